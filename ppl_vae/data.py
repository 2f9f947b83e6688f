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
  (or ``image_size``), RGB. Stored as float32, so the full set needs ~8 GB: use ``limit``.

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

from .errors import DataError, PplVaeError  # noqa: F401  (DataError: data.py is where users look for it)

__all__ = ["DATASETS", "PIXEL_MODES", "SPLITS", "DataBundle", "DataError", "load_data"]

DATASETS = ("digits", "mnist", "fashion_mnist", "kmnist", "omniglot", "celeba")
PIXEL_MODES = ("continuous", "dequantized", "binary_static", "binary_dynamic")
SPLITS = ("train", "val", "test")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 20_240_601  # fixed: the digits test split never changes

Labels = torch.Tensor | None


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
    """

    name: str
    pixels: str
    shape: tuple[int, int, int]
    num_classes: int | None
    train_x: torch.Tensor
    train_y: Labels
    val_x: torch.Tensor
    val_y: Labels
    test_x: torch.Tensor
    test_y: Labels
    class_names: tuple[str, ...] | None = None
    source: str = ""

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

    def split(self, split: str) -> tuple[torch.Tensor, Labels]:
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
    ) -> Iterator[tuple[torch.Tensor, Labels]]:
        """Iterate over ``(x, y)`` batches of ``split`` on ``device`` (``y`` may be ``None``).

        The order (if ``shuffle``) and, for ``binary_dynamic`` training data, the Bernoulli
        draws are a pure function of ``(seed, epoch)`` for a given ``batch_size`` (local
        generators only), so a resumed run sees the same batches. ``start`` skips the first
        ``start`` batches cheaply (resuming mid-epoch). The last partial batch is included.
        Arguments are checked at the call, not at the first ``next()``.
        """
        x, y = self.split(split)
        _check_batch_size(batch_size)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise DataError(f"start must be an integer >= 0, got start={start!r}")
        if shuffle:
            order = torch.randperm(len(x), generator=_generator(seed, epoch, "order", split))
        else:
            order = torch.arange(len(x))
        dynamic = self.pixels == "binary_dynamic" and split == "train"
        return self._iterate(x, y, order, batch_size, start, device, (seed, epoch) if dynamic else None)

    @staticmethod
    def _iterate(x, y, order, batch_size, start, device, binarize_key):
        for b in range(start, math.ceil(len(order) / batch_size)):
            idx = order[b * batch_size : (b + 1) * batch_size]
            xb = x[idx]
            if binarize_key is not None:
                xb = _bernoulli(xb, _generator(*binarize_key, "binarize", b))
            yield xb.to(device), (None if y is None else y[idx].to(device))

    def __repr__(self) -> str:
        return (
            f"DataBundle({self.name!r}, pixels={self.pixels!r}, shape={self.shape}, "
            f"num_classes={self.num_classes}, train={len(self.train_x)}, "
            f"val={len(self.val_x)}, test={len(self.test_x)})"
        )

    def summary(self) -> str:
        """Multi-line description: source, sizes and pixel means per split."""
        lines = [repr(self), f"  source: {self.source or '-'}"]
        for s in SPLITS:
            x, y = self.split(s)
            mean = f"{x.mean().item():.4f}" if len(x) else "-"
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
            omniglot, 64 for celeba).
    """
    _check_args(name, pixels, val_fraction, seed, limit, image_size)
    src = _LOADERS[name](name, None if root is None else Path(root).expanduser(), bool(download), image_size)

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
        x, y = src.get(official, torch.sort(idx).values)
        arrays[split] = (_apply_pixels(x, pixels, split, seed), y)

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
    )


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
    """What a loader returns: official train/test sizes and a decoder for index sets."""

    shape: tuple[int, int, int]
    num_classes: int | None
    class_names: tuple[str, ...] | None
    location: str
    sizes: dict[str, int]
    get: Callable[[str, torch.Tensor], tuple[torch.Tensor, Labels]]


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-2:] == (size, size) or len(x) == 0:
        return x
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.clamp_(0.0, 1.0)


def _tensor_source(name, location, images, labels, class_names, image_size) -> _Source:
    """Source over in-memory uint8 ``(N, H, W)`` or float ``(N, C, H, W)`` images."""

    def get(official: str, idx: torch.Tensor):
        x = images[official][idx]
        x = x.unsqueeze(1).float().div_(255) if x.dtype == torch.uint8 else x.float()
        return _resize(x, image_size), labels[official][idx]

    h, w = images["train"].shape[-2:]
    c = 1 if images["train"].dim() == 3 else images["train"].shape[1]
    shape = (c, image_size or h, image_size or w)
    sizes = {k: len(v) for k, v in images.items()}
    return _Source(shape, len(class_names), tuple(class_names), location, sizes, get)


