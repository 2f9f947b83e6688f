"""The Epanechnikov and relaxed-Poisson latents (ppl_vae/distributions.py), the defensive proposal for compact guides
(ppl_vae/evaluate/defensive.py) and the two VAEs built on them (vae_epanechnikov, vae_poisson).

Oracles: the Epanechnikov CDF, moments and entropy in closed form; ∫ q log(q/p) by quadrature; the Poisson pmf
and KL by summation; the linear-Gaussian VAE's exact log p(x) (compact guide: plain importance sampling is biased
by exactly log P(z ∈ supp q | x)); a one-count linear Poisson VAE whose log p(x) = log Σ_z p(z) p(x|z) is summed.
Every Monte Carlo tolerance is a multiple of the estimator's standard error.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from scipy import integrate, stats
from torch.distributions import kl_divergence

from ppl_vae import train
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import DataBundle
from ppl_vae.distributions.families import (
    EPANECHNIKOV_ENTROPY,
    DefensiveMixture,
    Epanechnikov,
    RelaxedPoisson,
    poisson_truncation,
)
from ppl_vae.distributions.likelihoods import GaussianLikelihood
from ppl_vae.distributions.plate import data_plate
from ppl_vae.errors import ConfigError
from ppl_vae.evaluate import log_likelihood, log_likelihood_summary
from ppl_vae.infer.analytic_kl import AnalyticKLELBO
from ppl_vae.models import build_model
from ppl_vae.models.linear_gaussian import LinearGaussianVAE
from ppl_vae.models.vae_epanechnikov import KernelBoundELBO
from ppl_vae.models.vae_poisson import KLAnnealedELBO, LinearDecoder, VAEPoisson, kl_beta_schedule
from ppl_vae.training.plan import plan_for


def quad(f, a, b):
    return integrate.quad(f, a, b, limit=200, epsabs=1e-12, epsrel=1e-10)[0]


def epa_pdf(z, mu, h):
    u = (z - mu) / h
    return 0.75 / h * (1 - u * u) if abs(u) <= 1 else 0.0


# ------------------------------------------------------------------------------------------------ Epanechnikov
def test_epanechnikov_sampler_matches_its_cdf():
    torch.manual_seed(0)
    q = Epanechnikov(torch.tensor(0.7), torch.tensor(1.3))
    z = q.sample((20000,)).double().numpy()
    ks = stats.kstest(z, lambda v: q.cdf(torch.as_tensor(v)).numpy())
    assert ks.statistic < 1.95 / math.sqrt(len(z))  # the 0.1 % critical value of the KS statistic
    assert z.min() >= 0.7 - 1.3 and z.max() <= 0.7 + 1.3
    p = torch.linspace(0.01, 0.99, 9)
    torch.testing.assert_close(q.cdf(q.icdf(p)), p, atol=1e-5, rtol=0)


def test_epanechnikov_moments_and_entropy():
    mu, h = 0.4, 2.0
    q = Epanechnikov(torch.tensor(mu), torch.tensor(h))
    assert float(q.variance) == pytest.approx(h * h / 5) and float(q.mean) == pytest.approx(mu)
    torch.manual_seed(1)
    n = 200_000
    z = q.sample((n,)).double()
    # Var of the sample variance: (μ4 − σ⁴)/n with μ4 = 3h⁴/35 for this kernel
    se = math.sqrt((3 / 35 - 1 / 25) * h**4 / n)
    assert abs(float(z.var()) - h * h / 5) < 5 * se
    assert quad(lambda v: epa_pdf(v, mu, h), mu - h, mu + h) == pytest.approx(1.0, abs=1e-9)
    ent = -quad(lambda v: epa_pdf(v, mu, h) * math.log(max(epa_pdf(v, mu, h), 1e-300)), mu - h, mu + h)
    assert float(q.entropy()) == pytest.approx(ent, abs=1e-6)
    assert float(q.entropy()) == pytest.approx(math.log(h) + EPANECHNIKOV_ENTROPY)


def test_epanechnikov_log_prob_support_and_edge():
    q = Epanechnikov(torch.tensor(0.0), torch.tensor(1.0))
    lp = q.log_prob(torch.tensor([-1.5, -1.0, 0.0, 0.3, 1.0, 2.0]))
    assert lp[0] == -math.inf and lp[-1] == -math.inf
    assert torch.isfinite(lp[1:5]).all()
    assert float(lp[3]) == pytest.approx(math.log(0.75 * (1 - 0.09)), abs=1e-6)
    # draws on the edge keep finite log-densities and gradients
    loc, scale = torch.tensor(0.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    Epanechnikov(loc, scale).log_prob(torch.tensor([1.0, -1.0, 0.999999])).sum().backward()
    assert torch.isfinite(loc.grad) and torch.isfinite(scale.grad)


@pytest.mark.parametrize("mu, h, m, s", [(0.0, math.sqrt(5), 0.0, 1.0), (0.5, 0.3, 0.0, 1.0), (-1.2, 2.0, 0.5, 1.7)])
def test_epanechnikov_normal_kl_equals_quadrature(mu, h, m, s):
    q = Epanechnikov(torch.tensor(mu, dtype=torch.float64), torch.tensor(h, dtype=torch.float64))
    p = torch.distributions.Normal(torch.tensor(m, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))

    def integrand(v):
        qv = epa_pdf(v, mu, h)
        return qv * (math.log(qv) - stats.norm.logpdf(v, m, s)) if qv > 0 else 0.0

    assert float(kl_divergence(q, p)) == pytest.approx(quad(integrand, mu - h, mu + h), abs=1e-8)


def test_epanechnikov_kl_minimum_and_mean_field_elbo_uses_it():
    h = torch.linspace(0.5, 5.0, 2001, dtype=torch.float64)
    kl = kl_divergence(Epanechnikov(torch.zeros_like(h), h), torch.distributions.Normal(0.0, 1.0))
    best = int(kl.argmin())
    assert float(h[best]) == pytest.approx(math.sqrt(5), abs=3e-3)
    at_root5 = kl_divergence(
        Epanechnikov(torch.zeros((), dtype=torch.float64), torch.tensor(math.sqrt(5), dtype=torch.float64)),
        torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0),
    )
    # KL(Epa(0, h) ‖ N(0,1)) = ½log 2π + h²/10 − log(4h/3) − 5/3 + 2 log 2, minimal at h = √5
    closed = 0.5 * math.log(2 * math.pi) + 0.5 - 0.5 * math.log(5) - 5 / 3 + math.log(3)
    assert float(at_root5) == pytest.approx(closed, abs=1e-9)
    assert float(kl[best]) == pytest.approx(closed, abs=1e-6)
    assert 0.046 < closed < 0.0463

    # a model whose observation ignores z: TraceMeanField's loss is then −log p(x) + the closed-form KL, no noise
    loc, scale = torch.tensor([[0.3, -0.2]]), torch.tensor([[0.8, 1.5]])

    def model(x):
        with pyro.plate("data", 1):
            pyro.sample("z", dist.Normal(torch.zeros(1, 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 1):
            pyro.sample("z", Epanechnikov(loc, scale).to_event(1))

    x = torch.tensor([0.0])
    expected = (
        -dist.Normal(0.0, 1.0).log_prob(x).sum()
        + kl_divergence(Epanechnikov(loc, scale), torch.distributions.Normal(0.0, 1.0)).sum()
    )
    for elbo in (TraceMeanField_ELBO(), AnalyticKLELBO()):
        assert elbo.loss(model, guide, x) == pytest.approx(float(expected), rel=1e-6)


def test_epanechnikov_rsample_gradient_is_pathwise():
    # E[z²] = μ² + h²/5: the pathwise gradient of its Monte Carlo estimate is (2μ, 2h/5) within 5 standard errors
    torch.manual_seed(2)
    n, mu0, h0 = 100_000, 0.6, 1.5
    mu, h = torch.tensor(mu0, requires_grad=True), torch.tensor(h0, requires_grad=True)
    z = Epanechnikov(mu, h).rsample((n,))
    (z * z).mean().backward()
    u = (z.detach() - mu0) / h0
    se_mu = float((2 * z.detach()).std()) / math.sqrt(n)
    se_h = float((2 * z.detach() * u).std()) / math.sqrt(n)
    assert abs(float(mu.grad) - 2 * mu0) < 5 * se_mu
    assert abs(float(h.grad) - 2 * h0 / 5) < 5 * se_h


# ------------------------------------------------------------------------------------------------ relaxed Poisson
def test_truncation_covers_the_rate():
    n = poisson_truncation(200.0)
    assert 250 < n < 280 and stats.poisson.sf(n - 1, 200.0) < 1e-5


def test_relaxed_counts_approach_the_poisson_pmf():
    rate, n = 3.0, 40_000
    pmf = torch.tensor(stats.poisson.pmf(range(40), rate))
    # E TV(empirical, pmf) ≤ ½ Σ_k sqrt(p_k(1 − p_k)/n): allow three times that
    bound = 3 * 0.5 * float((pmf * (1 - pmf)).sqrt().sum()) / math.sqrt(n)
    mismatch = []
    for t in (1.0, 0.3, 0.05, 0.01):
        torch.manual_seed(3)
        relaxed = RelaxedPoisson(torch.full((n,), rate), t).rsample()
        torch.manual_seed(3)
        hard = RelaxedPoisson(torch.full((n,), rate), t).sample()  # the same arrivals, counted
        mismatch.append(float((relaxed.round() != hard).float().mean()))
        if t == 0.01:
            emp = torch.bincount(relaxed.round().long(), minlength=40)[:40].double() / n
            assert 0.5 * float((emp - pmf).abs().sum()) < bound + mismatch[-1]
    # TV(round(relaxed), Poisson) ≤ P(round(relaxed) ≠ hard) + TV(hard, Poisson): the first term vanishes as t → 0
    assert mismatch == sorted(mismatch, reverse=True) and mismatch[-1] < 0.01 and mismatch[0] > 0.1
    torch.manual_seed(4)
    emp = torch.bincount(RelaxedPoisson(torch.full((n,), rate), 0.0).rsample().long(), minlength=40)[:40].double() / n
    assert 0.5 * float((emp - pmf).abs().sum()) < bound


def test_relaxed_poisson_gradients_flow():
    rate = torch.tensor([0.5, 2.0, 8.0], requires_grad=True)
    torch.manual_seed(5)
    RelaxedPoisson(rate.expand(4000, 3), 0.1).rsample().mean(0).sum().backward()
    assert torch.isfinite(rate.grad).all() and (rate.grad > 0).all()  # more rate, more counts
    rate.grad = None
    z = RelaxedPoisson(rate.expand(4000, 3), 0.1, hard=True).rsample()
    assert torch.equal(z, z.round())  # straight-through: integer forward
    z.mean(0).sum().backward()
    assert (rate.grad > 0).all()


def test_poisson_kl_matches_formula_and_sum():
    r = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    delta = torch.tensor([0.2, 1.0, 3.5], dtype=torch.float64)
    kl = kl_divergence(RelaxedPoisson(r * delta, 0.5), RelaxedPoisson(r, 0.5))
    torch.testing.assert_close(kl, r * (1 - delta + delta * delta.log()))
    k = torch.arange(80, dtype=torch.float64)
    for i in range(3):
        lq, lp = dist.Poisson(r[i] * delta[i]).log_prob(k), dist.Poisson(r[i]).log_prob(k)
        assert float(kl[i]) == pytest.approx(float((lq.exp() * (lq - lp)).sum()), abs=1e-10)
    torch.testing.assert_close(kl_divergence(RelaxedPoisson(r * delta), torch.distributions.Poisson(r)), kl)


def test_poisson_kl_and_sample_stay_finite_when_the_rate_underflows():
    # log δ = −200: δ is 0 in float32, the KL is r (its limit) and no gradient is NaN (δ log δ would give 0 · ∞)
    log_r = torch.tensor([0.0, 0.5], requires_grad=True)
    log_q = torch.tensor([-200.0, 0.2], requires_grad=True) + log_r
    q, p = RelaxedPoisson(None, 0.1, log_rate=log_q), RelaxedPoisson(None, 0.1, log_rate=log_r)
    assert float(q.rate[0].detach()) == 0.0
    kl = kl_divergence(q, p)
    assert float(kl[0].detach()) == pytest.approx(1.0)
    (kl.sum() + q.rsample((50,)).sum()).backward()
    assert torch.isfinite(log_r.grad).all()
    with pytest.raises(ValueError, match="exactly one"):
        RelaxedPoisson(torch.ones(2), log_rate=torch.zeros(2))


# ------------------------------------------------------------------------------------------------ defensive IS
class EpanechnikovLG(LinearGaussianVAE):
    """The linear-Gaussian VAE with a compact guide: Epa(posterior mean, ``width`` · √5 · posterior sd) per
    dimension, whose support holds P = Π_k P(|N(0,1)| < width·√5) of the exact posterior's mass."""

    width = 0.6

    def guide(self, x, y=None):
        with data_plate(x, self.num_data):
            mu, cov = self.posterior(x)
            h = self.width * math.sqrt(5) * cov.diagonal().sqrt().expand_as(mu)
            pyro.sample("z", Epanechnikov(mu, h).to_event(1))


