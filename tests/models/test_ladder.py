"""LaDDer: the nested bound against exact log p(x) on a linear-Gaussian ladder, the hyperpriors against
scikit-learn, the schedule, checkpoints of the fitted mixture and compatibility with Pyro's inference tools."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import DataBundle
from ppl_vae.distributions.hyperpriors import BGMHyperprior, StickBreakingHyperprior
from ppl_vae.distributions.likelihoods import FlooredLaplace, GaussianLikelihood
from ppl_vae.errors import ConfigError
from ppl_vae.evaluate.likelihood import log_likelihood
from ppl_vae.infer.importance import importance_log_weights
from ppl_vae.infer.iwae import TraceIWAE
from ppl_vae.models import LaDDer, build_model
from ppl_vae.training import plan_for, train

# ------------------------------------------------------------------------------------------------------------
# A linear-Gaussian ladder:  t ~ Σ_k w_k N(m_k, S_k),  z = B t + σz ε,  x = A z + σx ε'
# ------------------------------------------------------------------------------------------------------------

D, DZ, DT = 5, 3, 3
SX, SZ = 0.4, 0.3


class LinearGauss(nn.Module):
    """(loc, scale) = (x Mᵀ, s): a linear diagonal-Gaussian encoder with fixed weights."""

    def __init__(self, M, s):
        super().__init__()
        self.register_buffer("M", torch.as_tensor(M, dtype=torch.float))
        self.register_buffer("s", torch.as_tensor(s, dtype=torch.float))

    def forward(self, x, c=None):
        loc = x @ self.M.T
        return loc, self.s.expand_as(loc)


class Linear(nn.Module):
    def __init__(self, M):
        super().__init__()
        self.register_buffer("M", torch.as_tensor(M, dtype=torch.float))

    def forward(self, v, c=None):
        return v @ self.M.T


def _linear_ladder(hyper_w=None, hyper_m=None, hyper_S=None, exact_guide=True, perturb=0.0):
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    a = torch.tensor([1.5, 1.0, 0.7])
    A = Q[:, :DZ] * a  # orthogonal columns: AᵀA = diag(a²)
    Bm = torch.diag(torch.tensor([1.2, 0.8, 0.5]))
    # exact posteriors for the single N(0, I) hyperprior (all diagonal by construction)
    var_z = Bm.diagonal() ** 2 + SZ**2  # diag of Σ_z = BBᵀ + σz² I
    post_var_z = 1.0 / (1.0 / var_z + a**2 / SX**2)
    Mz = (post_var_z.unsqueeze(1) * A.T) / SX**2  # E[z|x] = Mz x
    post_var_t = 1.0 / (1.0 + Bm.diagonal() ** 2 / SZ**2)
    Mt = (post_var_t.unsqueeze(1) * Bm.T) / SZ**2  # E[t|z] = Mt z
    sz, st = post_var_z.sqrt(), post_var_t.sqrt()
    if not exact_guide:
        Mz, sz = Mz * (1 + perturb), sz * (1 + perturb)
        Mt, st = Mt * (1 - perturb), st * (1 + 2 * perturb)
    hp = BGMHyperprior(DT, 1 if hyper_w is None else len(hyper_w))
    if hyper_w is not None:
        hp.weights.copy_(torch.as_tensor(hyper_w, dtype=torch.float))
        hp.means.copy_(torch.as_tensor(hyper_m, dtype=torch.float))
        hp.covariances.copy_(torch.as_tensor(hyper_S, dtype=torch.float))
    lik = GaussianLikelihood(SX**2, link="identity")
    model = LaDDer(
        LinearGauss(Mz, sz),
        Linear(A),
        lik,
        DZ,
        inner_encoder=LinearGauss(Mt, st),
        inner_decoder=Linear(Bm),
        hyperprior=hp,
        t_dim=DT,
        prior="ladder",
        warmup_epochs=0,
        inner_sigma=SZ,
        inner_sigma_bounds=(SZ, SZ),
        learn_inner_sigma=False,
    )
    return model, A, Bm


def _exact_log_px(model, A, Bm, x):
    hp = model.hyperprior
    comps = []
    for w, m, S in zip(hp.weights, hp.means, hp.covariances, strict=False):
        cz = Bm @ S @ Bm.T + SZ**2 * torch.eye(DZ)
        cx = A @ cz @ A.T + SX**2 * torch.eye(D)
        comps.append(math.log(float(w)) + dist.MultivariateNormal(A @ Bm @ m, covariance_matrix=cx).log_prob(x))
    return torch.logsumexp(torch.stack(comps), 0)


def _exact_log_pz(model, Bm, z):
    hp = model.hyperprior
    comps = []
    for w, m, S in zip(hp.weights, hp.means, hp.covariances, strict=False):
        cz = Bm @ S @ Bm.T + SZ**2 * torch.eye(DZ)
        comps.append(math.log(float(w)) + dist.MultivariateNormal(Bm @ m, covariance_matrix=cz).log_prob(z))
    return torch.logsumexp(torch.stack(comps), 0)


def _simulate(model, A, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    hp = model.hyperprior
    k = torch.multinomial(hp.weights, n, replacement=True, generator=g)
    L = torch.linalg.cholesky(hp.covariances)
    t = hp.means[k] + (L[k] @ torch.randn(n, DT, 1, generator=g)).squeeze(-1)
    z = model.inner_decoder(t) + SZ * torch.randn(n, DZ, generator=g)
    return z @ A.T + SX * torch.randn(n, D, generator=g)


def test_exact_nested_guide_makes_every_weight_equal_log_px():
    """With t ~ N(0, I) and the exact posteriors q(z|x) = p(z|x), q(t|z) = p(t|z) = p(t|z, x), the nested bound is
    tight: log p(t) + log p(z|t) + log p(x|z) − log q(z|x) − log q(t|z) = log p(x) for every draw (float32
    round-off only: tolerance 1e-3 nats)."""
    model, A, Bm = _linear_ladder()
    x = _simulate(model, A, 20)
    exact = _exact_log_px(model, A, Bm, x)
    lw = importance_log_weights(model.model, model.guide, (x,), num_particles=50, max_plate_nesting=1).log_w
    assert lw.shape == (50, 20)
    assert torch.allclose(lw, exact.expand_as(lw), atol=1e-3)
    elbo = -Trace_ELBO(num_particles=1).loss(model.model, model.guide, x) / len(x)
    assert abs(elbo - exact.mean().item()) < 1e-3
    # ELBO_in(z) = log p(z) exactly for any z
    z = torch.randn(7, DZ)
    assert torch.allclose(model.inner_elbo(z), _exact_log_pz(model, Bm, z), atol=1e-3)


def test_nested_bound_below_exact_log_px_with_mixture_hyperprior():
    """A 2-component Gaussian-mixture hyperprior and a deliberately wrong guide: the Monte Carlo nested ELBO
    (S = 4000 draws, standard error se = std(log w)/√S) stays below the exact log p(x) (assert ELBO − 4·se ≤ exact
    per datapoint, i.e. the bound holds beyond 4 standard errors), and the inner ELBO stays below exact log p(z).
    The importance-sampled estimate with the same proposal approaches log p(x) (|IS − exact| < 5 delta-method
    standard errors + 0.02 nats)."""
    w = [0.3, 0.7]
    m = [[-2.0, 1.0, 0.0], [1.5, -1.0, 0.5]]
    S = [np.diag([0.3, 0.5, 0.4]).tolist(), np.diag([0.6, 0.2, 0.3]).tolist()]
    model, A, Bm = _linear_ladder(w, m, S, exact_guide=False, perturb=0.2)
    x = _simulate(model, A, 12, seed=3)
    exact = _exact_log_px(model, A, Bm, x)
    Snum = 4000
    lw = importance_log_weights(model.model, model.guide, (x,), num_particles=Snum, max_plate_nesting=1).log_w
    elbo, se = lw.mean(0), lw.std(0) / math.sqrt(Snum)
    assert (elbo - 4 * se <= exact).all()
    assert (elbo < exact).all()
    ll, ess = log_likelihood(model.model, model.guide, x, num_samples=Snum, seed=0, return_ess=True)
    mc_se = (1.0 / ess - 1.0 / Snum).clamp(min=0).sqrt()
    assert ((ll - exact).abs() < 5 * mc_se + 0.02).all()
    z = torch.randn(9, DZ)
    inner = torch.stack([model.inner_elbo(z, num_samples=2000)])[0]
    assert (inner < _exact_log_pz(model, Bm, z)).all()


# ------------------------------------------------------------------------------------------------------------
# Hyperpriors against scikit-learn
# ------------------------------------------------------------------------------------------------------------


def _blobs(n=600, seed=0):
    r = np.random.RandomState(seed)
    c = np.array([[-3.0, 0.0], [3.0, 1.0], [0.0, 4.0]])
    return np.concatenate([r.randn(n // 3, 2) * s + ci for ci, s in zip(c, (0.5, 0.8, 0.3), strict=False)])


@pytest.mark.parametrize("wtype", ["dirichlet_distribution", "dirichlet_process"])
def test_bgm_log_density_matches_sklearn(wtype):
    """The plug-in mixture equals ``GaussianMixture.score_samples`` with the BGM's weights_, means_, covariances_;
    ``expected_log_prob`` equals ``BayesianGaussianMixture.score_samples``. Buffers are float32, so agreement is
    to float32 precision (atol 1e-4 on values of order 10)."""
    from sklearn.mixture import GaussianMixture

    hp = BGMHyperprior(2, 6, weight_concentration_prior_type=wtype).fit(_blobs())
    bgm = hp._bgm
    pts = np.random.RandomState(1).randn(50, 2) * 3
    gm = GaussianMixture(6, covariance_type="full")
    gm.weights_, gm.means_, gm.covariances_ = bgm.weights_, bgm.means_, bgm.covariances_
    gm.precisions_cholesky_ = bgm.precisions_cholesky_
    ours = hp.log_prob(torch.tensor(pts, dtype=torch.float)).double().numpy()
    np.testing.assert_allclose(ours, gm.score_samples(pts), atol=1e-4)
    np.testing.assert_allclose(hp.expected_log_prob(torch.tensor(pts)).numpy(), bgm.score_samples(pts), atol=1e-4)
    assert 1 <= hp.active_components() <= 6


def test_bgm_buffers_travel_in_state_dict():
    hp = BGMHyperprior(2, 4).fit(_blobs())
    fresh = BGMHyperprior(2, 4)
    fresh.load_state_dict(hp.state_dict())
    t = torch.randn(10, 2)
    assert torch.equal(fresh.log_prob(t), hp.log_prob(t))
    assert int(fresh.num_fits) == 1


def test_stick_breaking_is_a_normalised_mixture():
    """Weights sum to 1 and the density integrates to 1 (Riemann sum on a 400² grid over [-12, 12]²: error
    well below 1e-3 for these smooth, well-contained components)."""
    hp = StickBreakingHyperprior(2, 6, init_scale=1.0)
    with torch.no_grad():
        hp.stick_logits.normal_()
        hp.raw_scales.normal_(0, 0.3)
    w = hp.weights().detach()
    assert torch.all(w > 0) and abs(float(w.sum()) - 1) < 1e-6
    g = torch.linspace(-12, 12, 400)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    with torch.no_grad():
        dens = hp.log_prob(torch.stack([xx.ravel(), yy.ravel()], 1)).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(dens) - 1) < 1e-3
    assert torch.isfinite(hp.log_prior())


# ------------------------------------------------------------------------------------------------------------
# The model built from a configuration: schedule, checkpoints, inference tools
# ------------------------------------------------------------------------------------------------------------


def _tiny_data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    x[: n // 2, :, :3] *= 0.2
    return DataBundle.from_tensors(x[:100], val_x=x[100:], test_x=x[100:])


def _tiny_cfg(**opts):
    base = {"warmup_epochs": 1, "num_components": 4, "inner_hidden": [16], "fit_points": 100, "bgm_max_iter": 50}
    base.update(opts)
    return ModelConfig(name="ladder", latent_dim=4, hidden=[32], options=base)


def test_schedule_refit_and_checkpoint_roundtrip():
    data = _tiny_data()
    model = build_model(_tiny_cfg(warmup_epochs=2), data.shape, num_data=100)
    assert not model.ladder_active
    tr = pyro.poutine.trace(model.guide).get_trace(data.train_x[:8])
    assert "t" not in tr.nodes
    res = train(model, data, TrainConfig(epochs=3, batch_size=50), progress=False)
    assert [h["ladder_on"] for h in res.history] == [False, True, True]
    assert int(model.hyperprior.num_fits) == 3
    assert all(math.isfinite(h["train_elbo"]) for h in res.history)
    assert float(model.likelihood.eval_floor) > 0
    tr = pyro.poutine.trace(model.guide).get_trace(data.train_x[:8])
    assert "t" in tr.nodes
    fresh = build_model(_tiny_cfg(warmup_epochs=2), data.shape, num_data=100)
    fresh.load_state_dict(model.state_dict())
    assert fresh.ladder_active
    t = torch.randn(5, 2)
    assert torch.equal(fresh.hyperprior.log_prob(t), model.hyperprior.log_prob(t))


def test_experiment_scores_only_ladder_epochs(tmp_path):
    """LaDDer's plan scores epochs from warmup_epochs + 1 on: best.pt is never an N(0, I) epoch."""
    from ppl_vae.config import Config, DataConfig
    from ppl_vae.experiment import run_experiment

    cfg = Config(
        name="ladder_tiny",
        data=DataConfig(name="digits", limit=200),
        model=_tiny_cfg(warmup_epochs=2),
        train=TrainConfig(epochs=3, batch_size=50),
    )
    run = run_experiment(cfg, tmp_path / "run", progress=False, figures=False)
    assert plan_for(run.model).stages(cfg.train)[0].first_scored_epoch == 3
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["best_epoch"] == 3
    assert "best_from_epoch: 1" in (tmp_path / "run" / "config.yaml").read_text()  # the user's setting, untouched


