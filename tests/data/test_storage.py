"""data.storage: images kept as 8-bit (in memory, memory-mapped IDX files, or image files decoded per batch by
DataLoader workers) give bit-identical batches to the float32 path, shard by rank at the read, and train alike."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from _images import write_idx as _write_idx
from _images import write_image_folder as _write_image_folder

import ppl_vae
from ppl_vae.config import ConfigError, DataConfig, TrainConfig
from ppl_vae.data import DataError, load_data, part_bounds
from ppl_vae.data import storage as images_mod
from ppl_vae.data.storage import Images


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPL_VAE_CACHE_DIR", str(tmp_path / "cache"))


def _epoch(data, batch=16, epoch=1, **kw):
    return list(data.batches("train", batch, shuffle=True, seed=5, epoch=epoch, **kw))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=False)
    )


@pytest.mark.parametrize("pixels", ["continuous", "binary_dynamic", "binary_static"])
@pytest.mark.parametrize("image_size", [None, 20])
def test_uint8_and_memory_mapped_idx_batches_are_the_float32_batches(tmp_path, pixels, image_size):
    root = _write_idx(tmp_path / "idx")
    kw = dict(root=root, pixels=pixels, seed=3, image_size=image_size)
    ref = load_data("mnist", **kw)
    for storage, workers in (("uint8", 0), ("mmap", 0), ("mmap", 2)):
        data = load_data("mnist", storage=storage, workers=workers, **kw)
        assert data.shape == ref.shape and data.storage == storage
        for split in ("train", "val", "test"):
            x, y = data.split(split)
            assert isinstance(x, Images) and x.shape == ref.split(split)[0].shape
            assert torch.equal(x[:], ref.split(split)[0]) and torch.equal(y, ref.split(split)[1])
        for epoch in (0, 1):
            assert _same(_epoch(data, epoch=epoch), _epoch(ref, epoch=epoch))
        assert _same(list(data.batches("val", 7, shuffle=False)), list(ref.batches("val", 7, shuffle=False)))
        assert _same(_epoch(data, start=3), _epoch(ref)[3:])  # a resumed epoch
    mapped = load_data("mnist", storage="mmap", **kw).train_x
    if pixels != "binary_static":  # the 8-bit rows stay in the file; a binarised split is 0/1 bytes in memory
        assert isinstance(mapped.rows.data, np.memmap) and mapped.nbytes == 0
    stored = load_data("mnist", storage="uint8", **kw).train_x
    side = 28 if pixels != "binary_static" else (image_size or 28)  # resized per batch unless binarised at load
    assert stored.nbytes == len(stored) * side * side  # one byte per pixel


def test_a_rank_reads_only_its_share_and_the_shares_make_the_batch(tmp_path, monkeypatch):
    data = load_data(
        "mnist", root=_write_idx(tmp_path / "idx", n_train=50), pixels="binary_dynamic", storage="uint8", seed=1
    )
    whole = _epoch(data, batch=16)
    reads = []
    original = images_mod.TensorRows.read
    monkeypatch.setattr(images_mod.TensorRows, "read", lambda self, idx: reads.append(len(idx)) or original(self, idx))
    world = 3
    shares = [_epoch(data, batch=16, part=(r, world)) for r in range(world)]
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([shares[r][b][0] for r in range(world)]), x)  # the draws too
        assert torch.equal(torch.cat([shares[r][b][1] for r in range(world)]), y)
        assert [len(shares[r][b][0]) for r in range(world)] == [
            hi - lo for lo, hi in (part_bounds(len(x), r, world) for r in range(world))
        ]
    assert max(reads) == 6 and sum(reads) == len(data.train_x)  # ceil(16 / 3): only the share's rows
    assert [part_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [part_bounds(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]  # an empty share
    assert _same(_epoch(data, batch=16, part=(1, world)), shares[1])  # a pure function of the layout
    assert not torch.equal(_epoch(data, batch=16, epoch=2)[0][0], whole[0][0])  # and of the epoch
    with pytest.raises(DataError, match=r"part must be \(rank, world\).*part=\(3, 3\)"):
        data.batches("train", 4, shuffle=False, part=(3, 3))


def test_an_image_folder_streams_from_its_files_through_dataloader_workers(tmp_path):
    root = _write_image_folder(tmp_path / "faces")
    ref = load_data("image_folder", root=root, image_size=16, val_fraction=0.2, seed=2)
    assert ref.shape == (3, 16, 16) and ref.num_classes == 3 and ref.class_names == ("class_0", "class_1", "class_2")
    assert len(ref.train_x) + len(ref.val_x) + len(ref.test_x) == 18 and len(ref.test_x) == round(0.2 * 18)
    assert ref.train_x.dtype == torch.float32 and 0 <= float(ref.train_x.min()) and float(ref.train_x.max()) <= 1
    for storage, workers in (("files", 0), ("files", 2), ("uint8", 2)):
        data = load_data(
            "image_folder", root=root, image_size=16, val_fraction=0.2, seed=2, storage=storage, workers=workers
        )
        assert _same(_epoch(data, batch=4), _epoch(ref, batch=4))
        assert _same(_epoch(data, batch=4, part=(1, 2)), _epoch(ref, batch=4, part=(1, 2)))
        assert torch.equal(data.test_x.to("cpu"), ref.test_x) and torch.equal(data.test_y, ref.test_y)
    files = load_data("image_folder", root=root, image_size=16, storage="files").train_x
    assert files.kind == "files" and files.nbytes == 0
    # the same files give the same test split whatever the seed
    assert torch.equal(load_data("image_folder", root=root, image_size=16, seed=9).test_x, ref.test_x)
    # a broken file is named when its batch is read
    (root / "class_1" / "002.png").write_bytes(b"not a png")
    broken = load_data("image_folder", root=root, image_size=16, storage="files", workers=2)
    with pytest.raises(DataError, match=r"cannot read .*class_1/002.png"):
        for split in ("train", "val", "test"):
            list(broken.batches(split, 4, shuffle=False))


def _workers_left(timeout: float = 60.0) -> list:
    """The worker processes still alive once they had ``timeout`` seconds to exit: a worker told to stop exits on
    its own schedule (on a loaded machine, after the call that stopped it returned), and ``active_children`` reaps
    the ones that exited; waiting for that event, not for a fixed time, keeps the test true under load."""
    import multiprocessing

    deadline = time.monotonic() + timeout
    while (alive := multiprocessing.active_children()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return alive


def test_dataloader_workers_are_shut_down_when_an_epoch_ends_or_the_caller_stops(tmp_path):
    import multiprocessing

    data = load_data("mnist", root=_write_idx(tmp_path / "idx"), storage="mmap", workers=2)
    assert len(_epoch(data)) == 6 and _workers_left() == []
    batches = data.batches("train", 8, shuffle=True)
    next(batches)
    assert len(multiprocessing.active_children()) == 2
    batches.close()  # what a garbage collection of an unfinished generator does
    assert _workers_left() == []


def test_storage_settings_are_checked_with_the_field_and_the_value(tmp_path):
    root = _write_idx(tmp_path / "idx")
    with pytest.raises(DataError, match=r"unknown storage='disk'"):
        load_data("mnist", root=root, storage="disk")
    with pytest.raises(DataError, match=r"storage='mmap' .* dataset 'digits'"):
        load_data("digits", storage="mmap")
    with pytest.raises(DataError, match=r"storage='files' .* dataset 'mnist'.*or 'mmap'"):
        load_data("mnist", root=root, storage="files")
    with pytest.raises(DataError, match=r"pixels='dequantized' .* storage='uint8'"):
        load_data("mnist", root=root, storage="uint8", pixels="dequantized")
    with pytest.raises(DataError, match=r"workers must be an integer >= 0, got workers=-1"):
        load_data("mnist", root=root, storage="uint8", workers=-1)
    bad = _write_idx(tmp_path / "bad")
    images = bad / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: the header says 90 images of 28x28.*truncated"):
        load_data("mnist", root=bad, storage="mmap")
    images.write_bytes(b"\x00\x00\x08\x01" + images.read_bytes()[4:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is not an IDX image file"):
        load_data("mnist", root=bad, storage="mmap")
    with pytest.raises(DataError, match=r"image_folder' needs data.root"):
        load_data("image_folder")
    with pytest.raises(ConfigError, match=r"data.storage must be one of .*got 'disk'"):
        DataConfig(storage="disk").validate()
    with pytest.raises(ConfigError, match=r"data.workers = 2 .* data.storage = 'memory'"):
        DataConfig(workers=2).validate()
    with pytest.raises(ConfigError, match=r"data.storage = 'uint8' is not available with data.multimodal"):
        DataConfig(storage="uint8", multimodal="poly").validate()
    DataConfig(name="celeba", workers=4).validate()  # folder datasets decode at load time with workers
    from ppl_vae.data.multimodal import make_multimodal

    with pytest.raises(DataError, match=r"data.multimodal='poly' .* storage='uint8'"):
        make_multimodal(load_data("mnist", root=root, storage="uint8"), "poly")


def test_images_index_like_the_float_tensor(tmp_path):
    root = _write_idx(tmp_path / "idx")
    ref = load_data("mnist", root=root, seed=1).test_x
    x = load_data("mnist", root=root, seed=1, storage="mmap", workers=1).test_x
    assert len(x) == len(ref) and x.shape == ref.shape and x.dim() == 4 and x.dtype == torch.float32
    mask = torch.arange(len(ref)) % 3 == 0
    for key in (
        0,
        -1,
        slice(2, 9),
        slice(None, None, 4),
        torch.tensor([5, 1, 5]),
        [3, 0],
        np.array([2, 4]),
        mask,
        (0, 0),
        (slice(1, 4), 0, slice(3, 7)),
        (torch.tensor([2, 0]), 0, 5, 5),
    ):
        assert torch.equal(x[key], ref[key]), key
    assert torch.equal(x.to("cpu"), ref) and abs(x.mean() - float(ref.double().mean())) < 1e-12
    with pytest.raises(IndexError, match=r"index 30 is out of range for 30 images"):
        x[30]
    with pytest.raises(IndexError, match=r"indexed by an int, a slice.*float32"):
        x[torch.tensor([0.5])]
    with pytest.raises(IndexError, match=r"ints and slices after the rows"):
        x[torch.tensor([2, 0]), torch.tensor([0, 0])]


def test_training_on_streamed_images_gives_the_float32_run(tmp_path):
    """The same VAE trained on the same folder of images held as float32 and decoded from the files by two
    DataLoader workers per batch: the same metrics, bit for bit (the batches are identical)."""
    root = _write_image_folder(tmp_path / "faces", per_class=(20, 20))
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, logger="none")
    out = []
    for storage, workers in (("memory", 0), ("files", 2)):
        data = load_data("image_folder", root=root, image_size=8, storage=storage, workers=workers)
        torch.manual_seed(0)
        model = ppl_vae.build_model(
            ppl_vae.config.ModelConfig(likelihood="bernoulli", latent_dim=2, hidden=[16]),
            data.shape,
            num_data=len(data.train_x),
        )
        run = ppl_vae.train(model, data, cfg, run_dir=tmp_path / storage, progress=False, seed=4)
        out.append([{k: v for k, v in r.items() if k != "seconds"} for r in run.history])
        lines = (tmp_path / storage / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert out[0] == out[1]


def test_the_cli_trains_on_memory_mapped_fashion_mnist_like_files(tmp_path):
    """``ppl-vae train`` with data.storage=mmap and a DataLoader worker: the run's metrics equal the float32
    run's."""
    root = _write_idx(tmp_path / "idx", n_train=120, n_test=40)
    histories = []
    for storage in ("memory", "mmap"):
        extra = [f"data.storage={storage}"] + (["data.workers=1"] if storage != "memory" else [])
        cfg = ppl_vae.config.load_config(
            None,
            [
                "data.name=fashion_mnist",
                f"data.root={root}",
                "data.pixels=binary_dynamic",
                "train.epochs=2",
                "train.batch_size=32",
                "model.hidden=[32]",
                "eval.num_samples=2",
                *extra,
            ],
        )
        ppl_vae.run_experiment(cfg, run_dir=tmp_path / storage, progress=False, figures=False)
        lines = (tmp_path / storage / "metrics.jsonl").read_text().splitlines()
        histories.append([{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines])
    assert histories[0] == histories[1]
