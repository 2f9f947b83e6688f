"""Faults users met in their data: image files of modes other than 8-bit RGB (16-bit greyscale PNGs were clipped to
white without a word) and a broken image read by a DataLoader worker (its whole traceback instead of one line).
Every test here failed before these fixes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _images import write_image_folder
from PIL import Image

from ppl_vae.data import DataError, load_data

SIDE = 64  # image_folder's default size: the files are read without any resizing


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPL_VAE_CACHE_DIR", str(tmp_path / "cache"))


def _all_images(data) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(data.split(s) for s in ("train", "val", "test")), strict=True)
    return torch.cat([torch.as_tensor(x[:]) for x in xs]), torch.cat(ys)


def _mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def _mixed_folder(root: Path, n: int = 3, seed: int = 0) -> dict[str, float]:
    """One class folder per PIL mode, each of ``n`` files written by PIL; returns each class's true mean in [0, 1]
    computed from the arrays written (not by PIL's conversion)."""
    rng = np.random.default_rng(seed)
    truth: dict[str, list[float]] = {}

    def save(cls: str, image: Image.Image, k: int, ext: str, mean: float) -> None:
        (root / cls).mkdir(parents=True, exist_ok=True)
        image.save(root / cls / f"{k}.{ext}")
        truth.setdefault(cls, []).append(mean)

    for k in range(n):
        a16 = rng.integers(0, 40_000, (SIDE, SIDE), dtype=np.uint16)  # mean ~0.3: clipping would give ~1.0
        save("i16_png", Image.fromarray(a16), k, "png", a16.mean() / 65535)  # PIL's mode I;16
        big = Image.frombytes("I;16B", (SIDE, SIDE), a16.astype(">u2").tobytes())  # (PIL's convert clips here)
        save("i16b_tiff", big, k, "tif", a16.mean() / 65535)
        a32 = rng.integers(0, 65536, (SIDE, SIDE)).astype(np.int32)
        save("i32_tiff", Image.fromarray(a32), k, "tif", a32.mean() / 65535)  # mode I
        f32 = rng.random((SIDE, SIDE), dtype=np.float32) ** 2
        save("f32_tiff", Image.fromarray(f32), k, "tif", float(f32.astype(np.float64).mean()))  # mode F
        bits = rng.random((SIDE, SIDE)) < 0.3
        save("bit1_png", Image.fromarray(bits), k, "png", bits.mean())  # mode 1
        la = rng.integers(0, 256, (SIDE, SIDE, 2), dtype=np.uint8)
        save("la_png", Image.fromarray(la, "LA"), k, "png", la[..., 0].mean() / 255)  # the alpha is dropped
        palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
        idx = rng.integers(0, 16, (SIDE, SIDE), dtype=np.uint8)
        p = Image.fromarray(idx, "L").convert("P")
        p.putpalette(palette.reshape(-1).tolist())
        save("p_png", p, k, "png", palette[idx].mean() / 255)
        rgba = rng.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
        save("rgba_png", Image.fromarray(rgba, "RGBA"), k, "png", rgba[..., :3].mean() / 255)
    for cls in truth:
        assert _mode(next((root / cls).iterdir())) != "RGB"
    return {cls: float(np.mean(v)) for cls, v in truth.items()}


def test_16_bit_greyscale_pngs_load_at_their_true_scale(tmp_path):
    rng = np.random.default_rng(1)
    arrays = []
    for cls in ("a", "b"):
        (tmp_path / "pngs" / cls).mkdir(parents=True)
        for k in range(5):
            a = rng.integers(0, 65536, (SIDE, SIDE), dtype=np.uint16)
            Image.fromarray(a).save(tmp_path / "pngs" / cls / f"{k}.png")
            arrays.append(a)
    assert _mode(tmp_path / "pngs" / "a" / "0.png") == "I;16"
    x, _ = _all_images(load_data("image_folder", root=tmp_path / "pngs", val_fraction=0.0))
    true = np.mean([a.mean() for a in arrays]) / 65535
    assert abs(float(x.mean()) - true) < 1 / 255, (float(x.mean()), true)
    assert float((x == 1.0).float().mean()) < 0.01  # not clipped to white (94 % of the pixels before)


@pytest.mark.parametrize("storage", ["memory", "files"])
def test_every_pil_mode_loads_at_its_own_scale(tmp_path, storage):
    truth = _mixed_folder(tmp_path / "mixed")
    data = load_data("image_folder", root=tmp_path / "mixed", val_fraction=0.0, storage=storage)
    x, y = _all_images(data)
    assert x.shape[1:] == (3, SIDE, SIDE)
    for c, cls in enumerate(data.class_names):
        got = float(x[y == c].mean())
        assert abs(got - truth[cls]) < 1 / 255, (cls, got, truth[cls])


@pytest.mark.parametrize(
    ("values", "mode", "shown"),
    [
        (np.arange(-2, SIDE * SIDE - 2, dtype=np.int32).reshape(SIDE, SIDE) * 40, "I", "[-80, "),
        (np.linspace(0.0, 4.0, SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE), "F", ", 4]"),
    ],
)
def test_values_outside_a_modes_range_are_refused_naming_the_file(tmp_path, values, mode, shown):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    write_image_folder(tmp_path / "imgs" / "ok", per_class=(4,))
    path = tmp_path / "imgs" / "a" / "wide.tif"
    Image.fromarray(values).save(path)
    assert _mode(path) == mode
    with pytest.raises(DataError) as info:
        load_data("image_folder", root=tmp_path / "imgs")
    message = str(info.value)
    assert str(path) in message and f"mode {mode!r}" in message and shown in message and "clipped" in message
    assert "\n" not in message


def _truncated_folder(root: Path) -> Path:
    write_image_folder(root)
    bad = root / "class_1" / "002.png"
    bad.write_bytes(bad.read_bytes()[:150])
    return bad


@pytest.mark.parametrize("storage", ["memory", "files"])
def test_a_broken_image_read_by_a_worker_is_the_same_one_line_error(tmp_path, storage):
    bad = _truncated_folder(tmp_path / "imgs")
    messages = []
    for workers in (0, 1):
        with pytest.raises(DataError) as info:
            data = load_data("image_folder", root=tmp_path / "imgs", storage=storage, workers=workers, image_size=16)
            for split in ("train", "val", "test"):
                for _ in data.batches(split, 8, shuffle=False):
                    pass
        messages.append(str(info.value))
    assert messages[0] == messages[1], messages  # the worker's error is the one this process raises
    assert str(bad) in messages[1] and "\n" not in messages[1] and "Traceback" not in messages[1]


def test_the_cli_reports_a_workers_broken_image_in_one_line(tmp_path):
    bad = _truncated_folder(tmp_path / "imgs")
    cmd = [
        sys.executable,
        "-m",
        "ppl_vae",
        "train",
        "--run-dir",
        str(tmp_path / "run"),
        "data.name=image_folder",
        f"data.root={tmp_path / 'imgs'}",
        "data.image_size=16",
        "data.workers=1",
        "train.epochs=1",
        "model.hidden=[16]",
        "--no-progress",
        "--no-figures",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PPL_VAE_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("ppl-vae: error: DataError: "), r.stderr
    assert str(bad) in lines[0] and "unexpected" not in lines[0]


_SAVE_UNDER_A_LIMIT = """
import errno, resource, signal, sys, torch
from ppl_vae.data import as_data
from ppl_vae.data.user import save_bundle
bundle = as_data(torch.rand(200, 1, 8, 8), seed=0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of the process being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_bundle(bundle, sys.argv[1])
except OSError as e:
    print(e.errno == errno.EFBIG, e.filename == sys.argv[1], type(e).__name__)
"""


def test_the_runs_copy_of_given_data_under_a_real_file_size_limit_is_an_os_error_naming_it(tmp_path):
    path = tmp_path / "data.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", _SAVE_UNDER_A_LIMIT, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.split() == ["True", "True", "OSError"], r.stdout + r.stderr
    assert not path.exists()  # no partial file left