def test_defensive_proposal_removes_the_bias_of_a_compact_guide():
    # W with orthogonal columns: the exact posterior covariance (I + WᵀW/σ²)⁻¹ is diagonal, so the mass of the
    # guide's box is the product of the per-dimension masses
    W = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0)))[0] * torch.tensor([2.0, 1.0])
    m = EpanechnikovLG(6, 2, sigma=0.5, W=W, seed=0)
    x = m.simulate(20, torch.Generator().manual_seed(1)).double()
    m = m.double()
    exact = float(m.log_marginal(x).detach().mean())
    # exact bias of plain IS: log of the posterior mass inside the support (the guide is centred; cov is shared)
    _, cov = m.posterior(x)
    c = EpanechnikovLG.width * math.sqrt(5)
    log_mass = sum(math.log(math.erf(c / math.sqrt(2))) for _ in range(2))
    assert float(cov[0, 1].detach().abs()) < 1e-6 * float(cov[0, 0].detach())
    S = 20_000
    plain = log_likelihood_summary(m.model, m.guide, x, S, defensive=False)
    safe = log_likelihood_summary(m.model, m.guide, x, S)  # "auto" detects the compact support
    assert plain["defensive_sites"] == [] and safe["defensive_sites"] == ["z"]
    tol_plain = 5 * math.hypot(plain["mc_std_error"], 1e-3)
    assert abs(plain["log_likelihood"] - (exact + log_mass)) < tol_plain
    assert abs(safe["log_likelihood"] - exact) < 5 * safe["mc_std_error"]
    assert exact - plain["log_likelihood"] > 50 * plain["mc_std_error"]  # plain IS is far off


