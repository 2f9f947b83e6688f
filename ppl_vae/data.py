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

Storage (``storage``, see :mod:`ppl_vae.images`): ``memory`` (float32 tensors, the default);
``uint8`` (8-bit in memory, converted per batch); ``mmap`` (IDX datasets: the files
memory-mapped); ``files`` (folder datasets: each image decoded when its batch is drawn, by
``workers`` DataLoader processes). A batch is bit-identical whatever the storage.

Splits: ``val_fraction`` of the official training set (drawn from ``seed``) is held out
for validation; test is the official test set.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import FOLDER_DATASETS, IDX_DATASETS
from .errors import DataError, PplVaeError  # noqa: F401  (DataError: data.py is where users look for it)
from .images import STORAGES, FileRows, Images, MemmapRows, TensorRows, read_batches, read_raw

__all__ = ["DATASETS", "PIXEL_MODES", "SPLITS", "STORAGES", "DataBundle", "DataError", "Images", "load_data",
           "part_bounds"]

DATASETS = ("digits", "mnist", "fashion_mnist", "kmnist", "omniglot", "celeba", "image_folder")
PIXEL_MODES = ("continuous", "dequantized", "binary_static", "binary_dynamic")
SPLITS = ("train", "val", "test")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 20_240_601  # fixed: the digits test split never changes
_FOLDER_SPLIT_SEED = 20_261_202  # fixed: an image folder's test split depends on its files only
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

    With ``storage`` other than ``memory`` a split's ``x`` is an :class:`~ppl_vae.images.Images`
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
    def from_tensors(cls, train_x: torch.Tensor, train_y: Labels = None, val_x: torch.Tensor | None = None,
                     val_y: Labels = None, test_x: torch.Tensor | None = None, test_y: Labels = None, *,
                     name: str = "tensors", num_classes: int | None = None) -> "DataBundle":
        """A bundle from your own tensors (any shape ``(N, ...)``); missing splits are empty."""
        if not isinstance(train_x, torch.Tensor) or train_x.dim() < 2 or len(train_x) == 0:
            got = tuple(train_x.shape) if isinstance(train_x, torch.Tensor) else type(train_x).__name__
            raise DataError(f"train_x must be a non-empty tensor of shape (N, ...), got {got}")
        empty = train_x[:0]
        return cls(name=name, pixels="continuous", shape=tuple(train_x.shape[1:]), num_classes=num_classes,
                   train_x=train_x, train_y=train_y, val_x=empty if val_x is None else val_x, val_y=val_y,
                   test_x=empty if test_x is None else test_x, test_y=test_y)

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
        if isinstance(rank, bool) or not isinstance(rank, int) or isinstance(world, bool) \
                or not isinstance(world, int) or not 0 <= rank < world:
            raise DataError(f"part must be (rank, world) with 0 <= rank < world, got part={part!r}")
        if shuffle:
            order = torch.randperm(len(x), generator=_generator(seed, epoch, "order", split))
        else:
            order = torch.arange(len(x))
        dynamic = self.pixels == "binary_dynamic" and split == "train"
        return self._iterate(x, y, order, batch_size, start, device, (seed, epoch) if dynamic else None, rank, world)

    @staticmethod
    def _iterate(x, y, order, batch_size, start, device, binarize_key, rank, world):
        def plan():   # lazily, per batch: (batch number, its size, this rank's bounds in it, its rows)
            for b in range(start, math.ceil(len(order) / batch_size)):
                idx = order[b * batch_size: (b + 1) * batch_size]
                lo, hi = part_bounds(len(idx), rank, world)
                yield b, len(idx), lo, hi, idx[lo:hi]

        shares = (share for *_, share in plan())
        if isinstance(x, Images):
            pin = device is not None and torch.device(device).type == "cuda"
            rows = read_batches(x, shares, x.workers, pin_memory=pin)
        else:
            rows = (x[share] for share in shares)
        for xb, (b, n, lo, hi, share) in zip(rows, plan()):   # rows first: its reader ends, its workers stop
            if binarize_key is not None:   # the draws of the whole batch, then this rank's rows of them
                u = torch.rand((n, *xb.shape[1:]), generator=_generator(*binarize_key, "binarize", b))
                xb = (u[lo:hi].to(xb.device) < xb).to(xb.dtype)
            yield xb.to(device), (None if y is None else y[share].to(device))

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
    src = _LOADERS[name](name, None if root is None else Path(root).expanduser(), bool(download), image_size,
                         storage == "mmap")

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
        elif storage == "uint8":   # this split's rows only
            images = Images(TensorRows(images.raw(slice(None))), torch.arange(len(idx)), src.shape, src.scale,
                            src.post, workers)
        if storage == "memory":
            x = _apply_pixels(images.float(), pixels, split, seed)
        elif pixels == "continuous" or (pixels == "binary_dynamic" and split == "train"):
            x = images
        else:   # binarised once: 0/1 bytes
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
    bar = tqdm(raws, total=len(chunks), desc=f"{name} {split}: decoding", unit="chunk", disable=len(images) < 2000,
               leave=False)
    values = torch.cat(list(bar)) if chunks else torch.empty((0, *images.item_shape), dtype=torch.uint8)
    return Images(TensorRows(values), torch.arange(len(images)), images.item_shape, images.scale, images.post,
                  workers)


