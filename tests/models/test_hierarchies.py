"""The Variational Ladder Autoencoder (vladder), the Markov hierarchical VAE (hvae) and the per-site latent analysis
(active units, KL per site, posterior means), checked against exact oracles where one exists."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from ppl_vae.config import ModelConfig
from ppl_vae.distributions.likelihoods import build_likelihood
from ppl_vae.evaluate import (
    active_units,
    kl_per_site,
    log_likelihood_summary,
    posterior_means,
)
from ppl_vae.infer import TraceIWAE
from ppl_vae.models import HVAE, VLadder, build_model
from ppl_vae.nn.ladder_nets import GatedAdd


def linear_ladder(seed=0, combination="concat"):
    torch.manual_seed(seed)
    lik = build_likelihood("gaussian", sigma2=0.5, link="identity")
    return VLadder((6,), lik, [1, 1, 1], hidden=(8,), act="identity", combination=combination).double()


def affine_map(m: VLadder):
    """b and W of the (affine) decoder mean: x = W z + b + noise, z = [z1, z2, z3]."""
    with torch.no_grad():
        b = m.decode(torch.zeros(1, m.latent_dim, dtype=torch.float64))[0]
        W = torch.stack(
            [m.decode(torch.eye(m.latent_dim, dtype=torch.float64)[j : j + 1])[0] - b for j in range(m.latent_dim)], 1
        )
    return W, b


@pytest.mark.parametrize("combination", ["concat", "gated"])
def test_linear_ladder_is_linear_gaussian_and_log_likelihood_converges_to_the_exact_value(combination):
    m = linear_ladder(0, combination)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 0.02}), TraceMeanField_ELBO())
    for _ in range(300):  # a reasonable guide: importance sampling needs it, the oracle does not
        svi.step(x)
    W, b = affine_map(m)
    z = torch.randn(5, m.latent_dim, dtype=torch.float64)
    torch.testing.assert_close(m.decode(z).detach(), z @ W.T + b)  # affine, exactly
    cov = W @ W.T + 0.5 * torch.eye(6, dtype=torch.float64)
    xt = x[:20]
    exact = float(dist.MultivariateNormal(b, cov).log_prob(xt).mean())
    res = log_likelihood_summary(m.model, m.guide, xt, 20_000, seed=0)
    assert abs(res["log_likelihood"] - exact) < 5 * res["mc_std_error"] + 1e-6
    # the factorised guide cannot match the correlated exact posterior: the ELBO is strictly below
    elbo = -Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1).loss(m.model, m.guide, xt)
    assert elbo / len(xt) < exact - 0.01


def test_ladder_sites_objectives_and_gradients():
    x = torch.rand(5, 1, 8, 8)
    for name, opts in (
        ("vladder", {"combination": "gated"}),
        ("vladder", {"combination": "concat", "layers": 2}),
        ("hvae", {"layers": 4}),
    ):
        m = build_model(ModelConfig(name=name, latent_dim=2, hidden=[16, 16], options=opts), (1, 8, 8), num_data=5)
        L = opts.get("layers", 3)
        tr = pyro.poutine.trace(m.guide).get_trace(x)
        assert [n for n in tr.nodes if n.startswith("z")] == [f"z{l}" for l in range(1, L + 1)]
        for elbo in (Trace_ELBO(), TraceIWAE(num_particles=3)):
            assert math.isfinite(elbo.loss(m.model, m.guide, x))
        if name == "vladder":  # independent layers: the mean-field ELBO is valid and Pyro agrees
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert math.isfinite(TraceMeanField_ELBO().loss(m.model, m.guide, x))
        m.zero_grad()
        Trace_ELBO().loss_and_grads(m.model, m.guide, x)
        missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, (name, missing)
        assert m.sample(3).shape == (3, 1, 8, 8) and m.reconstruct(x).shape == x.shape
        assert m.encode(x)[0].shape == (5, 2 * L)


def test_gated_add_starts_at_a_tenth_and_adds():
    gate = GatedAdd(4, 2)
    assert torch.equal(gate.gate.detach(), torch.full((4,), 0.1))
    s, z = torch.randn(3, 4), torch.randn(3, 2)
    torch.testing.assert_close(gate(s, z), s + 0.1 * gate.fc(z))
    m = build_model(ModelConfig(name="vladder", latent_dim=2, hidden=[16], options={"layers": 3}), (1, 8, 8))
    assert len(m.decoder.combine) == 2 and all(isinstance(c, GatedAdd) for c in m.decoder.combine)


def test_hvae_upper_layers_enter_x_only_through_z1():
    m = build_model(ModelConfig(name="hvae", latent_dim=2, hidden=[16], options={"layers": 3}), (1, 8, 8))
    assert isinstance(m, HVAE)
    z = torch.randn(4, 6)
    z2 = z.clone()
    z2[:, 2:] = torch.randn(4, 4)
    torch.testing.assert_close(m.decode(z), m.decode(z2))


# ------------------------------------------------------------------------------------------------ latent analysis
def test_active_units_counts_the_units_whose_mean_varies_with_x():
    # q(z|x) = N(A x, 0.3²): Var_x E[z_u|x] = ‖A_u‖² for x ~ N(0, I) = 1, 0.0025, 0.25 → 2 of 3 active
    A = torch.tensor([[1.0, 0.0], [0.03, 0.04], [0.0, 0.5]])

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ A.T, 0.3).to_event(1))

    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    au = active_units(guide, x)
    assert au["z"]["active"] == 2 and au["z"]["dims"] == 3
    for v, expected in zip(au["z"]["variance"], (1.0, 0.0025, 0.25), strict=True):
        assert v == pytest.approx(expected, abs=5 * expected * math.sqrt(2 / 4000))
    torch.testing.assert_close(posterior_means(guide, x)["z"], x @ A.T)
    with pytest.raises(ValueError, match="threshold"):
        active_units(guide, x, threshold=-1)


def test_kl_per_site_matches_the_closed_form_of_each_layer():
    m = linear_ladder(2)
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    S = 400
    kl = kl_per_site(m.model, m.guide, x, num_samples=S)
    with torch.no_grad():
        params = m.encoder(x)
    for l, (loc, scale) in enumerate(params, 1):
        q, p = dist.Normal(loc, scale), dist.Normal(torch.zeros_like(loc), torch.ones_like(loc))
        exact = float(torch.distributions.kl_divergence(q, p).sum(-1).mean())
        z = q.sample((S,))
        per = (q.log_prob(z) - p.log_prob(z)).sum(-1)  # the estimator's terms, for its variance
        se = float(per.std() / math.sqrt(per.numel()))
        assert kl[f"z{l}"] == pytest.approx(exact, abs=5 * se + 1e-9)
    assert set(kl) == {"z1", "z2", "z3"}


# ------------------------------------------------------------------------------------------------ VLAC
def vlac(coding="mixture", **opts):
    cfg = ModelConfig(
        name="vlac",
        latent_dim=2,
        hidden=[16],
        options={"warmup_epochs": 0, "num_components": 3, "coding": coding, **opts},
    )
    return build_model(cfg, (1, 8, 8)).double()


def test_vlac_codings_are_the_same_objective_on_the_same_draws():
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    a, b = vlac("mixture"), vlac("enumerate")
    b.load_state_dict(a.state_dict())
    for layers in (None, [2]):
        if layers:
            a, b = vlac("mixture", mixture_layers=layers), vlac("enumerate", mixture_layers=layers)
            b.load_state_dict(a.state_dict())
        pyro.set_rng_seed(0)
        la = Trace_ELBO(max_plate_nesting=1).loss(a.model, a.guide, x)
        pyro.set_rng_seed(0)
        lb = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(b.model, b.guide, x)
        assert la == pytest.approx(lb, rel=1e-12)
    from ppl_vae import plan_for
    from ppl_vae.config import TrainConfig
    from ppl_vae.models.vlac import EnumeratedClusters

    objective = plan_for(b).objective(TrainConfig())
    assert isinstance(objective, EnumeratedClusters) and isinstance(objective.current(), pyro.infer.TraceEnum_ELBO)
    b.mixture_on.fill_(False)  # the warm-up's N(0, I) priors have no c to sum out
    assert type(objective.current()) is Trace_ELBO


def test_vlac_enumerate_coding_trains_and_evaluates_without_pyro_warnings(tmp_path, capsys):
    """Warm-up epochs (no c site), then TraceEnum_ELBO; the test ELBO sums c out too: no warning reaches the user."""
    import warnings

    from ppl_vae.cli import main

    args = ["train", "vlac_digits", "--run-dir", str(tmp_path / "run"), "data.limit=200"]
    args += ["model.options.coding=enumerate", "model.options.warmup_epochs=1", "model.hidden=[16]"]
    args += ["train.epochs=2", "eval.num_samples=4", "model.options.num_components=3", "--no-figures"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(args) == 0
    err = capsys.readouterr().err
    assert "enumeration" not in err and "not guide" not in err, err


def test_vlac_cluster_assignment_by_bayes_rule_and_by_infer_discrete_agree():
    m = vlac("mixture")
    with torch.no_grad():
        for mix in m.mixtures.values():
            mix.loc.copy_(torch.tensor([[-3.0, 0.0], [0.0, 3.0], [3.0, 0.0]], dtype=torch.float64))
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)).double() * 4
    mus = [loc for loc, _ in m.encoder(x)]
    post = m.cluster_posterior(x)
    for l in (1, 2, 3):
        direct = m.cluster(x, l)
        torch.testing.assert_close(post[f"c{l}"], direct)
        expected = m.mixtures[str(l)].cluster_log_probs(mus[l - 1]).argmax(-1)
        torch.testing.assert_close(direct, expected)
    assert m.coding == "mixture"  # cluster_posterior leaves the model's coding alone
    with pytest.raises(ValueError, match="no mixture"):
        vlac(mixture_layers=[1]).cluster(x, 3)


def test_cluster_accuracy_is_one_on_separated_mixtures_and_ignores_label_names():
    from ppl_vae.distributions.priors import LearnedMixturePrior
    from ppl_vae.evaluate import cluster_accuracy, cluster_scores

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-8.0, 0.0], [0.0, 8.0], [8.0, 0.0], [0.0, -8.0]])
    y = torch.arange(4).repeat_interleave(100)
    z = centres[y] + torch.randn(400, 2, generator=g)
    prior = LearnedMixturePrior(4, 2)
    prior.init_from(z)
    pred = prior.cluster_log_probs(z).argmax(-1)
    assert cluster_accuracy(y, pred) == 1.0
    perm = torch.tensor([2, 0, 3, 1])
    assert cluster_accuracy(y, perm[pred]) == 1.0 and cluster_scores(perm[y], pred)["nmi"] == pytest.approx(1.0)
    # one cluster merged into another: exactly a quarter is lost
    merged = torch.where(pred == pred[0], pred[150], pred)
    assert cluster_accuracy(y, merged) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="same length"):
        cluster_accuracy(y, pred[:10])


def test_vlac_warm_up_fits_the_mixtures_then_scores(tmp_path):
    from ppl_vae import train
    from ppl_vae.config import TrainConfig
    from ppl_vae.data import DataBundle

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 1, 8, 8, generator=g) > 0.5).float()
    data = DataBundle.from_tensors(x, None, x[:16], None, x[:16], None)
    m = build_model(
        ModelConfig(
            name="vlac", latent_dim=2, hidden=[16], options={"warmup_epochs": 2, "num_components": 3, "fit_points": 64}
        ),
        (1, 8, 8),
        num_data=64,
    )
    before = m.mixtures["3"].loc.detach().clone()
    res = train(m, data, TrainConfig(epochs=4, batch_size=16), seed=0, progress=False)
    assert [r["mixture_on"] for r in res.history] == [False, True, True, True]
    assert res.best_epoch >= 3 and bool(m.mixture_on)
    assert not torch.equal(before, m.mixtures["3"].loc.detach())
    m.zero_grad()
    Trace_ELBO().loss_and_grads(m.model, m.guide, x[:8])
    assert all(p.grad is not None for p in m.parameters())


def test_layer_and_component_figures(tmp_path):
    from ppl_vae.viz import plot_component_generation, plot_layer_traversal

    m = vlac().float()
    for l in (1, 2, 3):
        assert plot_layer_traversal(m, tmp_path / f"t{l}.png", l).endswith(".png")
    assert plot_component_generation(m, tmp_path / "c.png", 3).endswith(".png")
    with pytest.raises(ValueError, match="layer must be"):
        plot_layer_traversal(m, tmp_path / "bad.png", 4)


@pytest.mark.parametrize("name", ["vladder", "vlac"])
def test_conv_ladders_train_and_keep_the_data_shape(name):
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    m = build_model(
        ModelConfig(
            name=name,
            arch="conv",
            channels=8,
            latent_dim=2,
            hidden=[32],
            options={"layers": 3, **({"warmup_epochs": 0} if name == "vlac" else {})},
        ),
        (1, 28, 28),
    )
    assert isinstance(m.encoder.up[0][0][0], torch.nn.Conv2d)
    loss = TraceIWAE(num_particles=3).loss(m.model, m.guide, x)
    assert math.isfinite(loss)
    assert m.reconstruct(x).shape == x.shape and m.sample(2).shape == (2, 1, 28, 28)
    m.zero_grad()
    Trace_ELBO().loss_and_grads(m.model, m.guide, x)
    assert all(p.grad is not None for p in m.parameters())


def test_exponential_kl_warm_up_is_the_official_shape():
    from ppl_vae.config import TrainConfig
    from ppl_vae.errors import ConfigError

    cfg = TrainConfig(kl_warmup_epochs=25, kl_warmup_shape="exp")
    assert [cfg.beta_at(e) for e in (0, 24, 99)] == pytest.approx(
        [1 - math.exp(-1 / 25), 1 - math.exp(-1), 1 - math.exp(-4)]
    )
    assert TrainConfig(kl_warmup_epochs=4).beta_at(1) == 0.5  # the linear default is unchanged
    with pytest.raises(ConfigError, match="kl_warmup_shape"):
        TrainConfig(kl_warmup_shape="cosine").validate()


def _official_ladder(name, batch_norm=True, hidden=(16, 16)):
    cfg = ModelConfig(
        name=name,
        latent_dim=2,
        hidden=list(hidden),
        likelihood="laplace",
        laplace_scale=0.125,
        link="sigmoid",
        options={"layers": 3, "batch_norm": batch_norm},
    )
    return build_model(cfg, (1, 8, 8), num_data=20)


@pytest.mark.parametrize("name", ["vladder", "hvae"])
def test_batch_norm_option_adds_batch_norm_trains_and_is_deterministic_in_eval(name):
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = build_model(ModelConfig(name=name, latent_dim=2, hidden=[16, 16]), (1, 8, 8), num_data=20)
    assert not any(isinstance(mod, torch.nn.BatchNorm1d) for mod in plain.modules())  # the default is unchanged
    torch.manual_seed(0)
    m = _official_ladder(name)
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm1d)]
    # one per hidden Linear: vladder 3 up + 3 down steps × 2 and f_0's one; hvae 6 networks × 2
    assert len(norms) == (13 if name == "vladder" else 12)
    # the official likelihood: a Laplace with scale 1/8 on the sigmoid mean
    raw = torch.randn(2, 1, 8, 8)
    lp = m.likelihood(raw, event_dim=3, x=x[:2]).log_prob(x[:2])
    torch.testing.assert_close(lp, dist.Laplace(torch.sigmoid(raw), 0.125).log_prob(x[:2]).sum((1, 2, 3)))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    before = [p.detach().clone() for p in m.parameters()]
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert math.isfinite(svi.step(x))
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert all(float(n.running_mean.abs().sum()) > 0 for n in norms)  # the batch statistics were tracked
    assert math.isfinite(TraceIWAE(num_particles=3).loss(m.model, m.guide, x))  # particles × batch through the norms
    m.eval()
    with torch.no_grad():
        r = m.reconstruct(x)
        torch.testing.assert_close(m.reconstruct(x), r, rtol=0, atol=0)
        torch.testing.assert_close(m.reconstruct(x[:3]), r[:3])  # running statistics: no dependence on the batch
    res = log_likelihood_summary(m.model, m.guide, x[:4], 20, seed=0)
    assert math.isfinite(res["log_likelihood"])


@pytest.mark.parametrize("name", ["vladder", "hvae"])
def test_batch_norm_option_refuses_a_non_boolean(name):
    from ppl_vae.errors import ConfigError

    with pytest.raises(ConfigError, match="model.options.batch_norm"):
        build_model(
            ModelConfig(name=name, latent_dim=2, hidden=[16], options={"batch_norm": "yes"}), (1, 8, 8), num_data=4
        )


@pytest.mark.parametrize("name", ["vladder", "hvae"])
def test_layer_grids_decode_one_layer_over_a_grid_with_the_others_fixed(tmp_path, name):
    from PIL import Image

    from ppl_vae.viz import plot_layer_grids
    from ppl_vae.viz.hierarchy import _layer_grid

    torch.manual_seed(1)
    m = _official_ladder(name, batch_norm=False, hidden=(32, 32)).eval()
    with torch.no_grad():
        # decode_layers: a None layer is its prior mean given the layers above
        z = [torch.randn(4, 2) for _ in range(3)]
        if name == "vladder":
            torch.testing.assert_close(m.decode_layers(z), m.decode(torch.cat(z, -1)))
            filled = m.decode_layers([z[0], None, None])
            torch.testing.assert_close(filled, m.decode(torch.cat([z[0], torch.zeros(4, 4)], -1)))
        else:
            torch.testing.assert_close(m.decode_layers(z), m.decode(torch.cat(z, -1)))  # only z_1 reaches x
            z1 = m.down[0](m.down[1](z[2])[0])[0]
            torch.testing.assert_close(m.decode_layers([None, None, z[2]]), m.decode_layers([z1, None, None]))
        for layer in (1, 2, 3):
            tiles = _layer_grid(m, layer, [None] * 3, 5, 2.0)
            assert tiles.shape == (5, 5, 1, 8, 8)
            assert float(tiles.flatten(2).std(dim=(0, 1)).max()) > 1e-4, f"layer {layer} changes nothing"
        x = torch.rand(1, 1, 8, 8)
        base = list(m.encode(x)[0].split(m.latent_dims, dim=-1))
        for layer in (2, 3):  # given x's codes the Markov model's x depends on z_1 alone: flat upper panels
            spread = float(_layer_grid(m, layer, base, 5, 2.0).flatten(2).std(dim=(0, 1)).max())
            assert (spread > 1e-4) == (name == "vladder")
    a = plot_layer_grids(m, tmp_path / "a.png")
    b = plot_layer_grids(m, tmp_path / "b.png")
    with Image.open(a) as ia, Image.open(b) as ib:
        assert a.endswith(".png") and ia.format == "PNG"
        assert np.array_equal(np.asarray(ia), np.asarray(ib))  # deterministic
    assert plot_layer_grids(m, tmp_path / "x.png", x=torch.rand(2, 1, 8, 8)).endswith(".png")
    assert m.training is False
    with pytest.raises(ValueError, match="steps"):
        plot_layer_grids(m, tmp_path / "bad.png", steps=1)
