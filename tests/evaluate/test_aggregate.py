"""The Gaussian mixture fitted to the aggregate posterior: fitting, seeded sampling, use as p(z), KL(q̂‖p)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pyro import poutine

from ppl_vae.config import ModelConfig
from ppl_vae.data import DataBundle, load_data
from ppl_vae.distributions.priors import GaussianMixturePrior
from ppl_vae.errors import ConfigError
from ppl_vae.evaluate import log_likelihood
from ppl_vae.evaluate.aggregate import (
    encode_aggregate,
    fit_aggregate_posterior,
    kl_monte_carlo,
    sample_aggregate,
    use_prior,
)
from ppl_vae.models import build_model


def two_blobs(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = (torch.rand(n, generator=g) < 0.3).long()
    centres = torch.tensor([[-3.0, 0.0], [2.0, 1.0]])
    return centres[k] + 0.5 * torch.randn(n, 2, generator=g)


def test_fit_recovers_a_known_mixture_and_matches_sklearn_densities():
    from sklearn.mixture import GaussianMixture

    z = two_blobs()
    q = GaussianMixturePrior.fit(z, num_components=2, seed=0)
    order = q.loc[:, 0].argsort()
    # 2000 draws: a weight's standard error is sqrt(0.3·0.7/2000) ≈ 0.010, a mean's ≤ 0.5/sqrt(600) ≈ 0.02
    assert q.weights[order].tolist() == pytest.approx([0.7, 0.3], abs=0.04)
    torch.testing.assert_close(q.loc[order], torch.tensor([[-3.0, 0.0], [2.0, 1.0]]), atol=0.08, rtol=0)
    gm = GaussianMixture(2, covariance_type="full", random_state=0, reg_covar=1e-6, max_iter=200).fit(z.double())
    ref = torch.as_tensor(gm.score_samples(z[:50].double().numpy()), dtype=torch.float32)
    torch.testing.assert_close(q.log_prob(z[:50]), ref, atol=1e-4, rtol=1e-5)
    for cov in ("diag", "spherical", "tied"):
        qc = GaussianMixturePrior.fit(z, num_components=2, covariance_type=cov, seed=0)
        assert qc.scale_tril.shape == (2, 2, 2) and torch.isfinite(qc.log_prob(z)).all()
    with pytest.raises(ConfigError, match="num_components must be a positive integer, got 0"):
        GaussianMixturePrior.fit(z, num_components=0)
    with pytest.raises(ConfigError, match="covariance_type"):
        GaussianMixturePrior.fit(z, num_components=2, covariance_type="banana")


def test_mixture_sampler_is_reproducible_from_a_seed():
    q = GaussianMixturePrior.fit(two_blobs(), num_components=4, seed=0)
    state = torch.get_rng_state()
    a, b, c = q.sample(500, seed=7), q.sample(500, seed=7), q.sample(500, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not touched
    # fitting is seeded too: same data, same seed → the same mixture and the same samples
    q2 = GaussianMixturePrior.fit(two_blobs(), num_components=4, seed=0)
    assert torch.equal(q2.sample(500, seed=7), a)
    # the draws follow the mixture: component shares within 4 binomial standard errors
    draws = q.sample(20000, seed=1)
    resp = (
        torch.stack(
            [
                torch.distributions.MultivariateNormal(q.loc[m], scale_tril=q.scale_tril[m]).log_prob(draws)
                + q.weights[m].log()
                for m in range(4)
            ],
            -1,
        )
        .softmax(-1)
        .mean(0)
    )
    se = (q.weights * (1 - q.weights) / 20000).sqrt()
    assert ((resp - q.weights).abs() < 4 * se + 0.01).all()
    # state round trip
    q3 = GaussianMixturePrior.from_state(q.state())
    assert torch.equal(q3.sample(10, seed=3), q.sample(10, seed=3))


def test_kl_monte_carlo_against_closed_forms():
    """KL(N(μ, Σ) ‖ N(0, I)) = ½(tr Σ + μᵀμ − d − log det Σ); with 10k draws × 10 repeats the mean of the
    repeats has standard error std/√10, and we allow 5 of those (plus float32 rounding)."""
    loc = torch.tensor([[0.5, -1.0]])
    cov = torch.tensor([[[0.6, 0.2], [0.2, 0.9]]])
    q = GaussianMixturePrior(torch.ones(1), loc, torch.linalg.cholesky(cov))
    exact = 0.5 * (cov[0].trace() + loc.pow(2).sum() - 2 - torch.logdet(cov[0]))
    mean, std = kl_monte_carlo(q, num_samples=10_000, repeats=10, seed=0)
    assert std > 0 and abs(mean - float(exact)) < 5 * std / math.sqrt(10) + 1e-5
    # q̂ = p exactly: every log-ratio is 0
    same = GaussianMixturePrior(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
    m0, s0 = kl_monte_carlo(same, num_samples=1000, repeats=3)
    assert abs(m0) < 1e-6 and s0 < 1e-6
    assert kl_monte_carlo(q, seed=3) == kl_monte_carlo(q, seed=3)


@pytest.fixture(scope="module")
def small_run():
    d = load_data("digits", pixels="continuous", seed=0)
    data = DataBundle.from_tensors(d.train_x[:300], test_x=d.test_x[:20], name="digits300")
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            name="sigma_vae", likelihood="gaussian", latent_dim=2, hidden=[16], options={"sigma2_mode": "learned"}
        ),
        (1, 8, 8),
        num_data=300,
    )
    return SimpleNamespace(model=model, data=data, device=torch.device("cpu"))


def test_mixture_as_the_prior_in_evaluation(small_run):
    m = small_run.model
    q = fit_aggregate_posterior(m, small_run.data.train_x, num_components=5, seed=0)
    x = small_run.data.test_x[:10]
    old = m.prior
    with use_prior(m, q):
        assert m.prior is q
        tr = poutine.trace(m.model).get_trace(x)
        z = tr.nodes["z"]["value"]
        torch.testing.assert_close(tr.nodes["z"]["fn"].log_prob(z), q.log_prob(z))
        ll_mix = log_likelihood(m.model, m.guide, x, num_samples=20, seed=0)
    assert m.prior is old
    ll_prior = log_likelihood(m.model, m.guide, x, num_samples=20, seed=0)
    assert ll_mix.shape == ll_prior.shape == (10,) and torch.isfinite(ll_mix).all()
    assert not torch.allclose(ll_mix, ll_prior)
    # encodings: posterior means, or one draw from each q(z|x_i), seeded
    means = encode_aggregate(m, x, draws="mean")
    torch.testing.assert_close(means, m.encode(x)[0])
    assert torch.equal(encode_aggregate(m, x, seed=1), encode_aggregate(m, x, seed=1))
    assert not torch.equal(encode_aggregate(m, x, seed=1), means)


def test_sample_aggregate_for_the_cli(small_run):
    a = sample_aggregate(small_run, n=6, seed=3, num_components=4)
    b = sample_aggregate(small_run, n=6, seed=3, num_components=4)
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, b)
    imgs, var = sample_aggregate(small_run, n=6, seed=3, num_components=4, return_variance=True)
    assert torch.equal(imgs, a) and var.shape == a.shape and bool((var > 0).all())
    with pytest.raises(ConfigError, match="--n must be a positive integer"):
        sample_aggregate(small_run, n=0)
    assert np.isfinite(a.numpy()).all()
