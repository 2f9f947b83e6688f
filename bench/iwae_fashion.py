"""IWAE vs VAE on dynamically binarised Fashion-MNIST, one and two stochastic layers (Burda et al. 2016, Table 1).

For each architecture (burda1: 784-200-200-50 tanh; burda2: 784-100-100-[100]-50-50-[50] tanh), identical networks,
initialisation seed, data order and epochs, trained with Adam 1e-3 and batch 100 under four objectives:
  vae        Trace_ELBO (1 particle)
  iwae5      TraceIWAE(K=5)
  iwae50     TraceIWAE(K=50)
  dreg50     TraceIWAE(K=50, estimator="dreg")
Evaluation: the importance-sampled test log-likelihood log p̂(x) with k=5000 samples from the guide
(``ppl_vae.evaluate.log_likelihood``) on the first ``--test-images`` test images (binarised once from the seed),
its standard error over images; seconds per training epoch; how the evaluation time grows with k.

    python bench/iwae_fashion.py              # full: 20,000 training images, 10 epochs, 2,000 test images
    python bench/iwae_fashion.py --quick      # 2,000 training images, 1 epoch, 100 test images, k=500
"""

from __future__ import annotations

import math
import time

import pyro
import torch
from pyro.infer import Trace_ELBO

from _common import environment, finish, parser
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import DataBundle, load_data
from ppl_vae.evaluate import log_likelihood
from ppl_vae.infer import TraceIWAE, fit
from ppl_vae.models import build_model

OBJECTIVES = {
    "vae": lambda: Trace_ELBO(max_plate_nesting=1),
    "iwae5": lambda: TraceIWAE(num_particles=5),
    "iwae50": lambda: TraceIWAE(num_particles=50),
    "dreg50": lambda: TraceIWAE(num_particles=50, estimator="dreg"),
}
ARCHS = {"1layer": ModelConfig(name="vae", arch="burda1"), "2layer": ModelConfig(name="vae2", arch="burda2")}


def subset(data: DataBundle, n_train: int, n_test: int) -> DataBundle:
    return DataBundle(name=data.name, pixels=data.pixels, shape=data.shape, num_classes=data.num_classes,
                      train_x=data.train_x[:n_train], train_y=data.train_y[:n_train], val_x=data.val_x[:0],
                      val_y=data.val_y[:0], test_x=data.test_x[:n_test], test_y=data.test_y[:n_test])


def main():
    p = parser(__doc__)
    p.add_argument("--train-images", type=int, default=None)
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--k", type=int, default=None, help="importance samples for the test log-likelihood")
    args = p.parse_args()
    q = args.quick
    n_train = args.train_images or (2000 if q else 20000)
    n_test = args.test_images or (100 if q else 2000)
    epochs = args.epochs or (1 if q else 10)
    k_eval = args.k or (500 if q else 5000)
    dev = torch.device(args.device)
    data = subset(load_data("fashion_mnist", pixels="binary_dynamic", seed=args.seed, val_fraction=0.0),
                  n_train, n_test)
    x_test = data.test_x.to(dev)
    out = {"test_ll": {}, "test_ll_sem": {}, "seconds_per_epoch": {}, "final_train_bound": {},
           "train_images": n_train, "test_images": n_test, "epochs": epochs, "k_eval": k_eval,
           "data": "Fashion-MNIST (Debian dataset-fashion-mnist), dynamically binarised",
           "optimiser": "Adam lr 1e-3, batch 100"}
    models = {}
    for arch, mcfg in ARCHS.items():
        for obj_name, make in OBJECTIVES.items():
            run = f"{arch}_{obj_name}"
            pyro.clear_param_store()
            pyro.set_rng_seed(args.seed)
            model = build_model(mcfg, data.shape, num_data=n_train).to(dev)
            t0 = time.perf_counter()
            res = fit(model.model, model.guide, data, make(), TrainConfig(epochs=epochs, batch_size=100, lr=1e-3),
                      seed=args.seed, device=dev, progress=False)
            out["seconds_per_epoch"][run] = round((time.perf_counter() - t0) / epochs, 2)
            out["final_train_bound"][run] = round(res.history[-1]["train_elbo"], 3)
            ll = log_likelihood(model.model, model.guide, x_test, num_samples=k_eval, seed=args.seed)
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
        log_likelihood(m.model, m.guide, x_test[:n_cost], num_samples=k, seed=args.seed)
        out["eval_seconds_vs_k"][str(k)] = round(time.perf_counter() - t0, 3)
    out["environment"] = environment(args.device)
    finish("iwae_fashion", out, q)


if __name__ == "__main__":
    main()
