"""Figures for trained VAEs: image grids, reconstructions, samples, latent plots, curves.

Everything is drawn on ``matplotlib.figure.Figure`` objects with an explicit Agg canvas, so
``pyplot`` and the user's (e.g. notebook) backend are never touched and nothing is shown.
Every function writes a PNG to the given path (creating parent folders) and returns that
path as ``str``.

Models are duck-typed: ``latent_dim``, ``encode(x, y=None) -> (loc, scale)``,
``decode(z, y=None)``, ``sample(n, y=None)``, ``reconstruct(x, y=None)``,
``num_classes`` and ``conditional`` (see the module tests for a minimal fake model).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.utils import make_grid, save_image

from ..nn.device import device_of

_MIN_TILE_PX = 32  # small images are upscaled (nearest neighbour) to at least this size
_DPI = 100
_MAX_CATEGORIES = 20  # integer labels with at most this many values get a legend


# --------------------------------------------------------------------------- what the figures say

_CONTEXT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ppl_vae_figure_context", default=None)


@contextlib.contextmanager
def figure_context(*, class_names: Sequence[str] | None = None, checkpoint: str | None = None) -> Iterator[None]:
    """What the figures drawn inside the block say about their data and model: ``class_names`` (the data set's,
    e.g. the ``class_names`` of a :class:`~ppl_vae.data.DataBundle`) label legends and class rows instead of the
    class indices; ``checkpoint`` (``"best"`` or ``"last"``) is named in the titles of sample grids. An argument
    given to a figure function directly wins; a run's figures are drawn inside one (``ppl_vae.experiment``)."""
    names = None if class_names is None else tuple(class_names)
    token = _CONTEXT.set({**(_CONTEXT.get() or {}), "class_names": names, "checkpoint": checkpoint})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _context(key: str, given=None):
    return given if given is not None else (_CONTEXT.get() or {}).get(key)


def class_label(value, class_names: Sequence[str] | None) -> str:
    """The name of class ``value`` (an integer index) in ``class_names``, else the index as text."""
    i = int(value)
    return str(class_names[i]) if class_names is not None and 0 <= i < len(class_names) else str(i)


def sample_title(seed: int | None, *, checkpoint: str | None = None, source: str = "prior") -> str:
    """The title of a sample grid: where z came from, that the images are the decoder's means E[x | z] (no
    pixel noise drawn), the seed and the checkpoint when known."""
    what = {"prior": "z ~ p(z)", "aggregate": "z ~ a mixture fitted to q(z)"}.get(source, source)
    parts = [] if seed is None else [f"seed {seed}"]
    if checkpoint is not None:
        parts.append(f"{checkpoint} checkpoint")
    return f"Samples: decoder means E[x | z], {what}" + ("\n" + ", ".join(parts) if parts else "")


# --------------------------------------------------------------------------- helpers


def _prepare_path(path: str | os.PathLike) -> str:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return str(p)


@contextlib.contextmanager
def _inference(model) -> Iterator[None]:
    """``torch.no_grad`` plus eval mode (restored afterwards) for ``nn.Module`` models."""
    was_training = getattr(model, "training", None)
    if was_training and hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global torch RNG (CPU and the model's CUDA device) and restore it afterwards."""
    cuda_index = None
    if device.type == "cuda":
        cuda_index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[] if cuda_index is None else [cuda_index]):
        torch.default_generator.manual_seed(seed)
        if cuda_index is not None:
            with torch.cuda.device(cuda_index):
                torch.cuda.manual_seed(seed)
        yield


def _is_conditional(model) -> bool:
    return bool(getattr(model, "conditional", False))


