"""Multimodal data: several named views of each datapoint, any of which may be missing, with a mask.

A :class:`MultimodalData` is a :class:`~ppl_vae.data.DataBundle` whose ``x`` is the *packed* datapoint (every
modality flattened and concatenated, shape ``(N, D_1 + … + D_M)``) and whose ``y`` is the **mask** ``(N, M)``
(``True`` = observed), so it goes through :func:`ppl_vae.train`, ``pyro.infer.SVI`` and
:func:`ppl_vae.evaluate.log_likelihood` unchanged: a multimodal model is called ``model(x, mask)`` and
``guide(x, mask)``, ``x`` packed or a dict ``{name: tensor}`` (:meth:`Layout.split` / :meth:`Layout.pack`).
The class labels live beside the mask (``train_labels`` …) for evaluation. A missing modality's slot in ``x``
holds zeros that no model reads: models drop it through the mask (``poutine.mask`` on its likelihood, its expert
left out of the aggregation), never by feeding zeros to an encoder.

Two constructions from any labelled image dataset (no download; :func:`make_multimodal`):

* ``poly`` — **PolyFashion** on Fashion-MNIST (PolyMNIST's recipe, Sutter, Daunhawer & Vogt 2021, on another
  base set): M modalities, each a *different* image of the datapoint's class under a fixed per-modality
  transform — a background texture, inversion, a Gaussian blur (cycled for M > 3, the texture re-drawn);
  modality 0 is the base image itself, modality m > 0 a same-class image drawn by a seeded permutation.
* ``image_label`` — the image and its class label as a one-hot vector (2 modalities).

Missing modalities: each modality of a training or validation datapoint is dropped with probability
``missing_rate`` (at least one stays); test data are complete (evaluation chooses its own subsets).
Everything is a pure function of ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DataError
from .bundle import DataBundle
from .sources import _generator

__all__ = ["Layout", "MultimodalData", "make_multimodal", "MULTIMODAL_KINDS", "POLY_TRANSFORMS"]

MULTIMODAL_KINDS = ("poly", "image_label")  # data.multimodal

POLY_TRANSFORMS = ("texture", "invert", "blur")


@dataclass(frozen=True)
class Layout:
    """Names, shapes and kinds (``"image"`` or ``"label"``) of the modalities of a packed datapoint."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    kinds: tuple[str, ...]

    def __post_init__(self):
        if not (len(self.names) == len(self.shapes) == len(self.kinds)) or not self.names:
            raise DataError(f"a Layout needs one name, shape and kind per modality, got {self}")
        if len(set(self.names)) != len(self.names):
            raise DataError(f"modality names must be distinct, got {self.names}")

    @property
    def num_modalities(self) -> int:
        return len(self.names)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def data_dim(self) -> int:
        return sum(self.sizes)

    def split(self, x) -> dict[str, torch.Tensor]:
        """``{name: (…, *shape)}`` from a packed ``(…, D)`` tensor (a dict is checked and returned as is)."""
        if isinstance(x, dict):
            missing = [n for n in self.names if n not in x]
            if missing:
                raise DataError(f"the modality dict lacks {missing}; expected keys {list(self.names)}")
            return {n: x[n] for n in self.names}
        if not torch.is_tensor(x) or x.shape[-1] != self.data_dim:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise DataError(
                f"a packed multimodal batch must have last dimension {self.data_dim} "
                f"({' + '.join(map(str, self.sizes))} for {list(self.names)}), got {got}"
            )
        parts = x.split(self.sizes, dim=-1)
        return {n: p.reshape(*x.shape[:-1], *s) for n, p, s in zip(self.names, parts, self.shapes, strict=False)}

    def pack(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The packed ``(B, D)`` tensor of ``{name: (B, *shape)}``."""
        parts = self.split(parts)
        return torch.cat([parts[n].reshape(parts[n].shape[0], -1).float() for n in self.names], dim=-1)

    def index(self, name_or_index) -> int:
        if isinstance(name_or_index, int) and 0 <= name_or_index < self.num_modalities:
            return name_or_index
        if name_or_index in self.names:
            return self.names.index(name_or_index)
        raise DataError(
            f"modality must be one of {list(self.names)} or an index < {self.num_modalities}, got {name_or_index!r}"
        )

    def full_mask(self, batch: int, device=None) -> torch.Tensor:
        return torch.ones(batch, self.num_modalities, dtype=torch.bool, device=device)

    def only(self, m: int, batch: int, device=None) -> torch.Tensor:
        """(B, M) mask with modality m alone."""
        mask = torch.zeros(batch, self.num_modalities, dtype=torch.bool, device=device)
        mask[:, m] = True
        return mask

    def all_but(self, m: int, batch: int, device=None) -> torch.Tensor:
        """(B, M) mask with every modality but m."""
        return ~self.only(m, batch, device)


@dataclass(eq=False, repr=False)
class MultimodalData(DataBundle):
    """A :class:`DataBundle` of packed multimodal datapoints (``x``), their masks (``y``) and class labels."""

    layout: Layout | None = None
    train_labels: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    label_classes: int | None = None

    @property
    def data_dim(self) -> int:
        return self.layout.data_dim

    def labels(self, split: str) -> torch.Tensor | None:
        return {"train": self.train_labels, "val": self.val_labels, "test": self.test_labels}[split]

    def __repr__(self) -> str:
        mods = ", ".join(f"{n}{tuple(s)}" for n, s in zip(self.layout.names, self.layout.shapes, strict=False))
        return (
            f"MultimodalData({self.name!r}, modalities=[{mods}], train={len(self.train_x)}, "
            f"val={len(self.val_x)}, test={len(self.test_x)}, observed={self.observed_fraction():.3f})"
        )

    def observed_fraction(self) -> float:
        """Share of (datapoint, modality) pairs of the training split that are observed."""
        return float(self.train_y.float().mean()) if len(self.train_y) else 1.0


# ----------------------------------------------------------------------------------------------- builders


def _texture(shape, g: torch.Generator) -> torch.Tensor:
    """A smooth random background (C, 2H, 2W) in [0, 0.7]: uniform noise, twice box-blurred, min–max scaled."""
    c, h, w = shape
    t = torch.rand(1, c, 2 * h, 2 * w, generator=g)
    for k in (5, 3):
        t = F.avg_pool2d(F.pad(t, (k // 2,) * 4, mode="reflect"), k, stride=1)
    t = (t - t.min()) / (t.max() - t.min()).clamp_min(1e-8)
    return 0.7 * t[0]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2 * sigma)))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _poly_transform(x: torch.Tensor, m: int, seed: int, split: str) -> torch.Tensor:
    """Modality m's fixed transform of images x (B, C, H, W) in [0, 1]."""
    kind, rep = POLY_TRANSFORMS[m % 3], m // 3
    if kind == "texture":
        tex = _texture(x.shape[1:], _generator(seed, "texture", m))
        h, w = x.shape[-2:]
        g = _generator(seed, "crop", m, split)
        oy = torch.randint(0, h + 1, (len(x),), generator=g)
        ox = torch.randint(0, w + 1, (len(x),), generator=g)
        crops = (
            torch.stack([tex[:, a : a + h, b : b + w] for a, b in zip(oy.tolist(), ox.tolist(), strict=False)])
            if len(x)
            else x.new_zeros(x.shape)
        )
        return crops * (1 - x) + x
    if kind == "invert":
        return 1 - x if rep % 2 == 0 else 0.5 + 0.5 * (1 - x)
    return _gaussian_blur(x, 1.0 + 0.5 * rep).clamp(0, 1)


def _same_class_partner(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """For each datapoint, the index of another datapoint of the same class (a random derangement per class
    where the class has ≥ 2 members)."""
    out = torch.arange(len(labels))
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2:
            continue
        perm = torch.randperm(len(idx), generator=g)
        shift = 1 + int(torch.randint(0, len(idx) - 1, (1,), generator=g))
        out[idx[perm]] = idx[perm.roll(shift)]
    return out


def _masks(n: int, m: int, rate: float, g: torch.Generator) -> torch.Tensor:
    mask = torch.rand(n, m, generator=g) >= rate
    empty = ~mask.any(1)
    if empty.any():
        keep = torch.randint(0, m, (int(empty.sum()),), generator=g)
        mask[empty.nonzero().flatten(), keep] = True
    return mask


def make_multimodal(
    base: DataBundle, kind: str = "poly", *, num_modalities: int = 3, missing_rate: float = 0.0, seed: int = 0
) -> MultimodalData:
    """A :class:`MultimodalData` from a labelled image bundle (see the module docstring)."""
    if kind not in MULTIMODAL_KINDS:
        raise DataError(f"data.multimodal must be one of {list(MULTIMODAL_KINDS)}, got {kind!r}")
    if base.storage != "memory":
        raise DataError(
            f"data.multimodal={kind!r} builds its modalities in memory from float32 images, but the "
            f"bundle was loaded with storage={base.storage!r}: load it with storage='memory'"
        )
    if base.train_y is None or base.train_y.dim() != 1 or not base.num_classes:
        raise DataError(
            f"data.multimodal={kind!r} needs a dataset with one class label per image, but "
            f"{base.name!r} has {'none' if base.train_y is None else tuple(base.train_y.shape[1:])}"
        )
    if isinstance(missing_rate, bool) or not isinstance(missing_rate, (int, float)) or not 0 <= missing_rate < 1:
        raise DataError(f"data.missing_rate must be a number in [0, 1), got {missing_rate!r}")
    if kind == "poly" and (
        isinstance(num_modalities, bool) or not isinstance(num_modalities, int) or num_modalities < 2
    ):
        raise DataError(f"data.num_modalities must be an integer >= 2, got {num_modalities!r}")
    shape = tuple(base.shape)
    if kind == "poly":
        m_count = num_modalities
        layout = Layout(tuple(f"m{m}" for m in range(m_count)), (shape,) * m_count, ("image",) * m_count)
    else:
        m_count = 2
        layout = Layout(("image", "label"), (shape, (base.num_classes,)), ("image", "label"))

    splits = {}
    for split in ("train", "val", "test"):
        x, y = base.split(split)
        if len(x) == 0:
            splits[split] = (torch.zeros(0, layout.data_dim), torch.zeros(0, m_count, dtype=torch.bool), y)
            continue
        if kind == "poly":
            parts = {}
            for m in range(m_count):
                idx = torch.arange(len(x)) if m == 0 else _same_class_partner(y, _generator(seed, "pair", m, split))
                parts[f"m{m}"] = _poly_transform(x[idx], m, seed, split)
        else:
            parts = {"image": x, "label": F.one_hot(y.long(), base.num_classes).float()}
        rate = missing_rate if split != "test" else 0.0
        mask = _masks(len(x), m_count, rate, _generator(seed, "missing", split))
        packed = layout.pack(parts)
        packed = packed * _expand_mask(mask, layout)  # a missing modality holds zeros that no model reads
        splits[split] = (packed, mask, y)
    suffix = f"poly{m_count}" if kind == "poly" else "image_label"
    return MultimodalData(
        name=f"{base.name}:{suffix}",
        pixels=base.pixels,
        shape=layout,
        num_classes=None,
        train_x=splits["train"][0],
        train_y=splits["train"][1],
        val_x=splits["val"][0],
        val_y=splits["val"][1],
        test_x=splits["test"][0],
        test_y=splits["test"][1],
        class_names=base.class_names,
        source=f"{base.source} ({suffix}, missing_rate={missing_rate:g}, seed={seed})",
        layout=layout,
        train_labels=splits["train"][2],
        val_labels=splits["val"][2],
        test_labels=splits["test"][2],
        label_classes=base.num_classes,
    )


def _expand_mask(mask: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(N, M) mask → (N, D) mask of the packed values."""
    return torch.cat([mask[:, m : m + 1].expand(-1, s) for m, s in enumerate(layout.sizes)], dim=1).float()