@pytest.mark.parametrize("hyperprior", ["bgm", "stick"])
def test_ladder_with_svi_iwae_and_log_likelihood(hyperprior):
    data = _tiny_data()
    model = build_model(_tiny_cfg(warmup_epochs=0, hyperprior=hyperprior), data.shape, num_data=100)
    assert model.ladder_active
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(max_plate_nesting=1))
    for _ in range(3):
        assert math.isfinite(svi.step(data.train_x[:50]))
    iw = TraceIWAE(num_particles=3)
    assert math.isfinite(iw.loss(model.model, model.guide, data.train_x[:20]))
    model.eval()
    ll = log_likelihood(model.model, model.guide, data.test_x[:10], num_samples=20, seed=0)
    assert ll.shape == (10,) and torch.isfinite(ll).all()
    assert model.sample(3).shape == (3, 1, 6, 6)
    assert model.encode(data.test_x[:4])[0].shape == (4, 2)
    assert model.decode(torch.zeros(2, 2)).shape == (2, 1, 6, 6)


def test_normal_prior_baseline_and_floored_laplace():
    data = _tiny_data()
    model = build_model(_tiny_cfg(prior="normal"), data.shape, num_data=100)
    assert model.latent_dim == 4 and not hasattr(model, "hyperprior")
    lik = model.likelihood
    assert isinstance(lik, FlooredLaplace)
    with torch.no_grad():
        lik.log_scale.fill_(math.log(1e-3))
    out = torch.zeros(3, 1, 6, 6)
    x = torch.rand(3, 1, 6, 6)
    d = lik(out, x=x)
    mae = (torch.sigmoid(out) - x).abs().mean()
    assert torch.allclose(d.base_dist.scale, mae.expand_as(x))  # floored at the batch MAE in training
    lik.eval()
    assert torch.allclose(lik(out, x=x).base_dist.scale, torch.tensor(1e-3))  # stored floor (0 before any epoch)


@pytest.mark.parametrize(
    "opts,msg",
    [
        ({"num_components": 0}, "num_components"),
        ({"hyperprior": "dp"}, "hyperprior"),
        ({"inner_sigma_min": 0.5, "inner_sigma_max": 0.1}, "inner_sigma_min"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_options_are_config_errors(opts, msg):
    with pytest.raises(ConfigError, match=msg):
        build_model(_tiny_cfg(**opts), (1, 6, 6), num_data=100)
