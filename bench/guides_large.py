"""The mixture guides at VLAE's network size: VAE vs recursive mixture (3, 5 components) vs GAMIX on all of
Fashion-MNIST's training images with a 784-500-500-50 ReLU MLP (the size of Park et al.'s VLAE experiments).

``bench/guides.py`` (784-200-200-16, 10,000 images) finds the diagonal Gaussian's approximation gap to be only 0.5
nats, too little room for a richer family; this script asks whether the mixtures pull ahead with a larger decoder,
more latents and all of the data. ``vae_wide`` is the capacity-matched control: the plain VAE with a 784-H-H-100
encoder whose width H gives it at least the parameters of recursive_5's five encoders and mixing heads (not in the
default runs; name it in ``--runs``). The Laplace guide is left out (25× the VAE's step time: not affordable on this
CPU; it is measured in ``bench/guides.py``). Bernoulli likelihood, dynamic binarisation, Adam 1e-3, batch 100, the
same epochs and training seed for every run. The runs train in two worker processes (one torch thread each) side by
side. ``test_ll``: log p̂(x) with k = 5000 on the first ``n_ll`` test images; the difference to the VAE is paired
over the same images (one training seed per invocation: its s.e. is the test-set s.e. only; ``--combine`` adds the
spread over the seeds run with ``--seeds N``, each stored in the same result file as the variant "seeds=N");
``vae_gaps``: the VAE's amortisation and approximation gaps on ``n_gap`` images.

    python bench/guides_large.py                          # full, seed 0
    python bench/guides_large.py --seeds 3 --runs recursive_5,vae_wide,gamix,vae    # another seed: a variant
    python bench/guides_large.py --combine                # every seed in guides_large.json -> its "combined"
    python bench/guides_large.py --quick                  # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/guides_large.json).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from _common import (
    RESULTS,
    finish,
    measured_chunks,
    one_seed,
    over_seeds,
    paired,
    parser,
    start,
)
from _guide_runs import beats_vae, gap_report, n_params, train, wide_width

from ppl_vae.config import TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import elbo_per_datapoint, log_likelihood
from ppl_vae.nn.networks import MLPEncoder

LATENT, HIDDEN = 50, [500, 500]
FULL = dict(limit=None, epochs=40, n_ll=500, S=5000, n_gap=100, gap_steps=300, gap_particles=16, elbo_particles=1000)
QUICK = dict(limit=1000, epochs=2, n_ll=40, S=1000, n_gap=20, gap_steps=20, gap_particles=4, elbo_particles=100)
ORDER = ("recursive_5", "recursive_3", "gamix", "vae")  # longest first: two workers finish close together
ALL = ("vae", "recursive_3", "recursive_5", "gamix", "gamix_noreg", "vae_wide")


def _data(s):
    return load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0)


def work(run: str, s: dict, seed: int) -> dict:
    """Train one run and score it (in a worker process, one torch thread)."""
    torch.set_num_threads(1)
    data = _data(s)
    tc = TrainConfig(objective="elbo", epochs=s["epochs"], batch_size=100, lr=1e-3)
    t0 = time.perf_counter()
    if run == "vae_wide":
        width = wide_width(data, latent=LATENT, hidden=HIDDEN)

        def widen(model):
            model.encoder = MLPEncoder(data.shape, LATENT, (width, width), "relu")

        model, hist = train("vae", data, tc, seed, latent=LATENT, hidden=HIDDEN, prepare=widen)
    else:
        model, hist = train(run, data, tc, seed, latent=LATENT, hidden=HIDDEN)
    train_s = time.perf_counter() - t0
    x_ll = data.test_x[: s["n_ll"]]
    ll = log_likelihood(
        model.model, model.guide, x_ll, num_samples=s["S"], **measured_chunks(len(x_ll), s["S"], 10), seed=0
    )
    res = {
        "ll": ll.double().numpy(),
        "test_elbo": float(elbo_per_datapoint(model.model, model.guide, x_ll, 100).mean()),
        "train_seconds": train_s,
        "seconds_per_epoch": statistics.mean(h["seconds"] for h in hist),
        "final_train_elbo": hist[-1]["train_elbo"],
        "final_val_elbo": hist[-1]["val_elbo"],
        "sizes": {"train": len(data.train_x), "test_used_for_ll": len(x_ll)},
        "encoder_parameters": n_params(model.encoder),
    }
    if run == "vae_wide":
        res["encoder_hidden"] = [width, width]
    if run == "vae":
        g = gap_report(model, x_ll[: s["n_gap"]], "diag", s, ll[: s["n_gap"]])
        del g["_amortised"]
        res["gaps"] = g
    print(f"[{run}] train {train_s:.0f}s  test LL {float(ll.mean()):.3f}  test ELBO {res['test_elbo']:.3f}", flush=True)
    return res


def seed_results(study: dict) -> dict:
    """{name: result} of every full run stored in the study's file: the default run and its variants."""
    runs = {"default": {k: v for k, v in study.items() if k not in ("variants", "combined")}}
    runs.update(study.get("variants", {}))
    return runs


