"""IWAE vs VAE on dynamically binarised Fashion-MNIST, one and two stochastic layers (Burda et al. 2016, Table 1).

For each architecture (burda1: 784-200-200-50 tanh; burda2: 784-100-100-[100]-50-50-[50] tanh), identical networks,
initialisation seed, data order and epochs, trained through ``ppl_vae.compare`` (the spec
``bench/specs/iwae_fashion.yaml``; Adam 1e-3, batch 100) under four objectives (``train.objective`` /
``num_particles`` / ``estimator``):
  vae        Trace_ELBO (1 particle)
  iwae5      TraceIWAE(K=5)
  iwae50     TraceIWAE(K=50)
  dreg50     TraceIWAE(K=50, estimator="dreg")
Evaluation: the importance-sampled test log-likelihood log p̂(x) with k=5000 samples from the guide
(``ppl_vae.evaluate.log_likelihood``) on the first ``--test-images`` test images (binarised once from the seed),
its standard error over images; seconds per training epoch; how the evaluation time grows with k.

    python bench/iwae_fashion.py              # full: 20,000 training images, 10 epochs, 2,000 test images
    python bench/iwae_fashion.py --quick      # 2,000 training images, 1 epoch, 100 test images, k=500

``--seeds N`` sets the training seed (initialisation, data subset and order, binarisation; default 0);
``--train-images``, ``--test-images``, ``--epochs`` and ``--k`` override the sizes (a full run with any of them is a
variant). Full mode keeps the runs in ``bench/runs/iwae_fashion/`` (a second run trains nothing) and copies the table
and figure to ``bench/results/iwae_fashion_compare.{md,png}``.
"""

from __future__ import annotations

import json
import time

import torch
from _common import finish, measured_chunks, one_seed, parser, run_history, run_spec, start

from ppl_vae.evaluate import log_likelihood
from ppl_vae.experiment import load_run

RUNS = [f"{arch}_{obj}" for arch in ("1layer", "2layer") for obj in ("vae", "iwae5", "iwae50", "dreg50")]


def main(argv=None):
    p = parser(__doc__, seeds="0", threads=2)
    p.add_argument("--train-images", type=int, default=None)
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--k", type=int, default=None, help="importance samples for the test log-likelihood")
    args = start(p, argv)
    seed = one_seed(args)
    q = args.quick
    n_train = args.train_images or (2000 if q else 20000)
    n_test = args.test_images or (100 if q else 2000)
    epochs = args.epochs or (1 if q else 10)
    k_eval = args.k or (500 if q else 5000)
    sizes = {"max_test": n_test, "num_samples": k_eval}
    result, folder = run_spec("iwae_fashion", args, sizes, [f"data.limit={n_train}", f"train.epochs={epochs}"])
    ll, secs = result["metrics"]["log_likelihood"]["runs"], result["metrics"]["seconds_per_epoch"]["runs"]
    ll_key = f"log_likelihood[num_samples={k_eval},max_test={n_test}]"
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
        "spec": "bench/specs/iwae_fashion.yaml",
    }
    for run in RUNS:
        run_dir = folder / "runs" / f"{run}-seed{seed}"
        out["test_ll"][run] = round(ll[run]["values"][str(seed)], 3)
        evaluated = json.loads((run_dir / "compare_metrics.json").read_text())
        out["test_ll_sem"][run] = round(evaluated[ll_key]["data_se"], 3)
        out["seconds_per_epoch"][run] = round(secs[run]["values"][str(seed)], 2)
        out["final_train_bound"][run] = round(run_history(folder, run, seed)[-1]["train_elbo"], 3)
    # evaluation cost against k, on the one-layer VAE
    m = load_run(folder / "runs" / f"1layer_vae-seed{seed}", device=args.device)
    x_test = m.data.test_x[:n_test].to(m.device)
    n_cost = min(100, n_test)
    ks = [10, 100, 1000] if q else [10, 100, 1000, 5000]
    out["eval_seconds_vs_k"] = {"images": n_cost, "model": "1layer_vae"}
    for k in ks:
        t0 = time.perf_counter()
        chunks = measured_chunks(n_cost, k)
        log_likelihood(m.model.model, m.model.guide, x_test[:n_cost], num_samples=k, seed=seed, **chunks)
        if m.device.type == "cuda":
            torch.cuda.synchronize()
        out["eval_seconds_vs_k"][str(k)] = round(time.perf_counter() - t0, 3)
    finish("iwae_fashion", out, args)


if __name__ == "__main__":
    main()
