"""ArviZ diagnostics of the guide (ppl_vae/evaluate/diagnostics.py) on whichever ArviZ line is installed."""

import numpy as np
import pytest
import torch

from ppl_vae.evaluate import azcompat, plot_khat, posterior_diagnostics, psis_diagnostics
from ppl_vae.infer.trace_checks import IWAEError
from ppl_vae.models.linear_gaussian import LinearGaussianVAE

D, d, B, S = 5, 2, 6, 1000


def make_lg(shift=0.0, scale=1.0, num_data=None, seed=0):
    W = 0.7 * torch.randn(D, d, generator=torch.Generator().manual_seed(seed))
    m = LinearGaussianVAE(D, d, 1.0, W=W, guide_shift=shift, guide_scale=scale, num_data=num_data, seed=seed)
    return m, m.simulate(B, torch.Generator().manual_seed(seed + 1))


def test_inference_data_groups_shapes_and_values():
    m, x = make_lg(num_data=1000)
    idata = posterior_diagnostics(m.model, m.guide, x, num_samples=S, seed=0, datapoint_index=[10, 11, 12, 13, 14, 15])
    assert azcompat.is_arviz_data(idata)
    assert {"posterior", "log_likelihood", "sample_stats", "observed_data"} <= set(azcompat.groups(idata))
    z = idata["posterior"]["z"]
    assert z.shape == (1, S, B, d) and z.dims[:3] == ("chain", "draw", "datapoint")
    assert list(idata["posterior"]["datapoint"].values) == [10, 11, 12, 13, 14, 15]
    assert idata["log_likelihood"]["x"].shape == (1, S, B)
    assert idata["observed_data"]["x"].shape == (B, D)
    lw = idata["sample_stats"]["log_weight"]
    assert lw.shape == (1, S, B)
    # log_weight = log_joint − log_q, and with the exact guide every log-weight is log p(x_i) (unscaled:
    # num_data = 1000 does not enter)
    np.testing.assert_allclose(
        lw.values, idata["sample_stats"]["log_joint"] - idata["sample_stats"]["log_q"], atol=1e-5
    )
    np.testing.assert_allclose(
        lw.values[0], np.broadcast_to(m.log_marginal(x).detach().numpy(), (S, B)), rtol=1e-5, atol=1e-4
    )  # float32 rounding of sums of ~10 terms
    # log_likelihood holds log p(x_i | z) for the posterior draws: recompute it independently
    zv = torch.as_tensor(z.values[0])
    loglik = torch.distributions.Normal(zv @ m.W.detach().T + m.b.detach(), 1.0).log_prob(x).sum(-1)
    np.testing.assert_allclose(idata["log_likelihood"]["x"].values[0], loglik.numpy(), rtol=1e-5, atol=1e-4)
    # the posterior draws follow the exact posterior: mean within 5 standard errors
    mu, cov = m.posterior(x)
    se = torch.sqrt(cov.diagonal() / S)
    assert ((zv.mean(0) - mu.detach()).abs() < 5 * se.detach()).all()


def test_same_seed_same_draws():
    m, x = make_lg(shift=0.5)
    a = posterior_diagnostics(m.model, m.guide, x, num_samples=50, seed=3)
    b = posterior_diagnostics(m.model, m.guide, x, num_samples=50, seed=3)
    np.testing.assert_array_equal(a["posterior"]["z"].values, b["posterior"]["z"].values)


def test_exact_guide_has_small_khat_and_full_ess():
    m, x = make_lg()
    diag = psis_diagnostics(posterior_diagnostics(m.model, m.guide, x, num_samples=S))
    assert diag["khat"].shape == (B,) and diag["num_samples"] == S
    assert (diag["khat"] < 0.5).all()
    # weights equal up to float rounding: ESS = S to rounding
    np.testing.assert_allclose(diag["ess"], S, rtol=1e-3)
    np.testing.assert_allclose(diag["ess_fraction"], 1.0, rtol=1e-3)


def test_shifted_narrow_guide_has_large_khat_and_small_ess():
    # N(μ + 1.5, 0.5² Σ): too narrow and off-centre, so p/q has a heavy right tail (infinite variance)
    m, x = make_lg(shift=1.5, scale=0.5)
    diag = psis_diagnostics(posterior_diagnostics(m.model, m.guide, x, num_samples=S))
    assert (diag["khat"] > 0.7).all(), diag["khat"]
    assert (diag["ess"] < 0.05 * S).all()


def test_psislw_takes_log_weights_not_their_negation():
    """k̂ is that of the right tail of the weights on either ArviZ line (1.x's psislw smooths −input)."""
    rng = np.random.default_rng(0)
    k_true = 1.0 / 0.6  # Pareto(α = 0.6) weights: k = 1/α ≈ 1.67
    lw = np.log(rng.pareto(0.6, size=(S, 3)) + 1.0)  # (S, B): log-weights with a heavy right tail
    right = psis_diagnostics(lw)["khat"]
    wrong = psis_diagnostics(-lw)["khat"]  # the negated input sees a bounded tail
    assert (right > 0.7).all() and (wrong < 0.5).all()
    assert (np.abs(right - k_true) < 0.5).all()  # the fit is near the truth (S = 1000, prior-shrunk)
    if azcompat.ARVIZ_1:
        from arviz_stats.base import array_stats

        _, k_direct = array_stats.psislw(-lw.T.copy())  # 1.x: smooths the tail of the negated input
    else:
        _, k_direct = azcompat.az.psislw(lw.T.copy())
    np.testing.assert_allclose(right, k_direct)


def test_input_formats_agree_and_ess_formula():
    m, x = make_lg(shift=0.5, scale=1.2)
    idata = posterior_diagnostics(m.model, m.guide, x, num_samples=400)
    lw = idata["sample_stats"]["log_weight"].values  # (1, S, B)
    ref = psis_diagnostics(idata)
    for obj in (lw, lw[0], torch.as_tensor(lw[0]), idata["sample_stats"]["log_weight"]):
        got = psis_diagnostics(obj)
        np.testing.assert_allclose(got["khat"], ref["khat"])
        np.testing.assert_allclose(got["ess"], ref["ess"])
    w = np.exp(lw[0].astype(np.float64))
    np.testing.assert_allclose(ref["ess"], w.sum(0) ** 2 / (w**2).sum(0), rtol=1e-9)
    one = psis_diagnostics(np.log(np.array([1.0, 1.0, 2.0, 4.0] * 10)))  # (S,) → one datapoint
    assert one["khat"].shape == (1,) and one["ess"][0] == pytest.approx(80**2 / (20 + 40 + 160))
    with pytest.raises(IWAEError):
        psis_diagnostics(np.zeros((2, 3, 4, 5)))
    with pytest.raises(IWAEError):
        psis_diagnostics(np.array([[np.nan], [0.0]]))


def test_plot_khat_writes_png(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    diag = {"khat": np.array([-np.inf, 0.1, 0.55, 0.9, 2.0]), "datapoint": np.arange(5)}
    path = plot_khat(diag, tmp_path / "khat.png")
    data = (tmp_path / "khat.png").read_bytes()
    assert path == str(tmp_path / "khat.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert plt.get_fignums() == before  # no pyplot figure left behind (nothing to show)
    plot_khat(torch.tensor([0.2, 0.3]), tmp_path / "k2.png")
    assert (tmp_path / "k2.png").stat().st_size > 1000
