"""Images stored as 8-bit values and converted to float32 in [0, 1] only when read: ``data.storage``.

A :class:`Images` is what :class:`~ppl_vae.data.DataBundle` holds as a split's ``x`` when ``data.storage`` is not
``memory``. It reads like the float tensor it replaces — ``len``, ``.shape``, ``x[i]``, ``x[:n]``, ``x[index]``,
``x[mask]`` and ``x.to(device)`` give float32 tensors in [0, 1] — but only the rows asked for are read and
converted. Where the bytes live (a *backing*):

* ``uint8``: one uint8 tensor in memory, a quarter of float32's size;
* ``mmap``: the IDX file itself, memory-mapped (``numpy.memmap``): the operating system pages in the rows a batch
  reads, and nothing is held per process;
* ``files``: the image files of a folder dataset (CelebA, Omniglot, ``torchvision.datasets.ImageFolder``), each
  decoded by torchvision when its row is read.

:func:`read_batches` reads a list of index sets through a ``torch.utils.data.DataLoader`` with worker processes
(``data.workers``): the workers decode (the bytes stay uint8 across processes), the main process converts. The
batches and their order are those of the index sets, so what a run sees is the same for any number of workers.
The conversion is the one the in-memory path applies at load time (``uint8 / scale``, then the dataset's own step:
a resize, Omniglot's inversion), so a batch is bit-identical whatever the storage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, PplVaeError

__all__ = ["STORAGES", "Images", "read_batches", "read_raw"]

STORAGES = ("memory", "uint8", "mmap", "files")  # where pixels live between batches (data.storage)


# --------------------------------------------------------------------------- backings: official index -> uint8 rows


class TensorRows:
    """uint8 rows held in memory: ``(N, C, H, W)``."""

    kind = "uint8"

    def __init__(self, data: torch.Tensor):
        self.data = data if data.dim() == 4 else data.unsqueeze(1)

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data[idx]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class MemmapRows:
    """The images of an IDX file (magic 0x00000803, uint8, ``(N, H, W)``) memory-mapped in place."""

    kind = "mmap"

    def __init__(self, path: str | Path, shown: str | Path | None = None):
        path = Path(path)
        shown = shown or path
        with open(path, "rb") as f:
            header = f.read(16)
        if len(header) < 16 or int.from_bytes(header[:4], "big") != 0x803:
            raise DataError(f"{shown} is not an IDX image file (its header does not start with 0x00000803)")
        n, h, w = (int.from_bytes(header[i : i + 4], "big") for i in (4, 8, 12))
        if path.stat().st_size != 16 + n * h * w:
            raise DataError(
                f"{shown}: the header says {n} images of {h}x{w}, so {16 + n * h * w} bytes, but the file "
                f"holds {path.stat().st_size}: it is truncated or corrupt — get a fresh copy"
            )
        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="r", offset=16, shape=(n, h, w))

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.data[idx.numpy()] if idx.dim() else self.data[int(idx)][None]
        out = torch.from_numpy(np.array(rows)).unsqueeze(1)  # a copy: the map is read-only
        return out if idx.dim() else out[0]

    @property
    def nbytes(self) -> int:
        return 0  # the page cache's, not this process's

    def __getstate__(self):  # a worker process started by spawn maps the file itself
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class FileRows:
    """Rows decoded from files by a torchvision dataset whose transform ends in ``PILToTensor`` (uint8), each of
    shape ``shape`` (``expected`` says what in the error otherwise)."""

    kind = "files"

    def __init__(
        self, name: str, dataset, where: Callable[[int], str], shape: tuple[int, ...], expected: str | None = None
    ):
        self.name, self.dataset, self.where = name, dataset, where
        self.shape, self.expected = tuple(shape), expected

    def item(self, i: int) -> torch.Tensor:
        try:
            x = self.dataset[i][0]
        except DataError:  # the loader's own (it names the file)
            raise
        except Exception as exc:
            raise DataError(f"{self.name}: cannot read {self.where(i)}: {type(exc).__name__}: {exc}") from exc
        if tuple(x.shape) != self.shape:
            raise DataError(
                f"{self.name}: {self.where(i)} gives an image of shape {tuple(x.shape)}; expected "
                f"{self.expected or self.shape}"
            )
        return x

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() == 0:
            return self.item(int(idx))
        items = [self.item(i) for i in idx.tolist()]
        return torch.stack(items) if items else torch.empty((0, *self.shape), dtype=torch.uint8)

    @property
    def nbytes(self) -> int:
        return 0


# --------------------------------------------------------------------------- Images


class Images:
    """A split's images ``(N, C, H, W)``: rows ``index`` of a backing, converted on reading as
    ``post(uint8 / scale)`` (``post``: the dataset's own step after the conversion, e.g. a resize; ``None``: none).
    Indexing returns float32 tensors (``x[rows, ...]``: the rows first, then the rest of the key on them);
    ``len``, ``shape``, ``dtype``, ``dim()`` and ``to()`` behave like the tensor's; reading every row (``to``,
    ``float``, ``mean``) goes through ``workers`` DataLoader processes. See the module docstring."""

    def __init__(
        self,
        rows,
        index: torch.Tensor,
        shape: tuple[int, int, int],
        scale: float = 255.0,
        post: Callable[[torch.Tensor], torch.Tensor] | None = None,
        workers: int = 0,
    ):
        self.rows, self.index = rows, index.long()
        self.item_shape, self.scale, self.post, self.workers = tuple(shape), float(scale), post, int(workers)

    @classmethod
    def from_uint8(cls, values: torch.Tensor, scale: float = 255.0) -> Images:
        """Images held as the uint8 tensor ``values`` ``(N, C, H, W)`` read as ``values / scale``."""
        return cls(TensorRows(values), torch.arange(len(values)), tuple(values.shape[1:]), scale)

    @property
    def kind(self) -> str:
        return self.rows.kind

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.item_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def nbytes(self) -> int:
        """Bytes this process holds for the images (0 for ``mmap`` and ``files``)."""
        return self.rows.nbytes

    def dim(self) -> int:
        return 1 + len(self.item_shape)

    def __len__(self) -> int:
        return len(self.index)

    def raw(self, key) -> torch.Tensor:
        """The stored uint8 rows of ``key`` (an int, a slice, an index or boolean tensor/list/array)."""
        return self.rows.read(self._official(key))

    def convert(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 rows → float32 in [0, 1], as at load time."""
        x = raw.float().div_(self.scale)
        if self.post is None:
            return x
        return self.post(x[None])[0] if x.dim() == len(self.item_shape) else self.post(x)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):  # x[rows, c, h, w]: the rows, then the rest on them
            if not key:
                return self.float()
            rows, rest = self[key[0]], key[1:]
            if any(not isinstance(k, int | slice) or isinstance(k, bool) for k in rest):
                raise IndexError(
                    f"Images take ints and slices after the rows (x[rows, c, h, w]), got {key!r}: index "
                    "the rows first (x[rows]) and the tensor it returns after"
                )
            single = isinstance(key[0], int | np.integer) and not isinstance(key[0], bool)
            return rows[rest] if single else rows[(slice(None), *rest)]
        return self.convert(self.raw(key))

    def to(self, *args, **kwargs) -> torch.Tensor:
        """Every image as one float32 tensor (read in chunks), then ``Tensor.to(*args, **kwargs)``."""
        return self.float().to(*args, **kwargs)

    def float(self) -> torch.Tensor:
        if len(self) == 0:
            return torch.empty(self.shape)
        return torch.cat(list(self._chunks()))

    def mean(self) -> float:
        """Mean pixel value (float64 sums over chunks of rows)."""
        total = sum(float(x.sum(dtype=torch.float64)) for x in self._chunks())
        return total / max(1, len(self) * math.prod(self.item_shape))

    def _chunks(self, size: int = 1024) -> Iterator[torch.Tensor]:
        sets = [torch.arange(s, min(s + size, len(self))) for s in range(0, len(self), size)]
        return read_batches(self, sets, self.workers)

    def _official(self, key) -> torch.Tensor:
        if isinstance(key, int | np.integer) and not isinstance(key, bool):
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"index {key} is out of range for {n} images")
            return self.index[key]
        if isinstance(key, slice):
            return self.index[key]
        key = torch.as_tensor(np.asarray(key) if isinstance(key, list | tuple) else key)
        if key.dtype == torch.bool and key.dim() == 1:
            if key.shape != (len(self),):
                raise IndexError(f"a boolean mask over {len(self)} images has shape {tuple(key.shape)}")
            return self.index[key]
        if key.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise IndexError(
                f"Images are indexed by an int, a slice, integer indices or a boolean mask over the rows; "
                f"got {type(key).__name__} of dtype {key.dtype}"
            )
        return self.index[key.long()]

    def __repr__(self) -> str:
        return f"Images(storage={self.kind!r}, shape={tuple(self.shape)})"