def combine(results: dict) -> dict:
    """Every seed's paired difference to the VAE, combined over training seeds (``_common.over_seeds``), with the
    count of seeds where the run beat its VAE and a t statistic of the seed means (n − 1 degrees of freedom)."""
    per = {}
    for name in sorted(results):
        d = results[name]
        if d.get("mode", d.get("environment", {}).get("mode")) != "full":
            continue
        for run, diff in d["test_ll_diff_vs_vae"].items():
            if run != "vae":
                per.setdefault(run, {})[d["training_seed"]] = (diff, d["test_ll_diff_vs_vae_std_error"][run])
        per.setdefault("vae", {})[d["training_seed"]] = (d["test_ll"]["vae"], 0.0)
    out = {
        "test_ll_vae_by_seed": {str(k): v[0] for k, v in sorted(per.pop("vae").items())},
        "test_ll_diff_vs_vae": {},
        "test_ll_diff_vs_vae_std_error": {},
        "seeds_positive": {},
        "t_statistic": {},
        "by_seed": {},
    }
    for run, by in per.items():
        pairs = [by[k] for k in sorted(by)]
        m, se = over_seeds(pairs)
        means = [a for a, _ in pairs]
        out["test_ll_diff_vs_vae"][run] = round(m, 3)
        out["test_ll_diff_vs_vae_std_error"][run] = round(se, 3)
        out["seeds_positive"][run] = f"{sum(a > 0 for a in means)}/{len(means)}"
        out["t_statistic"][run] = (
            round(statistics.mean(means) / (statistics.stdev(means) / math.sqrt(len(means))), 2)
            if len(means) > 1 and statistics.stdev(means) > 0
            else None
        )
        out["by_seed"][run] = {str(k): {"diff": v[0], "std_error": v[1]} for k, v in sorted(by.items())}
    out["claims"] = beats_vae(out, [r for r in per if r != "vae_wide"])
    out["sources"] = sorted(results)
    out["command"] = "python bench/guides_large.py --combine"
    return out


def main(argv=None):
    ap = parser(__doc__, seeds="0")
    ap.add_argument(
        "--combine",
        action="store_true",
        help="combine every seed stored in the result file over training seeds into its 'combined' entry (no training)",
    )
    ap.add_argument(
        "--runs",
        default=",".join(ORDER),
        help=f"comma-separated runs, submitted in this order to two workers; from {', '.join(ALL)}",
    )
    args = start(ap, argv)
    seed = one_seed(args)
    if args.combine:
        path = Path(args.out) if args.out else RESULTS / "guides_large.json"
        study = json.loads(path.read_text())
        study["combined"] = combine(seed_results(study))
        path.write_text(json.dumps(study, indent=2) + "\n")
        print(json.dumps(study["combined"]))
        return
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in ALL]
    if bad or "vae" not in runs:
        ap.error(f"--runs must name runs from {ALL} and include vae, got {args.runs!r}")
    s = QUICK if args.quick else FULL
    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = {run: pool.submit(work, run, s, seed) for run in runs}
        res = {run: f.result() for run, f in futures.items()}
    vae = res["vae"]["ll"]
    out = {
        "test_ll": {},
        "test_ll_diff_vs_vae": {},
        "test_ll_diff_vs_vae_std_error": {},
        "test_elbo": {},
        "final_train_elbo": {},
        "final_val_elbo": {},
        "seconds_per_epoch": {},
        "relative_seconds_per_epoch": {},
        "encoder_parameters": {},
    }
    richer = [r for r in ALL if r in res and r not in ("vae", "vae_wide")]
    for run in ["vae", *richer, *(["vae_wide"] if "vae_wide" in res else [])]:
        r = res[run]
        m, se = paired(r["ll"], vae)
        out["test_ll"][run] = round(float(r["ll"].mean()), 3)
        out["test_ll_diff_vs_vae"][run] = round(m, 3)
        out["test_ll_diff_vs_vae_std_error"][run] = round(se, 3)
        out["test_elbo"][run] = round(r["test_elbo"], 3)
        out["final_train_elbo"][run] = round(r["final_train_elbo"], 2)
        out["final_val_elbo"][run] = round(r["final_val_elbo"], 2)
        out["seconds_per_epoch"][run] = round(r["seconds_per_epoch"], 2)
        out["relative_seconds_per_epoch"][run] = round(r["seconds_per_epoch"] / res["vae"]["seconds_per_epoch"], 2)
        out["encoder_parameters"][run] = r["encoder_parameters"]
    out["vae_gaps"] = res["vae"]["gaps"]
    out["claims"] = beats_vae(out, richer)
    out.update(
        {
            "training_seed": seed,
            "data": {"name": "fashion_mnist", "pixels": "binary_dynamic", "limit": s["limit"], **res["vae"]["sizes"]},
            "sizes": {
                "latent_dim": LATENT,
                "hidden": HIDDEN,
                "epochs": s["epochs"],
                "batch_size": 100,
                "lr": 1e-3,
                "ll_num_samples": s["S"],
                "recursive_options": {"divergence_weight": 0.5, "log_ratio_cap": 5.0},
                "gamix_options": {"num_components": 3, "var_reg": 0.1},
                "gamix_noreg_options": {"num_components": 3, "var_reg": 0.0},
                **({"vae_wide_encoder_hidden": res["vae_wide"]["encoder_hidden"]} if "vae_wide" in res else {}),
            },
            "timing_note": "seconds_per_epoch: each run's fit loop in one of two worker processes running side by side "
            "(one torch thread each) on a shared 2-core machine; ratios are indicative",
            "workers": {"processes": 2, "torch_threads_per_worker": 1},
        }
    )
    finish("guides_large", out, args, device="cpu")


if __name__ == "__main__":
    main()
