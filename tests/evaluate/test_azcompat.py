"""The two ArviZ lines pinned to each other: this line's PSIS (ppl_vae.evaluate.azcompat.psislw) on fixed
log-weights against the stored results of both lines (tests/fixtures/psis_lines.npz, written by
tests/fixtures/make_psis_lines.py under arviz 0.23 and under arviz 1.x)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from ppl_vae.evaluate import azcompat

HERE = Path(__file__).resolve().parents[1] / "fixtures"
spec = importlib.util.spec_from_file_location("make_psis_lines", HERE / "make_psis_lines.py")
lines = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lines)
STORED = dict(np.load(HERE / "psis_lines.npz"))
OTHER = "0.23" if azcompat.ARVIZ_1 else "1.x"


def test_both_lines_are_stored():
    assert str(STORED["0.23_version"]).startswith("0.23") and str(STORED["1.x_version"]).startswith("1.")


@pytest.mark.parametrize("which", [lines.line(), OTHER])
def test_same_tail_length_gives_the_same_smoothed_weights_and_khat(which):
    """S = 900: both lines fit the same 90 tail draws, so they agree to rounding."""
    smoothed, khat = azcompat.psislw(lines.log_weights(900))
    np.testing.assert_allclose(khat, STORED[f"{which}_S900_khat"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(smoothed, STORED[f"{which}_S900_smoothed"], rtol=0, atol=1e-9)
    assert khat[0] > 0.7 and khat[3] < 0.5  # the heavy column is flagged, the light one is not


def test_other_sample_sizes_agree_to_a_few_hundredths():
    """S = 1000: 0.23 fits ⌈3√S⌉ = 95 tail draws, 1.x ⌊3√S⌋ = 94; one draw moves k̂ by ≤ 0.03 here (stored:
    0.011, 0.019, 0.028, 0.012), a small fraction of k̂'s own sampling error at S = 1000 (≈ 0.1); the body of
    the smoothed weights is the same, only the 95 tail values move."""
    smoothed, khat = azcompat.psislw(lines.log_weights(1000))
    np.testing.assert_allclose(khat, STORED[f"{lines.line()}_S1000_khat"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(khat, STORED[f"{OTHER}_S1000_khat"], rtol=0, atol=0.05)
    other = STORED[f"{OTHER}_S1000_smoothed"]
    for b in range(4):
        lw = lines.log_weights(1000)[:, b]
        body = np.argsort(lw)[:-95]
        shift = smoothed[body[0], b] - other[body[0], b]  # the normalising constants differ by the tail
        np.testing.assert_allclose(smoothed[body, b] - shift, other[body, b], rtol=0, atol=1e-9)
        assert abs(shift) < 0.05


def test_a_naive_port_would_get_the_sign_wrong():
    """On 1.x the raw array function smooths the negated input; azcompat passes −log w, so a heavy right tail
    of the weights is what it sees (the naive call sees the light left tail)."""
    lw = lines.log_weights(900)[:, :1]
    _, k = azcompat.psislw(lw)
    if azcompat.ARVIZ_1:
        from arviz_stats.base import array_stats

        _, naive = array_stats.psislw(lw.T)
    else:
        _, naive = azcompat.az.psislw(-lw.T)  # 0.23's equivalent mistake: the negated weights
    assert k[0] > 1.0 and float(np.ravel(naive)[0]) < 0.5
