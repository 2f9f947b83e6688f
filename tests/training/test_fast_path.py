"""The training path's fast parts: one Adam over all parameters (the same updates as Pyro's per-tensor Adam, old
checkpoints still resume), Pyro's checks on the first step only, the closed-form-KL default objective (against the
linear-Gaussian model's exact ELBO), and compiled ELBOs that trace once."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.util import is_validation_enabled

import ppl_vae
from ppl_vae import ModelConfig, TrainConfig, build_model, train
from ppl_vae.data import DataBundle
from ppl_vae.distributions.likelihoods import BernoulliLikelihood
from ppl_vae.infer.analytic_kl import AnalyticKLELBO
from ppl_vae.infer.jit import JitELBO
from ppl_vae.models import VAE2, LinearGaussianVAE
from ppl_vae.training import load_checkpoint
from ppl_vae.training.optim import ParamOptimizer


def _vae(num_data=60):
    return build_model(ModelConfig(name="vae", latent_dim=2, hidden=[16]), (1, 4, 4), num_data=num_data)


def _binary(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g).bernoulli(generator=g)


def test_one_adam_makes_the_same_updates_as_pyro_per_tensor_adam():
    x = _binary(20)
    params = {}
    for how in ("pyro", "one"):
        pyro.clear_param_store()
        torch.manual_seed(0)
        m = _vae()
        pyro.set_rng_seed(1)
        if how == "pyro":
            svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}, clip_args={"clip_norm": 0.5}), Trace_ELBO())
            for _ in range(5):
                svi.step(x)
        else:
            opt = ParamOptimizer(m, 1e-2, clip_norm=0.5)
            for _ in range(5):
                Trace_ELBO().loss_and_grads(m.model, m.guide, x)
                opt.step()
        params[how] = [p.detach().clone() for p in m.parameters()]
    for a, b in zip(params["pyro"], params["one"], strict=False):
        assert torch.equal(a, b)


def test_the_fused_adam_of_train_compile_makes_the_same_updates_to_rounding():
    x = _binary(20)
    params = {}
    for fused in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        m = _vae()
        pyro.set_rng_seed(1)
        opt = ParamOptimizer(m, 1e-2, clip_norm=0.5, fused=fused)
        assert opt.fused is fused and opt.optim.defaults["fused"] is (True if fused else None)
        for _ in range(5):
            Trace_ELBO().loss_and_grads(m.model, m.guide, x)
            opt.step()
        params[fused] = [p.detach().clone() for p in m.parameters()]
    for a, b in zip(params[False], params[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_pyro_param_created_by_a_step_joins_the_optimiser():
    x = torch.randn(10, 3)

    def model(x, y=None):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    opt = ParamOptimizer(None, 0.1)
    assert opt.params == []
    Trace_ELBO().loss_and_grads(model, lambda x, y=None: None, x)
    opt.step()
    assert len(opt.params) == 1 and float(pyro.param("loc").detach().abs().sum()) > 0


def test_a_checkpoint_with_pyro_optimiser_state_resumes(tmp_path):
    """Runs saved before the one-Adam loop hold pyro.optim.PyroOptim's state: it is loaded by parameter name."""
    data = DataBundle.from_tensors(_binary(60), val_x=_binary(20, 1))
    cfg = TrainConfig(epochs=2, batch_size=20, objective="elbo")
    pyro.set_rng_seed(0)
    whole = train(_vae(), data, cfg, run_dir=tmp_path / "whole", progress=False)
    pyro.set_rng_seed(0)
    train(_vae(), data, TrainConfig(**{**cfg.__dict__, "epochs": 1}), run_dir=tmp_path / "old", progress=False)
    ck = load_checkpoint(tmp_path / "old" / "checkpoint.pt")
    # rewrite the optimiser state into PyroOptim's format: {store name: a one-tensor torch Adam state_dict}
    ck["optim"] = {
        name: {"state": {0: st}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
        for name, st in ck["optim"]["state"].items()
    }
    torch.save(ck, tmp_path / "old" / "checkpoint.pt")
    pyro.set_rng_seed(0)
    resumed = train(_vae(), data, cfg, run_dir=tmp_path / "old", resume=True, progress=False)
    assert [h["train_elbo"] for h in resumed.history] == [h["train_elbo"] for h in whole.history]


def test_pyro_checks_run_on_the_first_step_only_unless_asked(tmp_path):
    seen = []

    class Watched(LinearGaussianVAE):
        def model(self, x, y=None):
            seen.append(is_validation_enabled())
            return super().model(x, y)

    data = DataBundle.from_tensors(torch.randn(40, 4))
    for every in (False, True):
        seen.clear()
        m = Watched(4, 2, num_data=40, guide_type="amortized")
        with pyro.validation_enabled(True):
            train(m, data, TrainConfig(epochs=2, batch_size=10, validate_every_step=every), progress=False)
        assert seen[0] is True
        assert all(seen) if every else not any(seen[1:])


def test_the_default_objective_uses_the_closed_form_kl_and_is_exact_in_it():
    """z-only linear-Gaussian model with a diagonal guide: with the KL in closed form the only noise left is the
    reconstruction term's; its mean is the closed-form ELBO."""
    pyro.set_rng_seed(0)
    m = LinearGaussianVAE(5, 2, sigma=0.5, guide_type="amortized", num_data=30, seed=1)
    x = m.simulate(30, torch.Generator().manual_seed(2))
    exact = float(m.exact_elbo(x).sum().detach())
    auto = ppl_vae.build_objective(TrainConfig())
    assert isinstance(auto, AnalyticKLELBO)
    with torch.no_grad():
        a = torch.tensor([-auto.loss(m.model, m.guide, x) for _ in range(400)])
    assert auto.analytic is True
    se = float(a.std()) / math.sqrt(len(a))
    assert abs(float(a.mean()) - exact) < 4 * se
    # with the same draw z, closed form − sampled = (log q(z) − log p(z)) − KL(q ‖ p), exactly
    with torch.no_grad():
        pyro.set_rng_seed(5)
        t = -Trace_ELBO().loss(m.model, m.guide, x)
        pyro.set_rng_seed(5)
        a1 = -auto.loss(m.model, m.guide, x)
        pyro.set_rng_seed(5)
        q = m.guide_dist(x)
        z = q.sample()
        p = dist.Normal(torch.zeros_like(z), 1.0).to_event(1)
        want = float((q.log_prob(z) - p.log_prob(z)).sum() - torch.distributions.kl_divergence(q, p).sum())
    assert a1 - t == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_the_default_objective_samples_where_the_guide_order_differs_from_the_model():
    """A two-layer VAE's guide draws z1 before z2, its model z2 before z1: the closed form would be wrong there,
    so the default objective is exactly Trace_ELBO (same draws, same value and gradient)."""
    x = _binary(8)
    m = VAE2((1, 4, 4), BernoulliLikelihood(), 4, 2, (8,), (8,), num_data=8)
    auto = AnalyticKLELBO()
    values = []
    for elbo in (auto, Trace_ELBO()):
        pyro.set_rng_seed(3)
        m.zero_grad()
        values.append((elbo.loss_and_grads(m.model, m.guide, x), [p.grad.clone() for p in m.parameters()]))
    assert auto.analytic is False
    assert values[0][0] == values[1][0]
    assert all(torch.equal(a, b) for a, b in zip(values[0][1], values[1][1], strict=False))


def test_compiled_elbo_traces_once_per_batch_shape():
    calls = []

    class Counted(LinearGaussianVAE):
        def model(self, x, y=None):
            calls.append(len(x))
            return super().model(x, y)

    m = Counted(4, 2, num_data=50, guide_type="amortized")
    data = DataBundle.from_tensors(torch.randn(50, 4))
    elbos = {}
    for mean_field in (False, True):
        calls.clear()
        jit = JitELBO(mean_field=mean_field)
        opt = ParamOptimizer(m, 1e-3)
        for epoch in range(3):
            for xb, _ in data.batches("train", 20, shuffle=True, epoch=epoch):  # 20, 20 and a last batch of 10
                jit.loss_and_grads(m.model, m.guide, xb)  # a new bound method each call, as users write
                opt.step()
        assert jit.traces == 2  # one graph per batch shape
        assert len(calls) <= 2 * 3  # the Python model ran only while tracing
        elbos[mean_field] = jit
    # Pyro's own JitTraceMeanField_ELBO would retrace on every call; ours reuses its graph
    assert calls.count(20) <= 3


def test_train_jit_trains_and_refuses_a_warm_up():
    data = DataBundle.from_tensors(_binary(60), val_x=_binary(20, 1))
    res = train(_vae(), data, TrainConfig(epochs=2, batch_size=20, objective="elbo", jit=True), progress=False)
    assert all(math.isfinite(h["val_elbo"]) for h in res.history)
    with pytest.raises(ppl_vae.ConfigError, match="train.jit must be false with train.kl_warmup_epochs"):
        TrainConfig(jit=True, kl_warmup_epochs=2).validate()
