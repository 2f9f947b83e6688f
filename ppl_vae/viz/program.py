"""Figures of any Pyro program, read from its traces — for a model that has no ``encode``/``decode``/``sample``
(e.g. Pyro's tutorial VAE written as ``model(x)``/``guide(x)``).

* ``reconstructions.png``: images above the mean of the observed site when the model is replayed on the guide's
  draw (the posterior predictive mean — what ``Predictive(model, guide=guide)`` samples around);
* ``prior_samples.png``: the mean of the observed site under latents drawn from the model's prior;
* ``latent_scatter.png``: the guide's mean of its first latent site per datapoint (the first two principal
  components when it has more than two dimensions), coloured by label;
* ``training_curves.png``.

The programs are called ``fn(x, y)`` (adapt other signatures first, :func:`ppl_vae.infer.signature.adapt`).
Image figures need datapoints of shape (C, H, W) or (H, W); other data get the scatter and the curves.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .curves import plot_training_curves
from .grids import (
    _MAX_CATEGORIES,
    _context,
    _new_figure,
    _save_figure,
    _tile_figure,
    _to_image_tensor,
    class_label,
    plot_sample_grid,
    sample_title,
)

__all__ = ["program_figures", "program_reconstructions"]


def _observed_mean(trace) -> torch.Tensor | None:
    """The mean of the first observed sample site of ``trace`` (one row per datapoint)."""
    for site in trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            fn = site["fn"]
            try:
                return fn.mean.detach()
            except (NotImplementedError, AttributeError):  # a distribution without a mean: show a draw
                return fn.sample().detach()
    return None


def _first_latent(trace) -> tuple[str, torch.Tensor] | None:
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            fn = site["fn"]
            try:
                return name, fn.mean.detach()
            except (NotImplementedError, AttributeError):
                return name, site["value"].detach()
    return None


def _plate_indices(trace, n: int) -> torch.Tensor | None:
    """The indices of a plate's subsample in ``trace`` when the program drew fewer than its ``n`` datapoints itself
    (Pyro's ``pyro.plate("data", len(x), subsample_size=B)`` idiom), else ``None``."""
    for site in trace.nodes.values():
        if site["type"] == "sample" and site_is_subsample(site) and site["value"] is not None:
            if getattr(site["fn"], "size", None) == n and len(site["value"]) < n:
                return site["value"]
    return None


def _as_images(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return _to_image_tensor(values.reshape(len(values), *shape).clamp(0, 1).cpu())


def program_figures(model, guide, x, y, history, run_dir, seed: int = 0, n_scatter: int = 2000) -> list[str]:
    """Write the figures above for the program ``(model, guide)`` on the data ``x`` into ``run_dir``."""
    run_dir = Path(run_dir)
    shape = tuple(x.shape[1:])
    images = len(shape) in (2, 3) and (len(shape) == 2 or shape[0] in (1, 3))
    paths: list[str] = []
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        # a program that draws its own subsample of B datapoints needs at least B of them
        m = min(n_scatter, len(x))
        trace = poutine.trace(guide).get_trace(x[:m], None if y is None else y[:m])
        rows = _plate_indices(trace, m)
        least = 0 if rows is None else len(rows)
        n = min(max(8, least), len(x))
        if images:
            paths.append(
                program_reconstructions(
                    model, guide, x[:n], None if y is None else y[:n], run_dir / "reconstructions.png"
                )
            )
        k = min(max(64, least), len(x))
        prior = _observed_mean(poutine.trace(model).get_trace(x[:k], None if y is None else y[:k]))
        if images and prior is not None and prior.numel() % math.prod(shape) == 0:
            title = sample_title(seed, checkpoint=_context("checkpoint"))
            grid = _as_images(prior.reshape(-1, *shape)[:64], shape)
            paths.append(plot_sample_grid(grid, run_dir / "prior_samples.png", 8, title))
        if not images:
            print(f"ppl-vae: no image figures: datapoints of shape {shape} are not images", file=sys.stderr)
        latent = _first_latent(trace)
    if latent is not None:
        labels = None if y is None else y[:m] if rows is None else y[:m][rows.to(y.device)]
        paths.append(_scatter(*latent, labels, run_dir / "latent_scatter.png"))
    if history:
        paths.append(plot_training_curves(history, run_dir / "training_curves.png"))
    return paths


def program_reconstructions(
    model, guide, x, y, path, title: str = "Reconstructions (posterior predictive mean)"
) -> str:
    """The datapoints ``x`` (images) above the mean of the observed site with the guide's latents (at most 8; a
    program that draws its own subsample of x shows the datapoints it drew)."""
    shape = tuple(x.shape[1:])
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(x, y)
        mean = _observed_mean(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y))
    rows = _plate_indices(guide_trace, len(x))
    x = x if rows is None else x[rows.to(x.device)]
    if mean is not None and rows is not None and mean.numel() == x.numel():
        x, mean = x[:8], mean.reshape(len(x), -1)[:8]
    if mean is None or mean.numel() != x.numel():
        raise ValueError(
            f"the model's first observed site does not hold one value per pixel of the {len(x)} datapoints "
            f"({None if mean is None else tuple(mean.shape)} vs {tuple(x.shape)}): no reconstruction figure"
        )
    tiles = torch.stack([_as_images(x, shape), _as_images(mean, shape)])
    return _tile_figure(tiles, path, title=title, row_labels=["original", "reconstruction"])


def _scatter(name: str, z: torch.Tensor, y, path: Path) -> str:
    z = z.reshape(len(z), -1).double().cpu()
    label = f"guide mean of {name!r}"
    if z.shape[1] > 2:
        z = z - z.mean(0)
        _, _, v = torch.linalg.svd(z, full_matrices=False)
        z = z @ v[:2].T
        label += " (first two principal components)"
    elif z.shape[1] == 1:
        z = torch.cat([z, torch.zeros_like(z)], 1)
    fig = _new_figure(5, 5)
    ax = fig.add_subplot()
    c = None if y is None or np.asarray(y).ndim != 1 else np.asarray(y.cpu() if torch.is_tensor(y) else y)
    classes = None if c is None or c.dtype.kind not in "iu" else np.unique(c)
    if classes is not None and len(classes) <= _MAX_CATEGORIES:  # one colour per class, named in a legend
        names, cmap = _context("class_names"), matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        pts = z.numpy()
        for i, k in enumerate(classes):
            sel = c == k
            ax.scatter(pts[sel, 0], pts[sel, 1], s=6, color=cmap(i % cmap.N), label=class_label(k, names))
        ax.legend(title="class", fontsize=7, markerscale=2, loc="best")
    else:
        ax.scatter(z[:, 0].numpy(), z[:, 1].numpy(), c=c, s=6, cmap="viridis" if c is not None else None)
    ax.set_title(label)
    return _save_figure(fig, path)