def test_defensive_leaves_gaussian_guides_alone_and_true_forces_it():
    m = LinearGaussianVAE(6, 2, sigma=0.5, seed=0, guide_scale=0.9)
    x = m.simulate(10, torch.Generator().manual_seed(1)).double()
    m = m.double()
    exact = float(m.log_marginal(x).detach().mean())
    auto = log_likelihood(m.model, m.guide, x, 500)
    torch.testing.assert_close(auto, log_likelihood(m.model, m.guide, x, 500, defensive=False), rtol=0, atol=0)
    forced = log_likelihood_summary(m.model, m.guide, x, 20_000, defensive=True)
    assert forced["defensive_sites"] == ["z"]
    assert abs(forced["log_likelihood"] - exact) < 5 * forced["mc_std_error"] + 1e-6
    with pytest.raises(ValueError, match="defensive must be"):
        log_likelihood(m.model, m.guide, x, 10, defensive="yes")


def test_defensive_mixture_is_a_density():
    q = Epanechnikov(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64))
    mix = DefensiveMixture(q, 0.1, 4.0)
    total = quad(lambda v: float(mix.log_prob(torch.tensor(v, dtype=torch.float64)).exp()), -20, 20)
    assert total == pytest.approx(1.0, abs=1e-7)
    torch.manual_seed(6)
    big = DefensiveMixture(Epanechnikov(torch.zeros(3), torch.ones(3)).to_event(1), 0.2).expand((5000,))
    z = big.sample()
    assert z.shape == (5000, 3) and big.log_prob(z).shape == (5000,)
    outside = (z.abs() > 1).any(-1).float().mean()  # only the Gaussian component leaves [−1, 1]
    assert 0.0 < float(outside) < 0.2
    with pytest.raises(ValueError, match="weight"):
        DefensiveMixture(q, 1.5)


