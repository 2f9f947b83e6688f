"""IWAE vs VAE on dynamically binarised Fashion-MNIST, one and two stochastic layers (Burda et al. 2016, Table 1).

For each architecture (burda1: 784-200-200-50 tanh; burda2: 784-100-100-[100]-50-50-[50] tanh), identical networks,
initialisation seed, data order and epochs, trained with ``ppl_vae.train`` (Adam 1e-3, batch 100) under four
objectives (``train.objective`` / ``num_particles`` / ``estimator``):
  vae        Trace_ELBO (1 particle)
  iwae5      TraceIWAE(K=5)
  iwae50     TraceIWAE(K=50)
  dreg50     TraceIWAE(K=50, estimator="dreg")
Evaluation: the importance-sampled test log-likelihood log p̂(x) with k=5000 samples from the guide
(``ppl_vae.evaluate.log_likelihood``) on the first ``--test-images`` test images (binarised once from the seed),
its standard error over images; seconds per training epoch; how the evaluation time grows with k.

    python bench/iwae_fashion.py              # full: 20,000 training images, 10 epochs, 2,000 test images
    python bench/iwae_fashion.py --quick      # 2,000 training images, 1 epoch, 100 test images, k=500

``--seeds N`` sets the training seed (initialisation, data order, binarisation; default 0); ``--train-images``,
``--test-images``, ``--epochs`` and ``--k`` override the sizes (a full run with any of them is a variant).
"""

from __future__ import annotations

import math
import time

import pyro
import torch
from _common import finish, measured_chunks, one_seed, parser, start

import ppl_vae
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import DataBundle, load_data
from ppl_vae.evaluate import log_likelihood
from ppl_vae.models import build_model

# the objective of each run, as TrainConfig settings (ppl_vae.build_objective: Trace_ELBO or TraceIWAE)
OBJECTIVES = {
    "vae": dict(objective="elbo"),
    "iwae5": dict(objective="iwae", num_particles=5),
    "iwae50": dict(objective="iwae", num_particles=50),
    "dreg50": dict(objective="iwae", num_particles=50, estimator="dreg"),
}
ARCHS = {"1layer": ModelConfig(name="vae", arch="burda1"), "2layer": ModelConfig(name="vae2", arch="burda2")}


def subset(data: DataBundle, n_train: int, n_test: int) -> DataBundle:
    return DataBundle(
        name=data.name,
        pixels=data.pixels,
        shape=data.shape,
        num_classes=data.num_classes,
        train_x=data.train_x[:n_train],
        train_y=data.train_y[:n_train],
        val_x=data.val_x[:0],
        val_y=data.val_y[:0],
        test_x=data.test_x[:n_test],
        test_y=data.test_y[:n_test],
    )


def main(argv=None):
    p = parser(__doc__, seeds="0", threads=2)
    p.add_argument("--train-images", type=int, default=None)
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--k", type=int, default=None, help="importance samples for the test log-likelihood")
    args = start(p, argv)
    if len(args.seeds) != 1:
        p.error(f"one training seed per run (--seeds N), got {args.seeds}")
    seed = one_seed(args)
    q = args.quick
    n_train = args.train_images or (2000 if q else 20000)
    n_test = args.test_images or (100 if q else 2000)
    epochs = args.epochs or (1 if q else 10)
    k_eval = args.k or (500 if q else 5000)
    dev = torch.device(args.device)
    data = subset(load_data("fashion_mnist", pixels="binary_dynamic", seed=seed, val_fraction=0.0), n_train, n_test)
    x_test = data.test_x.to(dev)
    out = {
        "test_ll": {},
        "test_ll_sem": {},
        "seconds_per_epoch": {},
        "final_train_bound": {},
        "train_images": n_train,
        "test_images": n_test,
        "epochs": epochs,
        "k_eval": k_eval,
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist), dynamically binarised",
        "optimiser": "Adam lr 1e-3, batch 100",
    }
    models = {}
    for arch, mcfg in ARCHS.items():
        for obj_name, objective in OBJECTIVES.items():
            run = f"{arch}_{obj_name}"
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            model = build_model(mcfg, data.shape, num_data=n_train).to(dev)
            t0 = time.perf_counter()
            tc = TrainConfig(epochs=epochs, batch_size=100, lr=1e-3, **objective)
            res = ppl_vae.train(model, data, tc, seed=seed, device=dev, progress=False)
            out["seconds_per_epoch"][run] = round((time.perf_counter() - t0) / epochs, 2)
            out["final_train_bound"][run] = round(res.history[-1]["train_elbo"], 3)
            ll = log_likelihood(
                model.model, model.guide, x_test, num_samples=k_eval, seed=seed, **measured_chunks(len(x_test), k_eval)
            )
            out["test_ll"][run] = round(ll.mean().item(), 3)
            out["test_ll_sem"][run] = round((ll.std() / math.sqrt(len(ll))).item(), 3)
            models[run] = model
            print(run, out["test_ll"][run], out["seconds_per_epoch"][run], flush=True)
    # evaluation cost against k, on the one-layer VAE
    m = models["1layer_vae"]
    n_cost = min(100, n_test)
    ks = [10, 100, 1000] if q else [10, 100, 1000, 5000]
    out["eval_seconds_vs_k"] = {"images": n_cost, "model": "1layer_vae"}
    for k in ks:
        t0 = time.perf_counter()
        log_likelihood(m.model, m.guide, x_test[:n_cost], num_samples=k, seed=seed, **measured_chunks(n_cost, k))
        out["eval_seconds_vs_k"][str(k)] = round(time.perf_counter() - t0, 3)
    finish("iwae_fashion", out, args)


if __name__ == "__main__":
    main()
