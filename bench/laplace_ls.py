"""Line-searched Laplace guide vs the VLAE schedule vs the VAE at 16 latents (the setting of ``bench/guides.py``).

The VLAE guide takes T = 4 damped Newton steps μ ← μ + η_t(μ̂ − μ), η_t = 0.5/(t+1). ``laplace_ls`` takes the
same T = 4 Newton directions but, per image, the step η ∈ {1, ½, ¼, ⅛, 0} with the highest exact log p(x, μ)
(``damping="line_search"`` in :func:`ppl_vae.guides.laplace_posterior`), so the log joint never decreases along
the iterations. Same data, networks, optimiser and epochs as ``bench/guides.py`` (784-200-200-16 ReLU MLP,
Bernoulli, dynamically binarised Fashion-MNIST, 10,000 training images, 20 epochs, Adam 1e-3, batch 100); each run
reports its k = 5000 test log-likelihood on the first 1,000 test images (paired difference to the VAE), the test
ELBO, the amortisation and approximation gaps on the first 200 (``bench/guides.py``'s ``gap_report``), seconds per
epoch relative to the VAE (runs one after the other in one process), the training ELBO of every epoch and its
largest epoch-on-epoch drop (a measure of the training instability seen with 2 latents, ``bench/laplace_2d.py``).

    flock /tmp/ppl_vae_bench.lock nice -n 5 /work/venv/bin/python bench/laplace_ls.py --threads 1   # full
    /work/venv/bin/python bench/laplace_ls.py --quick                                              # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/laplace_ls.json).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import environment, finish, paired, parser  # noqa: E402
from guides import FULL, HIDDEN, LATENT, QUICK, elbo_per_image, gap_report, run_config, train  # noqa: E402

from ppl_vae.config import TrainConfig  # noqa: E402
from ppl_vae.data import load_data  # noqa: E402
from ppl_vae.evaluate.likelihood import log_likelihood  # noqa: E402

LS_RUNS = ("vae", "laplace", "laplace_ls")


def largest_drop(curve: list[float]) -> float:
    """max_e (ELBO_{e−1} − ELBO_e) over consecutive epochs (0 if the curve never goes down)."""
    return max([0.0] + [a - b for a, b in zip(curve, curve[1:])])


def main(argv=None):
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 lets another benchmark share the box)")
    ap.add_argument("--runs", default=",".join(LS_RUNS), help=f"comma-separated, from {', '.join(LS_RUNS)}; vae first")
    ap.add_argument("--out", default=None, help="JSON path (full mode default: bench/results/laplace_ls.json)")
    args = ap.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or runs[0] != "vae" or any(r not in LS_RUNS for r in runs):
        ap.error(f"--runs must start with vae and name runs from {LS_RUNS}, got {args.runs!r}")
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0)
    tc = TrainConfig(epochs=s["epochs"], batch_size=100, lr=1e-3)
    x_ll = data.test_x[: s["n_ll"]]
    x_gap = x_ll[: s["n_gap"]]
    out = {k: {} for k in ("test_ll", "test_ll_diff_vs_vae", "test_elbo", "seconds_per_epoch",
                           "relative_seconds_per_epoch", "amortisation_gap", "train_elbo_by_epoch",
                           "largest_train_elbo_drop")}
    lls = {}
    for run in runs:
        t0 = time.perf_counter()
        model, hist = train(run, data, tc, args.seed)
        curve = [round(h["train_elbo"], 2) for h in hist]
        ll = log_likelihood(model.model, model.guide, x_ll, num_samples=s["S"], batch_size=10, seed=0).double()
        lls[run] = ll
        out["test_ll"][run] = [round(float(ll.mean()), 3), round(float(ll.std() / math.sqrt(len(ll))), 3)]
        out["test_elbo"][run] = round(float(elbo_per_image(model, model.guide, x_ll, s["elbo_particles"]).mean()), 3)
        out["seconds_per_epoch"][run] = round(statistics.mean(h["seconds"] for h in hist), 3)
        out["train_elbo_by_epoch"][run] = curve
        out["largest_train_elbo_drop"][run] = round(largest_drop(curve), 2)
        g = gap_report(model, x_gap, "diag" if run == "vae" else "full", s, ll[: s["n_gap"]])
        g["inference_gap"] = round(float((ll[: s["n_gap"]] - g.pop("_amortised")).mean()), 3)
        out["amortisation_gap"][run] = g
        print(f"[{run}] {time.perf_counter() - t0:.0f}s  test LL {out['test_ll'][run][0]:.3f}  "
              f"amortisation gap {g['gap']:.3f}  largest drop {out['largest_train_elbo_drop'][run]}", flush=True)
    for run in runs:
        out["test_ll_diff_vs_vae"][run] = [round(v, 3) for v in paired(lls[run], lls["vae"])]
        out["relative_seconds_per_epoch"][run] = round(out["seconds_per_epoch"][run] / out["seconds_per_epoch"]["vae"],
                                                       2)
    env = environment("cpu")
    out.update({
        "command": ("flock /tmp/ppl_vae_bench.lock nice -n 5 /work/venv/bin/python bench/laplace_ls.py --threads "
                    f"{args.threads}" + (f" --seed {args.seed}" if args.seed else "")
                    + (f" --runs {args.runs}" if runs != list(LS_RUNS) else "")
                    + (f" --out {args.out}" if args.out else "")
                    if not args.quick else "/work/venv/bin/python bench/laplace_ls.py --quick"),
        "mode": "quick" if args.quick else "full", "training_seed": args.seed,
        "data": {"name": "fashion_mnist", "pixels": "binary_dynamic", "limit": s["limit"],
                 "train": len(data.train_x), "test_used_for_ll": len(x_ll), "test_used_for_gap": len(x_gap)},
        "sizes": {"latent_dim": LATENT, "hidden": HIDDEN, "epochs": s["epochs"], "batch_size": 100, "lr": 1e-3,
                  "ll_num_samples": s["S"], "gap_steps": s["gap_steps"],
                  "options": {r: run_config(r)[1] for r in runs}},
        "hardware": {"platform": env["platform"], "cpu_count": env["cpu_count"],
                     "torch_threads": torch.get_num_threads()},
        "environment": env, "date": env["date"], "total_seconds": round(time.perf_counter() - t_start, 1),
    })
    finish("laplace_ls", out, args.quick, args.out)


if __name__ == "__main__":
    main()
