"""Figures of hierarchical and multimodal models: one layer traversed, generation per mixture component, the
cross-generation grid of a multimodal VAE.
"""

from __future__ import annotations

import re

import torch

from ..nn.device import device_of
from .grids import (
    _inference,
    _new_figure,
    _prepare_path,
    _save_figure,
    _seeded,
    _tile,
    _tile_figure,
    _to_image_tensor,
)


def plot_layer_traversal(model, path, layer: int, rows: int = 8, cols: int = 8, seed: int = 0) -> str:
    """What one latent layer controls, for a model with ``latent_dims`` (one size per layer) and ``decode`` of
    z = [z_1, …, z_L] (vladder, vlac, hvae): each row holds the other layers at one N(0, I) draw, each column
    gives layer ``layer`` (1-based) one draw, shared by the rows."""
    dims = list(getattr(model, "latent_dims", []))
    if not 1 <= layer <= len(dims):
        raise ValueError(
            f"plot_layer_traversal: layer must be in 1..{len(dims)} (the model's latent_dims {dims}), got {layer}"
        )
    device = device_of(model)
    with _inference(model), _seeded(seed, device):
        others = torch.randn(rows, 1, sum(dims), device=device).expand(rows, cols, sum(dims)).clone()
        start = sum(dims[: layer - 1])
        others[..., start : start + dims[layer - 1]] = torch.randn(1, cols, dims[layer - 1], device=device)
        images = model.decode(others.reshape(rows * cols, -1))
    tiles = _to_image_tensor(images).reshape(rows, cols, *images.shape[1:])
    return _tile_figure(
        tiles,
        path,
        title=f"Layer {layer} varies along each row; the other layers are fixed per row",
        row_labels=[str(r) for r in range(rows)],
        ylabel="draw of the other layers",
    )


def _layer_grid(model, layer: int, base: list, steps: int, span: float) -> torch.Tensor:
    """(rows, steps, C, H, W) images: layer ``layer`` (1-based) over a grid of its first one or two units (the rest of
    the layer at its base value), every other layer at ``base`` (tensors of shape (1, d_l) or None)."""
    dims = list(model.latent_dims)
    d = dims[layer - 1]
    device = device_of(model)
    values = torch.linspace(-span, span, steps, device=device)
    if d >= 2:  # columns: unit 0 from −span to +span; rows: unit 1 from +span (top) to −span
        u1, u0 = torch.meshgrid(values.flip(0), values, indexing="ij")
        grid = torch.stack([u0.reshape(-1), u1.reshape(-1)], -1)
        rows = steps
    else:
        grid, rows = values[:, None], 1
    start = base[layer - 1]
    z = (start if start is not None else torch.zeros(1, d, device=device)).expand(len(grid), d).clone()
    z[:, : grid.shape[1]] = grid
    zs = [z if l == layer - 1 else (None if b is None else b.expand(len(grid), -1)) for l, b in enumerate(base)]
    images = _to_image_tensor(model.decode_layers(zs))
    return images.reshape(rows, steps, *images.shape[1:])


def plot_layer_grids(model, path, x=None, steps: int = 7, span: float = 2.0, title: str | None = None) -> str:
    """Per-layer traversals (Zhao, Song & Ermon 2017, Fig. 4-5), one panel per latent layer: layer l's code runs
    over a ``steps`` × ``steps`` grid on [−span, span]² (its first two units; a 1-d layer gives one row) and is
    decoded with the other layers fixed. Fixed at: with ``x`` = None, each layer's prior mean given the layers
    above (the model's ``decode_layers`` with ``None`` entries: 0 for independent layers; in a Markov hierarchy
    the layers below the varied one follow it through the generative chain's means); with a batch ``x``, its
    first image's posterior means (``encode(x[:1])``; in a Markov hierarchy x then depends on z_1 alone, so the
    upper panels stay flat). For a model with ``latent_dims`` and ``decode_layers([z_1, …, z_L])`` (vladder, hvae).
    Deterministic; returns the path written."""
    dims = list(getattr(model, "latent_dims", []))
    if not dims or not hasattr(model, "decode_layers"):
        raise ValueError("plot_layer_grids: the model needs latent_dims and decode_layers (e.g. vladder, hvae)")
    if int(steps) < 2:
        raise ValueError(f"plot_layer_grids: steps must be at least 2, got {steps}")
    if not float(span) > 0:
        raise ValueError(f"plot_layer_grids: span must be positive, got {span}")
    device = device_of(model)
    with _inference(model):
        if x is None:
            base = [None] * len(dims)
            fixed = "prior means"
        else:
            x = torch.as_tensor(x, device=device)
            loc = model.encode(x[:1])[0]  # the first image of the batch
            base = list(loc.split(dims, dim=-1))
            fixed = "an image's posterior means"
        panels = [_layer_grid(model, l, base, int(steps), float(span)) for l in range(1, len(dims) + 1)]
    fig = _new_figure(2.6 * len(dims), 3.0)
    axes = fig.subplots(1, len(dims), squeeze=False)[0]
    for l, (ax, tiles) in enumerate(zip(axes, panels, strict=True), start=1):
        img = _tile(tiles, 1, 1.0)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"z{l} varies", fontsize=10)
        ax.set_xlabel(f"z{l}[0]: −{span:g} → {span:g}", fontsize=8)
        if tiles.shape[0] > 1:
            ax.set_ylabel(f"z{l}[1]: {span:g} → −{span:g}", fontsize=8)
    fig.suptitle(title or f"One layer varies, the others at {fixed}", fontsize=10)
    return _save_figure(fig, path)


