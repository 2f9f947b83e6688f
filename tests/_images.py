"""Small image datasets written by a test: IDX files (MNIST layout) and an ImageFolder of PNGs."""

from __future__ import annotations

import struct

import numpy as np


def write_idx(folder, n_train=90, n_test=30, seed=0):
    """The four MNIST-layout IDX files (plain) of random images whose labels are their row's class."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{stem}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + x.tobytes())
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + y.tobytes())
    return folder


def write_image_folder(root, per_class=(7, 5, 6), seed=0):
    """An ImageFolder of RGB PNGs of assorted sizes, one subfolder per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, n in enumerate(per_class):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for k in range(n):
            h, w = rng.integers(20, 40, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{k:03d}.png")
    return root
