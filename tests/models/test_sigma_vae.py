"""σ² as part of the model (Lin, Roberts, Trigoni & Clark): closed form, gradient learning, in-place updates that
keep Adam's state, the per-pixel floor, and Algorithm 1's staged training."""

import math

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from ppl_vae.config import ModelConfig, TrainConfig, config_from_dict
from ppl_vae.data import DataBundle, load_data
from ppl_vae.distributions.likelihoods import GaussianLikelihood, build_likelihood, closed_form_sigma2
from ppl_vae.errors import ConfigError
from ppl_vae.models import build_model
from ppl_vae.training import plan_for, train

SITE = "likelihood.sigma2"


@pytest.fixture(scope="module")
def digits():
    d = load_data("digits", pixels="continuous", seed=0)
    return DataBundle.from_tensors(d.train_x[:300], val_x=d.val_x[:60], test_x=d.test_x[:60], name="digits300")


def sigma_vae(mode="learned", n=300, latent=2, hidden=(32,), **opts):
    cfg = ModelConfig(
        name="sigma_vae",
        likelihood="gaussian",
        latent_dim=latent,
        hidden=list(hidden),
        options={"sigma2_mode": mode, **opts},
    )
    torch.manual_seed(0)
    return build_model(cfg, (1, 8, 8), num_data=n)