def _labels_for(model, y, batch: int, device: torch.device, what: str) -> torch.Tensor | None:
    """``y`` as an int64 tensor of shape (batch,) on ``device`` for conditional models, else None.

    ``y`` may be an int (broadcast), a sequence or a tensor. Non-conditional models get None.
    """
    if not _is_conditional(model):
        return None
    if y is None:
        raise ValueError(f"{what}: the model is conditional, so labels y are required")
    y = torch.as_tensor(y, dtype=torch.long)
    if y.dim() == 0:
        y = y.expand(batch)
    y = y.reshape(-1)
    if y.numel() < batch:
        raise ValueError(f"{what}: got {y.numel()} labels for {batch} inputs")
    return y[:batch].to(device)


def _to_image_tensor(images) -> torch.Tensor:
    """Float CPU tensor (B, C, H, W) clamped to [0, 1]; accepts (B, H, W) and arrays."""
    images = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if images.dim() == 2:
        images = images[None, None]
    elif images.dim() == 3:
        images = images[:, None]
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    return images.clamp(0.0, 1.0)


def _auto_upscale(h: int, w: int, upscale: int | None, min_px: int = _MIN_TILE_PX) -> int:
    if upscale is None:
        return max(1, math.ceil(min_px / max(1, min(h, w))))
    if int(upscale) < 1:
        raise ValueError(f"upscale must be a positive integer, got {upscale}")
    return int(upscale)


def _upscale(images: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return images
    return F.interpolate(images, scale_factor=factor, mode="nearest")


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path) -> str:
    path = _prepare_path(path)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _tile(tiles: torch.Tensor, pad: int, pad_value: float) -> np.ndarray:
    """(R, K, C, H, W) images -> one (rows*H, cols*W[, 3]) array with ``pad`` px between tiles."""
    r, k, c, h, w = tiles.shape
    if pad > 0:
        tiles = F.pad(tiles, (0, pad, 0, pad), value=pad_value)
    hp, wp = h + pad, w + pad
    img = tiles.permute(2, 0, 3, 1, 4).reshape(c, r * hp, k * wp)
    if pad > 0:
        img = img[:, : r * hp - pad, : k * wp - pad]
    img = img.numpy()
    return img[0] if c == 1 else np.transpose(img, (1, 2, 0))


def _tile_figure(
    tiles: torch.Tensor,
    path,
    *,
    title: str,
    pad: int = 2,
    pad_value: float = 1.0,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    min_tile_px: int = 48,
    max_px: int = 1600,
) -> str:
    """Draw an (R, K) array of images with optional per-row / per-column tick labels.

    Tiles are upscaled by an integer nearest-neighbour factor to >= ``min_tile_px`` and drawn at one
    screen pixel per image pixel (unless wider/taller than ``max_px``), so small images stay crisp.
    """
    r, k, c, h, w = tiles.shape
    factor = _auto_upscale(h, w, None, min_tile_px)
    tiles = _upscale(tiles.reshape(r * k, c, h, w), factor)
    h, w = h * factor, w * factor
    img = _tile(tiles.reshape(r, k, c, h, w), pad, pad_value)
    ih, iw = img.shape[:2]
    shrink = min(1.0, max_px / max(ih, iw))
    ax_w, ax_h = iw * shrink / _DPI, ih * shrink / _DPI
    left, right, bottom, top = 1.6, 0.3, 1.2, 0.6  # generous margins, trimmed by bbox_inches="tight"
    fig = Figure(figsize=(left + ax_w + right, bottom + ax_h + top), dpi=_DPI)
    FigureCanvasAgg(fig)
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes((left / fw, bottom / fh, ax_w / fw, ax_h / fh))
    kw = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if c == 1 else {}
    ax.imshow(img, interpolation="nearest" if shrink == 1.0 else "antialiased", aspect="equal", **kw)
    centres_x = [j * (w + pad) + (w - 1) / 2 for j in range(k)]
    centres_y = [i * (h + pad) + (h - 1) / 2 for i in range(r)]
    if col_labels is not None:
        ax.set_xticks(centres_x, list(col_labels), fontsize=8, rotation=90 if k > 10 else 0)
    else:
        ax.set_xticks([])
    if row_labels is not None:
        ax.set_yticks(centres_y, list(row_labels), fontsize=9)
    else:
        ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(length=0)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    path = _prepare_path(path)
    fig.savefig(path, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.1)
    return path