# ------------------------------------------------------------------------------------------------ the two VAEs
def tiny_images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataBundle.from_tensors(x, y, x[:16], y[:16], x[:16], y[:16], num_classes=10)


def test_kernel_bound_value_is_the_papers_eq_10():
    cfg = ModelConfig(name="vae_epanechnikov", arch="mlp", hidden=[16], latent_dim=3, likelihood="bernoulli")
    m = build_model(cfg, (1, 8, 8), num_data=200)
    for p in m.decoder.parameters():  # a decoder that ignores z makes the reconstruction term deterministic
        torch.nn.init.zeros_(p)
    x = tiny_images(10).train_x
    B, M = 0.1, 10
    elbo = plan_for(m).objective(TrainConfig(batch_size=M))
    assert isinstance(elbo, KernelBoundELBO)
    loc, r = m.encoder(x, None)
    recon = m.likelihood(m.decoder(loc, None), event_dim=3).log_prob(x)
    expected = 200 / 10 * float((-recon + 3 * B / (5 * M) * r.reciprocal().sum(-1)).sum().detach())
    assert elbo.loss(m.model, m.guide, x) == pytest.approx(expected, rel=1e-6)

    exact = build_model(
        ModelConfig(
            name="vae_epanechnikov",
            arch="mlp",
            hidden=[16],
            latent_dim=3,
            likelihood="bernoulli",
            options={"objective": "exact"},
        ),
        (1, 8, 8),
        200,
    )
    assert isinstance(plan_for(exact).objective(TrainConfig()), AnalyticKLELBO)
    with pytest.raises(ConfigError, match="model.options.objective"):
        build_model(
            ModelConfig(
                name="vae_epanechnikov", arch="mlp", latent_dim=3, likelihood="bernoulli", options={"objective": "kde"}
            ),
            (1, 8, 8),
        )

    def gauss_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 3), 1.0).to_event(1))

    with pytest.raises(ConfigError, match="Epanechnikov guide sites only; site 'z' is Normal"):
        elbo.loss(m.model, gauss_guide, x)