def test_modes_build_and_validate():
    assert sigma_vae("fixed").sigma2() == 1.0
    m = sigma_vae("learned")
    assert m.sigma2_mode == "learned" and isinstance(m.likelihood, GaussianLikelihood)
    assert [st.name for st in plan_for(sigma_vae("per_pixel")).stages(TrainConfig())] == ["stage1", "stage2"]
    assert len(plan_for(sigma_vae("closed_form")).stages(TrainConfig())) == 1
    with pytest.raises(ConfigError, match=r"model.options.sigma2_mode must be one of .* got 'magic'"):
        sigma_vae("magic")
    with pytest.raises(ConfigError, match="model.likelihood must be 'gaussian'"):
        build_model(ModelConfig(name="sigma_vae", likelihood="bernoulli"), (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="model.options.stage2_epochs must be a positive integer, got 0"):
        sigma_vae("per_pixel", stage2_epochs=0)
    with pytest.raises(ConfigError, match="unknown keys"):
        sigma_vae("learned", sigma2_init=3)
    # the old API keeps working: fixed σ² and the same log-density
    lik = build_likelihood("gaussian", sigma2=0.25)
    out, x = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    ref = (-0.5 * math.log(2 * math.pi * 0.25) - (1 - 0.5) ** 2 / 0.5) * 4
    torch.testing.assert_close(lik(out).log_prob(x), torch.full((2,), ref))


def test_closed_form_sigma2_equals_mse_of_current_reconstructions(digits):
    """Eq. 9 on a step: after the model runs (training mode, gradients on), σ² is exactly the mean squared
    error of the reconstructions g(z) at the guide's draws z, and the ELBO's gradient in σ² is zero there."""
    m = sigma_vae("closed_form")
    m.train()
    x = digits.train_x[:50]
    guide_tr = poutine.trace(m.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(x)
    z = guide_tr.nodes["z"]["value"]
    with torch.no_grad():
        mse = (m.decode(z) - x).pow(2).mean()
    torch.testing.assert_close(m.likelihood.sigma2_value(), mse, rtol=2e-7, atol=0)  # exp(log v): 1-2 ulp
    torch.testing.assert_close(model_tr.nodes["x"]["fn"].base_dist.scale.pow(2).max().detach(), mse, rtol=1e-6, atol=0)
    # stationarity: d/dσ² [−(d/2) log σ² − SSE/(2σ²)] = 0 at σ² = SSE/d
    u = pyro.get_param_store()[SITE].unconstrained()
    model_tr.compute_log_prob()
    (g,) = torch.autograd.grad(model_tr.nodes["x"]["log_prob_sum"], [u])
    assert abs(float(g)) < 1e-3 * model_tr.nodes["x"]["log_prob"].numel() * 64
    # the epoch-wise version: S draws per datapoint from a seeded generator, checked against a direct computation
    m.eval()
    value = m.closed_form_sigma2(x, num_samples=3, seed=5, batch_size=20)
    gen = torch.Generator().manual_seed(5)
    total = 0.0
    with torch.no_grad():
        for s in range(0, 50, 20):
            xb = x[s : s + 20]
            loc, scale = m.encode(xb)
            eps = torch.randn((3, *loc.shape), generator=gen)
            total += float((m.decode(loc + scale * eps) - xb).pow(2).sum(dtype=torch.float64))
    assert value == pytest.approx(total / (3 * x.numel()), rel=1e-12)
    assert closed_form_sigma2(torch.zeros(3), torch.ones(3)) == 1.0
    # not in evaluation: no gradients → σ² unchanged
    m.likelihood.set_sigma2(0.3)
    with torch.no_grad():
        poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(x)
    assert float(m.likelihood.sigma2_value()) == pytest.approx(0.3)


def test_gradient_learned_sigma2_converges_to_closed_form_on_frozen_decoder(digits):
    """With encoder and decoder frozen, gradient ascent on the ELBO in σ² alone converges to E_q[MSE] (eq. 9):
    the gradient in u = log σ² is −d/2 + SSE/(2σ²), linear in SSE, so its expectation vanishes at σ² = E[SSE]/d.
    The reference uses 400 draws per image (its own Monte Carlo error is negligible). Noise: each step sees one
    draw per image, an estimate with standard deviation s (measured below over 40 seeds); ClippedAdam's decaying
    step (lr 0.05·0.985^t) averages ≳ 50 such steps at the end, so the final error is well inside 3·s."""
    m = sigma_vae("learned", n=100)
    x = digits.train_x[:100]
    m.eval()
    target = m.closed_form_sigma2(x, num_samples=400, seed=1)
    one_draw = torch.tensor([m.closed_form_sigma2(x, num_samples=1, seed=100 + k) for k in range(40)])
    s = float(one_draw.std())
    m.train()
    frozen = pyro.optim.ClippedAdam(lambda name, p: {"lr": 0.05 if name == SITE else 0.0, "lrd": 0.985})
    svi = SVI(m.model, m.guide, frozen, Trace_ELBO())  # lr 0 for every network weight: encoder/decoder frozen
    for _ in range(300):
        svi.step(x)
    learned = float(m.likelihood.sigma2_value())
    assert target < 0.5  # it moved a long way from the initial σ² = 1
    assert abs(learned - target) < 3 * s + 1e-4 * target, (learned, target, s)


@pytest.mark.parametrize("mode", ["learned", "closed_form"])
def test_in_place_update_keeps_adam_state(digits, mode):
    """set_sigma2 writes into the param store's unconstrained tensor: the same tensor object, the same Adam
    optimiser object, its moments untouched; a plain assignment would have made a new, orphaned tensor."""
    m = sigma_vae(mode)
    optim = pyro.optim.Adam({"lr": 0.01})
    svi = SVI(m.model, m.guide, optim, Trace_ELBO())
    for _ in range(5):
        svi.step(digits.train_x[:100])
    store = pyro.get_param_store()
    u = store[SITE].unconstrained()
    opt = optim.optim_objs[u]
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[u].items()}
    assert before["exp_avg_sq"].abs().sum() > 0
    m.likelihood.set_sigma2(0.123)
    assert store[SITE].unconstrained() is u and optim.optim_objs[u] is opt
    for k, v in before.items():
        assert torch.equal(torch.as_tensor(opt.state[u][k]), torch.as_tensor(v)), k
    assert float(store[SITE].detach()) == pytest.approx(0.123, rel=1e-6)
    assert u is m.likelihood._parameters["sigma2_unconstrained"]
    svi.step(digits.train_x[:100])  # the optimiser carries on with the same state
    assert optim.optim_objs[store[SITE].unconstrained()] is opt
    assert int(torch.as_tensor(opt.state[u]["step"])) == int(torch.as_tensor(before["step"])) + 1
    # why in place: assigning through the store replaces the tensor, and Adam's state is left behind
    store[SITE] = torch.tensor(0.5)
    assert store[SITE].unconstrained() is not u and store[SITE].unconstrained() not in optim.optim_objs


def test_fixed_sigma2_cannot_be_set():
    with pytest.raises(ValueError, match="fixed"):
        sigma_vae("fixed").likelihood.set_sigma2(0.1)
    with pytest.raises(ValueError, match="positive"):
        sigma_vae("learned").likelihood.set_sigma2(-1.0)


def test_per_pixel_variance_never_falls_below_half_the_dataset_variance(digits):
    m = sigma_vae("per_pixel")
    m.likelihood.set_sigma2(0.02)
    assert m.begin_stage2() == pytest.approx(0.02)
    assert m.per_pixel and m.sigma2() == pytest.approx(0.02)
    floor = 0.01
    z = torch.randn(500, 2) * 3
    with torch.no_grad():
        v0 = m.decode_variance(z)
        # stage 2 starts from the stage-1 likelihood: σ²_k(z) ≈ σ²_dataset everywhere
        torch.testing.assert_close(v0, torch.full_like(v0, 0.02), rtol=0.05, atol=0)
        last = [mod for mod in m.variance_net.net.modules() if getattr(mod, "bias", None) is not None][-1]
        last.bias.fill_(-80.0)  # drive v(z) = softplus(·) to 0
        v = m.decode_variance(z)
    assert v.shape == (500, 1, 8, 8)
    assert bool((v >= floor).all()) and float(v.min()) == pytest.approx(floor, rel=1e-6)
    # training cannot push it under the floor either
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(15):
        svi.step(digits.train_x[:100])
    with torch.no_grad():
        assert bool((m.decode_variance(torch.randn(1000, 2) * 4) >= floor).all())
        x = digits.train_x[:8]
        recon, var = m.reconstruct_with_variance(x)
    assert recon.shape == var.shape == x.shape
    # stage 2 does not read the global σ² any more
    tr = poutine.trace(m.model).get_trace(x)
    assert SITE not in [n for n, s in tr.nodes.items() if s["type"] == "param"]


def test_staged_training_follows_algorithm_1(digits, tmp_path):
    """Stage 1 stops when δELBO < ε₁ after n₁ epochs (here ε₁ is huge, so exactly at n₁ = 3); stage 2 starts
    from σ²_dataset, frozen, and the run folder holds both stages."""
    m = sigma_vae("per_pixel", stage2_epochs=2)
    s1 = TrainConfig(epochs=20, batch_size=100, lr=1e-2, stop_delta=1e9, min_epochs=3)
    s2 = plan_for(m).stages(s1)[1].train
    assert (s2.epochs, s2.stop_delta, s2.min_epochs) == (2, None, 1)
    res = train(m, digits, s1, run_dir=tmp_path, seed=0, progress=False)
    assert [h["stage"] for h in res.history] == [1, 1, 1, 2, 2]
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5]
    assert len(res.stages["stage1"].history) == 3 and res.stages["stage1"].stopped_early
    s2_value = res.history[2]["sigma2"]  # σ² at the end of stage 1
    assert m.sigma2() == pytest.approx(s2_value, rel=1e-6)  # σ²_dataset
    assert float(m.variance_net.floor) == pytest.approx(s2_value / 2, rel=1e-6)
    assert all(h["sigma2"] == pytest.approx(s2_value, rel=1e-6) for h in res.history[3:])  # frozen
    assert (tmp_path / "stage1" / "checkpoint.pt").is_file() and (tmp_path / "checkpoint.pt").is_file()
    assert res.history[3]["train_elbo"] > res.history[2]["train_elbo"] - 5.0  # no collapse at the switch
    # a fresh model restored from the stage-2 checkpoint is in stage 2 with the same floor
    m2 = sigma_vae("per_pixel", stage2_epochs=2)
    m2.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["module"])
    assert m2.per_pixel and float(m2.variance_net.floor) == pytest.approx(s2_value / 2, rel=1e-6)


