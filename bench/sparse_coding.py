"""Sparse coding with a Poisson VAE (Vafaii, Galor & Yates 2024): linear-decoder filters on natural-image patches,
beside a Gaussian VAE with the same linear decoder.

Data: random 16×16 grey patches of scikit-learn's two bundled sample photos (``load_sample_images``), each
patch's mean removed, ZCA-whitened with a regularised covariance (eigenvalues λ + ε·λ_max, ε = ``--whiten-eps``)
and scaled to unit variance; 10% held out. Models: ``vae_poisson`` with ``decoder: linear`` and ``vae`` whose
decoder is replaced by the same :class:`~ppl_vae.models.vae_poisson.LinearDecoder` x̂ = W z + b; both with an
MLP encoder (256), K latents, p(x|z) = N(W z + b, σ² I) (``--sigma2``), Adam, batch 100, ``ppl_vae.train``.

Measures, per method, over the K filters (columns of W): ``filter_kurtosis`` — mean excess kurtosis of a
filter's 256 weights (a localised filter is heavy-tailed; a Gaussian VAE's decoder is identified only up to a
rotation, so its filters are mixtures with near-Gaussian weights); ``filter_top10_energy`` — mean share of a
filter's squared weight in its 26 largest pixels (0.1 for a flat filter); ``sparsity`` (Poisson: fraction of zero
counts on held-out patches); ``val_elbo_last``. The figure, the 64 filters of largest norm of each model, is
``bench/results/sparse_coding_filters.png``.

    python bench/sparse_coding.py            # full: 20,000 patches, 40 epochs, K = 128
    python bench/sparse_coding.py --quick    # 4,000 patches, 4 epochs, K = 64
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyro
import torch
from _common import RESULTS, finish, one_seed, parser, start
from sklearn.datasets import load_sample_images

import ppl_vae
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import DataBundle
from ppl_vae.models import build_model
from ppl_vae.models.vae_poisson import LinearDecoder

SIZE = 16


def patches(n: int, seed: int, eps: float) -> torch.Tensor:
    """n random SIZE×SIZE grey patches of the sample photos, mean-removed, ZCA-whitened, unit variance."""
    rng = np.random.default_rng(seed)
    imgs = [im.mean(-1) / 255.0 for im in load_sample_images().images]
    out = np.empty((n, SIZE * SIZE))
    for i in range(n):
        im = imgs[i % len(imgs)]
        r, c = rng.integers(0, im.shape[0] - SIZE), rng.integers(0, im.shape[1] - SIZE)
        out[i] = im[r : r + SIZE, c : c + SIZE].ravel()
    out -= out.mean(1, keepdims=True)
    evals, evecs = np.linalg.eigh(np.cov(out, rowvar=False))
    evals = evals.clip(min=0)
    white = out @ (evecs @ np.diag(1.0 / np.sqrt(evals + eps * evals.max())) @ evecs.T)
    return torch.tensor(white / white.std(), dtype=torch.float32)


def excess_kurtosis(w: np.ndarray) -> float:
    """Mean over filters (columns) of the excess kurtosis of their weights."""
    w = w - w.mean(0, keepdims=True)
    return float(((w**4).mean(0) / (w**2).mean(0) ** 2 - 3.0).mean())


def top_energy(w: np.ndarray, share: float = 0.1) -> float:
    """Mean over filters of the fraction of squared weight in the largest ``share`` of pixels."""
    e = np.sort(w**2, axis=0)[::-1]
    k = max(1, round(share * w.shape[0]))
    return float((e[:k].sum(0) / e.sum(0)).mean())


def build(method: str, K: int, num_data: int, sigma2: float):
    cfg = ModelConfig(
        name="vae_poisson" if method == "poisson" else "vae",
        likelihood="gaussian",
        sigma2=sigma2,
        link="identity",
        arch="mlp",
        hidden=[256],
        latent_dim=K,
        options={"decoder": "linear"} if method == "poisson" else {},
    )
    m = build_model(cfg, (SIZE * SIZE,), num_data=num_data)
    if method == "gaussian":
        m.decoder = LinearDecoder(K, (SIZE * SIZE,))
    return m


def figure(filters: dict, stats: dict, K: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(filters), figsize=(6 * len(filters), 6.4))
    step = SIZE + 1
    for ax, (method, W) in zip(axes, filters.items(), strict=True):
        order = np.argsort(-np.linalg.norm(W, axis=0))[:64]
        tiles = np.full((8 * step + 1, 8 * step + 1), np.nan)
        for j, k in enumerate(order):
            f = W[:, k].reshape(SIZE, SIZE)
            r, c = divmod(j, 8)
            tiles[1 + step * r : step * (r + 1), 1 + step * c : step * (c + 1)] = f / (np.abs(f).max() + 1e-12)
        ax.imshow(tiles, cmap="gray", vmin=-1, vmax=1)
        ax.set_title(
            f"{method} VAE, linear decoder: 64 of {K} filters\nexcess kurtosis "
            f"{stats[method]['filter_kurtosis']:.2f}, top-10% energy {stats[method]['filter_top10_energy']:.2f}"
        )
        ax.axis("off")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = parser(__doc__, seeds="0", threads=1)
    p.add_argument("--patches", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--whiten-eps", type=float, default=0.05)
    p.add_argument("--sigma2", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    args = start(p, argv)
    seed = one_seed(args)
    n, epochs, K = (4000, 4, 64) if args.quick else (args.patches, args.epochs, args.K)
    x = patches(n, seed, args.whiten_eps)
    nv = n // 10
    data = DataBundle.from_tensors(x[nv:], None, x[:nv], None, name="sample_image_patches")
    stats, filters = {}, {}
    for method in ("poisson", "gaussian"):
        pyro.set_rng_seed(seed)
        m = build(method, K, len(data.train_x), args.sigma2).to(args.device)
        res = ppl_vae.train(
            m,
            data,
            TrainConfig(objective="auto", epochs=epochs, batch_size=100, lr=args.lr),
            seed=seed,
            device=args.device,
            progress=not args.quick,
        )
        W = m.decoder.linear.weight.detach().cpu().numpy()  # (256, K): one filter per column
        filters[method] = W
        stats[method] = {
            "filter_kurtosis": round(excess_kurtosis(W), 3),
            "filter_top10_energy": round(top_energy(W), 4),
            "val_elbo_last": round(res.history[-1]["val_elbo"], 3),
        }
        if method == "poisson":
            m.eval()
            with torch.no_grad():
                z = m.guide_dist(data.val_x.to(args.device)).sample()
            stats[method]["sparsity"] = round(float((z == 0).float().mean()), 4)
    png = (Path(tempfile.mkdtemp()) if args.quick else RESULTS) / "sparse_coding_filters.png"
    figure(filters, stats, K, png)
    out = {
        "filter_kurtosis": {k: v["filter_kurtosis"] for k, v in stats.items()},
        "filter_top10_energy": {k: v["filter_top10_energy"] for k, v in stats.items()},
        "sparsity": stats["poisson"]["sparsity"],
        "methods": stats,
        "poisson_more_localised": stats["poisson"]["filter_top10_energy"] > stats["gaussian"]["filter_top10_energy"],
        "figure": png.name if not args.quick else str(png),
        "settings": {
            "patches": n,
            "epochs": epochs,
            "K": K,
            "whiten_eps": args.whiten_eps,
            "sigma2": args.sigma2,
            "lr": args.lr,
            "encoder": "MLP 256-256",
            "batch_size": 100,
        },
    }
    finish("sparse_coding", out, args)


if __name__ == "__main__":
    main()
