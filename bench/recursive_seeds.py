"""More training seeds for the recursive mixture at the small size of ``bench/guides.py``, and its grown schedule.

``bench/guides.py`` found the 5-component recursive mixture +0.11 ± 0.11 nats above the VAE over training seeds
0–2 — too few seeds to tell a small gain from none. This script trains, for each seed in ``--seeds``, with the
settings of ``bench/guides.py`` (784-200-200-16 ReLU MLP, Bernoulli, dynamically binarised Fashion-MNIST, 10,000
training images, 20 epochs, Adam 1e-3, batch 100):

  vae                  the VAE
  recursive_5          the recursive mixture guide, all 5 components trained from the first step (our default)
  recursive_5_grown    the same guide grown one component at a time as in the paper's recursion: component m is
                       switched on after 3·m epochs (``grow_every=3``: 1 component in epochs 1–3, … 5 from epoch 13)

and reports the k = 5000 test log-likelihood on the first 1,000 test images, each run's paired difference to the VAE
of the same seed, and the combination over seeds (``_common.over_seeds``). ``pooled`` adds the seeds of
``bench/results/guides.json`` (same settings, seeds 0–2) for the runs both have.

    python bench/recursive_seeds.py --threads 1   # full (seeds 3-12)
    python bench/recursive_seeds.py --quick       # < 5 min (the first two seeds)
The last line of stdout is the JSON summary (full mode also writes bench/results/recursive_seeds.json).
"""

from __future__ import annotations

import json
import statistics
import time

from _common import RESULTS, finish, measured_chunks, over_seeds, paired, parser, start
from _guide_runs import FULL, HIDDEN, LATENT, QUICK, run_config, train

from ppl_vae.config import TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import log_likelihood

SEED_RUNS = ("vae", "recursive_5", "recursive_5_grown")


def summarise(diffs: dict[int, list[float]]) -> dict:
    """Mean ± s.e. over seeds of the paired differences, the seeds with a positive difference and the t ratio."""
    m, se = over_seeds([tuple(v) for v in diffs.values()])
    return {"mean": round(m, 3), "std_error": round(se, 3), "t": round(m / se, 2) if se > 0 else None,
            "seeds_better": f"{sum(v[0] > 0 for v in diffs.values())}/{len(diffs)}", "seeds": sorted(diffs)}


def main(argv=None):
    args = start(parser(__doc__, seeds="3,4,5,6,7,8,9,10,11,12"), argv)
    seeds = list(args.seeds)
    s = QUICK if args.quick else FULL
    if args.quick:
        seeds = seeds[:2]
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0)
    tc = TrainConfig(objective="elbo", epochs=s["epochs"], batch_size=100, lr=1e-3)
    x = data.test_x[: s["n_ll"]]
    out = {"test_ll": {r: {} for r in SEED_RUNS}, "diff_vs_vae": {r: {} for r in SEED_RUNS[1:]},
           "seconds_per_epoch": {r: {} for r in SEED_RUNS}}
    for seed in seeds:
        lls = {}
        for run in SEED_RUNS:
            t0 = time.perf_counter()
            model, hist = train(run, data, tc, seed)
            lls[run] = log_likelihood(model.model, model.guide, x, num_samples=s["S"], seed=0,
                                      **measured_chunks(len(x), s["S"], 10)).double()
            out["test_ll"][run][seed] = round(float(lls[run].mean()), 3)
            out["seconds_per_epoch"][run][seed] = round(statistics.mean(h["seconds"] for h in hist), 3)
            if run != "vae":
                out["diff_vs_vae"][run][seed] = [round(v, 4) for v in paired(lls[run], lls["vae"])]
            print(f"[{run} seed {seed}] {time.perf_counter() - t0:.0f}s  test LL {out['test_ll'][run][seed]:.3f}"
                  + (f"  − VAE {out['diff_vs_vae'][run][seed][0]:+.3f}" if run != "vae" else ""), flush=True)
    out["over_seeds"] = {run: summarise(d) for run, d in out["diff_vs_vae"].items()}
    # pool with bench/guides.py's seeds (same settings) where it has the run and not the seed
    pooled = {}
    if not args.quick and (RESULTS / "guides.json").exists():
        by_seed = json.loads((RESULTS / "guides.json").read_text())["by_seed"]
        for run, d in out["diff_vs_vae"].items():
            extra = {int(sd): [r["diff_vs_vae"], r["diff_vs_vae_std_error"]]
                     for sd, r in by_seed.get(run, {}).items() if int(sd) not in d}
            if extra:
                pooled[run] = summarise({**extra, **d})
    out["pooled_with_guides_json"] = pooled
    out["relative_seconds_per_epoch"] = {
        run: round(statistics.mean(out["seconds_per_epoch"][run][sd] / out["seconds_per_epoch"]["vae"][sd]
                                   for sd in seeds), 2) for run in SEED_RUNS}
    out.update({
        "training_seeds": seeds,
        "data": {"name": "fashion_mnist", "pixels": "binary_dynamic", "limit": s["limit"],
                 "train": len(data.train_x), "test_used_for_ll": len(x)},
        "sizes": {"latent_dim": LATENT, "hidden": HIDDEN, "epochs": s["epochs"], "batch_size": 100, "lr": 1e-3,
                  "ll_num_samples": s["S"], "options": {r: run_config(r)[1] for r in SEED_RUNS}},
    })
    finish("recursive_seeds", out, args, device="cpu")


if __name__ == "__main__":
    main()
