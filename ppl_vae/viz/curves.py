"""Training curves and the standard figure set of a run (:func:`make_figures`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from .grids import (
    _is_conditional,
    _new_figure,
    _save_figure,
    plot_class_conditional,
    plot_prior_samples,
    plot_reconstructions,
)
from .latent_plots import plot_latent_space


def _as_float(v) -> float:
    if v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_training_curves(history: Sequence[Mapping], path) -> str:
    """ELBO per datapoint vs epoch from a list of per-epoch dicts (``epoch``, ``train_elbo``,
    optional ``val_elbo``; None/NaN values are skipped)."""
    if not history:
        raise ValueError("plot_training_curves: empty history")
    epochs = np.array([_as_float(h.get("epoch", i + 1)) for i, h in enumerate(history)])
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    drawn = False
    for key, name, style in (("train_elbo", "train", "-o"), ("val_elbo", "validation", "-s")):
        vals = np.array([_as_float(h.get(key)) for h in history])
        ok = np.isfinite(vals) & np.isfinite(epochs)
        if ok.any():
            ax.plot(epochs[ok], vals[ok], style, markersize=3, label=name)
            drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finite ELBO values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.5
    ax.set_ylabel("ELBO per datapoint")
    ax.set_title("Training curves")
    ax.grid(True, alpha=0.3)
    return _save_figure(fig, path)


@runtime_checkable
class FigureModel(Protocol):
    """What the standard figures read from a model (``ppl_vae.viz.grids``); a Pyro program without it gets the
    figures of its traces (:func:`ppl_vae.viz.program.program_figures`)."""

    latent_dim: int

    def encode(self, x, y=None): ...

    def decode(self, z, y=None): ...

    def sample(self, n: int, y=None): ...

    def reconstruct(self, x, y=None): ...


def make_figures(model, data_x, data_y, history, run_dir, seed: int = 0, n_scatter: int = 2000) -> list[str]:
    """Write every figure that applies to ``model`` into ``run_dir``; return the paths written.

    Files: reconstructions.png, prior_samples.png, class_conditional.png (conditional models),
    latent_manifold.png (2-D latents), latent_scatter.png (2-D) or latent_tsne.png (otherwise),
    training_curves.png (non-empty history). ``data_y`` (labels, may be None for unconditional
    models) colours the scatter and conditions a conditional model.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cond = _is_conditional(model)
    if cond and data_y is None:
        raise ValueError("make_figures: the model is conditional, so data_y is required")
    data_x = torch.as_tensor(data_x)
    data_y = None if data_y is None else torch.as_tensor(np.asarray(data_y) if not torch.is_tensor(data_y) else data_y)
    y_small = None if (data_y is None or not cond) else data_y[:8]
    paths = [
        plot_reconstructions(model, data_x[:8], run_dir / "reconstructions.png", y=y_small, n=8),
        plot_prior_samples(model, run_dir / "prior_samples.png", n=64, seed=seed),
    ]
    if cond:
        paths.append(plot_class_conditional(model, run_dir / "class_conditional.png", seed=seed))
    paths += plot_latent_space(model, data_x, data_y, run_dir, max_points=n_scatter, seed=seed)
    if history:
        paths.append(plot_training_curves(history, run_dir / "training_curves.png"))
    return paths
