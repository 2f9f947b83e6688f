"""Annealed importance sampling (ppl_vae.evaluate.ais) against the exact evidence of the linear-Gaussian VAE and a
Gamma-Poisson model; tolerances from the estimator's own spread over chains (its Monte Carlo standard error)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.config import ModelConfig
from ppl_vae.evaluate import ais_log_likelihood, log_likelihood, mc_std_error
from ppl_vae.evaluate.ais import AISError, ais_schedule
from ppl_vae.models import build_model
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


def _oracle(data_dim, latent_dim, sigma, n, **kwargs):
    vae = LinearGaussianVAE(data_dim, latent_dim, sigma=sigma, seed=1, **kwargs)
    x = vae.simulate(n, torch.Generator().manual_seed(2))
    with torch.no_grad():
        return vae, x, vae.log_marginal(x).double()


def _mean_error(result, exact):
    """(mean over datapoints of log p̂ − log p, its Monte Carlo standard error √Σse²/N)."""
    n = exact.numel()
    return float((result.log_px - exact).mean()), float(result.std_error.pow(2).sum().sqrt() / n)


def test_ais_matches_the_exact_evidence_with_enough_steps():
    vae, x, exact = _oracle(10, 2, 0.5, 20)
    steps = 300
    r = ais_log_likelihood(vae.model, vae.guide, x, num_steps=steps, num_chains=64, seed=0)
    err, se = _mean_error(r, exact)
    allowance = 5.0 / steps  # AIS's bias shrinks like 1/T
    assert abs(err) < 0.05 and abs(err) < 4 * se + allowance, (err, se)
    per_point = (r.log_px - exact).abs()
    assert bool((per_point < 4 * r.std_error + allowance).all()), (per_point, r.std_error)
    assert 0.55 < float(r.acceptance.mean()) < 0.85  # the step size was adapted towards 0.65
    assert r.log_weights.shape == (64, 20) and r.log_px.shape == r.std_error.shape == (20,)


@pytest.fixture(scope="module")
def step_sweep():
    vae, x, exact = _oracle(20, 3, 0.3, 30)  # a narrow posterior: the prior is a poor start
    return exact, {
        steps: ais_log_likelihood(vae.model, vae.guide, x, num_steps=steps, num_chains=16, seed=0)
        for steps in (3, 30, 300)
    }


def test_few_steps_give_a_lower_bound_in_expectation(step_sweep):
    exact, runs = step_sweep
    err, se = _mean_error(runs[3], exact)
    assert err <= 3 * se, (err, se)
    assert err < -1.0  # and a clearly biased one: 3 steps from the prior are far from enough here


def test_more_steps_come_closer(step_sweep):
    exact, runs = step_sweep
    (e3, s3), (e30, s30), (e300, s300) = (_mean_error(runs[t], exact) for t in (3, 30, 300))
    assert e3 + 3 * math.hypot(s3, s30) < e30, (e3, e30)
    assert e30 + 3 * math.hypot(s30, s300) < e300, (e30, e300)
    assert e300 <= 3 * s300


def test_the_exact_posterior_as_the_start_is_exact_at_any_number_of_steps():
    vae, x, exact = _oracle(10, 2, 0.5, 10)
    for steps in (1, 4):
        r = ais_log_likelihood(vae.model, vae.guide, x, num_steps=steps, num_chains=4, initial="guide", seed=0)
        assert torch.allclose(r.log_px, exact, atol=1e-3), (steps, r.log_px - exact)
        assert float(r.log_weights.std(0).max()) < 1e-3  # zero variance: every chain's weight is p(x)
    shifted = LinearGaussianVAE(10, 2, sigma=0.5, seed=1, guide_shift=0.3)
    r = ais_log_likelihood(shifted.model, shifted.guide, x, num_steps=1, num_chains=4, initial="guide", seed=0)
    assert float((r.log_px - exact).abs().max()) > 0.1  # a start that is not the posterior is not exact at T = 1


def _gamma_poisson(a=2.0, b=0.5):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            rate = pyro.sample("rate", dist.Gamma(torch.tensor(a), torch.tensor(b)))
            pyro.sample("x", dist.Poisson(rate.unsqueeze(-1).expand(*rate.shape, x.shape[-1])).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("rate", dist.Gamma(torch.tensor(a) + x.sum(-1), torch.tensor(b) + x.shape[-1]))

    def log_evidence(x):
        s, k = x.sum(-1).double(), x.shape[-1]
        return (
            a * math.log(b)
            - math.lgamma(a)
            + torch.lgamma(a + s)
            - (a + s) * math.log(b + k)
            - torch.lgamma(x.double() + 1).sum(-1)
        )

    return model, guide, log_evidence


def test_a_positive_latent_moves_in_unconstrained_space_with_its_jacobian():
    model, guide, log_evidence = _gamma_poisson()
    x = torch.tensor([[0, 1, 2, 1, 0, 1], [3, 5, 4, 6, 2, 4], [9, 7, 12, 8, 10, 11], [0, 0, 1, 0, 0, 0]]).float()
    exact = log_evidence(x)
    r = ais_log_likelihood(model, guide, x, num_steps=100, num_chains=32, seed=0)
    err = (r.log_px - exact).abs()
    assert bool((err < 4 * r.std_error + 0.05).all()), (r.log_px - exact, r.std_error)


@pytest.mark.parametrize(
    "latent, why",
    [
        (lambda n: dist.Bernoulli(torch.full((n,), 0.5)), "discrete"),
        (lambda n: dist.Delta(torch.zeros(n)), "not reparameterisable"),  # a density with no gradient in z
    ],
    ids=["bernoulli", "delta"],
)
def test_a_discrete_or_non_reparameterisable_latent_is_refused_by_name(latent, why):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("cluster", latent(x.shape[0]))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("cluster", latent(x.shape[0]))

    with pytest.raises(AISError, match=f"'cluster'.*{why}"):
        ais_log_likelihood(model, guide, torch.zeros(3), num_steps=2, num_chains=2)


def test_schedules_run_from_zero_to_one_and_bad_arguments_are_refused():
    for kind in ("sigmoid", "linear"):
        beta = ais_schedule(50, kind)
        assert beta[0] == 0 and beta[-1] == 1 and bool((beta.diff() > 0).all())
    sig = ais_schedule(50, "sigmoid")
    assert sig[1] < 0.2 * ais_schedule(50, "linear")[1]  # small first steps
    vae, x, _ = _oracle(4, 2, 0.5, 2)
    with pytest.raises(AISError, match="schedule"):
        ais_log_likelihood(vae.model, vae.guide, x, num_steps=2, schedule="cosine")
    with pytest.raises(AISError, match="initial"):
        ais_log_likelihood(vae.model, vae.guide, x, num_steps=2, initial="posterior")


def test_a_built_image_vae_agrees_with_importance_sampling_and_is_left_as_it_was():
    torch.manual_seed(0)
    vae = build_model(ModelConfig(name="vae", latent_dim=2, hidden=[8]), (1, 28, 28), num_data=1000)
    vae.train()
    x = (torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    lp_is, ess = log_likelihood(vae.model, vae.guide, x, num_samples=5000, seed=0, return_ess=True)
    rng = torch.get_rng_state()
    r = ais_log_likelihood(vae.model, vae.guide, x, num_steps=50, num_chains=32, initial="guide", seed=0)
    se = torch.sqrt(r.std_error**2 + mc_std_error(ess, 5000) ** 2)
    assert bool(((r.log_px - lp_is.double()).abs() < 4 * se + 0.05).all()), (r.log_px - lp_is, se)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert vae.training and all(p.grad is None for p in vae.parameters())  # parameters fixed, modes restored
