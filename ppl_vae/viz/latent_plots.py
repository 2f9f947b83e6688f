"""Figures of the latent space: the decoded manifold of a 2-D latent and scatter plots of posterior means
(t-SNE to 2-D when wider), coloured by label; :func:`plot_latent_space` picks what fits the latent's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch

from ..nn.device import device_of
from .grids import (
    _MAX_CATEGORIES,
    _context,
    _inference,
    _is_conditional,
    _labels_for,
    _new_figure,
    _save_figure,
    _sparse_labels,
    _tile_figure,
    _to_image_tensor,
    class_label,
)


def manifold_grid(n: int = 20, quantile_range: tuple[float, float] = (0.05, 0.95)) -> torch.Tensor:
    """(n, n, 2) latent grid: z = Phi^{-1}(q) of ``n`` evenly spaced quantiles per axis.

    Entry [i, j] is (z1 = Phi^{-1}(q_j), z2 = Phi^{-1}(q_{n-1-i})), i.e. z1 grows to the right and
    z2 grows upwards when row 0 is drawn on top (Kingma & Welling 2014, Fig. 4).
    """
    lo, hi = quantile_range
    if not (0.0 < lo < hi < 1.0):
        raise ValueError(f"quantile_range must satisfy 0 < lo < hi < 1, got {quantile_range}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    q = torch.linspace(lo, hi, n, dtype=torch.float64)
    z = torch.distributions.Normal(0.0, 1.0).icdf(q).to(torch.float32)
    z1 = z.expand(n, n)  # varies along columns
    z2 = z.flip(0)[:, None].expand(n, n)  # varies along rows, largest on top
    return torch.stack([z1, z2], dim=-1)


def plot_latent_manifold(model, path, n: int = 20, y=None, quantile_range: tuple[float, float] = (0.05, 0.95)) -> str:
    """Decode an n x n inverse-Gaussian-CDF grid of a 2-D latent space into one tiled image.

    ValueError unless ``latent_dim == 2``. For a conditional model ``y`` (an int) fixes the class;
    it defaults to class 0.
    """
    if int(model.latent_dim) != 2:
        raise ValueError(f"plot_latent_manifold needs latent_dim == 2, got {model.latent_dim}")
    device = device_of(model)
    grid = manifold_grid(n, quantile_range)
    z = grid.reshape(n * n, 2).to(device)
    title = "Latent manifold"
    if _is_conditional(model):
        y = 0 if y is None else y
        y = torch.as_tensor(y, dtype=torch.long)
        if y.numel() != 1:
            raise ValueError("plot_latent_manifold: y must be a single class label")
        title += f" (class {int(y)})"
    yb = _labels_for(model, y, n * n, device, "plot_latent_manifold")
    with _inference(model):
        images = model.decode(z, y=yb)
    images = _to_image_tensor(images)
    tiles = images.reshape(n, n, *images.shape[1:])
    z_axis = grid[0, :, 0].tolist()
    every = max(1, n // 6)
    return _tile_figure(
        tiles,
        path,
        title=title,
        col_labels=_sparse_labels(z_axis, every),
        row_labels=_sparse_labels(z_axis[::-1], every),
        xlabel="$z_1$",
        ylabel="$z_2$",
        pad=1,
        pad_value=0.5,
        min_tile_px=32,
    )


def _encode_means(model, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 512) -> np.ndarray:
    device = device_of(model)
    out = []
    with _inference(model):
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].to(device, torch.float32)
            yb = None if y is None else y[s : s + batch_size].to(device)
            loc, _ = model.encode(xb, y=yb)
            out.append(loc.detach().to("cpu", torch.float32).reshape(loc.shape[0], -1))
    return torch.cat(out).numpy()


def plot_latent_scatter(
    model,
    x,
    labels,
    path,
    y=None,
    max_points: int = 2000,
    seed: int = 0,
    method: str = "auto",
    *,
    class_names: Sequence[str] | None = None,
) -> str:
    """Scatter of encoder means q(z|x), coloured by ``labels`` (None: one colour).

    ``method``: "latent" (plot the 2-D means directly), "tsne" (t-SNE to 2-D) or "auto" (latent
    if ``latent_dim == 2`` else t-SNE). At most ``max_points`` inputs, subsampled with ``seed``.
    A conditional model is encoded with ``y``, or with ``labels`` if ``y`` is None. The legend names the
    classes by ``class_names`` (default: those of :func:`~ppl_vae.viz.figure_context`), else by index.
    """
    if method == "auto":
        method = "latent" if int(model.latent_dim) == 2 else "tsne"
    if method not in ("latent", "tsne"):
        raise ValueError(f"method must be 'auto', 'latent' or 'tsne', got {method!r}")
    if method == "latent" and int(model.latent_dim) != 2:
        raise ValueError(f"method='latent' needs latent_dim == 2, got {model.latent_dim}; use 'tsne'")
    x = torch.as_tensor(x)
    total = x.shape[0]
    lab = None if labels is None else torch.as_tensor(np.asarray(labels)).reshape(-1)
    if lab is not None and lab.numel() != total:
        raise ValueError(f"got {lab.numel()} labels for {total} inputs")
    if _is_conditional(model) and y is None:
        y = labels
    yt = None
    if _is_conditional(model):
        if y is None:
            raise ValueError("plot_latent_scatter: the model is conditional, so y or labels are required")
        yt = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y, dtype=torch.long).reshape(-1)
        if yt.numel() != total:
            raise ValueError(f"got {yt.numel()} class labels y for {total} inputs")
    if total > max_points:
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_points]
        idx = idx.sort().values
        x = x[idx]
        lab = None if lab is None else lab[idx]
        yt = None if yt is None else yt[idx]
    m = x.shape[0]
    if m == 0:
        raise ValueError("plot_latent_scatter: no inputs")
    means = _encode_means(model, x, yt)
    if method == "tsne":
        if m < 2:
            raise ValueError("t-SNE needs at least 2 points")
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (m - 1) / 3.0)
        pts = TSNE(
            n_components=2, perplexity=perplexity, random_state=seed, init="pca", learning_rate="auto"
        ).fit_transform(means.astype(np.float64))
        title = f"t-SNE of latent means (latent_dim={means.shape[1]}, n={m})"
        xlabel, ylabel = "t-SNE 1", "t-SNE 2"
    else:
        pts = means
        title = f"Latent means (n={m})"
        xlabel, ylabel = "$z_1$", "$z_2$"

    fig = _new_figure(7.0, 6.0)
    ax = fig.add_subplot()
    size = 6 if m > 500 else 14
    if lab is None:
        ax.scatter(pts[:, 0], pts[:, 1], s=size, alpha=0.7, color="tab:blue", linewidths=0)
    else:
        lab_np = lab.numpy()
        uniq = np.unique(lab_np)
        integral = lab_np.dtype.kind in "iub" or bool(np.all(np.mod(lab_np, 1) == 0))
        if integral and len(uniq) <= _MAX_CATEGORIES:
            cmap = matplotlib.colormaps["tab10" if len(uniq) <= 10 else "tab20"]
            names = _context("class_names", class_names)
            for i, u in enumerate(uniq):
                sel = lab_np == u
                label = class_label(u, names) if lab_np.dtype.kind != "b" else str(bool(u))
                ax.scatter(
                    pts[sel, 0], pts[sel, 1], s=size, alpha=0.7, color=cmap(i % cmap.N), label=label, linewidths=0
                )
            ax.legend(title="class", loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2, frameon=False)
        else:
            sc = ax.scatter(
                pts[:, 0], pts[:, 1], c=lab_np.astype(np.float64), s=size, alpha=0.7, cmap="viridis", linewidths=0
            )
            fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save_figure(fig, path)


def plot_latent_space(
    model,
    x,
    labels,
    out_dir,
    *,
    n: int = 20,
    max_points: int = 2000,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> list[str]:
    """The latent-space figures that fit the model's latent size, written into ``out_dir``: for a 2-D latent the
    decoded manifold (``latent_manifold.png``, an ``n`` × ``n`` grid) and the scatter of the encoder's means
    (``latent_scatter.png``); for any other size a t-SNE of the means (``latent_tsne.png``), as a run's figures
    do. Returns the paths written. Use it where the latent size may change (a notebook's edited model)."""
    out_dir = Path(out_dir)
    two_d = int(model.latent_dim) == 2
    paths = [plot_latent_manifold(model, out_dir / "latent_manifold.png", n=n)] if two_d else []
    scatter = out_dir / ("latent_scatter.png" if two_d else "latent_tsne.png")
    paths.append(
        plot_latent_scatter(model, x, labels, scatter, max_points=max_points, seed=seed, class_names=class_names)
    )
    return paths