# --------------------------------------------------------------------------- batches through a DataLoader


class _Rows(torch.utils.data.Dataset):
    """The rows of an :class:`Images` as a map-style dataset for a DataLoader (uint8, fetched a batch at a time)."""

    def __init__(self, images: Images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor | _Failed:
        return self._read(int(i))

    def __getitems__(self, indices: list[int]) -> torch.Tensor | _Failed:
        return self._read(torch.as_tensor(indices, dtype=torch.long))

    def _read(self, key) -> torch.Tensor | _Failed:
        try:
            return self.images.raw(key)
        except PplVaeError as e:  # handed to the main process as a value: see _Failed
            return _Failed(type(e), str(e))


class _Failed:
    """A library error raised in a DataLoader worker, sent back as the batch: the main process raises it again as
    itself (one line naming the file), where torch would re-raise a copy whose message is the worker's traceback."""

    def __init__(self, kind: type, message: str):
        self.kind, self.message = kind, message

    def error(self) -> PplVaeError:
        return self.kind(self.message)


def _as_is(batch):
    return batch


def read_raw(
    images: Images, index_sets: Iterable[torch.Tensor], workers: int = 0, pin_memory: bool = False
) -> Iterator[torch.Tensor]:
    """The stored uint8 rows of each index set (taken lazily), in order: read in this process (``workers=0``) or by
    ``workers`` DataLoader processes, each fetching a whole set at a time."""
    if workers == 0:
        for idx in index_sets:
            yield images.raw(idx)
        return
    loader = torch.utils.data.DataLoader(
        _Rows(images),
        batch_sampler=(idx.tolist() for idx in index_sets),
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )  # its workers' seeds: not a draw from the global RNG
    batches = iter(loader)
    try:
        for batch in batches:
            if isinstance(batch, _Failed):
                raise batch.error() from None
            yield batch
    finally:  # also when the caller stops early: the workers are shut down here, not by a later garbage collection
        del batches


def read_batches(
    images: Images, index_sets: Iterable[torch.Tensor], workers: int = 0, pin_memory: bool = False
) -> Iterator[torch.Tensor]:
    """The float32 rows of each index set, in order (:func:`read_raw`, converted in this process); an empty set
    gives an empty batch."""
    for raw in read_raw(images, index_sets, workers, pin_memory):
        yield images.convert(raw)