def test_epanechnikov_vae_trains_and_sharpens_its_kernels():
    data = tiny_images()
    m = build_model(
        ModelConfig(name="vae_epanechnikov", arch="mlp", hidden=[32], latent_dim=4, likelihood="bernoulli"),
        data.shape,
        num_data=64,
    )
    r0 = float(m.encode(data.train_x)[1].mean().detach())
    res = train(m, data, TrainConfig(epochs=15, batch_size=16, lr=3e-3), progress=False)
    assert res.history[-1]["train_elbo"] > res.history[0]["train_elbo"]
    # the bound's weight is tiny: the kernels narrow, as the reconstruction asks
    assert float(m.encode(data.train_x)[1].mean().detach()) < r0


def test_poisson_plan_anneals_the_temperature_over_the_first_half():
    data = tiny_images()
    m = build_model(
        ModelConfig(name="vae_poisson", arch="mlp", hidden=[16], latent_dim=4, likelihood="bernoulli"),
        data.shape,
        num_data=64,
    )
    assert isinstance(m, VAEPoisson)
    res = train(m, data, TrainConfig(epochs=6, batch_size=16), progress=False)
    temps = [r["temperature"] for r in res.history]
    assert temps == pytest.approx([1.0, 1 - 0.95 / 3, 1 - 2 * 0.95 / 3, 0.05, 0.05, 0.05])
    m.eval()
    z = pyro.poutine.trace(m.guide).get_trace(data.test_x).nodes["z"]["value"]
    assert torch.equal(z, z.round())  # hard counts at evaluation
    with pytest.raises(ConfigError, match="train.objective must be 'auto' or 'meanfield'"):
        plan_for(m).objective(TrainConfig(objective="elbo"))