def _sparse_labels(values: Sequence[float], every: int) -> list[str]:
    n = len(values)
    return [f"{v:.2f}" if (i % every == 0 or i == n - 1) else "" for i, v in enumerate(values)]


# --------------------------------------------------------------------------- figures


def save_image_grid(
    images, path, nrow: int = 8, pad: int = 2, upscale: int | None = None, *, pad_value: float = 0.5
) -> str:
    """Save images (B, C, H, W) in [0, 1] as one PNG grid with ``nrow`` images per row.

    ``upscale`` is an integer nearest-neighbour factor; None picks the smallest factor that makes
    tiles at least 32 px, so 8x8 digits stay readable. Returns the path written.
    """
    images = _to_image_tensor(images)
    if images.shape[0] == 0:
        raise ValueError("save_image_grid: no images")
    factor = _auto_upscale(images.shape[-2], images.shape[-1], upscale)
    grid = make_grid(_upscale(images, factor), nrow=max(1, int(nrow)), padding=pad, pad_value=pad_value)
    path = _prepare_path(path)
    save_image(grid, path, format="png")
    return path


def plot_reconstructions(model, x, path, y=None, n: int = 8, title: str = "Reconstructions") -> str:
    """Originals (top row) above their reconstructions (bottom row) for the first ``n`` inputs."""
    x = torch.as_tensor(x)[:n]
    n = x.shape[0]
    if n == 0:
        raise ValueError("plot_reconstructions: no inputs")
    device = device_of(model)
    yb = _labels_for(model, y, n, device, "plot_reconstructions")
    with _inference(model):
        recon = model.reconstruct(x.to(device, torch.float32), y=yb)
    tiles = torch.stack([_to_image_tensor(x), _to_image_tensor(recon)])
    return _tile_figure(tiles, path, title=title, row_labels=["original", "reconstruction"])


def draw_prior_samples(model, n: int = 64, seed: int = 0, y=None, nrow: int | None = None):
    """``(images, nrow)``: ``model.sample(n, y)`` (the decoder's means at prior draws) from ``seed``, in eval mode,
    the caller's global RNG state restored afterwards, and the images per row of their grid. A conditional model
    without ``y`` gets the labels 0, 1, ..., num_classes-1 cycled, with one column per class."""
    device = device_of(model)
    if _is_conditional(model) and y is None:
        k = _num_classes(model, "plot_prior_samples")
        y = torch.arange(n) % k
        nrow = nrow or k
    yb = _labels_for(model, y, n, device, "plot_prior_samples")
    with _inference(model), _seeded(seed, device):
        samples = model.sample(n, y=yb)
    return samples, nrow or max(1, math.ceil(math.sqrt(n)))


def plot_sample_grid(images, path, nrow: int, title: str) -> str:
    """``images`` (B, C, H, W) in [0, 1] as a titled grid of ``nrow`` per row (the last row left blank where
    short); small images are upscaled so that they stay crisp."""
    images = _to_image_tensor(images)
    b = images.shape[0]
    if b == 0:
        raise ValueError("plot_sample_grid: no images")
    nrow = max(1, min(int(nrow), b))
    rows = math.ceil(b / nrow)
    blank = images.new_ones(rows * nrow - b, *images.shape[1:])
    tiles = torch.cat([images, blank]).reshape(rows, nrow, *images.shape[1:])
    return _tile_figure(tiles, path, title=title, pad=2, pad_value=0.5, min_tile_px=_MIN_TILE_PX)


