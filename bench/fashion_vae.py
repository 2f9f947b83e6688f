"""Bernoulli VAE on dynamically binarised Fashion-MNIST: test ELBO and seconds per epoch.

Model: Burda et al.'s one-stochastic-layer MLP (784-200-200-50 tanh), Bernoulli likelihood, Trace_ELBO, Adam 1e-3,
batch 100, trained with ``ppl_vae.train``. Data: Debian's ``dataset-fashion-mnist`` (60k train of which 10%
validation, 10k test), a fresh binarisation every epoch; test images binarised once from the seed.
The test ELBO is the mean single-sample ELBO per test image (nats; higher is better).

    python bench/fashion_vae.py               # full: all images, 30 epochs
    python bench/fashion_vae.py --quick       # 5,000 training images, 2 epochs

``--seeds N`` sets the seed (initialisation, data order, binarisation; default 0), ``--epochs`` the epochs.

The run is the compare spec ``bench/specs/fashion_vae.yaml`` (``ppl_vae.compare``; the best-validation checkpoint is
evaluated); full mode keeps it in ``bench/runs/fashion_vae/`` (a second run trains nothing).
"""

from __future__ import annotations

from _common import finish, one_seed, parser, run_history, run_spec, start

import ppl_vae


def main(argv=None):
    p = parser(__doc__, seeds="0", threads=2)
    p.add_argument("--epochs", type=int, default=None)
    args = start(p, argv)
    seed = one_seed(args)
    epochs = args.epochs or (2 if args.quick else 30)
    result, folder = run_spec("fashion_vae", args, {"overrides": ["data.limit=5000"]}, [f"train.epochs={epochs}"])
    history = run_history(folder, "vae", seed)
    cfg = ppl_vae.load_config(folder / "runs" / f"vae-seed{seed}" / "config.yaml")
    data = ppl_vae.load_data(
        cfg.data.name, pixels=cfg.data.pixels, seed=seed, limit=cfg.data.limit, val_fraction=cfg.data.val_fraction
    )
    out = {
        "test_elbo": round(result["metrics"]["test_elbo"]["runs"]["vae"]["mean"], 3),
        "val_elbo_last": round(history[-1]["val_elbo"], 3),
        "train_elbo_last": round(history[-1]["train_elbo"], 3),
        "seconds_per_epoch": round(result["metrics"]["seconds_per_epoch"]["runs"]["vae"]["mean"], 2),
        "epochs": len(history),
        "train_images": len(data.train_x),
        "test_images": len(data.test_x),
        "data": repr(data),
        "model": "burda1 MLP 784-200-200-50 tanh, Bernoulli, Trace_ELBO, Adam 1e-3, batch 100",
        "spec": "bench/specs/fashion_vae.yaml",
    }
    finish("fashion_vae", out, args)


if __name__ == "__main__":
    main()