def test_poisson_vae_log_likelihood_equals_the_summed_marginal():
    """One count z ~ Pois(r), x | z ~ N(w z + b, σ²): log p(x) = log Σ_z Pois(z; r) N(x; w z + b, σ²)."""
    torch.manual_seed(7)

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x, c=None):
            return self.lin(x), None

    dec = LinearDecoder(1, (2,))
    with torch.no_grad():
        dec.linear.weight.copy_(torch.tensor([[0.8], [-0.5]]))
        dec.linear.bias.copy_(torch.tensor([0.1, 0.3]))
    m = VAEPoisson(Enc(), dec, GaussianLikelihood(sigma2=0.25, link="identity"), 1, prior_rate=2.5).double()
    x = torch.tensor([[1.7, -0.6], [0.1, 0.3], [4.1, -2.2]], dtype=torch.float64)
    k = torch.arange(60, dtype=torch.float64)
    lp = dist.Poisson(torch.tensor(2.5, dtype=torch.float64)).log_prob(k)
    mean = k[:, None] * dec.linear.weight.detach().double()[:, 0] + dec.linear.bias.detach().double()
    lik = dist.Normal(mean[:, None, :], 0.5).log_prob(x[None]).sum(-1)  # (K, N)
    exact = torch.logsumexp(lp[:, None] + lik, 0)
    m.train()  # log_likelihood switches to eval() (hard counts) and back
    s = log_likelihood_summary(m.model, m.guide, x, 20_000)
    assert m.training
    est = log_likelihood(m.model, m.guide, x, 20_000)
    se = 1.0 / math.sqrt(s["min_ess"])
    assert torch.allclose(est, exact, atol=5 * se + 1e-6)


def test_sharpness_is_the_variance_of_the_laplacian():
    from ppl_vae.evaluate import sharpness

    assert sharpness(torch.full((3, 1, 8, 8), 0.4)) == 0.0
    # a ±1 checkerboard: the Laplacian is −8·c at every interior pixel, 18 of each sign on the 6×6 interior
    i = torch.arange(8)
    board = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().view(1, 1, 8, 8)
    assert sharpness(board) == pytest.approx(64 * 36 / 35)
    assert sharpness(board.expand(2, 3, 8, 8)) == pytest.approx(64 * 36 / 35)  # channels are averaged
    with pytest.raises(ValueError, match="H, W >= 3"):
        sharpness(torch.zeros(2, 1, 2, 8))


# ------------------------------------------------------------------------------------------------ official P-VAE
def _official_betas(total, start, anneal, const):
    """The official ``beta_anneal_linear`` written out: start for ⌈c·T⌉ steps, linspace(start, 1) to ⌈(c+p)·T⌉."""
    a, b = math.ceil(const * total), math.ceil((const + anneal) * total)
    betas = [1.0] * total
    betas[:a] = [start] * a
    betas[a:b] = torch.linspace(start, 1.0, b - a, dtype=torch.float64).tolist()
    return betas


@pytest.mark.parametrize("total,anneal,const", [(1000, 0.5, 0.01), (37, 0.5, 0.0), (120, 0.3, 0.2)])
def test_kl_beta_schedule_is_the_official_linear_annealing(total, anneal, const):
    kw = {"start": 1e-4, "anneal_fraction": anneal, "constant_fraction": const}
    got = [kl_beta_schedule(t, total, **kw) for t in range(total)]
    assert got == pytest.approx(_official_betas(total, 1e-4, anneal, const), abs=1e-12)
    assert got[0] == pytest.approx(1e-4) and got[-1] == 1.0


def _poisson(data, hidden=(16,), latent_dim=4, **options):
    cfg = ModelConfig(
        name="vae_poisson",
        arch="mlp",
        hidden=list(hidden),
        latent_dim=latent_dim,
        likelihood="bernoulli",
        options=options,
    )
    return build_model(cfg, data.shape, num_data=len(data.train_x))


def test_poisson_kl_annealing_weights_the_kl_per_step_and_validates_at_beta_one():
    data = tiny_images()  # 64 images, batch 16: 4 steps per epoch
    m = _poisson(data, kl_anneal_fraction=0.5, kl_constant_fraction=0.25)
    plan = plan_for(m)
    train_cfg = TrainConfig(epochs=4, batch_size=16)
    elbo = plan.objective(train_cfg)
    assert isinstance(elbo, KLAnnealedELBO)
    x = data.train_x[:16]
    # at step 0 β = 1e-4: loss(β) = −E log p(x|z) + β·KL, so loss(1) − loss(β) = (1 − β)·KL on the same draws
    with torch.no_grad():
        kl = 64 / 16 * float(kl_divergence(m.guide_dist(x), m.prior_dist(16)).sum())
    pyro.set_rng_seed(3)
    annealed = elbo.loss(m.model, m.guide, x)
    pyro.set_rng_seed(3)
    full = plan.validation_objective(train_cfg).loss(m.model, m.guide, x)
    assert full - annealed == pytest.approx((1 - 1e-4) * kl, rel=1e-4)
    res = train(m, data, train_cfg, progress=False)
    # 16 steps: β = 1e-4 for steps 0..3, linspace(1e-4, 1, 8) over steps 4..11, then 1 (β of each epoch's last step)
    assert [r["kl_beta"] for r in res.history] == pytest.approx([1e-4, 1e-4 + 3 * (1 - 1e-4) / 7, 1.0, 1.0])
    assert plan_for(m).stages(train_cfg)[0].first_scored_epoch == 3  # the first epoch that ends at β = 1
    assert res.best_epoch >= 3
    with pytest.raises(ConfigError, match="train.jit must be false"):
        plan_for(m).objective(TrainConfig(jit=True))
    with pytest.raises(ConfigError, match="kl_constant_fraction \\+ kl_anneal_fraction must be at most 1"):
        _poisson(data, kl_anneal_fraction=0.9, kl_constant_fraction=0.2)


