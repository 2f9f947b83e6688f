"""Writes this ArviZ line's PSIS results on fixed log-weights into psis_lines.npz (run once per line:
``python tests/data/make_psis_lines.py`` under Python 3.11 / arviz 0.23 and under Python ≥ 3.12 / arviz 1.x);
tests/test_arviz_lines.py checks each line against the other's stored results."""

from pathlib import Path

import numpy as np

from ppl_vae.evaluate import azcompat

PATH = Path(__file__).with_name("psis_lines.npz")


def log_weights(S: int) -> np.ndarray:
    """(S, 4) log-weights: heavy (Pareto α = 0.6, k ≈ 1.7), borderline (α = 1.5, k ≈ 0.67), Gaussian log-weights
    of spread 1.5 (k ≈ 0.5) and of spread 0.3 (light)."""
    rng = np.random.default_rng(20261201)
    return np.stack(
        [
            np.log(rng.pareto(0.6, S) + 1),
            np.log(rng.pareto(1.5, S) + 1),
            1.5 * rng.normal(size=S),
            0.3 * rng.normal(size=S),
        ],
        1,
    )


SIZES = (900, 1000)  # 3√900 = 90 tail draws on both lines; 3√1000 = 94.87: 0.23 takes 95, 1.x 94


def line() -> str:
    return "1.x" if azcompat.ARVIZ_1 else "0.23"


if __name__ == "__main__":
    stored = dict(np.load(PATH)) if PATH.exists() else {}
    for S in SIZES:
        smoothed, khat = azcompat.psislw(log_weights(S))
        stored[f"{line()}_S{S}_khat"] = khat
        stored[f"{line()}_S{S}_smoothed"] = smoothed
    stored[f"{line()}_version"] = np.array(azcompat.ARVIZ_VERSION)
    np.savez_compressed(PATH, **stored)
    print(f"wrote {PATH} for arviz {azcompat.ARVIZ_VERSION}: {sorted(stored)}")
