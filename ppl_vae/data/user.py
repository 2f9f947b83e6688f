"""Your own data as a :class:`~ppl_vae.data.DataBundle`: tensors, NumPy arrays or a map-style ``Dataset``.

>>> data = as_data((x, y), val_fraction=0.1, test_fraction=0.1, seed=0)   # x: (N, ...) floats, y: (N,) labels
>>> ppl_vae.train(model, x, TrainConfig(epochs=5))                         # the same, done by train itself

Accepted (:func:`as_data`):

* a :class:`DataBundle` or :class:`~ppl_vae.data.MultimodalData` — returned as it is;
* a tensor or array ``x`` of shape ``(N, ...)``, or a pair ``(x, y)`` with ``y`` of length ``N``;
* a map-style :class:`torch.utils.data.Dataset` whose items are ``x``, ``(x, y)`` or ``{"x": ..., "y": ...}``
  (read once, in index order, into memory);
* a :class:`~torch.utils.data.DataLoader`: its ``dataset`` is read as above. Its own sampler and batch size are not
  used — a loader's shuffling cannot be replayed from a checkpoint, so batches come from the bundle's seeded order
  and ``train.batch_size``, which is what makes ``resume`` exact (a warning says so);
* a mapping ``{"train": ..., "val": ..., "test": ...}`` of any of these (missing splits are empty).

One set is split: ``test_fraction`` of it is held out with a fixed permutation (the same for every ``seed``, like an
official test split), then ``val_fraction`` of the rest is drawn from ``seed``. Values are kept exactly: floating
data become float32, booleans 0/1 floats; integer data (8-bit pixels, counts) are refused with what to do, since
their scale is the user's to choose. Everything is checked before training starts, each fault in one line naming
the item and what was expected.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError
from .bundle import PIXEL_MODES, SPLITS, DataBundle, _apply_pixels
from .multimodal import MultimodalData
from .sources import _generator

__all__ = ["as_data", "save_bundle", "load_bundle", "same_bundle"]

_PROGRESS_FROM = 20_000  # items read from a Dataset before a progress bar is worth showing


def as_data(
    data: Any,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    name: str | None = None,
    num_classes: int | None = None,
    pixels: str = "continuous",
) -> Any:
    """``data`` as a bundle of train/val/test splits (see the module's text for what is accepted).

    ``pixels`` other than ``continuous`` binarises (or dequantises) values in [0, 1] as :func:`load_data` does.
    """
    if isinstance(data, DataBundle | MultimodalData):
        return data
    for field, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise DataError(f"{field} must be a number in [0, 1), got {field}={value!r}")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must leave training data, got {val_fraction} + {test_fraction} >= 1"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got seed={seed!r}")
    if isinstance(data, Mapping) and set(data) <= set(SPLITS) and "train" in data:
        parts = {s: _read(data[s], f"data[{s!r}]") if s in data else None for s in SPLITS}
        x, y = parts["train"]  # type: ignore[misc]
        splits = {s: parts[s] or (x[:0], None if y is None else y[:0]) for s in SPLITS}
    elif isinstance(data, Mapping):
        raise DataError(f"a mapping of data must have the keys 'train' (and 'val', 'test'), got keys {sorted(data)}")
    else:
        splits = _split(*_read(data, "data"), val_fraction, test_fraction, seed)
    shapes = {s: tuple(splits[s][0].shape[1:]) for s in SPLITS if len(splits[s][0])}
    if len(set(shapes.values())) > 1:
        raise DataError(f"the splits hold datapoints of different shapes: {shapes}")
    if num_classes is None:
        num_classes = _num_classes(splits)
    bundle = DataBundle.from_tensors(
        splits["train"][0],
        splits["train"][1],
        splits["val"][0],
        splits["val"][1],
        splits["test"][0],
        splits["test"][1],
        name=name or _kind(data),
        num_classes=num_classes,
    )
    bundle.source = f"your {_kind(data)}"
    bundle.check_finite()
    return _with_pixels(bundle, pixels, seed)


def _with_pixels(bundle: DataBundle, pixels: str, seed: int) -> DataBundle:
    if pixels not in PIXEL_MODES:
        raise DataError(f"pixels must be one of {list(PIXEL_MODES)}, got pixels={pixels!r}")
    if pixels == "continuous":
        return bundle
    for s in SPLITS:
        x = bundle.split(s)[0]
        if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
            raise DataError(
                f"pixels={pixels!r} needs values in [0, 1] (they are probabilities or grey levels), but the "
                f"{s} split lies in [{float(x.min()):g}, {float(x.max()):g}]: scale your data, or use continuous"
            )
        setattr(bundle, f"{s}_x", _apply_pixels(x, pixels, s, seed))
    bundle.pixels = pixels
    return bundle


def _kind(data) -> str:
    if isinstance(data, Mapping):
        return "splits"
    if isinstance(data, torch.utils.data.DataLoader):
        return "DataLoader"
    if isinstance(data, torch.utils.data.Dataset):
        return f"Dataset {type(data).__name__}"
    return "arrays" if isinstance(data, np.ndarray) or _is_pair(data) else "tensor"


def _is_pair(data) -> bool:
    return isinstance(data, tuple | list) and len(data) in (1, 2) and not isinstance(data[0], int | float)


def _read(data, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` of one set, as float32 values and int64 (or float, for several attributes) labels."""
    if isinstance(data, torch.utils.data.DataLoader):
        warnings.warn(
            "ppl_vae reads the DataLoader's dataset and batches it itself, in a seeded order that a checkpoint can "
            "replay (train.batch_size sets the batch; the loader's sampler, shuffling and batch size are not used)",
            UserWarning,
            stacklevel=4,
        )
        return _read(data.dataset, f"{what}.dataset")
    if isinstance(data, torch.utils.data.IterableDataset):
        raise DataError(
            f"{what} is an IterableDataset ({type(data).__name__}): ppl_vae needs a map-style Dataset (with "
            "__len__ and __getitem__) so that splits, batch order and resume are reproducible — read the stream "
            "into a tensor, or give a map-style Dataset"
        )
    if isinstance(data, torch.utils.data.Dataset):
        return _read_dataset(data, what)
    if _is_pair(data):
        x = _values(data[0], f"{what}[0]")
        y = _labels(data[1], len(x), f"{what}[1]") if len(data) == 2 else None
        return x, y
    return _values(data, what), None


def _read_dataset(ds, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"{what} ({type(ds).__name__}) has no len(): a map-style Dataset needs __len__") from None
    if n == 0:
        raise DataError(f"{what} ({type(ds).__name__}) is empty")
    xs, ys = [], []
    items = tqdm(range(n), desc="reading the Dataset", unit="item", disable=n < _PROGRESS_FROM, leave=False)
    for i in items:
        x, y = _item(ds[i], f"{what}[{i}]")
        if xs and (y is None) != (ys[0] is None):
            raise DataError(
                f"{what}[{i}] has {'no ' if y is None else 'a '}label, item 0 {'has' if y is None else 'has none'}"
            )
        xs.append(_values(x, f"{what}[{i}]", batch=False))
        if xs[-1].shape != xs[0].shape:
            raise DataError(
                f"{what}[{i}] has shape {tuple(xs[-1].shape)}, item 0 {tuple(xs[0].shape)}: every item of a "
                "Dataset must have the same shape (resize or pad them in the Dataset's transform)"
            )
        ys.append(y)
    x = torch.stack(xs)
    return x, (None if ys[0] is None else _labels(ys, n, f"{what}'s labels"))


def _item(item, where: str):
    if isinstance(item, Mapping):
        if "x" not in item:
            raise DataError(
                f"{where} is a mapping without the key 'x' (keys {sorted(item)}): items are x, (x, y) or "
                "{'x': ..., 'y': ...}"
            )
        return item["x"], item.get("y")
    if isinstance(item, tuple | list):
        if len(item) not in (1, 2):
            raise DataError(
                f"{where} is a {type(item).__name__} of {len(item)} values: items are x, (x, y) or "
                "{'x': ..., 'y': ...}"
            )
        return item[0], (item[1] if len(item) == 2 else None)
    return item, None


def _values(x, where: str, batch: bool = True) -> torch.Tensor:
    """A float32 tensor of the values of ``x``; integer values are refused (their scale is the user's choice)."""
    if type(x).__module__.startswith("PIL"):
        raise DataError(
            f"{where} is a PIL image: give the Dataset a transform that makes a float tensor in the range your "
            "likelihood expects (torchvision.transforms.ToTensor() gives [0, 1])"
        )
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise DataError(f"{where} is a NumPy array of Python objects: give numbers (float or bool)")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"{where} is a {type(x).__name__}, not a tensor, array or number") from None
    if x.dtype == torch.bool:
        x = x.float()
    elif not x.is_floating_point():
        lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
        raise DataError(
            f"{where} holds integers ({x.dtype}, values {lo}..{hi}): ppl_vae does not guess their scale — "
            "convert them yourself (8-bit pixels: x.float() / 255; counts: x.float() with a count likelihood)"
        )
    if batch and (x.dim() < 2 or len(x) == 0):
        raise DataError(
            f"{where} has shape {tuple(x.shape)}: data are (N, ...) with N >= 1 datapoints"
            + (" (one feature per datapoint: x.reshape(-1, 1))" if x.dim() == 1 else "")
        )
    return x.detach().to("cpu", torch.float32)