def _load_digits(name, root, download, image_size) -> _Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=_generator(_DIGITS_SPLIT_SEED, "digits-test"))
    n_test = int(round(_DIGITS_TEST_FRACTION * len(x)))
    test, train = torch.sort(perm[:n_test]).values, torch.sort(perm[n_test:]).values
    images = {"train": x[train], "test": x[test]}
    labels = {"train": y[train], "test": y[test]}
    names = [str(i) for i in range(10)]
    return _tensor_source(name, "sklearn.datasets.load_digits", images, labels, names, image_size)


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


def _load_idx(name, root, download, image_size) -> _Source:
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
        x = _read_idx(read_image_file, paths[img_stem], found[img_stem], "image")
        y = _read_idx(read_label_file, paths[lab_stem], found[lab_stem], "label")
        if x.dim() != 3 or tuple(x.shape[1:]) != (28, 28):
            raise DataError(f"{found[img_stem]}: expected 28x28 images, got an array of shape {tuple(x.shape)}")
        if len(y) != len(x):
            raise DataError(
                f"{found[lab_stem]} holds {len(y)} labels but {found[img_stem]} holds {len(x)} images"
            )
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < len(cls.classes)):
            raise DataError(f"{found[lab_stem]}: labels outside 0..{len(cls.classes) - 1}")
        images[split], labels[split] = x, y
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


def _decode(name: str, dataset, idx: torch.Tensor, what: Callable[[int], str]):
    xs, ys = [], []
    for i in idx.tolist():
        try:
            x, y = dataset[i]
        except Exception as exc:
            raise DataError(f"{name}: cannot read {what(i)}: {type(exc).__name__}: {exc}") from exc
        xs.append(x)
        ys.append(torch.as_tensor(y, dtype=torch.int64))
    return xs, ys


def _load_omniglot(name, root, download, image_size) -> _Source:
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
    tf = transforms.Compose([transforms.Resize((size, size), antialias=True), transforms.ToTensor()])
    sets = {
        split: _make(name, root, lambda bg=bg: _Omniglot(str(root), background=bg, transform=tf, download=download))
        for split, bg in (("train", True), ("test", False))
    }

    def get(official: str, idx: torch.Tensor):
        ds = sets[official]

        def what(i):
            image, char = ds._flat_character_images[i]
            return os.path.join(ds.target_folder, ds._characters[char], image)

        xs, ys = _decode(name, ds, idx, what)
        x = 1.0 - torch.stack(xs) if xs else torch.empty(0, 1, size, size)
        return x, torch.stack(ys) if ys else torch.empty(0, dtype=torch.int64)

    chars = tuple(sets["train"]._characters)
    sizes = {k: len(v) for k, v in sets.items()}
    return _Source((1, size, size), len(chars), chars, str(root / "omniglot-py"), sizes, get)


_CELEBA_FILES = [
    "celeba/img_align_celeba",
    "celeba/list_attr_celeba.txt",
    "celeba/identity_CelebA.txt",
    "celeba/list_bbox_celeba.txt",
    "celeba/list_landmarks_align_celeba.txt",
    "celeba/list_eval_partition.txt",
]


def _load_celeba(name, root, download, image_size) -> _Source:
    from torchvision import datasets, transforms

    size = image_size or 64
    how = (
        "Pass download=True (needs internet and the `gdown` package), or download the aligned "
        "images and annotation files from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into <root>/celeba/."
    )
    root = _folder_root(name, root, download, _CELEBA_FILES, how)
    tf = transforms.Compose(
        [transforms.CenterCrop(148), transforms.Resize(size, antialias=True), transforms.ToTensor()]
    )
    sets = {
        split: _make(name, root, lambda s=split: datasets.CelebA(str(root), split=s, target_type="attr", transform=tf, download=download))
        for split in ("train", "test")
    }

    def get(official: str, idx: torch.Tensor):
        ds = sets[official]
        xs, ys = _decode(name, ds, idx, lambda i: os.path.join(ds.root, ds.base_folder, "img_align_celeba", ds.filename[i]))
        if any(x.shape != (3, size, size) for x in xs):
            raise DataError(f"{name}: expected RGB images giving 3x{size}x{size} crops under {root / 'celeba'}")
        x = torch.stack(xs) if xs else torch.empty(0, 3, size, size)
        return x, torch.stack(ys) if ys else torch.empty(0, len(ds.attr_names), dtype=torch.int64)

    attrs = tuple(sets["train"].attr_names)
    sizes = {k: len(v) for k, v in sets.items()}
    return _Source((3, size, size), None, attrs, str(root / "celeba"), sizes, get)


_LOADERS: dict[str, Callable[..., _Source]] = {
    "digits": _load_digits,
    "mnist": _load_idx,
    "fashion_mnist": _load_idx,
    "kmnist": _load_idx,
    "omniglot": _load_omniglot,
    "celeba": _load_celeba,
}