# --------------------------------------------------------------------------- checks & rng


def _check_args(name, pixels, val_fraction, seed, limit, image_size) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset name={name!r}; known datasets: {', '.join(DATASETS)}")
    if pixels not in PIXEL_MODES:
        raise DataError(f"unknown pixels={pixels!r}; known pixel modes: {', '.join(PIXEL_MODES)}")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, int | float)
        or not 0.0 <= val_fraction < 1.0
    ):
        raise DataError(f"val_fraction must be a number in [0, 1), got val_fraction={val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got seed={seed!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be None or an integer >= 1, got limit={limit!r}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise DataError(f"image_size must be None or an integer >= 1, got image_size={image_size!r}")


def _check_storage(name, pixels, storage, workers) -> None:
    if storage not in STORAGES:
        raise DataError(f"unknown storage={storage!r}; known storages: {', '.join(STORAGES)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise DataError(f"workers must be an integer >= 0, got workers={workers!r}")
    if storage == "mmap" and name not in IDX_DATASETS:
        raise DataError(f"storage='mmap' maps IDX files in place, which dataset {name!r} does not have; use it with "
                        f"{', '.join(IDX_DATASETS)}, or storage='uint8'"
                        + (" or 'files'" if name in FOLDER_DATASETS else ""))
    if storage == "files" and name not in FOLDER_DATASETS:
        raise DataError(f"storage='files' decodes image files per batch, which dataset {name!r} does not have; use it "
                        f"with {', '.join(FOLDER_DATASETS)}, or storage='uint8'"
                        + (" or 'mmap'" if name in IDX_DATASETS else ""))
    if storage != "memory" and pixels == "dequantized":
        raise DataError(f"pixels='dequantized' draws its noise once per image at load time, so the images are no "
                        f"longer 8-bit: it needs storage='memory', got storage={storage!r}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split={split!r}; splits are {', '.join(SPLITS)}")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")


def _generator(*keys: int | str) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints/strings (stable across runs)."""
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) % 2**64 for k in keys]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


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


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """What a loader returns: per official split ("train", "test") its uint8 rows (a backing of
    :mod:`ppl_vae.images`) and labels; the images are ``post(rows / scale)``."""

    shape: tuple[int, int, int]
    num_classes: int | None
    class_names: tuple[str, ...] | None
    location: str
    rows: dict
    labels: dict[str, torch.Tensor]
    scale: float = 255.0
    post: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.labels.items()}


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-2:] == (size, size) or len(x) == 0:
        return x
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.clamp_(0.0, 1.0)


def _tensor_source(name, location, rows, labels, class_names, image_size, scale=255.0) -> _Source:
    """Source over uint8 rows ``(N, 1, H, W)`` (in memory or memory-mapped) read as ``rows / scale``."""
    h, w = rows["train"].data.shape[-2:]
    shape = (1, image_size or h, image_size or w)
    post = None if image_size is None or (h, w) == (image_size, image_size) else _resize_to(image_size)
    return _Source(shape, len(class_names), tuple(class_names), location, rows, labels, scale, post)


class _resize_to:
    """``post`` of a resized dataset (a class, so a spawned DataLoader worker can unpickle it)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(x, self.size)


def _invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def _split_off_test(n: int, seed: int, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed 20% test split of ``n`` datapoints (sorted (train, test) indices), from a constant seed."""
    perm = torch.randperm(n, generator=_generator(seed, tag))
    n_test = int(round(_DIGITS_TEST_FRACTION * n))
    return torch.sort(perm[n_test:]).values, torch.sort(perm[:n_test]).values


def _load_digits(name, root, download, image_size, mapped) -> _Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images).to(torch.uint8).unsqueeze(1)   # integer grey levels 0..16
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    train, test = _split_off_test(len(x), _DIGITS_SPLIT_SEED, "digits-test")
    rows = {"train": TensorRows(x[train]), "test": TensorRows(x[test])}
    labels = {"train": y[train], "test": y[test]}
    names = [str(i) for i in range(10)]
    return _tensor_source(name, "sklearn.datasets.load_digits", rows, labels, names, image_size, scale=16.0)


# ---- MNIST-like IDX datasets

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_STEMS = _IDX_FILES["train"] + _IDX_FILES["test"]


def _cache_dir() -> Path:
    env = os.environ.get("PPL_VAE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ppl_vae"


def _idx_class(name: str):
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "kmnist": datasets.KMNIST}[name]


def _idx_candidates(name: str, cls_name: str, root: Path | None) -> list[Path]:
    roots = [root] if root is not None else [_cache_dir() / name]
    folders = [f for r in roots for f in (r / cls_name / "raw", r / cls_name, r)]
    if root is None and name == "fashion_mnist":
        folders.append(DEBIAN_FASHION_MNIST)
    return folders


def _find_files(folder: Path, stems) -> dict[str, Path]:
    """Map each stem to ``folder/stem`` or ``folder/stem.gz`` (plain preferred), if present."""
    found = {}
    for stem in stems:
        for path in (folder / stem, folder / f"{stem}.gz"):
            if path.is_file():
                found[stem] = path
                break
    return found


def _how_to_get(name: str, root: Path | None) -> str:
    target = root if root is not None else _cache_dir() / name
    ways = [f"pass download=True (needs internet; saves under {target})"]
    if name == "fashion_mnist":
        ways.append(
            f"or run `sudo apt-get install dataset-fashion-mnist` and pass root='{DEBIAN_FASHION_MNIST}'"
        )
    else:
        ways.append("or copy the four files (plain or .gz) into a folder and pass it as root")
    return "To get them: " + ", ".join(ways) + "."


def _missing_idx_error(name: str, root: Path | None, folders: list[Path]) -> DataError:
    lines = [f"{name}: raw IDX files not found."]
    if root is not None and not root.is_dir():
        lines.append(f"  root folder {root} does not exist.")
    lines.append("  Looked in: " + ", ".join(str(f) for f in folders))
    lines.append("  Expected files (plain or .gz): " + ", ".join(_IDX_STEMS))
    for folder in folders:
        found = _find_files(folder, _IDX_STEMS)
        if found:
            missing = [s for s in _IDX_STEMS if s not in found]
            lines.append(f"  {folder} lacks: {', '.join(missing)}")
    lines.append("  " + _how_to_get(name, root))
    return DataError("\n".join(lines))


def _download_idx(name: str, cls, root: Path) -> None:
    try:
        cls(root=str(root), train=True, download=True)
    except Exception as exc:  # network, permissions, or unreadable files
        raw = root / cls.__name__ / "raw"
        if len(_find_files(raw, _IDX_STEMS)) < len(_IDX_STEMS):
            hint = (
                f"run `sudo apt-get install dataset-fashion-mnist` and pass root='{DEBIAN_FASHION_MNIST}'"
                if name == "fashion_mnist"
                else "copy the four IDX files (plain or .gz) into a folder and pass it as root"
            )
            raise DataError(
                f"{name}: download into {raw} failed ({type(exc).__name__}: {str(exc).strip()}).\n"
                f"  Retry online, or offline {hint}."
            ) from exc
        # The files are there but torchvision could not read them: _read_idx names the culprit.


def _arrange(name: str, cls_name: str, folder: Path, found: dict[str, Path]) -> dict[str, Path]:
    """Make a torchvision-layout folder for ``found``; return the plain file paths to read.

    Plain files in ``<root>/<ClassName>/raw`` are used in place; otherwise plain files are
    symlinked and ``.gz`` files decompressed into ``<cache>/<name>-<hash>/<ClassName>/raw``.
    """
    if folder.name == "raw" and folder.parent.name == cls_name and all(p.suffix != ".gz" for p in found.values()):
        return dict(found)
    tag = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
    raw = _cache_dir() / f"{name}-{tag}" / cls_name / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        out = {}
        for stem, src in found.items():
            dst = raw / stem
            if src.suffix == ".gz":
                _decompress(src, dst)
            else:
                _link(src.resolve(), dst)
            out[stem] = dst
        return out
    except OSError as exc:
        raise DataError(
            f"{name}: cannot prepare the cache folder {raw} ({exc}); "
            "set PPL_VAE_CACHE_DIR to a writable folder"
        ) from exc


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() and Path(os.readlink(dst)) == src:
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        os.symlink(src, tmp)
    except OSError:  # no symlinks here: copy instead
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _decompress(src: Path, dst: Path) -> None:
    """Decompress ``src`` into ``dst`` unless a copy of this exact source is already there."""
    stat = src.stat()
    stamp = f"{src.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}\n"
    marker = dst.with_name(f".{dst.name}.source")
    if dst.is_file() and not dst.is_symlink() and marker.is_file() and marker.read_text() == stamp:
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    except (OSError, EOFError, zlib.error) as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, PermissionError):
            raise
        raise DataError(f"corrupt gzip file {src}: {type(exc).__name__}: {exc}") from exc
    os.replace(tmp, dst)
    marker.write_text(stamp)


def _read_idx(reader, path: Path, shown: Path, kind: str) -> torch.Tensor:
    try:
        return reader(str(path))
    except Exception as exc:  # torchvision raises AssertionError/RuntimeError/... on bad files
        raise DataError(
            f"corrupt or unreadable IDX {kind} file {shown}: {type(exc).__name__}: {exc}. "
            "Delete it and get a fresh copy."
        ) from exc


def _load_idx(name, root, download, image_size, mapped) -> _Source:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    cls = _idx_class(name)
    folders = _idx_candidates(name, cls.__name__, root)
    hit = None
    for f in folders:
        found = _find_files(f, _IDX_STEMS)
        if len(found) == len(_IDX_STEMS):
            hit = (f, found)
            break
    if hit is None and download:
        target = root if root is not None else _cache_dir() / name
        _download_idx(name, cls, target)
        folder = target / cls.__name__ / "raw"
        hit = (folder, _find_files(folder, _IDX_STEMS))
        if len(hit[1]) < len(_IDX_STEMS):
            hit = None
    if hit is None:
        raise _missing_idx_error(name, root, folders)

    folder, found = hit
    paths = _arrange(name, cls.__name__, folder, found)
    images, labels = {}, {}
    for split, (img_stem, lab_stem) in _IDX_FILES.items():
        if mapped:
            rows = MemmapRows(paths[img_stem], found[img_stem])
            x = rows.data
        else:
            x = _read_idx(read_image_file, paths[img_stem], found[img_stem], "image")
        y = _read_idx(read_label_file, paths[lab_stem], found[lab_stem], "label")
        if len(x.shape) != 3 or tuple(x.shape[1:]) != (28, 28):
            raise DataError(f"{found[img_stem]}: expected 28x28 images, got an array of shape {tuple(x.shape)}")
        if len(y) != len(x):
            raise DataError(
                f"{found[lab_stem]} holds {len(y)} labels but {found[img_stem]} holds {len(x)} images"
            )
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < len(cls.classes)):
            raise DataError(f"{found[lab_stem]}: labels outside 0..{len(cls.classes) - 1}")
        images[split], labels[split] = rows if mapped else TensorRows(x), y.long()
    return _tensor_source(name, str(folder), images, labels, cls.classes, image_size)


# ---- torchvision folder datasets (omniglot, celeba)


def _folder_root(name: str, root: Path | None, download: bool, expected: list[str], how: str) -> Path:
    """The root to hand to torchvision; a clear DataError if the expected files are absent."""
    root = root if root is not None else _cache_dir() / name
    missing = [e for e in expected if not (root / e).exists()]
    if missing and not download:
        raise DataError(
            f"{name}: data not found under root {root}"
            + ("" if root.is_dir() else " (the folder does not exist)")
            + f".\n  Missing: {', '.join(str(root / m) for m in missing)}\n  {how}"
        )
    return root


def _make(name: str, root: Path, ctor: Callable):
    try:
        return ctor()
    except Exception as exc:
        raise DataError(f"{name}: torchvision could not open the data under {root}: {type(exc).__name__}: {exc}") from exc


def _load_omniglot(name, root, download, image_size, mapped) -> _Source:
    from torchvision import datasets, transforms

    class _Omniglot(datasets.Omniglot):
        # torchvision only accepts the downloaded zips; also accept the extracted folders.
        def _check_integrity(self) -> bool:
            return super()._check_integrity() or os.path.isdir(os.path.join(self.root, self._get_target_folder()))

    size = image_size or 28
    how = (
        "Pass download=True (needs internet), or unpack images_background.zip and images_evaluation.zip "
        "from https://github.com/brendenlake/omniglot into <root>/omniglot-py/."
    )
    folders = ["omniglot-py/images_background", "omniglot-py/images_evaluation"]
    root = _folder_root(name, root, download, folders, how)
    tf = transforms.Compose([transforms.Resize((size, size), antialias=True), transforms.PILToTensor()])
    sets = {
        split: _make(name, root, lambda bg=bg: _Omniglot(str(root), background=bg, transform=tf, download=download))
        for split, bg in (("train", True), ("test", False))
    }

    def where(ds):
        def what(i):
            image, char = ds._flat_character_images[i]
            return os.path.join(ds.target_folder, ds._characters[char], image)
        return what

    rows = {k: FileRows(name, ds, where(ds), (1, size, size)) for k, ds in sets.items()}
    labels = {k: torch.as_tensor([c for _, c in ds._flat_character_images], dtype=torch.int64).reshape(-1)
              for k, ds in sets.items()}
    chars = tuple(sets["train"]._characters)
    return _Source((1, size, size), len(chars), chars, str(root / "omniglot-py"), rows, labels, post=_invert)


_CELEBA_FILES = [
    "celeba/img_align_celeba",
    "celeba/list_attr_celeba.txt",
    "celeba/identity_CelebA.txt",
    "celeba/list_bbox_celeba.txt",
    "celeba/list_landmarks_align_celeba.txt",
    "celeba/list_eval_partition.txt",
]


def _load_celeba(name, root, download, image_size, mapped) -> _Source:
    from torchvision import datasets, transforms

    size = image_size or 64
    how = (
        "Pass download=True (needs internet and the `gdown` package), or download the aligned "
        "images and annotation files from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into <root>/celeba/."
    )
    root = _folder_root(name, root, download, _CELEBA_FILES, how)
    tf = transforms.Compose(
        [transforms.CenterCrop(148), transforms.Resize(size, antialias=True), transforms.PILToTensor()]
    )
    sets = {
        split: _make(name, root, lambda s=split: datasets.CelebA(str(root), split=s, target_type="attr", transform=tf, download=download))
        for split in ("train", "test")
    }

    def where(ds):
        return lambda i: os.path.join(ds.root, ds.base_folder, "img_align_celeba", ds.filename[i])

    rows = {k: FileRows(name, ds, where(ds), (3, size, size), "RGB images giving 3x{s}x{s} crops".format(s=size))
            for k, ds in sets.items()}
    labels = {k: torch.as_tensor(ds.attr, dtype=torch.int64).reshape(len(ds.filename), len(ds.attr_names))
              for k, ds in sets.items()}
    attrs = tuple(sets["train"].attr_names)
    return _Source((3, size, size), None, attrs, str(root / "celeba"), rows, labels)


def _load_image_folder(name, root, download, image_size, mapped) -> _Source:
    from torchvision import datasets, transforms

    if root is None:
        raise DataError("data.name='image_folder' needs data.root: a folder with one subfolder of images per class "
                        "(torchvision.datasets.ImageFolder's layout, e.g. root/cats/001.png, root/dogs/002.jpg)")
    if not root.is_dir():
        raise DataError(f"image_folder: root {root} is not a folder")
    size = image_size or 64
    tf = transforms.Compose([transforms.Resize(size, antialias=True), transforms.CenterCrop(size),
                             transforms.PILToTensor()])
    ds = _make(name, root, lambda: datasets.ImageFolder(str(root), transform=tf))
    targets = torch.as_tensor(ds.targets, dtype=torch.int64)
    train, test = _split_off_test(len(targets), _FOLDER_SPLIT_SEED, "image-folder-test")
    files = FileRows(name, ds, lambda i: ds.samples[i][0], (3, size, size))
    rows = {"train": _Subset(files, train), "test": _Subset(files, test)}
    labels = {"train": targets[train], "test": targets[test]}
    return _Source((3, size, size), len(ds.classes), tuple(ds.classes), str(root), rows, labels)


class _Subset:
    """The rows ``index`` of another backing (a split carved out of one set of files)."""

    def __init__(self, rows, index: torch.Tensor):
        self.rows, self.index, self.kind = rows, index, rows.kind

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        return self.rows.read(self.index[idx])

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes


_LOADERS: dict[str, Callable[..., _Source]] = {
    "digits": _load_digits,
    "mnist": _load_idx,
    "fashion_mnist": _load_idx,
    "kmnist": _load_idx,
    "omniglot": _load_omniglot,
    "celeba": _load_celeba,
    "image_folder": _load_image_folder,
}
