"""Streaming data (``data.storage``, ``data.workers``): what 8-bit storage costs per epoch and what it saves in memory.

Rows (ratios of epoch times measured side by side in one run, interleaved rounds, one torch thread; the epoch time
is ``metrics`` ``seconds`` of the epochs after the first, whose first step runs Pyro's checks):

  idx_epoch_over_memory   Fashion-MNIST (the Debian package's IDX files; random IDX files if it is absent),
                          ``pixels: binary_dynamic``, batch 128: ``uint8``, ``mmap`` and ``mmap`` with one DataLoader
                          worker, each ÷ ``memory`` (float32 tensors)
  idx_memory_mb           the train split's resident bytes after ``load_data`` in a fresh process (VmRSS after −
                          before, MB) and ``Images.nbytes``, per storage
  folder_epoch_over_uint8 an ImageFolder of 64×64 PNGs (written by the script; RGB, 3×32×32 after the resize),
                          ``files`` (each image decoded when its batch is read) with 0 and 2 DataLoader workers ÷
                          ``uint8`` (decoded once at load)

Model: the MLP VAE of ``bench/scaling.py`` (784-200-200-16, Bernoulli; 3072-200-200-16 on the folder), the default
objective, no validation set.

    python bench/storage.py            # full: 3 rounds, 12,000 Fashion-MNIST images, 3 epochs; 3,000 PNGs
    python bench/storage.py --quick    # 2 rounds, 3,000 images; 600 PNGs
The last line of stdout is the JSON summary (full mode also writes bench/results/storage.json).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyro
import torch
from _common import finish, parser, ratio_rounds, start, write_idx

import ppl_vae
from ppl_vae import ModelConfig, build_model
from ppl_vae.config import TrainConfig
from ppl_vae.data import DEBIAN_FASHION_MNIST, load_data

FULL = dict(rounds=3, limit=12000, epochs=3, batch=128, folder_images=3000, folder_epochs=3)
QUICK = dict(rounds=2, limit=3000, epochs=3, batch=128, folder_images=600, folder_epochs=2)
IDX_ROWS = (("uint8", 0), ("mmap", 0), ("mmap", 1))


def idx_root(tmp: Path) -> tuple[Path, str]:
    """The Debian Fashion-MNIST files, or random IDX files of the same sizes when the package is absent."""
    if DEBIAN_FASHION_MNIST.is_dir():
        return DEBIAN_FASHION_MNIST, "fashion-mnist (Debian package dataset-fashion-mnist)"
    return write_idx(tmp, 60000, 10000), "random IDX files (Fashion-MNIST's sizes; the Debian package is absent)"


def write_folder(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class_{c}").mkdir(parents=True)
    for k in range(n):
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"class_{k % 2}" / f"{k:05d}.png")
    return root


def epoch_seconds(data, epochs: int, batch: int) -> float:
    pyro.set_rng_seed(0)
    model = build_model(
        ModelConfig(
            name="vae", likelihood="bernoulli", arch="mlp", latent_dim=16, hidden=[200, 200], activation="relu"
        ),
        data.shape,
        num_data=len(data.train_x),
    )
    res = ppl_vae.train(
        model, data, TrainConfig(epochs=epochs, batch_size=batch, logger="none"), seed=0, progress=False
    )
    return statistics.median(r["seconds"] for r in res.history[1:])


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def memory_worker(spec: str) -> None:
    """(in a fresh process) load the data with one storage and print the resident-memory growth."""
    root, storage, limit = spec.split(",")
    torch.set_num_threads(1)
    before = _rss_kb()
    data = load_data(
        "fashion_mnist",
        root=root,
        pixels="binary_dynamic",
        storage=storage,
        val_fraction=0.0,
        limit=None if limit == "none" else int(limit),
    )
    x = data.train_x
    nbytes = x.nbytes if storage != "memory" else x.numel() * x.element_size()
    print(
        json.dumps(
            {"rss_mb": round((_rss_kb() - before) / 1024, 1), "nbytes_mb": round(nbytes / 2**20, 1), "images": len(x)}
        )
    )


def memory_rows(root: Path) -> dict:
    out = {}
    for storage in ("memory", "uint8", "mmap"):
        res = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--memory-worker", f"{root},{storage},none"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if res.returncode != 0:
            raise RuntimeError(f"the memory worker for storage={storage} failed:\n{res.stderr[-2000:]}")
        out[storage] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv=None):
    ap = parser(__doc__, seeds=None, threads=1)
    ap.add_argument("--memory-worker", default=None, help="(internal) root,storage,limit of one memory measurement")
    args = start(ap, argv)
    if args.memory_worker:
        return memory_worker(args.memory_worker)
    s = QUICK if args.quick else FULL
    out = {"settings": dict(s)}
    with tempfile.TemporaryDirectory() as tmp:
        root, what = idx_root(Path(tmp))
        out["idx_data"] = what

        def load(storage, workers=0):
            return load_data(
                "fashion_mnist",
                root=root,
                pixels="binary_dynamic",
                storage=storage,
                workers=workers,
                limit=s["limit"],
                val_fraction=0.0,
            )

        ref = load("memory")
        out["idx_epoch_over_memory"] = {}
        for storage, workers in IDX_ROWS:
            data = load(storage, workers)
            row = ratio_rounds(
                lambda data=data: epoch_seconds(data, s["epochs"], s["batch"]),
                lambda: epoch_seconds(ref, s["epochs"], s["batch"]),
                s["rounds"],
            )
            out["idx_epoch_over_memory"][f"{storage}_workers{workers}"] = row
            print(f"{storage} (workers {workers}) / memory", row, flush=True)
        out["idx_memory_mb"] = memory_rows(root)  # the full training split (60,000 images)
        print("memory", out["idx_memory_mb"], flush=True)

        folder = write_folder(Path(tmp) / "folder", s["folder_images"])

        def folder_data(storage, workers):
            return load_data(
                "image_folder", root=folder, image_size=32, storage=storage, workers=workers, val_fraction=0.0
            )

        decoded = folder_data("uint8", 2)
        out["folder_epoch_over_uint8"] = {}
        for workers in (0, 2):
            files = folder_data("files", workers)
            row = ratio_rounds(
                lambda files=files: epoch_seconds(files, s["folder_epochs"], s["batch"]),
                lambda: epoch_seconds(decoded, s["folder_epochs"], s["batch"]),
                s["rounds"],
            )
            out["folder_epoch_over_uint8"][f"files_workers{workers}"] = row
            print(f"files (workers {workers}) / uint8", row, flush=True)
    finish("storage", out, args, device="cpu")


if __name__ == "__main__":
    main()
