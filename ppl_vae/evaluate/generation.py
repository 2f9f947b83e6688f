r"""What "How to train your VAE" (Rivera 2023) shows of a trained model, as numbers: FID of reconstructions, of
decoded midpoints between encoded test pairs and of prior samples, the sharpness of each (variance of the
Laplacian), and the share of collapsed posterior variances.

The model is any of the library's VAEs: ``encode(x) -> (loc, scale)`` of q(z|x) (a mixture guide gives its
moments), ``decode(z)`` and ``sample(n)`` in data space. Midpoints: test images paired (0, 1), (2, 3), …, decoded
at ½(μ_a + μ_b) — N/2 images against N for the other two FIDs, and FID is biased upwards at small n, so compare
midpoint FIDs with each other (rows of a study), not with the reconstruction FID. A posterior variance σ_ij²
counts as collapsed when it is below ``collapse_threshold`` (default 0.01, i.e. σ < 0.1 against the prior's 1);
for a mixture guide (K > 1) σ² is the mixture's marginal variance, which includes the spread between components
(exact for K = 1, the author's method). Images in [−1, 1] (``data_range=(-1, 1)``) are mapped to [0, 1] for the
FID feature extractor and the sharpness.
"""

from __future__ import annotations

import torch

from .fid import FrechetDistance
from .sharpness import sharpness

__all__ = ["generation_report", "collapsed_fraction", "midpoints"]


def _unit(x: torch.Tensor, data_range) -> torch.Tensor:
    lo, hi = data_range
    return ((x - lo) / (hi - lo)).clamp(0, 1)


@torch.no_grad()
def collapsed_fraction(model, x: torch.Tensor, threshold: float = 0.01, batch_size: int = 500) -> float:
    """Share of (image, latent dimension) pairs whose posterior variance σ² is below ``threshold``."""
    below, total = 0, 0
    for a in range(0, len(x), batch_size):
        _, scale = model.encode(x[a : a + batch_size])
        below += int((scale.pow(2) < threshold).sum())
        total += scale.numel()
    return below / max(total, 1)


@torch.no_grad()
def midpoints(model, x: torch.Tensor) -> torch.Tensor:
    """Decoded ½(μ_a + μ_b) for the test pairs (x_0, x_1), (x_2, x_3), …"""
    loc, _ = model.encode(x[: len(x) // 2 * 2])
    return model.decode(0.5 * (loc[0::2] + loc[1::2]))


@torch.no_grad()
def generation_report(
    model,
    x: torch.Tensor,
    fid: FrechetDistance,
    *,
    data_range=(0.0, 1.0),
    seed: int = 0,
    collapse_threshold: float = 0.01,
) -> dict:
    """``recon_fid``, ``midpoint_fid``, ``prior_fid`` (against the real images ``fid`` was built with), their
    ``sharpness`` (and the data's), and ``collapsed_fraction`` on test images ``x`` (module docstring)."""
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            recon = model.reconstruct(x)
            mid = midpoints(model, x)
            prior = model.sample(len(x))
        sets = {"recon": recon, "midpoint": mid, "prior": prior}
        out = {f"{k}_fid": float(fid.score(_unit(v, data_range).cpu())) for k, v in sets.items()}
        out["sharpness"] = {k: sharpness(_unit(v, data_range)) for k, v in {**sets, "data": x}.items()}
        out["collapsed_fraction"] = collapsed_fraction(model, x, collapse_threshold)
        out["fid_extractor"] = fid.name
    finally:
        model.train(was)
    return out