def test_poisson_defaults_keep_beta_one_and_the_constant_prior():
    data = tiny_images()
    m = _poisson(data)
    assert not m.kl_annealed and m.rate_clamp is None
    assert plan_for(m).validation_objective(TrainConfig()) is None
    assert not isinstance(plan_for(m).objective(TrainConfig()), KLAnnealedELBO)
    assert torch.all(m.log_r == 0.0)  # log prior_rate = log 1


def test_poisson_uniform_prior_init_is_the_officials_range():
    data = tiny_images()
    torch.manual_seed(0)
    network = _poisson(data, hidden=(8,), latent_dim=4000, prior_init="uniform")
    linear = _poisson(data, hidden=(8,), latent_dim=4000, prior_init="uniform", decoder="linear")
    own = _poisson(data, hidden=(8,), latent_dim=4000, prior_init="uniform", prior_log_rate_high=1.0)
    for m, high in ((network, -2.0), (linear, -4.0), (own, 1.0)):
        r = m.log_r.detach()
        assert float(r.min()) >= -6.0 and float(r.max()) <= high
        assert float(r.min()) < -5.95 and float(r.max()) > high - 0.05  # it fills the range, uniformly
        assert float(r.mean()) == pytest.approx((high - 6.0) / 2, abs=0.1)
    with pytest.raises(ConfigError, match="prior_log_rate_high is used with prior_init: uniform only"):
        _poisson(data, prior_log_rate_high=-3.0)


class _FixedLogDelta(torch.nn.Module):
    """An encoder whose raw output (log δr before the clamp at 10) is the same for every image."""

    def __init__(self, raw):
        super().__init__()
        self.raw = torch.nn.Parameter(torch.as_tensor(raw))

    def forward(self, x, c=None):
        return self.raw.expand(x.shape[0], -1), None


def test_poisson_rate_clamp_bounds_the_posterior_log_rate_softly():
    raw = [-3.0, 2.0, 7.0, 30.0]
    lik = GaussianLikelihood(sigma2=0.25, link="identity")
    m = VAEPoisson(_FixedLogDelta(raw), LinearDecoder(4, (2,)), lik, 4, rate_clamp=5.0)
    free = VAEPoisson(_FixedLogDelta(raw), LinearDecoder(4, (2,)), lik, 4)
    x = torch.zeros(3, 2)
    with torch.no_grad():
        log_rate, unclamped = m.guide_log_rate(x), free.guide_log_rate(x)
    assert torch.allclose(log_rate, 5.0 - torch.nn.functional.softplus(5.0 - unclamped))
    assert float(log_rate.max()) < 5.0 < 9.0 < float(unclamped.max())  # 10 − softplus(10 − 30) ≈ 10 unclamped
    assert torch.allclose(log_rate[:, 0], unclamped[:, 0], atol=1e-3)  # far below c: as good as unchanged
    assert torch.allclose(m.encode(x)[0], log_rate.exp())  # the rates that figures and probes read
    # the KL is that of the clamped posterior that is sampled: p (1 − δ + δ log δ), δ = q/p
    log_d = log_rate - m.log_r
    kl = kl_divergence(m.guide_dist(x), m.prior_dist(3))
    assert torch.allclose(kl, m.log_r.exp() * (1 - log_d.exp() + log_d.exp() * log_d))
