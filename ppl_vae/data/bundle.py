"""Image datasets by name, as float tensors in [0, 1], with reproducible batching.

>>> data = load_data("digits", pixels="binary_dynamic", seed=1)
>>> data
DataBundle('digits', pixels='binary_dynamic', shape=(1, 8, 8), num_classes=10, train=1294, val=144, test=359)
>>> for x, y in data.batches("train", 128, shuffle=True, seed=1, epoch=0):
...     pass  # x: (<=128, 1, 8, 8) float32 in {0, 1}, y: (<=128,) int64

Datasets (see :data:`DATASETS`):

* ``digits`` -- scikit-learn's embedded 8x8 digits (1797 images, no files needed).
  There is no official test split, so a fixed 20% test split is drawn once from a
  constant seed (the same for every ``seed``, like an official split).
* ``mnist``, ``fashion_mnist``, ``kmnist`` -- 28x28 IDX files read with torchvision's
  readers. ``root`` may use torchvision's layout (``<root>/<ClassName>/raw/``) or hold
  the four files directly (plain or ``.gz``, e.g. Debian's
  ``/usr/share/datasets/fashion-mnist``); the latter are arranged (symlinks or
  decompressed copies) under the cache folder (``$PPL_VAE_CACHE_DIR``, default
  ``~/.cache/ppl_vae``).
* ``omniglot`` -- torchvision ``Omniglot``: background set = train, evaluation set = test;
  resized to 28x28 (or ``image_size``) and inverted so strokes are 1.
* ``celeba`` -- torchvision ``CelebA`` (aligned faces): centre crop 148, resize to 64x64
  (or ``image_size``), RGB. As float32 the official train + test images need ~9 GB: use ``storage="files"``
  (decoded per batch) or ``"uint8"`` (~2.2 GB), or ``limit``.
* ``image_folder`` -- your own images with torchvision ``ImageFolder``: ``root`` holds one
  subfolder per class; RGB, resized (shorter side) and centre-cropped to 64x64 (or
  ``image_size``). No official test split: a fixed 20% is drawn from a constant seed.

Storage (``storage``, see :mod:`ppl_vae.data.storage`): ``memory`` (float32 tensors, the default);
``uint8`` (8-bit in memory, converted per batch); ``mmap`` (IDX datasets: the files
memory-mapped); ``files`` (folder datasets: each image decoded when its batch is drawn, by
``workers`` DataLoader processes). A batch is bit-identical whatever the storage.

Splits: ``val_fraction`` of the official training set (drawn from ``seed``) is held out
for validation; test is the official test set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DataError, PplVaeError  # noqa: F401  (DataError: data.py is where users look for it)
from .sources import _LOADERS, DATASETS, FOLDER_DATASETS, IDX_DATASETS, _generator
from .storage import STORAGES, Images, MemmapRows, TensorRows, read_batches, read_raw

PIXEL_MODES = ("continuous", "dequantized", "binary_static", "binary_dynamic")
SPLITS = ("train", "val", "test")
_DECODE_CHUNK = 256

Labels = torch.Tensor | None
Split = torch.Tensor | Images


# --------------------------------------------------------------------------- bundle


@dataclass(eq=False, repr=False)
class DataBundle:
    """Train/val/test tensors of one dataset.

    Images are float32 ``(N, C, H, W)`` in [0, 1]; labels are int64 or ``None``:

    * digits / mnist / fashion_mnist / kmnist: ``(N,)`` class index, ``num_classes=10``.
    * omniglot: ``(N,)`` character index within its own set (``class_names`` holds the
      train set's ``alphabet/character`` names, ``num_classes=964`` for the full set); test
      labels index the evaluation set's characters, so they are not comparable with train.
    * celeba: ``(N, 40)`` binary attributes, ``num_classes=None``, ``class_names`` = the
      attribute names.

    With ``pixels="binary_dynamic"``, ``train_x`` holds the *continuous* probabilities and
    :meth:`batches` draws a fresh binarisation per ``(seed, epoch)``; ``val_x``/``test_x``
    are binarised once at load time. Every other mode is applied once at load time.

    With ``storage`` other than ``memory`` a split's ``x`` is an :class:`~ppl_vae.data.storage.Images`
    (8-bit values converted when read; indexing gives float32 tensors) and :meth:`batches`
    reads only each batch's rows, through ``workers`` DataLoader processes when ``workers > 0``.
    """

    name: str
    pixels: str
    shape: tuple[int, int, int]
    num_classes: int | None
    train_x: Split
    train_y: Labels
    val_x: Split
    val_y: Labels
    test_x: Split
    test_y: Labels
    class_names: tuple[str, ...] | None = None
    source: str = ""
    storage: str = "memory"
    workers: int = 0

    @classmethod
    def from_tensors(
        cls,
        train_x: torch.Tensor,
        train_y: Labels = None,
        val_x: torch.Tensor | None = None,
        val_y: Labels = None,
        test_x: torch.Tensor | None = None,
        test_y: Labels = None,
        *,
        name: str = "tensors",
        num_classes: int | None = None,
    ) -> DataBundle:
        """A bundle from your own tensors (any shape ``(N, ...)``); missing splits are empty."""
        if not isinstance(train_x, torch.Tensor) or train_x.dim() < 2 or len(train_x) == 0:
            got = tuple(train_x.shape) if isinstance(train_x, torch.Tensor) else type(train_x).__name__
            raise DataError(f"train_x must be a non-empty tensor of shape (N, ...), got {got}")
        empty = train_x[:0]
        return cls(
            name=name,
            pixels="continuous",
            shape=tuple(train_x.shape[1:]),
            num_classes=num_classes,
            train_x=train_x,
            train_y=train_y,
            val_x=empty if val_x is None else val_x,
            val_y=val_y,
            test_x=empty if test_x is None else test_x,
            test_y=test_y,
        )

    @property
    def data_dim(self) -> int:
        """Number of values per image, C*H*W."""
        return math.prod(self.shape)

    def split(self, split: str) -> tuple[Split, Labels]:
        """``(x, y)`` of a split as stored (binary_dynamic train: the probabilities)."""
        _check_split(split)
        return getattr(self, f"{split}_x"), getattr(self, f"{split}_y")

    def num_batches(self, split: str, batch_size: int) -> int:
        """Number of batches per epoch, counting the last partial one."""
        _check_batch_size(batch_size)
        return math.ceil(len(self.split(split)[0]) / batch_size)

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        device: torch.device | str | None = None,
        start: int = 0,
        part: tuple[int, int] | None = None,
    ) -> Iterator[tuple[torch.Tensor, Labels]]:
        """Iterate over ``(x, y)`` batches of ``split`` on ``device`` (``y`` may be ``None``).

        The order (if ``shuffle``) and, for ``binary_dynamic`` training data, the Bernoulli
        draws are a pure function of ``(seed, epoch)`` for a given ``batch_size`` (local
        generators only), so a resumed run sees the same batches. ``start`` skips the first
        ``start`` batches cheaply (resuming mid-epoch). The last partial batch is included.
        ``part=(rank, world)`` yields rank ``rank``'s contiguous share of every batch
        (:func:`part_bounds`; possibly empty) and reads only those rows: the shares of the
        ``world`` ranks, put together, are the batches of ``part=None``, draws included.
        Arguments are checked at the call, not at the first ``next()``.
        """
        x, y = self.split(split)
        _check_batch_size(batch_size)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise DataError(f"start must be an integer >= 0, got start={start!r}")
        rank, world = (0, 1) if part is None else part
        if (
            isinstance(rank, bool)
            or not isinstance(rank, int)
            or isinstance(world, bool)
            or not isinstance(world, int)
            or not 0 <= rank < world
        ):
            raise DataError(f"part must be (rank, world) with 0 <= rank < world, got part={part!r}")
        if shuffle:
            order = torch.randperm(len(x), generator=_generator(seed, epoch, "order", split))
        else:
            order = torch.arange(len(x))
        dynamic = self.pixels == "binary_dynamic" and split == "train"
        return self._iterate(x, y, order, batch_size, start, device, (seed, epoch) if dynamic else None, rank, world)

    @staticmethod
    def _iterate(x, y, order, batch_size, start, device, binarize_key, rank, world):
        def plan():  # lazily, per batch: (batch number, its size, this rank's bounds in it, its rows)
            for b in range(start, math.ceil(len(order) / batch_size)):
                idx = order[b * batch_size : (b + 1) * batch_size]
                lo, hi = part_bounds(len(idx), rank, world)
                yield b, len(idx), lo, hi, idx[lo:hi]

        shares = (share for *_, share in plan())
        if isinstance(x, Images):
            pin = device is not None and torch.device(device).type == "cuda"
            rows = read_batches(x, shares, x.workers, pin_memory=pin)
        else:
            rows = (x[share] for share in shares)
        for xb, (b, n, lo, hi, share) in zip(
            rows, plan(), strict=False
        ):  # rows first: its reader ends, its workers stop
            if binarize_key is not None:  # the draws of the whole batch, then this rank's rows of them
                u = torch.rand((n, *xb.shape[1:]), generator=_generator(*binarize_key, "binarize", b))
                xb = (u[lo:hi].to(xb.device) < xb).to(xb.dtype)
            yield xb.to(device), (None if y is None else y[share].to(device))

    def check_finite(self) -> None:
        """Every value of every split is finite: a NaN or inf in the data is reported as data, before training
        (8-bit :class:`~ppl_vae.data.storage.Images` are by construction)."""
        for split in SPLITS:
            x = self.split(split)[0]
            if isinstance(x, Images) or len(x) == 0 or bool(torch.isfinite(x).all()):
                continue
            bad = ~torch.isfinite(x.reshape(len(x), -1))
            rows = bad.any(1).nonzero().flatten()
            raise DataError(
                f"data.{split}_x holds {int(bad.sum())} non-finite value(s) (NaN or inf) in {len(rows)} "
                f"datapoint(s), the first at index {int(rows[0])}: the data are broken, not the optimiser "
                "— clean or drop those images"
            )

    def check_unit_interval(self, sites) -> None:
        """Targets of a Bernoulli likelihood (observed at ``sites``) must lie in [0, 1]: the log-density of a grey
        level outside it is not a probability, and training on 0–255 pixels gives meaningless ELBOs."""
        for split in SPLITS:
            x = self.split(split)[0]
            if isinstance(x, Images) or len(x) == 0:  # 8-bit images are read into [0, 1]
                continue
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise DataError(
                    f"the likelihood of site(s) {sorted(sites)} is Bernoulli, which needs data in [0, 1], "
                    f"but data.{split}_x lies in [{lo:g}, {hi:g}]: scale the images to [0, 1] (e.g. "
                    "divide 8-bit pixels by 255) or choose data.pixels (continuous, binary_static, "
                    "binary_dynamic) and a likelihood that fits the values"
                )

    def check_link_range(self, likelihoods) -> None:
        """Data a sigmoid-link likelihood (``likelihoods``: their names) can fit lie in [0, 1]: its means cannot
        leave (0, 1), so tabular or standardised data would train without a word and fit badly."""
        for split in SPLITS:
            x = self.split(split)[0]
            if isinstance(x, Images) or len(x) == 0:
                continue
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise DataError(
                    f"model.link = 'sigmoid' keeps the means of the model's likelihood ({', '.join(likelihoods)}) "
                    "in (0, 1), but "
                    f"data.{split}_x lies in [{lo:g}, {hi:g}]: set model.link: identity for data of any range "
                    "(or scale the data to [0, 1])"
                )

    def __repr__(self) -> str:
        stored = "" if self.storage == "memory" else f", storage={self.storage!r}, workers={self.workers}"
        return (
            f"DataBundle({self.name!r}, pixels={self.pixels!r}, shape={self.shape}, "
            f"num_classes={self.num_classes}, train={len(self.train_x)}, "
            f"val={len(self.val_x)}, test={len(self.test_x)}{stored})"
        )

    def summary(self) -> str:
        """Multi-line description: source, sizes and pixel means per split."""
        lines = [repr(self), f"  source: {self.source or '-'}"]
        for s in SPLITS:
            x, y = self.split(s)
            mean = f"{float(x.mean()):.4f}" if len(x) else "-"
            labels = "none" if y is None else f"{tuple(y.shape)} {y.dtype}"
            lines.append(f"  {s:5s}: {len(x):7d} images, pixel mean {mean}, labels {labels}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- load_data


def load_data(
    name: str = "digits",
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    pixels: str = "continuous",
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    image_size: int | None = None,
    storage: str = "memory",
    workers: int = 0,
) -> DataBundle:
    """Load dataset ``name`` into a :class:`DataBundle`.

    Args:
        name: one of :data:`DATASETS`.
        root: folder holding the data (ignored for ``digits``). ``None``: the cache folder
            ``$PPL_VAE_CACHE_DIR/<name>`` (default ``~/.cache/ppl_vae/<name>``), and for
            ``fashion_mnist`` also ``/usr/share/datasets/fashion-mnist``.
        download: let torchvision download missing files into ``root`` (needs internet).
        pixels: ``continuous`` (as is); ``dequantized`` (``(255 x + u) / 256``, ``u ~ U(0,1)``,
            drawn once from ``seed``); ``binary_static`` (one Bernoulli draw from ``seed``
            for all splits); ``binary_dynamic`` (fresh draw for training batches per
            ``(seed, epoch)`` in :meth:`DataBundle.batches`; val/test binarised once from
            ``seed`` so evaluation is stable).
        val_fraction: share of the official training set held out for validation, in [0, 1).
        seed: seeds the train/val split, the ``limit`` subsets and the load-time pixel noise.
        limit: keep at most ``limit`` training images; val and test are cut by the same
            factor ``limit / full_train_size`` (rounded up). Subsets are drawn from ``seed``.
        image_size: resize images to ``image_size`` squared (default: native size; 28 for
            omniglot, 64 for celeba and image_folder).
        storage: ``memory`` (float32 tensors), ``uint8`` (8-bit in memory, converted per batch),
            ``mmap`` (mnist-like IDX files memory-mapped), ``files`` (celeba, omniglot,
            image_folder: decoded when a batch is drawn). Not ``memory``: ``pixels`` must be
            ``continuous``, ``binary_dynamic`` or ``binary_static`` (a binarised split is
            kept as 0/1 bytes); ``dequantized`` noise is drawn once per image, so it needs
            ``memory``.
        workers: DataLoader worker processes that read (decode) batches, and for folder
            datasets with ``memory``/``uint8`` decode the files at load time; 0 = this process.
    """
    _check_args(name, pixels, val_fraction, seed, limit, image_size)
    _check_storage(name, pixels, storage, workers)
    src = _LOADERS[name](
        name, None if root is None else Path(root).expanduser(), bool(download), image_size, storage == "mmap"
    )

    g = _generator(seed, "split")
    perm = torch.randperm(src.sizes["train"], generator=g)
    n_val = int(round(val_fraction * len(perm)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    test_idx = torch.arange(src.sizes["test"])
    if limit is not None and limit < len(train_idx):
        factor = limit / len(train_idx)
        train_idx = train_idx[:limit]
        val_idx = val_idx[: math.ceil(len(val_idx) * factor)]
        keep = math.ceil(len(test_idx) * factor)
        test_idx = torch.randperm(len(test_idx), generator=_generator(seed, "test-subset"))[:keep]

    arrays = {}
    for split, official, idx in (("train", "train", train_idx), ("val", "train", val_idx), ("test", "test", test_idx)):
        idx = torch.sort(idx).values
        images = Images(src.rows[official], idx, src.shape, src.scale, src.post, workers)
        if storage in ("memory", "uint8") and not isinstance(src.rows[official], TensorRows | MemmapRows):
            images = _decoded(name, images, workers, split)
        elif storage == "uint8":  # this split's rows only
            images = Images(
                TensorRows(images.raw(slice(None))), torch.arange(len(idx)), src.shape, src.scale, src.post, workers
            )
        if storage == "memory":
            x = _apply_pixels(images.float(), pixels, split, seed)
        elif pixels == "continuous" or (pixels == "binary_dynamic" and split == "train"):
            x = images
        else:  # binarised once: 0/1 bytes
            x = Images.from_uint8(_apply_pixels(images.float(), pixels, split, seed).to(torch.uint8), scale=1.0)
        arrays[split] = (x, src.labels[official][idx])

    return DataBundle(
        name=name,
        pixels=pixels,
        shape=src.shape,
        num_classes=src.num_classes,
        train_x=arrays["train"][0],
        train_y=arrays["train"][1],
        val_x=arrays["val"][0],
        val_y=arrays["val"][1],
        test_x=arrays["test"][0],
        test_y=arrays["test"][1],
        class_names=src.class_names,
        source=src.location,
        storage=storage,
        workers=workers,
    )


def part_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``(lo, hi)``: rank ``rank``'s contiguous share of ``n`` rows split over ``world`` ranks, the first ``n %
    world`` ranks one row longer (``torch.tensor_split``'s rule)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def _decoded(name: str, images: Images, workers: int, split: str) -> Images:
    """A file-backed split decoded once into uint8 memory (by ``workers`` DataLoader processes)."""
    chunks = [torch.arange(s, min(s + _DECODE_CHUNK, len(images))) for s in range(0, len(images), _DECODE_CHUNK)]
    raws = read_raw(images, chunks, workers)
    bar = tqdm(
        raws, total=len(chunks), desc=f"{name} {split}: decoding", unit="chunk", disable=len(images) < 2000, leave=False
    )
    values = torch.cat(list(bar)) if chunks else torch.empty((0, *images.item_shape), dtype=torch.uint8)
    return Images(TensorRows(values), torch.arange(len(images)), images.item_shape, images.scale, images.post, workers)


# --------------------------------------------------------------------------- checks & rng


def _check_args(name, pixels, val_fraction, seed, limit, image_size) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset name={name!r}; known datasets: {', '.join(DATASETS)}")
    if pixels not in PIXEL_MODES:
        raise DataError(f"unknown pixels={pixels!r}; known pixel modes: {', '.join(PIXEL_MODES)}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be a number in [0, 1), got val_fraction={val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got seed={seed!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be None or an integer >= 1, got limit={limit!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be None or an integer >= 1, got image_size={image_size!r}")


def _check_storage(name, pixels, storage, workers) -> None:
    if storage not in STORAGES:
        raise DataError(f"unknown storage={storage!r}; known storages: {', '.join(STORAGES)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise DataError(f"workers must be an integer >= 0, got workers={workers!r}")
    if storage == "mmap" and name not in IDX_DATASETS:
        raise DataError(
            f"storage='mmap' maps IDX files in place, which dataset {name!r} does not have; use it with "
            f"{', '.join(IDX_DATASETS)}, or storage='uint8'" + (" or 'files'" if name in FOLDER_DATASETS else "")
        )
    if storage == "files" and name not in FOLDER_DATASETS:
        raise DataError(
            f"storage='files' decodes image files per batch, which dataset {name!r} does not have; use it "
            f"with {', '.join(FOLDER_DATASETS)}, or storage='uint8'" + (" or 'mmap'" if name in IDX_DATASETS else "")
        )
    if storage != "memory" and pixels == "dequantized":
        raise DataError(
            f"pixels='dequantized' draws its noise once per image at load time, so the images are no "
            f"longer 8-bit: it needs storage='memory', got storage={storage!r}"
        )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split={split!r}; splits are {', '.join(SPLITS)}")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")


def _bernoulli(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(p.shape, generator=g).to(p.device)
    return (u < p).to(p.dtype)


def _apply_pixels(x: torch.Tensor, pixels: str, split: str, seed: int) -> torch.Tensor:
    if pixels == "continuous" or (pixels == "binary_dynamic" and split == "train"):
        return x
    g = _generator(seed, "pixels", split)
    if pixels == "dequantized":
        return (x * 255 + torch.rand(x.shape, generator=g)) / 256
    return _bernoulli(x, g)  # binary_static, or binary_dynamic val/test
