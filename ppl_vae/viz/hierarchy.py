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
