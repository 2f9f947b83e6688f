"""Bernoulli VAE on dynamically binarised Fashion-MNIST: test ELBO and seconds per epoch.

Model: Burda et al.'s one-stochastic-layer MLP (784-200-200-50 tanh), Bernoulli likelihood, Trace_ELBO, Adam 1e-3,
batch 100, trained with ``ppl_vae.train``. Data: Debian's ``dataset-fashion-mnist`` (60k train of which 10%
validation, 10k test), a fresh binarisation every epoch; test images binarised once from the seed.
The test ELBO is the mean single-sample ELBO per test image (nats; higher is better).

    python bench/fashion_vae.py               # full: all images, 30 epochs
    python bench/fashion_vae.py --quick       # 5,000 training images, 2 epochs

``--seeds N`` sets the seed (initialisation, data order, binarisation; default 0), ``--epochs`` the epochs.
"""

from __future__ import annotations

import time

import pyro
import torch
from _common import finish, one_seed, parser, start
from pyro.infer import Trace_ELBO

import ppl_vae
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import load_data
from ppl_vae.models import build_model
from ppl_vae.training import evaluate_elbo


def main(argv=None):
    p = parser(__doc__, seeds="0", threads=2)
    p.add_argument("--epochs", type=int, default=None)
    args = start(p, argv)
    if len(args.seeds) != 1:
        p.error(f"one training seed per run (--seeds N), got {args.seeds}")
    seed = one_seed(args)
    epochs = args.epochs or (2 if args.quick else 30)
    limit = 5000 if args.quick else None
    data = load_data("fashion_mnist", pixels="binary_dynamic", seed=seed, limit=limit)
    pyro.set_rng_seed(seed)
    model = build_model(ModelConfig(name="vae", arch="burda1"), data.shape, num_data=len(data.train_x))
    model.to(args.device)
    t0 = time.perf_counter()
    res = ppl_vae.train(
        model,
        data,
        TrainConfig(objective="elbo", epochs=epochs, batch_size=100, lr=1e-3),
        seed=seed,
        device=args.device,
        progress=not args.quick,
    )
    train_seconds = time.perf_counter() - t0
    with torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        test = evaluate_elbo(
            model.model,
            model.guide,
            data,
            Trace_ELBO(max_plate_nesting=1),
            "test",
            1000,
            args.device,
            len(data.train_x),
        )
    out = {
        "test_elbo": round(test, 3),
        "val_elbo_last": round(res.history[-1]["val_elbo"], 3),
        "train_elbo_last": round(res.history[-1]["train_elbo"], 3),
        "seconds_per_epoch": round(train_seconds / epochs, 2),
        "epochs": epochs,
        "train_images": len(data.train_x),
        "test_images": len(data.test_x),
        "data": repr(data),
        "model": "burda1 MLP 784-200-200-50 tanh, Bernoulli, Trace_ELBO, Adam 1e-3, batch 100",
    }
    finish("fashion_vae", out, args)


if __name__ == "__main__":
    main()
