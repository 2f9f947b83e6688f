"""Where images come from: one loader per dataset name, each returning a :class:`_Source` (per official split
its 8-bit rows, memory-resident, memory-mapped or read from files, and its labels). :mod:`.bundle` turns a source
into splits and batches.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, PplVaeError, spell  # noqa: F401  (DataError: data.py is where users look for it)
from .imagefile import read_rgb
from .storage import FileRows, MemmapRows, TensorRows

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 20_240_601  # fixed: the digits test split never changes
_FOLDER_SPLIT_SEED = 20_261_202  # fixed: an image folder's test split depends on its files only


def _generator(*keys: int | str) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints/strings (stable across runs)."""
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) % 2**64 for k in keys]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """What a loader returns: per official split ("train", "test") its uint8 rows (a backing of
    :mod:`ppl_vae.data.storage`) and labels; the images are ``post(rows / scale)``."""

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
    x = torch.as_tensor(bunch.images).to(torch.uint8).unsqueeze(1)  # integer grey levels 0..16
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


def _pass_download(first: bool = False) -> str:
    """The hint to download, in the words of the interface that asked (errors.spell); ``first``: capitalised."""
    hint = spell("pass download=True", "add data.download=true")
    return hint[0].upper() + hint[1:] if first else hint


def _pass_root(folder=None) -> str:
    """The hint to read ``folder`` (None: a folder of the user's) as the data root, in the interface's words."""
    if folder is None:
        return spell("pass it as root", "give it as data.root=FOLDER")
    return spell(f"pass root='{folder}'", f"add data.root={folder}")


def _how_to_get(name: str, root: Path | None) -> str:
    target = root if root is not None else _cache_dir() / name
    ways = [f"{_pass_download()} (needs internet; saves under {target})"]
    if name == "fashion_mnist":
        ways.append(f"or run `sudo apt-get install dataset-fashion-mnist` and {_pass_root(DEBIAN_FASHION_MNIST)}")
    else:
        ways.append(f"or copy the four files (plain or .gz) into a folder and {_pass_root()}")
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
                f"run `sudo apt-get install dataset-fashion-mnist` and {_pass_root(DEBIAN_FASHION_MNIST)}"
                if name == "fashion_mnist"
                else f"copy the four IDX files (plain or .gz) into a folder and {_pass_root()}"
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
            f"{name}: cannot prepare the cache folder {raw} ({exc}); set PPL_VAE_CACHE_DIR to a writable folder"
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
        # its bare asserts (no message) check the header: the number of dimensions, the type code, the size
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else "its header (type, dimensions) does not fit the data"
        raise DataError(
            f"corrupt or unreadable IDX {kind} file {shown}: {detail}. Delete it and get a fresh copy."
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
            raise DataError(f"{found[lab_stem]} holds {len(y)} labels but {found[img_stem]} holds {len(x)} images")
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
        raise DataError(
            f"{name}: torchvision could not open the data under {root}: {type(exc).__name__}: {exc}"
        ) from exc


def _load_omniglot(name, root, download, image_size, mapped) -> _Source:
    from torchvision import datasets, transforms

    class _Omniglot(datasets.Omniglot):
        # torchvision only accepts the downloaded zips; also accept the extracted folders.
        def _check_integrity(self) -> bool:
            return super()._check_integrity() or os.path.isdir(os.path.join(self.root, self._get_target_folder()))

    size = image_size or 28
    how = (
        f"{_pass_download(first=True)} (needs internet), or unpack images_background.zip and images_evaluation.zip "
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
    labels = {
        k: torch.as_tensor([c for _, c in ds._flat_character_images], dtype=torch.int64).reshape(-1)
        for k, ds in sets.items()
    }
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
        f"{_pass_download(first=True)} (needs internet and the `gdown` package), or download the aligned "
        "images and annotation files from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into <root>/celeba/."
    )
    root = _folder_root(name, root, download, _CELEBA_FILES, how)
    tf = transforms.Compose(
        [transforms.CenterCrop(148), transforms.Resize(size, antialias=True), transforms.PILToTensor()]
    )
    sets = {
        split: _make(
            name,
            root,
            lambda s=split: datasets.CelebA(str(root), split=s, target_type="attr", transform=tf, download=download),
        )
        for split in ("train", "test")
    }

    def where(ds):
        return lambda i: os.path.join(ds.root, ds.base_folder, "img_align_celeba", ds.filename[i])

    rows = {
        k: FileRows(name, ds, where(ds), (3, size, size), f"RGB images giving 3x{size}x{size} crops")
        for k, ds in sets.items()
    }
    labels = {
        k: torch.as_tensor(ds.attr, dtype=torch.int64).reshape(len(ds.filename), len(ds.attr_names))
        for k, ds in sets.items()
    }
    attrs = tuple(sets["train"].attr_names)
    return _Source((3, size, size), None, attrs, str(root / "celeba"), rows, labels)


def _load_image_folder(name, root, download, image_size, mapped) -> _Source:
    from torchvision import datasets, transforms

    if root is None:
        raise DataError(
            "data.name='image_folder' needs data.root: a folder with one subfolder of images per class "
            "(torchvision.datasets.ImageFolder's layout, e.g. root/cats/001.png, root/dogs/002.jpg)"
        )
    if not root.is_dir():
        raise DataError(f"image_folder: root {root} is not a folder")
    size = image_size or 64
    tf = transforms.Compose(
        [transforms.Resize(size, antialias=True), transforms.CenterCrop(size), transforms.PILToTensor()]
    )
    ds = _make(name, root, lambda: datasets.ImageFolder(str(root), transform=tf, loader=read_rgb))
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

DATASETS = tuple(_LOADERS)  # data.name
IDX_DATASETS = ("mnist", "fashion_mnist", "kmnist")  # data.storage: mmap reads their files in place
FOLDER_DATASETS = ("omniglot", "celeba", "image_folder")  # data.storage: files decodes them per batch
