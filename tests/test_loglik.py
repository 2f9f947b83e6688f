"""Importance-sampled log-likelihood (ppl_vae/evaluate/likelihood.py) against exact oracles.

The linear-Gaussian VAE gives log p(x) in closed form; its exact guide makes every log-weight equal to log p(x),
so any batching/chunking must return log p(x) to float precision; a poor guide must converge within the
delta-method Monte Carlo error sqrt(1/ESS − 1/S) (see ``mc_std_error``).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import pyro_method
from torch import nn

import ppl_vae.evaluate.likelihood as likelihood_mod
from ppl_vae.evaluate import bits_per_dim, log_likelihood, log_likelihood_summary, mc_std_error
from ppl_vae.evaluate.likelihood import DEFAULT_MAX_ELEMENTS, plan_chunks
from ppl_vae.infer.importance import IWAEError, LogWeights
from ppl_vae.likelihoods import BernoulliLikelihood
from ppl_vae.models.linear_gaussian import LinearGaussianVAE
from ppl_vae.models.vae2 import VAE2

D, d = 5, 2



def make_lg(shift=0.0, scale=1.0, num_data=None, n=6, double=True, seed=0, cls=LinearGaussianVAE):
    W = 0.7 * torch.randn(D, d, generator=torch.Generator().manual_seed(seed))
    m = cls(D, d, 1.0, W=W, guide_shift=shift, guide_scale=scale, num_data=num_data, seed=seed)
    x = m.simulate(n, torch.Generator().manual_seed(seed + 1))
    if double:
        m, x = m.double(), x.double()
    return m, x


# ---------------------------------------------------------------------------------------------------------
# exactness and bookkeeping
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size, chunk_size", [(None, None), (3, 4), (7, 10), (1, 1), (2, 9), (100, 3)])
@pytest.mark.parametrize("vectorize", [True, False])
def test_exact_guide_gives_log_marginal_for_any_batching(batch_size, chunk_size, vectorize):
    m, x = make_lg(num_data=1000, n=7)
    lp = log_likelihood(m.model, m.guide, x, num_samples=10, batch_size=batch_size, chunk_size=chunk_size,
                        vectorize_particles=vectorize)
    assert lp.shape == (7,) and not lp.requires_grad
    torch.testing.assert_close(lp, m.log_marginal(x).detach(), rtol=1e-10, atol=1e-10)  # float64 rounding


def test_running_logsumexp_bookkeeping(monkeypatch):
    """Known log-weights f(k, i) fed through the batch/chunk loop must give logmeanexp_k f(k, i) exactly."""
    N, S = 7, 11
    data = torch.arange(N, dtype=torch.float64)
    f = lambda k, i: torch.sin(1.3 * k[:, None] + 0.7 * i[None, :]) * 3.0  # noqa: E731
    offsets = {}

    def fake(model, guide, args, kwargs=None, *, num_particles, **kw):
        xb = args[0]
        key = tuple(xb.tolist())
        start = offsets.get(key, 0)
        offsets[key] = start + num_particles
        k = torch.arange(start, start + num_particles, dtype=torch.float64)
        return LogWeights(log_w=f(k, xb), scale=1.0, num_data=N)

    monkeypatch.setattr(likelihood_mod, "importance_log_weights", fake)
    all_w = f(torch.arange(S, dtype=torch.float64), data)                       # (S, N)
    expected = torch.logsumexp(all_w, 0) - math.log(S)
    expected_ess = torch.exp(2 * torch.logsumexp(all_w, 0) - torch.logsumexp(2 * all_w, 0))
    for bs, cs in [(None, None), (3, 4), (2, 11), (7, 1), (5, 6)]:
        offsets.clear()
        lp, ess = log_likelihood(None, None, data, num_samples=S, batch_size=bs, chunk_size=cs,
                                 vectorize_particles=False, return_ess=True)
        torch.testing.assert_close(lp, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ess, expected_ess, rtol=1e-12, atol=1e-12)
        assert all(v == S for v in offsets.values())  # every datapoint got exactly S samples


def test_plan_chunks_rule():
    assert plan_chunks(1000, 5000) == (20, 5000)
    for N, S in [(1000, 5000), (10, 10), (3, 1_000_000), (50_000, 1)]:
        bs, cs = plan_chunks(N, S)
        assert 1 <= bs <= N and 1 <= cs <= S and bs * cs <= DEFAULT_MAX_ELEMENTS
    assert plan_chunks(1000, 5000, batch_size=100) == (100, 1000)
    assert plan_chunks(1000, 5000, chunk_size=500) == (200, 500)
    assert plan_chunks(1000, 5000, batch_size=7, chunk_size=3) == (7, 3)
    with pytest.raises(IWAEError):
        plan_chunks(10, 0)
    with pytest.raises(IWAEError):
        plan_chunks(10, 10, batch_size=0)


def test_result_does_not_depend_on_num_data():
    m_small, x = make_lg(num_data=None)
    m_big, _ = make_lg(num_data=100_000)
    m_small.guide_shift = m_big.guide_shift = 0.7  # a non-exact guide, so the draws matter
    a = log_likelihood(m_small.model, m_small.guide, x, num_samples=50, seed=3)
    b = log_likelihood(m_big.model, m_big.guide, x, num_samples=50, seed=3)
    assert torch.equal(a, b)


def test_conditional_model_gets_its_labels_per_batch():
    """x | z, y ~ N(z + y, 1), z ~ N(0, 1): log p(x|y) = log N(x; y, 2); the guide is the exact posterior."""
    def model(x, y):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z + y, 1.0), obs=x)

    def guide(x, y):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal((x - y) / 2, math.sqrt(0.5)))

    x = torch.linspace(-2, 3, 9, dtype=torch.float64)
    y = torch.arange(9, dtype=torch.float64) % 3
    lp = log_likelihood(model, guide, x, num_samples=8, batch_size=4, chunk_size=3, y=y)
    torch.testing.assert_close(lp, dist.Normal(y, math.sqrt(2.0)).log_prob(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(IWAEError, match="labels"):
        log_likelihood(model, guide, x, num_samples=8, y=y[:5])


def test_global_observed_sites_are_left_out_with_a_warning():
    m, x = make_lg(num_data=50)

    def model(x):
        pyro.sample("penalty", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0), obs=m.W.sum())
        m.model(x)

    with pytest.warns(UserWarning, match="penalty"):
        lp = log_likelihood(model, m.guide, x, num_samples=5, max_plate_nesting=1)
    torch.testing.assert_close(lp, m.log_marginal(x).detach(), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# a poor guide: convergence within the Monte Carlo error
# ---------------------------------------------------------------------------------------------------------

def test_poor_guide_converges_to_log_marginal_within_mc_error():
    # N(μ + 0.7, 1.3² Σ): wider than the posterior, so w = p/q is bounded and the delta method applies
    m, x = make_lg(shift=0.7, scale=1.3)
    S = 20_000
    lp, ess = log_likelihood(m.model, m.guide, x, num_samples=S, seed=0, return_ess=True)
    se = mc_std_error(ess, S)
    err = lp.double() - m.log_marginal(x).detach()
    # 5 standard errors, plus the O(1/S) downward bias of log(mean w) ≈ −se²/2
    assert (err.abs() < 5 * se + se**2).all(), (err, se)
    assert (ess > 1000).all() and (se < 0.05).all()  # and the error bar itself is small: it converged


def test_determinism_and_rng_isolation():
    m, x = make_lg(shift=0.7, scale=1.3, num_data=100)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = log_likelihood(m.model, m.guide, x, num_samples=300, seed=5, batch_size=4, chunk_size=64)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    b = log_likelihood(m.model, m.guide, x, num_samples=300, seed=5, batch_size=4, chunk_size=64)
    assert torch.equal(a, b)                           # same seed and chunking: bit-identical
    c = log_likelihood(m.model, m.guide, x, num_samples=300, seed=6, batch_size=4, chunk_size=64)
    assert not torch.equal(a, c)
    # Another chunking draws other samples: not bit-identical, but the same estimate within MC error
    a2, ess_a = log_likelihood(m.model, m.guide, x, num_samples=300, seed=5, batch_size=4, chunk_size=64,
                               return_ess=True)
    e, ess_e = log_likelihood(m.model, m.guide, x, num_samples=300, seed=5, chunk_size=300, return_ess=True)
    tol = 5 * torch.sqrt(mc_std_error(ess_a, 300) ** 2 + mc_std_error(ess_e, 300) ** 2)
    assert ((a2 - e).abs() < tol).all()


class _Spy(LinearGaussianVAE):
    @pyro_method
    def model(self, x, y=None):
        self.seen.append(self.training)
        return super().model(x, y)


def test_eval_mode_during_the_call_and_flags_restored():
    m, x = make_lg(cls=_Spy)
    m.seen = []
    m.extra = nn.Dropout(0.5)
    m.train()
    m.extra.eval()  # mixed flags must come back exactly
    log_likelihood(m.model, m.guide, x, num_samples=4)
    assert m.seen and not any(m.seen)
    assert m.training and not m.extra.training


def test_summary_and_bits_per_dim():
    m, x = make_lg(shift=0.7, scale=1.3)
    s = log_likelihood_summary(m.model, m.guide, x, num_samples=500, seed=1)
    lp = log_likelihood(m.model, m.guide, x, num_samples=500, seed=1).double()
    assert s["log_likelihood"] == pytest.approx(lp.mean().item(), rel=1e-12)
    assert s["std_error"] == pytest.approx((lp.std() / math.sqrt(len(lp))).item(), rel=1e-10)
    assert 0 < s["mc_std_error"] < s["std_error"]
    assert s["bits_per_dim"] == pytest.approx(-s["log_likelihood"] / (D * math.log(2)), rel=1e-12)
    assert s["num_data"] == 6 and s["num_samples"] == 500 and 1 <= s["min_ess"] <= s["mean_ess"] <= 500


def test_bits_per_dim_formula():
    assert bits_per_dim(-784 * math.log(2) * 2.0, 784) == pytest.approx(2.0)
    t = bits_per_dim(torch.tensor([-math.log(2) * 28 * 28, 0.0]), (1, 28, 28))
    torch.testing.assert_close(t, torch.tensor([1.0, 0.0]))
    assert bits_per_dim(-10.0, 5) == pytest.approx(10.0 / (5 * math.log(2)))
    with pytest.raises(IWAEError):
        bits_per_dim(-1.0, 0)


def test_two_layer_vae_log_likelihood_runs_vectorised_and_looped():
    torch.manual_seed(0)
    vae = VAE2((8, 8), BernoulliLikelihood(), latent_dim1=6, latent_dim=3, hidden1=(16,), hidden2=(8,),
                      num_data=100)
    x = (torch.rand(5, 8, 8) < 0.3).float()
    S = 64
    a, ess_a = log_likelihood(vae.model, vae.guide, x, num_samples=S, chunk_size=16, return_ess=True)
    b, ess_b = log_likelihood(vae.model, vae.guide, x, num_samples=S, vectorize_particles=False,
                              return_ess=True)
    for lp in (a, b):
        assert lp.shape == (5,) and torch.isfinite(lp).all() and (lp < 0).all()
    # both ways of drawing the particles estimate the same quantity: agreement within 5 MC standard errors
    tol = 5 * torch.sqrt(mc_std_error(ess_a, S) ** 2 + mc_std_error(ess_b, S) ** 2)
    assert ((a.double() - b.double()).abs() < tol + 1e-6).all()