def plot_prior_samples(
    model, path, n: int = 64, seed: int = 0, y=None, nrow: int | None = None, *, checkpoint: str | None = None
) -> str:
    """Grid of ``n`` decoded prior samples (the decoder's means E[x | z], z ~ p(z)), reproducible for ``seed``,
    titled with what they are, the seed and ``checkpoint`` (default: the one of :func:`figure_context`).

    The caller's global RNG state is restored afterwards. A conditional model without ``y`` gets
    the labels 0, 1, ..., num_classes-1 cycled, with one column per class. ``ppl-vae sample`` draws the same grid
    (``draw_prior_samples`` and ``plot_sample_grid``), so with the run's seed its file is this one.
    """
    images, nrow = draw_prior_samples(model, n, seed, y, nrow)
    title = sample_title(seed, checkpoint=_context("checkpoint", checkpoint))
    return plot_sample_grid(images, path, nrow, title)


def _num_classes(model, what: str) -> int:
    k = getattr(model, "num_classes", None)
    if not k:
        raise ValueError(f"{what}: the model has no num_classes")
    return int(k)


def plot_class_conditional(
    model, path, per_class: int = 8, seed: int = 0, *, class_names: Sequence[str] | None = None
) -> str:
    """One row of ``per_class`` prior samples (decoder means) per class for a conditional model (ValueError
    otherwise); the rows are labelled with ``class_names`` (default: those of :func:`figure_context`) or the
    class indices."""
    if not _is_conditional(model):
        raise ValueError("plot_class_conditional needs a conditional model (model.conditional is False)")
    k = _num_classes(model, "plot_class_conditional")
    device = device_of(model)
    y = torch.arange(k, device=device).repeat_interleave(per_class)
    with _inference(model), _seeded(seed, device):
        samples = model.sample(k * per_class, y=y)
    tiles = _to_image_tensor(samples).reshape(k, per_class, *samples.shape[1:])
    names = _context("class_names", class_names)
    return _tile_figure(
        tiles,
        path,
        title="Class-conditional samples: decoder means E[x | z, y]",
        row_labels=[class_label(c, names) for c in range(k)],
        ylabel="class",
    )


@torch.no_grad()
def plot_interpolations(model, xa, xb, path, steps: int = 8, data_range=(0.0, 1.0)) -> str:
    """One row per pair: x_a, the decoded (1 − t) μ_a + t μ_b for ``steps`` values of t in [0, 1], x_b (images
    in ``data_range`` shown on [0, 1])."""
    device = device_of(model)
    xa, xb = torch.as_tensor(xa).to(device), torch.as_tensor(xb).to(device)
    with _inference(model):
        la, lb = model.encode(xa)[0], model.encode(xb)[0]
        t = torch.linspace(0, 1, steps, device=device).view(1, -1, 1)
        z = (1 - t) * la[:, None] + t * lb[:, None]
        strip = model.decode(z.reshape(-1, z.shape[-1])).reshape(len(xa), steps, *xa.shape[1:])
    lo, hi = data_range
    rows = (torch.cat([xa[:, None], strip, xb[:, None]], 1) - lo) / (hi - lo)
    return save_image_grid(rows.reshape(-1, *xa.shape[1:]), path, nrow=steps + 2)


@torch.no_grad()
def plot_perturbations(
    model, x, path, dims: int = 8, steps: int = 7, radius: float = 2.0, data_range=(0.0, 1.0)
) -> str:
    """Latent perturbations of one encoded image: row j moves z = μ(x) along the j-th of the ``dims`` latent
    dimensions with the largest posterior mean magnitude by δ ∈ [−radius, radius] (``steps`` values), decoded."""
    device = device_of(model)
    x = torch.as_tensor(x).to(device)[:1]
    with _inference(model):
        loc = model.encode(x)[0][0]
        order = loc.abs().argsort(descending=True)[:dims]
        deltas = torch.linspace(-radius, radius, steps, device=device)
        z = loc.repeat(len(order) * steps, 1)
        for r, j in enumerate(order.tolist()):
            z[r * steps : (r + 1) * steps, j] += deltas
        images = model.decode(z)
    lo, hi = data_range
    return save_image_grid((images - lo) / (hi - lo), path, nrow=steps)
