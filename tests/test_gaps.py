"""The inference-gap analysis (ppl_vae.evaluate.gaps) against the linear-Gaussian model's exact answers.

For a Gaussian posterior N(μ, Λ⁻¹) the best diagonal Gaussian is N(μ, diag(1/Λ_ii)), so the approximation gap of
the diagonal family is KL(q* ‖ p(z|x)) = ½(Σ_i log Λ_ii − log det Λ) exactly; the full-covariance family contains
the posterior, so its approximation gap is 0 and its amortisation gap is log p(x) − ELBO[q] of the closed form.
"""

import math

import pyro
import pytest
import torch

from ppl_vae.evaluate import amortisation_gap, elbo_per_datapoint, inference_gaps
from ppl_vae.infer.importance import IWAEError, importance_log_weights
from ppl_vae.models import LinearGaussianVAE
from ppl_vae.plate import data_plate


def _data(n=20):
    pyro.set_rng_seed(0)
    m = LinearGaussianVAE(5, 2, sigma=0.5, guide_type="amortized", num_data=100, seed=1)
    return m, m.simulate(n, torch.Generator().manual_seed(2))


def _mc_std_error(model, x, particles):
    """Standard error of the mean over datapoints of the per-datapoint Monte Carlo ELBO with ``particles`` draws."""
    with torch.no_grad():
        lw = importance_log_weights(model.model, model.guide, (x,), num_particles=2000, max_plate_nesting=1).log_w
    return float(lw.var(0).sum().sqrt() / math.sqrt(particles) / len(x))


def test_elbo_per_datapoint_is_the_closed_form_elbo_within_monte_carlo_error():
    m, x = _data()
    pyro.set_rng_seed(3)
    est = elbo_per_datapoint(m.model, m.guide, x, num_particles=4000)
    exact = m.exact_elbo(x).detach()
    assert est.shape == (20,)
    assert abs(float(est.mean() - exact.mean())) < 4 * _mc_std_error(m, x, 4000)


def test_diagonal_family_gaps_match_the_exact_mean_field_optimum():
    m, x = _data()
    with torch.no_grad():
        log_px = m.log_marginal(x)
        prec = torch.linalg.inv(m.posterior(x)[1])
        approx = float(0.5 * (prec.diagonal().log().sum() - torch.logdet(prec)))
        amortised = m.exact_elbo(x)
    pyro.set_rng_seed(4)
    g = inference_gaps(m.model, m.guide, x, log_px, steps=1500, lr=5e-2, num_particles=16, elbo_particles=4000,
                       parameters=m.parameters())
    se = _mc_std_error(m, x, 4000)
    assert abs(g["amortised_elbo"] - float(amortised.mean())) < 4 * se
    assert abs(g["inference_gap"] - float((log_px - amortised).mean())) < 4 * se
    # the optimised q is (nearly) the mean-field optimum, whose log-weights vary little: its ELBO is precise, and
    # what is left is the optimiser's distance from the optimum, well under 0.01 nats here (measured 5e-5)
    assert g["approximation_gap"] == pytest.approx(approx, abs=0.01)
    assert approx > 0.005                                    # a non-trivial gap: the posterior is correlated
    assert all(p.requires_grad for p in m.parameters())     # the model's parameters are thawed again


def test_full_covariance_family_closes_the_approximation_gap():
    pyro.set_rng_seed(0)
    m = LinearGaussianVAE(5, 2, sigma=0.5, guide_type="exact", guide_shift=0.5, num_data=100, seed=1)
    x = m.simulate(20, torch.Generator().manual_seed(2))
    with torch.no_grad():
        log_px, amortised = m.log_marginal(x), m.exact_elbo(x)
    pyro.set_rng_seed(5)
    g = inference_gaps(m.model, m.guide, x, log_px, steps=300, elbo_particles=4000)
    assert g["approximation_gap"] == pytest.approx(0.0, abs=0.01)
    assert g["gap_mean"] == pytest.approx(float((log_px - amortised).mean()), abs=0.02)
    assert g["gap"].shape == (20,) and g["datapoints_where_optimisation_lost"] == 0


def test_a_non_gaussian_guide_site_is_refused():
    m, x = _data(4)

    def guide(xb, y=None):
        with data_plate(xb, 100):
            pyro.sample("z", pyro.distributions.Laplace(torch.zeros(len(xb), 2), 1.0).to_event(1))

    with pytest.raises(IWAEError, match="Gaussian guide site"):
        amortisation_gap(m.model, guide, x, steps=1, elbo_particles=2)
