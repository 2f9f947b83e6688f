"""Line-searched Laplace guide vs the VLAE schedule vs the VAE at 16 latents (the setting of ``bench/guides.py``).

The VLAE guide takes T = 4 damped Newton steps μ ← μ + η_t(μ̂ − μ), η_t = 0.5/(t+1). ``laplace_ls`` takes the
same T = 4 Newton directions but, per image, the step η ∈ {1, ½, ¼, ⅛, 0} with the highest exact log p(x, μ)
(``damping="line_search"`` in :func:`ppl_vae.guides.laplace_posterior`), so the log joint never decreases along
the iterations. Same data, networks, optimiser and epochs as ``bench/guides.py`` (784-200-200-16 ReLU MLP,
Bernoulli, dynamically binarised Fashion-MNIST, 10,000 training images, 20 epochs, Adam 1e-3, batch 100); each run
reports its k = 5000 test log-likelihood on the first 1,000 test images (paired difference to the VAE), the test
ELBO, the amortisation and approximation gaps on the first 200 (``_guide_runs.gap_report``, i.e.
``ppl_vae.evaluate.inference_gaps``), seconds per
epoch relative to the VAE (runs one after the other in one process), the training ELBO of every epoch and its
largest epoch-on-epoch drop (a measure of the training instability seen with 2 latents, ``bench/laplace_2d.py``).

    python bench/laplace_ls.py --threads 1   # full
    python bench/laplace_ls.py --quick       # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/laplace_ls.json).
"""

from __future__ import annotations

import math
import statistics
import time

from _common import finish, measured_chunks, one_seed, paired, parser, start
from _guide_runs import FULL, HIDDEN, LATENT, QUICK, gap_report, run_config, train

from ppl_vae.config import TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import elbo_per_datapoint, log_likelihood

LS_RUNS = ("vae", "laplace", "laplace_ls")


def largest_drop(curve: list[float]) -> float:
    """max_e (ELBO_{e−1} − ELBO_e) over consecutive epochs (0 if the curve never goes down)."""
    return max([0.0] + [a - b for a, b in zip(curve, curve[1:], strict=False)])


def main(argv=None):
    ap = parser(__doc__, seeds="0")
    ap.add_argument("--runs", default=",".join(LS_RUNS), help=f"comma-separated, from {', '.join(LS_RUNS)}; vae first")
    args = start(ap, argv)
    seed = one_seed(args)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or runs[0] != "vae" or any(r not in LS_RUNS for r in runs):
        ap.error(f"--runs must start with vae and name runs from {LS_RUNS}, got {args.runs!r}")
    s = QUICK if args.quick else FULL
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0)
    tc = TrainConfig(objective="elbo", epochs=s["epochs"], batch_size=100, lr=1e-3)
    x_ll = data.test_x[: s["n_ll"]]
    x_gap = x_ll[: s["n_gap"]]
    out = {
        k: {}
        for k in (
            "test_ll",
            "test_ll_diff_vs_vae",
            "test_elbo",
            "seconds_per_epoch",
            "relative_seconds_per_epoch",
            "amortisation_gap",
            "train_elbo_by_epoch",
            "largest_train_elbo_drop",
        )
    }
    lls = {}
    for run in runs:
        t0 = time.perf_counter()
        model, hist = train(run, data, tc, seed)
        curve = [round(h["train_elbo"], 2) for h in hist]
        ll = log_likelihood(
            model.model, model.guide, x_ll, num_samples=s["S"], **measured_chunks(len(x_ll), s["S"], 10), seed=0
        ).double()
        lls[run] = ll
        out["test_ll"][run] = [round(float(ll.mean()), 3), round(float(ll.std() / math.sqrt(len(ll))), 3)]
        out["test_elbo"][run] = round(
            float(elbo_per_datapoint(model.model, model.guide, x_ll, s["elbo_particles"]).mean()), 3
        )
        out["seconds_per_epoch"][run] = round(statistics.mean(h["seconds"] for h in hist), 3)
        out["train_elbo_by_epoch"][run] = curve
        out["largest_train_elbo_drop"][run] = round(largest_drop(curve), 2)
        g = gap_report(model, x_gap, "diag" if run == "vae" else "full", s, ll[: s["n_gap"]])
        g["inference_gap"] = round(float((ll[: s["n_gap"]] - g.pop("_amortised")).mean()), 3)
        out["amortisation_gap"][run] = g
        print(
            f"[{run}] {time.perf_counter() - t0:.0f}s  test LL {out['test_ll'][run][0]:.3f}  "
            f"amortisation gap {g['gap']:.3f}  largest drop {out['largest_train_elbo_drop'][run]}",
            flush=True,
        )
    for run in runs:
        out["test_ll_diff_vs_vae"][run] = [round(v, 3) for v in paired(lls[run], lls["vae"])]
        out["relative_seconds_per_epoch"][run] = round(
            out["seconds_per_epoch"][run] / out["seconds_per_epoch"]["vae"], 2
        )
    out.update(
        {
            "training_seed": seed,
            "data": {
                "name": "fashion_mnist",
                "pixels": "binary_dynamic",
                "limit": s["limit"],
                "train": len(data.train_x),
                "test_used_for_ll": len(x_ll),
                "test_used_for_gap": len(x_gap),
            },
            "sizes": {
                "latent_dim": LATENT,
                "hidden": HIDDEN,
                "epochs": s["epochs"],
                "batch_size": 100,
                "lr": 1e-3,
                "ll_num_samples": s["S"],
                "gap_steps": s["gap_steps"],
                "options": {r: run_config(r)[1] for r in runs},
            },
        }
    )
    finish("laplace_ls", out, args, device="cpu")


if __name__ == "__main__":
    main()