def test_staged_plan_resumes_in_stage_2(digits, tmp_path):
    digits = DataBundle.from_tensors(digits.train_x[:100], val_x=digits.val_x[:20])
    s1 = TrainConfig(epochs=20, batch_size=50, lr=1e-2, stop_delta=1e9, min_epochs=2)
    m = sigma_vae("per_pixel", n=100, stage2_epochs=3)
    full = train(m, digits, s1, run_dir=tmp_path / "a", seed=0, progress=False)
    m = sigma_vae("per_pixel", n=100, stage2_epochs=2)
    train(m, digits, s1, run_dir=tmp_path / "b", seed=0, progress=False)
    m = sigma_vae("per_pixel", n=100, stage2_epochs=3)
    res = train(m, digits, s1, run_dir=tmp_path / "b", seed=0, resume=True, progress=False)
    assert [h["stage"] for h in res.history] == [1, 1, 2, 2, 2]
    assert [h["train_elbo"] for h in res.history] == pytest.approx([h["train_elbo"] for h in full.history], rel=1e-5)


def test_sigma_vae_runs_from_a_config_and_reloads_sigma2(tmp_path):
    from ppl_vae.experiment import load_run, run_experiment

    cfg = config_from_dict(
        {
            "name": "s",
            "device": "cpu",
            "data": {"name": "digits", "limit": 200},
            "model": {
                "name": "sigma_vae",
                "likelihood": "gaussian",
                "latent_dim": 2,
                "hidden": [16],
                "options": {"sigma2_mode": "closed_form", "closed_form_every": "epoch"},
            },
            "train": {"epochs": 2, "batch_size": 50},
        }
    )
    run = run_experiment(cfg, tmp_path / "run", progress=False, figures=False)
    trained = run.model.sigma2()
    assert trained < 0.5
    pyro.clear_param_store()
    again = load_run(tmp_path / "run", which="last")
    assert again.model.sigma2() == pytest.approx(trained, rel=1e-6)


def test_two_models_keep_their_own_sigma2(digits):
    """Pyro's param store is global and keyed by name: every sigma_vae's σ² is 'likelihood.sigma2'. A model run
    after another must use its own σ², and must not adopt (or overwrite) the other's."""
    from ppl_vae.training import fit

    x = DataBundle.from_tensors(digits.train_x[:100])
    a, b = sigma_vae("learned", n=100), sigma_vae("learned", n=100)
    fit((a.model, a.guide), x, TrainConfig(epochs=1, batch_size=50, lr=0.05), objective=Trace_ELBO(), progress=False)
    fit((b.model, b.guide), x, TrainConfig(epochs=3, batch_size=50, lr=0.05), objective=Trace_ELBO(), progress=False)
    sa, sb = a.sigma2(), b.sigma2()
    assert sa != pytest.approx(sb)
    tr = poutine.trace(a.model).get_trace(x.train_x[:10])  # b's σ² is in the store under the same name
    assert tr.nodes["x"]["fn"].base_dist.scale.pow(2).max().item() == pytest.approx(sa, rel=1e-6)
    assert a.sigma2() == pytest.approx(sa) and b.sigma2() == pytest.approx(sb)
    assert pyro.get_param_store()[SITE].unconstrained() is a.likelihood._own()
