"""NUTS reference posteriors and the inference-gap report (ppl_vae/evaluate/reference.py, report.py) against the
linear-Gaussian model, whose posterior N(μ, Σ) and log p(x) are exact; and `ppl-vae gaps` end to end."""

import json
import math

import numpy as np
import pyro
import pytest
import torch

from ppl_vae.cli import main
from ppl_vae.evaluate import azcompat, compare_to_reference, gap_report, nuts_posterior
from ppl_vae.infer.trace_checks import IWAEError
from ppl_vae.models import LinearGaussianVAE


def _lg(shift=0.0, scale=1.0):
    pyro.set_rng_seed(0)
    m = LinearGaussianVAE(5, 2, sigma=0.5, guide_type="amortized", num_data=100, seed=1)
    x = m.simulate(4, torch.Generator().manual_seed(2))
    return m, x


@pytest.fixture(scope="module")
def reference():
    m, x = _lg()
    ref = nuts_posterior(
        m.model,
        x[:1],
        guide=m.guide,
        num_chains=4,
        num_samples=400,
        warmup_steps=300,
        seed=0,
        parameters=list(m.parameters()),
    )
    return m, x, ref


def test_nuts_matches_the_exact_posterior_within_its_monte_carlo_error(reference):
    m, x, ref = reference
    z = ref["draws"]["z"]  # (chain, draw, d)
    assert z.shape == (4, 400, 2)
    assert ref["max_rhat"] < 1.01 and ref["divergences"] == 0
    mu, cov = (t.detach().double().numpy() for t in m.posterior(x[:1]))
    mu = mu.reshape(-1)
    ess = ref["ess"]["z"]
    flat = z.reshape(-1, 2)
    # mean: standard error sqrt(Var/ESS); variance: sqrt(2/ESS)·Var for a Gaussian (ESS of z, a slight
    # overstatement for z²) — 4 standard errors each
    assert np.all(np.abs(flat.mean(0) - mu) < 4 * np.sqrt(np.diag(cov) / ess))
    assert np.all(np.abs(flat.var(0) - np.diag(cov)) < 4 * np.sqrt(2 / ess) * np.diag(cov))
    # the correlation too (the posterior is correlated): Fisher-z standard error 1/sqrt(ESS − 3)
    r_hat = np.corrcoef(flat.T)[0, 1]
    r = cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1])
    assert abs(np.arctanh(r_hat) - np.arctanh(r)) < 4 / math.sqrt(ess.min() - 3)
    # the parameters were frozen for the run and are thawed again; the decoder did not move
    assert all(p.requires_grad for p in m.parameters())


def test_the_arviz_container_has_draws_divergences_and_log_likelihoods(reference):
    m, x, ref = reference
    data = ref["data"]
    assert azcompat.is_arviz_data(data)
    assert {"posterior", "sample_stats", "log_likelihood"} <= set(azcompat.groups(data))
    assert data["posterior"]["z"].shape[:2] == (4, 400)
    assert data["sample_stats"]["diverging"].shape == (4, 400)
    # log_likelihood holds log p(x | z) of each draw: recompute it from the model's linear map
    z = torch.as_tensor(ref["draws"]["z"].reshape(-1, 2), dtype=torch.float32)
    with torch.no_grad():
        lp = torch.distributions.Normal(z @ m.W.T + m.b, 0.5).log_prob(x[:1]).sum(-1)
    np.testing.assert_allclose(
        np.asarray(data["log_likelihood"]["x"].values).reshape(-1), lp.numpy(), rtol=1e-5, atol=1e-4
    )


def test_compare_to_reference_recovers_the_exact_kl_both_ways(reference):
    m, x, ref = reference
    c = compare_to_reference(m.model, m.guide, x[:1], ref, num_samples=4000, elbo_samples=4000, seed=0)
    with torch.no_grad():
        kl = float((m.log_marginal(x[:1]) - m.exact_elbo(x[:1]))[0])
        log_px = float(m.log_marginal(x[:1])[0])
    assert kl > 1.0  # the untrained amortised guide is far from the posterior
    # log p̂ from the NUTS-fitted Student-t is an accurate estimate (k̂ small); the ELBO's Monte Carlo error is
    # sd(log w)/sqrt(4000), a few hundredths here
    assert c["khat_nuts_is"] < 0.5
    assert c["log_px_nuts_is"] == pytest.approx(log_px, abs=0.05)
    assert c["kl_nuts_is"] == pytest.approx(kl, abs=0.15)
    assert c["kl_guide_is"] == pytest.approx(kl, abs=0.15)
    mu = m.posterior(x[:1])[0].detach().numpy().reshape(-1)
    np.testing.assert_allclose(c["nuts_mean"], mu, atol=0.1)


def test_nuts_rejects_a_batch():
    m, x = _lg()
    with pytest.raises(IWAEError, match="one datapoint"):
        nuts_posterior(m.model, x, num_chains=1, num_samples=5, warmup_steps=5)


def test_gap_report_matches_the_exact_gaps_of_the_linear_gaussian_model():
    """Full-covariance family: q* is the exact posterior, so the approximation gap is 0 and the amortisation gap
    is the closed-form log p(x) − ELBO[q]."""
    m, x = _lg()
    with torch.no_grad():
        exact_inference = (m.log_marginal(x) - m.exact_elbo(x)).double()
    r = gap_report(
        m.model,
        m.guide,
        x,
        num_samples=2000,
        family="full",
        steps=1000,
        lr=5e-2,
        num_particles=16,
        elbo_particles=2000,
        parameters=list(m.parameters()),
        seed=0,
        nuts_images=1,
        nuts={"num_chains": 2, "num_samples": 300, "warmup_steps": 200},
    )
    assert r["num_images"] == 4 and r["sites"] == ["z"]
    assert r["inference"]["mean"] == pytest.approx(float(exact_inference.mean()), abs=0.1)
    assert abs(r["approximation"]["mean"]) < 0.05
    assert r["amortisation"]["mean"] == pytest.approx(float(exact_inference.mean()), abs=0.1)
    per = r["per_image"]
    np.testing.assert_allclose(
        np.array(per["inference"]), np.array(per["amortisation"]) + np.array(per["approximation"]), atol=1e-9
    )
    row = r["nuts"]["images"][0]
    assert row["index"] == 0 and abs(row["approximation_gap_nuts_is"]) < 0.05
    json.dumps(r)  # JSON-ready


def test_gaps_cli_writes_json_and_png(tmp_path):
    run = tmp_path / "run"
    assert (
        main(["train", "--run-dir", str(run), "--no-figures", "train.epochs=1", "model.hidden=[16]", "--no-progress"])
        == 0
    )
    assert (
        main(
            [
                "gaps",
                str(run),
                "--num-images",
                "6",
                "--num-samples",
                "100",
                "--steps",
                "20",
                "--elbo-particles",
                "50",
                "--nuts",
                "1",
                "--nuts-chains",
                "2",
                "--nuts-samples",
                "30",
                "--nuts-warmup",
                "30",
            ]
        )
        == 0
    )
    out = json.loads((run / "gaps.json").read_text())
    assert out["num_images"] == 6 and out["checkpoint"] == "best" and len(out["nuts"]["images"]) == 1
    for k in ("amortisation", "approximation", "inference"):
        assert np.isfinite(out[k]["mean"]) and out[k]["std_error"] > 0
    # the optimisation starts at the amortised q, so on average it cannot lose more than Monte Carlo noise
    assert out["amortisation"]["mean"] > -3 * out["amortisation"]["std_error"]
    assert (run / "gaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["gaps", str(run), "--num-images", "2", "--nuts", "3"]) == 2