def _labels(y, n: int, where: str) -> torch.Tensor:
    if isinstance(y, list) and y and not isinstance(y[0], int | float):
        y = torch.stack([torch.as_tensor(v) for v in y])
    try:
        y = torch.as_tensor(np.asarray(y) if isinstance(y, np.ndarray) else y)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"{where} must be numbers (class indices or attributes), got {type(y).__name__}") from None
    if len(y) != n:
        raise DataError(f"{where} has {len(y)} labels for {n} datapoints: give one label per datapoint")
    if y.dtype == torch.bool:
        return y.long()
    if y.is_floating_point():
        if y.dim() == 1 and bool((y == y.round()).all()):
            return y.long()
        return y.float()
    return y.long()


def _split(x, y, val_fraction: float, test_fraction: float, seed: int):
    n = len(x)
    test = torch.randperm(n, generator=_generator(0, "user-test"))[: math.floor(test_fraction * n)]
    rest = torch.ones(n, dtype=torch.bool)
    rest[test] = False
    rest_idx = rest.nonzero().flatten()
    perm = rest_idx[torch.randperm(len(rest_idx), generator=_generator(seed, "user-val"))]
    n_val = int(round(val_fraction * n))
    idx = {"train": perm[n_val:], "val": perm[:n_val], "test": test}
    if len(idx["train"]) == 0:
        raise DataError(
            f"{n} datapoint(s) leave none for training with val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    out = {}
    for s in SPLITS:
        i = torch.sort(idx[s]).values
        out[s] = (x[i], None if y is None else y[i])
    return out


def _num_classes(splits) -> int | None:
    y = splits["train"][1]
    if y is None or y.dim() != 1 or y.is_floating_point() or len(y) == 0:
        return None
    ys = [splits[s][1] for s in SPLITS if splits[s][1] is not None and len(splits[s][1])]
    return int(max(int(t.max()) for t in ys)) + 1


# --------------------------------------------------------------------------- a run's own copy of given data


def save_bundle(bundle: DataBundle, path) -> None:
    """Write a bundle's splits to one safetensors file (no pickle), so a run trained on data passed in memory can
    be evaluated again from its folder."""
    tensors, meta = {}, {"name": bundle.name, "pixels": bundle.pixels, "num_classes": str(bundle.num_classes)}
    for s in SPLITS:
        x, y = bundle.split(s)
        if not isinstance(x, torch.Tensor):
            raise DataError(f"the {s} split is stored as {type(x).__name__}: only in-memory data can be kept")
        tensors[f"{s}_x"] = x.contiguous()
        if y is not None:
            tensors[f"{s}_y"] = y.contiguous()
    write_safetensors(tensors, path, meta)


def write_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, a failed write raised as the ``OSError`` of the system (errno and file
    name: a full disk, a quota or a file-size limit is then reported as such) with the partial file removed."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # safetensors' own error class wraps the system's: "I/O error: ... (os error 28)"
        if os.path.isfile(path):
            os.remove(path)  # a part of the file is no copy of the data
        code = re.search(r"os error (\d+)", str(e))
        if isinstance(e, OSError) or code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def load_bundle(path) -> DataBundle:
    """The bundle :func:`save_bundle` wrote (tensors only: nothing in the file is executed)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has keys(), not __iter__)
    bundle = DataBundle.from_tensors(
        t["train_x"],
        t.get("train_y"),
        t["val_x"],
        t.get("val_y"),
        t["test_x"],
        t.get("test_y"),
        name=meta.get("name", "given"),
        num_classes=None if meta.get("num_classes", "None") == "None" else int(meta["num_classes"]),
    )
    bundle.pixels = meta.get("pixels", "continuous")
    bundle.source = str(path)
    return bundle


def same_bundle(a: DataBundle, b: DataBundle) -> bool:
    """The splits of ``a`` and ``b`` hold the same values and labels."""
    for s in SPLITS:
        (xa, ya), (xb, yb) = a.split(s), b.split(s)
        if xa.shape != xb.shape or not torch.equal(xa, xb) or (ya is None) != (yb is None):
            return False
        if ya is not None and not torch.equal(ya, yb):
            return False
    return a.pixels == b.pixels
