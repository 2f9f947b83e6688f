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
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.utils import make_grid, save_image

__all__ = [
    "save_image_grid",
    "plot_interpolations",
    "plot_perturbations",
    "plot_cross_generation",
    "plot_reconstructions",
    "plot_prior_samples",
    "plot_class_conditional",
    "manifold_grid",
    "plot_latent_manifold",
    "plot_latent_scatter",
    "plot_training_curves",
    "make_figures",
]

_MIN_TILE_PX = 32  # small images are upscaled (nearest neighbour) to at least this size
_DPI = 100
_MAX_CATEGORIES = 20  # integer labels with at most this many values get a legend


# --------------------------------------------------------------------------- helpers


def _prepare_path(path: str | os.PathLike) -> str:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return str(p)


def _model_device(model) -> torch.device:
    """Device of the model's first parameter, CPU if it has none."""
    try:
        return next(iter(model.parameters())).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


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


def save_image_grid(images, path, nrow: int = 8, pad: int = 2, upscale: int | None = None,
                    *, pad_value: float = 0.5) -> str:
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
    device = _model_device(model)
    yb = _labels_for(model, y, n, device, "plot_reconstructions")
    with _inference(model):
        recon = model.reconstruct(x.to(device, torch.float32), y=yb)
    tiles = torch.stack([_to_image_tensor(x), _to_image_tensor(recon)])
    return _tile_figure(tiles, path, title=title, row_labels=["original", "reconstruction"])


def plot_prior_samples(model, path, n: int = 64, seed: int = 0, y=None, nrow: int | None = None) -> str:
    """Grid of ``n`` decoded prior samples, reproducible for ``seed``.

    The caller's global RNG state is restored afterwards. A conditional model without ``y`` gets
    the labels 0, 1, ..., num_classes-1 cycled, with one column per class.
    """
    device = _model_device(model)
    if _is_conditional(model) and y is None:
        k = _num_classes(model, "plot_prior_samples")
        y = torch.arange(n) % k
        nrow = nrow or k
    yb = _labels_for(model, y, n, device, "plot_prior_samples")
    with _inference(model), _seeded(seed, device):
        samples = model.sample(n, y=yb)
    return save_image_grid(samples, path, nrow=nrow or max(1, math.ceil(math.sqrt(n))))


def _num_classes(model, what: str) -> int:
    k = getattr(model, "num_classes", None)
    if not k:
        raise ValueError(f"{what}: the model has no num_classes")
    return int(k)


def plot_class_conditional(model, path, per_class: int = 8, seed: int = 0) -> str:
    """One row of ``per_class`` prior samples per class for a conditional model (ValueError otherwise)."""
    if not _is_conditional(model):
        raise ValueError("plot_class_conditional needs a conditional model (model.conditional is False)")
    k = _num_classes(model, "plot_class_conditional")
    device = _model_device(model)
    y = torch.arange(k, device=device).repeat_interleave(per_class)
    with _inference(model), _seeded(seed, device):
        samples = model.sample(k * per_class, y=y)
    tiles = _to_image_tensor(samples).reshape(k, per_class, *samples.shape[1:])
    return _tile_figure(tiles, path, title="Class-conditional samples",
                        row_labels=[str(c) for c in range(k)], ylabel="class")


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


def plot_latent_manifold(model, path, n: int = 20, y=None,
                         quantile_range: tuple[float, float] = (0.05, 0.95)) -> str:
    """Decode an n x n inverse-Gaussian-CDF grid of a 2-D latent space into one tiled image.

    ValueError unless ``latent_dim == 2``. For a conditional model ``y`` (an int) fixes the class;
    it defaults to class 0.
    """
    if int(model.latent_dim) != 2:
        raise ValueError(f"plot_latent_manifold needs latent_dim == 2, got {model.latent_dim}")
    device = _model_device(model)
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
        tiles, path, title=title,
        col_labels=_sparse_labels(z_axis, every), row_labels=_sparse_labels(z_axis[::-1], every),
        xlabel="$z_1$", ylabel="$z_2$", pad=1, pad_value=0.5, min_tile_px=32,
    )