def plot_component_generation(model, path, layer: int, per_component: int = 8, seed: int = 0) -> str:
    """One row per mixture component c of ``layer``: decoded prior samples with c_layer = c fixed and every other
    latent drawn (a model with ``mixtures`` and ``prior_sample(n, component={layer: c})``, e.g. vlac)."""
    mixtures = getattr(model, "mixtures", {})
    if str(layer) not in mixtures:
        raise ValueError(f"plot_component_generation: layer {layer} has no mixture prior")
    k = mixtures[str(layer)].num_components
    device = device_of(model)
    with _inference(model), _seeded(seed, device):
        z = torch.cat([model.prior_sample(per_component, {layer: c}) for c in range(k)])
        images = model.decode(z)
    tiles = _to_image_tensor(images).reshape(k, per_component, *images.shape[1:])
    return _tile_figure(
        tiles,
        path,
        title=f"Component-wise generation, layer {layer}",
        row_labels=[str(c) for c in range(k)],
        ylabel="component",
    )


def modality_label(name: str) -> str:
    """How a figure names a modality: its layout name, or "modality k" for the generic names ``m0``, ``m1``, ..."""
    generic = re.fullmatch(r"m(\d+)", name)
    return f"modality {generic.group(1)}" if generic else name


def _generate(model, x, i: int, j: int) -> torch.Tensor:
    return model.decode(model.conditional(x, model.layout.only(i, len(x), x.device)).sample(), j)


@torch.no_grad()
def plot_cross_generation(model, x: torch.Tensor, path, n: int = 6, seed: int = 0, title: str | None = None) -> str:
    """A grid: row i = generated from modality i alone, column j = generated modality j, each cell ``n``
    datapoints (their true modality j in the top row); labels are shown as the most probable class. Modalities
    are named by the layout (generic names ``m0``, ``m1``, ... as "modality 0", ...); ``title`` (default: what the
    grid shows) goes above it."""
    layout = model.layout
    x = x[:n]
    parts = layout.split(x)
    m_count = layout.num_modalities
    names = [modality_label(name) for name in layout.names]
    title = title or "Cross-generation from each modality alone (decoder means)"
    fig = _new_figure(0.5 * n * m_count + 0.6, 0.62 * (m_count + 1) + 0.8)
    axes = fig.subplots(m_count + 1, m_count, squeeze=False)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for j in range(m_count):
            cells = [parts[layout.names[j]]] + [_generate(model, x, i, j) for i in range(m_count)]
            for r, vals in enumerate(cells):
                ax = axes[r, j]
                ax.set_xticks([]), ax.set_yticks([])
                if layout.kinds[j] == "label":
                    ax.text(
                        0.5,
                        0.5,
                        " ".join(str(int(c)) for c in vals.argmax(-1).tolist()),
                        ha="center",
                        va="center",
                        fontsize=9,
                    )
                else:
                    imgs = vals.clamp(0, 1).cpu()
                    row = torch.cat(list(imgs.permute(0, 2, 3, 1)), dim=1)
                    ax.imshow(
                        row.squeeze(-1).numpy() if row.shape[-1] == 1 else row.numpy(), cmap="gray", vmin=0, vmax=1
                    )
                if r == 0:
                    ax.set_title(names[j], fontsize=9)
                if j == 0:
                    ax.set_ylabel("data" if r == 0 else f"from {names[r - 1]}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save_figure(fig, _prepare_path(path))
