"""Tests for ppl_vae.data: digits, synthetic IDX/Omniglot/CelebA folders, pixel modes, batching."""

from __future__ import annotations

import gzip
import math
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_vae.data import DEBIAN_FASHION_MNIST, DataBundle, DataError, load_data
from ppl_vae.errors import PplVaeError

IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Keep every cache write inside the test's tmp folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PPL_VAE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data("digits", seed=0)


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian dims, raw data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_folder(folder: Path, gz: bool, n_train=30, n_test=10, size=28, seed=0) -> dict[str, np.ndarray]:
    """Debian-like flat folder with the four IDX files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write_idx(folder / IDX_NAMES[key], array, gz)
    return arrays


def rows(x: torch.Tensor, y: torch.Tensor) -> Counter:
    return Counter((xi.numpy().tobytes(), int(yi)) for xi, yi in zip(x, y, strict=False))


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_range(digits):
    assert digits.shape == (1, 8, 8) and digits.data_dim == 64 and digits.num_classes == 10
    for split in ("train", "val", "test"):
        x, y = digits.split(split)
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert 0.0 <= x.min() and x.max() <= 1.0
    assert len(digits.train_x) + len(digits.val_x) + len(digits.test_x) == 1797
    assert len(digits.test_x) == 359 and len(digits.val_x) == round(0.1 * (1797 - 359))
    assert "train=1294" in repr(digits) and "val=144" in repr(digits)
    assert "source" in digits.summary()


def test_digits_splits_partition_the_data(digits):
    from sklearn.datasets import load_digits

    full = load_digits()
    x = torch.as_tensor(full.images, dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.as_tensor(full.target)
    parts = Counter()
    for split in ("train", "val", "test"):
        parts += rows(*digits.split(split))
    assert parts == rows(x, y)  # together the splits are exactly the dataset, each image once


def test_digits_deterministic_per_seed(digits):
    again = load_data("digits", seed=0)
    other = load_data("digits", seed=1)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.val_y, digits.val_y)
    assert not torch.equal(other.train_x, digits.train_x)
    assert not torch.equal(other.val_x, digits.val_x)
    # the test split is fixed (like an official one), whatever the seed
    assert torch.equal(other.test_x, digits.test_x)


def test_val_fraction_zero_and_limit():
    data = load_data("digits", val_fraction=0.0)
    assert data.val_x.shape == (0, 1, 8, 8) and data.val_y.shape == (0,)
    assert data.num_batches("val", 16) == 0 and list(data.batches("val", 16, shuffle=True)) == []
    small = load_data("digits", limit=100)
    factor = 100 / 1294
    assert len(small.train_x) == 100
    assert len(small.val_x) == math.ceil(144 * factor)
    assert len(small.test_x) == math.ceil(359 * factor)
    assert len(load_data("digits", limit=10**6).train_x) == 1294


def test_image_size_resizes():
    data = load_data("digits", image_size=16, limit=20)
    assert data.shape == (1, 16, 16) and data.train_x.shape[1:] == (1, 16, 16)
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0


# --------------------------------------------------------------------------- IDX via torchvision


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_idx_flat_folder_round_trip(tmp_path, name, gz):
    arrays = make_idx_folder(tmp_path / "flat", gz)
    data = load_data(name, root=tmp_path / "flat", val_fraction=0.0)
    assert data.shape == (1, 28, 28) and data.num_classes == 10 and len(data.class_names) == 10
    for split in ("train", "test"):
        x, y = data.split(split)
        expected = torch.from_numpy(arrays[f"{split}_x"]).float().unsqueeze(1) / 255
        assert x.dtype == torch.float32 and torch.equal(x, expected)
        assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(arrays[f"{split}_y"]).long())


def test_idx_val_split_partitions_train(tmp_path):
    arrays = make_idx_folder(tmp_path / "flat", gz=True)
    data = load_data("fashion_mnist", root=tmp_path / "flat", val_fraction=0.2, seed=3)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (24, 6, 10)
    full = rows(torch.from_numpy(arrays["train_x"]).float().unsqueeze(1) / 255, torch.from_numpy(arrays["train_y"]))
    assert rows(data.train_x, data.train_y) + rows(data.val_x, data.val_y) == full


def test_idx_cache_is_a_torchvision_root(tmp_path, _cache):
    import torchvision

    arrays = make_idx_folder(tmp_path / "flat", gz=True)
    load_data("fashion_mnist", root=tmp_path / "flat")
    (raw,) = _cache.glob("fashion_mnist-*/FashionMNIST/raw")
    ds = torchvision.datasets.FashionMNIST(root=str(raw.parent.parent), train=False)
    assert torch.equal(ds.data, torch.from_numpy(arrays["test_x"]))


def test_idx_cache_refreshes_when_source_changes(tmp_path):
    make_idx_folder(tmp_path / "flat", gz=True, seed=0)
    first = load_data("mnist", root=tmp_path / "flat", val_fraction=0.0)
    arrays = make_idx_folder(tmp_path / "flat", gz=True, seed=1, n_train=12)
    second = load_data("mnist", root=tmp_path / "flat", val_fraction=0.0)
    assert len(first.train_x) == 30 and len(second.train_x) == 12
    assert torch.equal(second.train_y, torch.from_numpy(arrays["train_y"]).long())


def test_idx_torchvision_layout_used_in_place(tmp_path, _cache):
    arrays = make_idx_folder(tmp_path / "tv" / "KMNIST" / "raw", gz=False)
    data = load_data("kmnist", root=tmp_path / "tv", val_fraction=0.0)
    assert torch.equal(data.test_y, torch.from_numpy(arrays["test_y"]).long())
    assert not _cache.exists()  # nothing to arrange


# --------------------------------------------------------------------------- errors


def test_truncated_idx_names_the_file(tmp_path):
    make_idx_folder(tmp_path / "flat", gz=False)
    bad = tmp_path / "flat" / IDX_NAMES["train_x"]
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
        load_data("mnist", root=tmp_path / "flat")
    assert str(tmp_path / "flat") in str(err.value)


def test_wrong_magic_names_the_file(tmp_path):
    make_idx_folder(tmp_path / "flat", gz=True)
    bad = tmp_path / "flat" / (IDX_NAMES["test_y"] + ".gz")
    data = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + data[4:]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_data("fashion_mnist", root=tmp_path / "flat")


def test_truncated_gzip_names_the_file(tmp_path):
    make_idx_folder(tmp_path / "flat", gz=True)
    bad = tmp_path / "flat" / (IDX_NAMES["train_y"] + ".gz")
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz"):
        load_data("fashion_mnist", root=tmp_path / "flat")


def test_wrong_image_size(tmp_path):
    make_idx_folder(tmp_path / "flat", gz=False, size=32)
    with pytest.raises(DataError, match=r"28x28.*\(30, 32, 32\)"):
        load_data("mnist", root=tmp_path / "flat")


def test_label_count_mismatch(tmp_path):
    make_idx_folder(tmp_path / "flat", gz=False)
    write_idx(tmp_path / "flat" / IDX_NAMES["test_y"], np.zeros(7, np.uint8), gz=False)
    with pytest.raises(DataError, match="7 labels"):
        load_data("mnist", root=tmp_path / "flat")


def test_missing_folder_explains_where_and_how(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_data("fashion_mnist", root=missing)
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg
    assert str(missing / "FashionMNIST" / "raw") in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "download=True" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "/usr/share/datasets/fashion-mnist" in msg


def test_partial_folder_lists_missing_files(tmp_path):
    make_idx_folder(tmp_path / "flat", gz=False)
    (tmp_path / "flat" / IDX_NAMES["test_x"]).unlink()
    with pytest.raises(DataError, match=r"lacks: t10k-images-idx3-ubyte") as err:
        load_data("kmnist", root=tmp_path / "flat")
    assert "download=True" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"name": "cifar"}, ["name", "'cifar'", "digits", "fashion_mnist"]),
        ({"pixels": "gray"}, ["pixels", "'gray'", "binary_dynamic"]),
        ({"val_fraction": 1.0}, ["val_fraction", "1.0", "[0, 1)"]),
        ({"val_fraction": -0.1}, ["val_fraction", "-0.1"]),
        ({"limit": 0}, ["limit", "0"]),
        ({"image_size": -3}, ["image_size", "-3"]),
    ],
)
def test_bad_arguments(kwargs, words):
    with pytest.raises(DataError) as err:
        load_data(**kwargs)
    assert isinstance(err.value, ValueError) and isinstance(err.value, PplVaeError)
    for word in words:
        assert word in str(err.value)


def test_bad_batch_arguments(digits):
    with pytest.raises(DataError, match="split='valid'"):
        digits.split("valid")
    with pytest.raises(DataError, match="batch_size=0"):
        digits.batches("train", 0, shuffle=False)  # checked at the call, not lazily
    with pytest.raises(DataError, match="start=-1"):
        digits.batches("train", 8, shuffle=False, start=-1)


def test_missing_omniglot_and_celeba(tmp_path):
    with pytest.raises(DataError, match="images_background") as err:
        load_data("omniglot", root=tmp_path / "o")
    assert str(tmp_path / "o") in str(err.value) and "download=True" in str(err.value)
    with pytest.raises(DataError, match="list_attr_celeba.txt") as err:
        load_data("celeba", root=tmp_path / "c")
    assert "download=True" in str(err.value)


# --------------------------------------------------------------------------- pixel modes


def test_binary_static():
    data = load_data("digits", pixels="binary_static", seed=2)
    for split in ("train", "val", "test"):
        assert set(data.split(split)[0].unique().tolist()) <= {0.0, 1.0}
    e0 = torch.cat([x for x, _ in data.batches("train", 100, shuffle=False, epoch=0)])
    e1 = torch.cat([x for x, _ in data.batches("train", 100, shuffle=False, epoch=1)])
    assert torch.equal(e0, e1) and torch.equal(e0, data.train_x)
    assert torch.equal(load_data("digits", pixels="binary_static", seed=2).train_x, data.train_x)


def test_binary_dynamic():
    cont = load_data("digits", seed=4)
    data = load_data("digits", pixels="binary_dynamic", seed=4)
    assert torch.equal(data.train_x, cont.train_x)  # stored as probabilities

    def epoch(e, seed=0):
        return torch.cat([x for x, _ in data.batches("train", 128, shuffle=False, seed=seed, epoch=e)])

    e0, e1 = epoch(0), epoch(1)
    assert set(e0.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, epoch(0)) and not torch.equal(e0, epoch(0, seed=1))

    p = cont.train_x
    sigma = torch.sqrt((p * (1 - p)).sum()) / p.numel()
    for sample in (e0, e1):
        assert abs(sample.mean() - p.mean()) < 5 * sigma

    # evaluation splits: binarised once, the same every epoch
    for split in ("val", "test"):
        stored = data.split(split)[0]
        assert set(stored.unique().tolist()) <= {0.0, 1.0}
        for e in (0, 1):
            assert torch.equal(torch.cat([x for x, _ in data.batches(split, 50, shuffle=False, epoch=e)]), stored)


def test_dequantized():
    cont = load_data("digits", seed=5)
    data = load_data("digits", pixels="dequantized", seed=5)
    for split in ("train", "val", "test"):
        x, c = data.split(split)[0], cont.split(split)[0]
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert (x - c).abs().max() <= 1 / 256 + 1e-6
        assert not torch.equal(x, c)


# --------------------------------------------------------------------------- batches


def test_batches_cover_each_index_once(digits):
    n = len(digits.train_x)
    data = DataBundle(**{**digits.__dict__, "train_y": torch.arange(n)})  # labels = positions
    seen = [y for _, y in data.batches("train", 100, shuffle=True, seed=7, epoch=3)]
    assert len(seen) == data.num_batches("train", 100) == math.ceil(n / 100)
    assert [len(y) for y in seen[:-1]] == [100] * (len(seen) - 1) and len(seen[-1]) == n % 100
    order = torch.cat(seen)
    assert torch.equal(order.sort().values, torch.arange(n))
    assert not torch.equal(order, torch.arange(n))

    again = torch.cat([y for _, y in data.batches("train", 100, shuffle=True, seed=7, epoch=3)])
    other_epoch = torch.cat([y for _, y in data.batches("train", 100, shuffle=True, seed=7, epoch=4)])
    other_seed = torch.cat([y for _, y in data.batches("train", 100, shuffle=True, seed=8, epoch=3)])
    assert torch.equal(order, again)
    assert not torch.equal(order, other_epoch) and not torch.equal(order, other_seed)
    unshuffled = torch.cat([y for _, y in data.batches("train", 100, shuffle=False)])
    assert torch.equal(unshuffled, torch.arange(n))


def test_batches_pairs_match_and_ignore_global_rng(digits):
    torch.manual_seed(0)
    a = list(digits.batches("val", 32, shuffle=True, seed=1, epoch=0))
    torch.manual_seed(123)
    torch.rand(10)
    b = list(digits.batches("val", 32, shuffle=True, seed=1, epoch=0))
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = a[0]
    for xi, yi in zip(x, y, strict=False):  # every (x, y) pair is a stored pair
        match = (digits.val_x == xi).flatten(1).all(1)
        assert (digits.val_y[match] == yi).any()


def test_batches_resume_with_start():
    data = load_data("digits", pixels="binary_dynamic", seed=0)
    full = list(data.batches("train", 64, shuffle=True, seed=2, epoch=5))
    tail = list(data.batches("train", 64, shuffle=True, seed=2, epoch=5, start=7))
    assert len(tail) == len(full) - 7
    for (xa, ya), (xb, yb) in zip(full[7:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_device_and_missing_labels(digits):
    x, y = next(digits.batches("test", 16, shuffle=False, device="cpu"))
    assert x.device.type == "cpu" and y.device.type == "cpu" and x.shape == (16, 1, 8, 8)
    x, y = next(digits.batches("test", 16, shuffle=False, device=torch.device("cpu")))
    assert x.device == torch.device("cpu")
    unlabeled = DataBundle(**{**digits.__dict__, "test_y": None})
    xs = [(x, y) for x, y in unlabeled.batches("test", 100, shuffle=True)]
    assert all(y is None for _, y in xs) and sum(len(x) for x, _ in xs) == len(digits.test_x)


# --------------------------------------------------------------------------- omniglot / celeba


def test_omniglot_synthetic_folder(tmp_path):
    from PIL import Image

    for subset, alphabets in (("images_background", ["Alpha", "Beta"]), ("images_evaluation", ["Gamma"])):
        for a in alphabets:
            for c in ("character01", "character02"):
                folder = tmp_path / "omniglot-py" / subset / a / c
                folder.mkdir(parents=True)
                for k in range(3):
                    img = np.full((105, 105), 255, np.uint8)
                    img[20:80, 40:65] = 0  # a thick black vertical stroke on white
                    Image.fromarray(img).save(folder / f"{a}_{c}_{k}.png")
    data = load_data("omniglot", root=tmp_path, val_fraction=0.25)
    assert data.shape == (1, 28, 28) and data.num_classes == 4
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (9, 3, 6)
    assert data.train_y.dtype == torch.int64 and set(data.train_y.tolist()) <= {0, 1, 2, 3}
    x = data.test_x[0, 0]
    assert x[0, 0] == 0.0 and x[14, 14] > 0.9  # inverted: background 0, stroke 1
    assert load_data("omniglot", root=tmp_path, image_size=20).shape == (1, 20, 20)
    for storage in ("uint8", "files"):  # decoded per batch (or once, to bytes): the same images
        other = load_data("omniglot", root=tmp_path, val_fraction=0.25, storage=storage, workers=1)
        for split in ("train", "val", "test"):
            assert torch.equal(other.split(split)[0][:], data.split(split)[0])
            assert torch.equal(other.split(split)[1], data.split(split)[1])


def test_celeba_synthetic_folder(tmp_path, monkeypatch):
    import torchvision
    from PIL import Image

    # torchvision checks md5 sums of the real annotation files; the layout is what we test here
    monkeypatch.setattr(torchvision.datasets.CelebA, "_check_integrity", lambda self: True)
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    partition = [0, 0, 0, 0, 2, 2]  # official train / test; one-image splits trip torchvision
    attr_names = ["Smiling", "Young"]
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(base / "img_align_celeba" / name)
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partition, strict=False)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    attrs = [[1, -1], [-1, 1], [1, 1], [-1, -1], [1, 1], [1, -1]]
    (base / "list_attr_celeba.txt").write_text(
        f"{len(names)}\n{' '.join(attr_names)}\n"
        + "".join(f"{n} {a} {b}\n" for n, (a, b) in zip(names, attrs, strict=False))
    )
    (base / "list_bbox_celeba.txt").write_text(
        f"{len(names)}\nimage_id x_1 y_1 width height\n" + "".join(f"{n} 1 2 3 4\n" for n in names)
    )
    (base / "list_landmarks_align_celeba.txt").write_text(
        f"{len(names)}\nlefteye_x lefteye_y\n" + "".join(f"{n} 5 6\n" for n in names)
    )
    data = load_data("celeba", root=tmp_path, val_fraction=0.25)
    assert data.shape == (3, 64, 64) and data.num_classes is None
    assert data.class_names == ("Smiling", "Young")
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (3, 1, 2)
    assert data.train_x.shape == (3, 3, 64, 64) and data.train_x.dtype == torch.float32
    assert torch.equal(data.test_y, torch.tensor([[1, 1], [1, 0]]))  # {-1, 1} attributes as {0, 1}
    assert data.train_y.shape == (3, 2) and data.train_y.dtype == torch.int64
    files = load_data("celeba", root=tmp_path, val_fraction=0.25, storage="files")
    assert files.train_x.kind == "files"
    for split in ("train", "val", "test"):
        assert torch.equal(files.split(split)[0][:], data.split(split)[0])
        assert torch.equal(files.split(split)[1], data.split(split)[1])


# --------------------------------------------------------------------------- system data


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist():
    data = load_data("fashion_mnist", root=DEBIAN_FASHION_MNIST, limit=500)
    assert data.shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.train_x) == 500 and data.train_x.shape[1:] == (1, 28, 28)
    assert set(data.train_y.unique().tolist()) == set(range(10))
    assert len(data.test_x) == math.ceil(10000 * 500 / 54000)
