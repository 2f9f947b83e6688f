"""Uncertainty maps σ²(z) beside reconstructions and generated samples (Lin, Roberts, Trigoni & Clark, Figures 3
and 4): for a model with a per-pixel variance σ²_k(z) (``sigma_vae`` after stage 2) the map shows where the model
expects its mean image g(z) to be wrong; for a global σ² it is flat.

Models are duck-typed: ``encode(x) -> (loc, scale)``, ``decode(z)``, ``decode_variance(z)`` (σ² in the data's
shape) and, for prior samples, ``prior(n)``. Each function writes a PNG (parent folders created) and returns its
path; σ² rows use one colour scale (shown by a colour bar, in σ² units) across the figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..nn.device import device_of
from .grids import save_image_grid

__all__ = ["plot_reconstruction_uncertainty", "plot_sample_uncertainty", "save_variance_grid", "variance_figures"]


def _check(model) -> None:
    if not hasattr(model, "decode_variance"):
        raise ValueError(
            f"{type(model).__name__} has no decode_variance(z): uncertainty maps need a model with "
            "a learned variance (model.name=sigma_vae)"
        )


def _as_display(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) → (N, H, W) grey or (N, H, W, 3) RGB, as numpy."""
    x = images.detach().float().cpu()
    return x[:, 0].numpy() if x.shape[1] == 1 else x.permute(0, 2, 3, 1).clamp(0, 1).numpy()


def _variance_display(var: torch.Tensor) -> np.ndarray:
    """Per-pixel σ² averaged over channels: (N, H, W)."""
    return var.detach().float().cpu().mean(1).numpy()


def _figure(rows: list[tuple[str, np.ndarray, bool]], path, title: str, cmap: str = "magma") -> str:
    """rows: (label, array of N images, is_variance). Variance rows share a colour scale and a colour bar."""
    n = rows[0][1].shape[0]
    vmax = max((float(a.max()) for _, a, v in rows if v), default=1.0)
    vmin = min((float(a.min()) for _, a, v in rows if v), default=0.0)
    tile = 1.0
    fig = Figure(figsize=(tile * n + 1.6, tile * len(rows) + 0.7), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), n, squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.1})
    mappable = None
    for r, (label, arr, is_var) in enumerate(rows):
        for j in range(n):
            ax = axes[r, j]
            if is_var:
                mappable = ax.imshow(arr[j], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            elif arr.ndim == 3:
                ax.imshow(arr[j], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(arr[j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
        bar.set_label("σ²", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png", bbox_inches="tight", pad_inches=0.1)
    return str(p)


@torch.no_grad()
def plot_reconstruction_uncertainty(model, x: torch.Tensor, path, n: int = 8) -> str:
    """Figure 3: originals, reconstructions g(μ(x)) and σ²(μ(x)) for the first ``n`` inputs."""
    _check(model)
    x = torch.as_tensor(x)[:n].float()
    if x.shape[0] == 0:
        raise ValueError("plot_reconstruction_uncertainty: no inputs")
    was = model.training
    model.eval()
    try:
        z = model.encode(x.to(device_of(model)))[0]
        recon, var = model.decode(z), model.decode_variance(z)
    finally:
        model.train(was)
    rows = [
        ("original", _as_display(x), False),
        ("reconstruction", _as_display(recon), False),
        ("σ²(z)", _variance_display(var), True),
    ]
    return _figure(rows, path, "Reconstructions and their uncertainty σ²(z)")


@torch.no_grad()
def plot_sample_uncertainty(
    model, path, n: int = 8, seed: int = 0, prior=None, z: torch.Tensor | None = None, title: str | None = None
) -> str:
    """Figure 4: generated means g(z) above their σ²(z), z from ``prior`` (a
    :class:`~ppl_vae.distributions.priors.GaussianMixturePrior` or the model's prior when None), or the given ``z``.
    Seeded."""
    _check(model)
    dev = device_of(model)
    if z is None:
        if prior is not None and hasattr(prior, "sample") and hasattr(prior, "num_components"):
            z = prior.sample(n, seed=seed)
        else:
            g = torch.Generator().manual_seed(seed)
            z = torch.randn(n, model.latent_dim, generator=g)
        where = "the fitted mixture q̂(z)" if prior is not None else "the prior"
    else:
        where = "given z"
    was = model.training
    model.eval()
    try:
        z = z.to(dev)
        mean, var = model.decode(z), model.decode_variance(z)
    finally:
        model.train(was)
    rows = [("sample g(z)", _as_display(mean), False), ("σ²(z)", _variance_display(var), True)]
    return _figure(rows, path, title or f"Samples from {where} and their uncertainty σ²(z)")


def save_variance_grid(variance: torch.Tensor, path, nrow: int = 8) -> str:
    """σ² maps as a plain image grid (``ppl_vae.viz.save_image_grid``), each scaled by the set's maximum."""
    v = variance.detach().float().cpu()
    return save_image_grid(v / v.max().clamp_min(1e-12), path, nrow=nrow)


def variance_figures(model, x: torch.Tensor, run_dir, seed: int = 0, prior=None, n: int = 8) -> list[str]:
    """reconstruction_uncertainty.png and sample_uncertainty.png in ``run_dir`` (plus
    aggregate_sample_uncertainty.png when a fitted ``prior`` is given)."""
    run_dir = Path(run_dir)
    paths = [
        plot_reconstruction_uncertainty(model, x, run_dir / "reconstruction_uncertainty.png", n=n),
        plot_sample_uncertainty(model, run_dir / "sample_uncertainty.png", n=n, seed=seed),
    ]
    if prior is not None:
        paths.append(
            plot_sample_uncertainty(model, run_dir / "aggregate_sample_uncertainty.png", n=n, seed=seed, prior=prior)
        )
    return paths