def _encode_means(model, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 512) -> np.ndarray:
    device = _model_device(model)
    out = []
    with _inference(model):
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].to(device, torch.float32)
            yb = None if y is None else y[s : s + batch_size].to(device)
            loc, _ = model.encode(xb, y=yb)
            out.append(loc.detach().to("cpu", torch.float32).reshape(loc.shape[0], -1))
    return torch.cat(out).numpy()


def plot_latent_scatter(model, x, labels, path, y=None, max_points: int = 2000, seed: int = 0,
                        method: str = "auto") -> str:
    """Scatter of encoder means q(z|x), coloured by ``labels`` (None: one colour).

    ``method``: "latent" (plot the 2-D means directly), "tsne" (t-SNE to 2-D) or "auto" (latent
    if ``latent_dim == 2`` else t-SNE). At most ``max_points`` inputs, subsampled with ``seed``.
    A conditional model is encoded with ``y``, or with ``labels`` if ``y`` is None.
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
        pts = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca",
                   learning_rate="auto").fit_transform(means.astype(np.float64))
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
            for i, u in enumerate(uniq):
                sel = lab_np == u
                label = str(int(u)) if lab_np.dtype.kind != "b" else str(bool(u))
                ax.scatter(pts[sel, 0], pts[sel, 1], s=size, alpha=0.7, color=cmap(i % cmap.N),
                           label=label, linewidths=0)
            ax.legend(title="label", loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2,
                      frameon=False)
        else:
            sc = ax.scatter(pts[:, 0], pts[:, 1], c=lab_np.astype(np.float64), s=size, alpha=0.7,
                            cmap="viridis", linewidths=0)
            fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save_figure(fig, path)


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
    ax.set_ylabel("ELBO per datapoint")
    ax.set_title("Training curves")
    ax.grid(True, alpha=0.3)
    return _save_figure(fig, path)


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
    data_y = None if data_y is None else torch.as_tensor(np.asarray(data_y) if not torch.is_tensor(data_y)
                                                          else data_y)
    y_small = None if (data_y is None or not cond) else data_y[:8]
    two_d = int(model.latent_dim) == 2
    paths = [
        plot_reconstructions(model, data_x[:8], run_dir / "reconstructions.png", y=y_small, n=8),
        plot_prior_samples(model, run_dir / "prior_samples.png", n=64, seed=seed),
    ]
    if cond:
        paths.append(plot_class_conditional(model, run_dir / "class_conditional.png", seed=seed))
    if two_d:
        paths.append(plot_latent_manifold(model, run_dir / "latent_manifold.png"))
    scatter_name = "latent_scatter.png" if two_d else "latent_tsne.png"
    paths.append(plot_latent_scatter(model, data_x, data_y, run_dir / scatter_name,
                                     max_points=n_scatter, seed=seed))
    if history:
        paths.append(plot_training_curves(history, run_dir / "training_curves.png"))
    return paths


def plot_layer_traversal(model, path, layer: int, rows: int = 8, cols: int = 8, seed: int = 0) -> str:
    """What one latent layer controls, for a model with ``latent_dims`` (one size per layer) and ``decode`` of
    z = [z_1, …, z_L] (vladder, vlac, hvae): each row holds the other layers at one N(0, I) draw, each column
    gives layer ``layer`` (1-based) one draw, shared by the rows."""
    dims = list(getattr(model, "latent_dims", []))
    if not 1 <= layer <= len(dims):
        raise ValueError(f"plot_layer_traversal: layer must be in 1..{len(dims)} (the model's latent_dims "
                         f"{dims}), got {layer}")
    device = _model_device(model)
    with _inference(model), _seeded(seed, device):
        others = torch.randn(rows, 1, sum(dims), device=device).expand(rows, cols, sum(dims)).clone()
        start = sum(dims[:layer - 1])
        others[..., start:start + dims[layer - 1]] = torch.randn(1, cols, dims[layer - 1], device=device)
        images = model.decode(others.reshape(rows * cols, -1))
    tiles = _to_image_tensor(images).reshape(rows, cols, *images.shape[1:])
    return _tile_figure(tiles, path, title=f"Layer {layer} varies along each row; the other layers are fixed per row",
                        row_labels=[str(r) for r in range(rows)], ylabel="draw of the other layers")


def plot_component_generation(model, path, layer: int, per_component: int = 8, seed: int = 0) -> str:
    """One row per mixture component c of ``layer``: decoded prior samples with c_layer = c fixed and every other
    latent drawn (a model with ``mixtures`` and ``prior_sample(n, component={layer: c})``, e.g. vlac)."""
    mixtures = getattr(model, "mixtures", {})
    if str(layer) not in mixtures:
        raise ValueError(f"plot_component_generation: layer {layer} has no mixture prior")
    k = mixtures[str(layer)].num_components
    device = _model_device(model)
    with _inference(model), _seeded(seed, device):
        z = torch.cat([model.prior_sample(per_component, {layer: c}) for c in range(k)])
        images = model.decode(z)
    tiles = _to_image_tensor(images).reshape(k, per_component, *images.shape[1:])
    return _tile_figure(tiles, path, title=f"Component-wise generation, layer {layer}",
                        row_labels=[str(c) for c in range(k)], ylabel="component")


def _generate(model, x, i: int, j: int) -> torch.Tensor:
    return model.decode(model.conditional(x, model.layout.only(i, len(x), x.device)).sample(), j)


@torch.no_grad()
def plot_cross_generation(model, x: torch.Tensor, path, n: int = 6, seed: int = 0, title: str | None = None) -> str:
    """A grid: row i = generated from modality i alone, column j = generated modality j, each cell ``n``
    datapoints (their true modality j in the top row); labels are shown as the most probable class."""
    layout = model.layout
    x = x[:n]
    parts = layout.split(x)
    m_count = layout.num_modalities
    fig = _new_figure(0.5 * n * m_count + 0.6, 0.62 * (m_count + 1) + 0.5 + (0.3 if title else 0))
    axes = fig.subplots(m_count + 1, m_count, squeeze=False)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for j in range(m_count):
            cells = [parts[layout.names[j]]] + [_generate(model, x, i, j)
                                                for i in range(m_count)]
            for r, vals in enumerate(cells):
                ax = axes[r, j]
                ax.set_xticks([]), ax.set_yticks([])
                if layout.kinds[j] == "label":
                    ax.text(0.5, 0.5, " ".join(str(int(c)) for c in vals.argmax(-1).tolist()), ha="center",
                            va="center", fontsize=9)
                else:
                    imgs = vals.clamp(0, 1).cpu()
                    row = torch.cat(list(imgs.permute(0, 2, 3, 1)), dim=1)
                    ax.imshow(row.squeeze(-1).numpy() if row.shape[-1] == 1 else row.numpy(), cmap="gray",
                              vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(f"{layout.names[j]}", fontsize=9)
                if j == 0:
                    ax.set_ylabel("data" if r == 0 else f"from {layout.names[r - 1]}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, _prepare_path(path))


@torch.no_grad()
def plot_interpolations(model, xa, xb, path, steps: int = 8, data_range=(0.0, 1.0)) -> str:
    """One row per pair: x_a, the decoded (1 − t) μ_a + t μ_b for ``steps`` values of t in [0, 1], x_b (images
    in ``data_range`` shown on [0, 1])."""
    device = _model_device(model)
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
def plot_perturbations(model, x, path, dims: int = 8, steps: int = 7, radius: float = 2.0,
                       data_range=(0.0, 1.0)) -> str:
    """Latent perturbations of one encoded image: row j moves z = μ(x) along the j-th of the ``dims`` latent
    dimensions with the largest posterior mean magnitude by δ ∈ [−radius, radius] (``steps`` values), decoded."""
    device = _model_device(model)
    x = torch.as_tensor(x).to(device)[:1]
    with _inference(model):
        loc = model.encode(x)[0][0]
        order = loc.abs().argsort(descending=True)[:dims]
        deltas = torch.linspace(-radius, radius, steps, device=device)
        z = loc.repeat(len(order) * steps, 1)
        for r, j in enumerate(order.tolist()):
            z[r * steps:(r + 1) * steps, j] += deltas
        images = model.decode(z)
    lo, hi = data_range
    return save_image_grid((images - lo) / (hi - lo), path, nrow=steps)
