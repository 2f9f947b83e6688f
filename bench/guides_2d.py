"""Richer guides where the posterior is far from Gaussian: the ``bench/guides.py`` setting with a 2-D latent.

With 16 latents (``bench/guides.py``) the diagonal Gaussian's *approximation* gap — log p̂(x) minus the ELBO of
q optimised per image — is only about half a nat, which bounds what a richer family can add at a fixed decoder.
With 2 latents the decoder must fold many images into a plane and the posteriors become skewed and multimodal.
This script repeats the comparison there: VAE, Laplace guide, recursive mixture (3 components), GAMIX (3
components, γ = 0.1) and GAMIX's mixture with γ = 0; the same networks (784-200-200-2), Bernoulli likelihood,
dynamically binarised Fashion-MNIST (10,000 training images), 20 epochs, Adam 1e-3, batch 100.
Measures: ``test_ll`` (k = 5000 on the first ``n_ll`` test images; mean over training seeds for the seeded runs),
the paired difference to the VAE of the same seed, and the VAE's approximation and amortisation gaps on
``n_gap`` images (the room a richer family has).

    python bench/guides_2d.py --threads 1   # full
    python bench/guides_2d.py --quick       # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/guides_2d.json).
"""

from __future__ import annotations

import statistics
import time

from _common import finish, measured_chunks, over_seeds, paired, parser, start
from _guide_runs import beats_vae, gap_report, train

from ppl_vae.config import TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import elbo_per_datapoint, log_likelihood

LATENT = 2
FULL = dict(
    limit=10000,
    epochs=20,
    n_ll=500,
    S=5000,
    n_gap=200,
    gap_steps=300,
    gap_particles=16,
    elbo_particles=1000,
    seeds=(0, 1),
)
QUICK = dict(
    limit=1000, epochs=2, n_ll=50, S=2000, n_gap=30, gap_steps=30, gap_particles=8, elbo_particles=200, seeds=(0, 1)
)
RUNS = ("vae", "laplace", "recursive_3", "gamix", "gamix_noreg")
SEEDED = ("vae", "recursive_3", "gamix", "gamix_noreg")


def main(argv=None):
    args = start(parser(__doc__, seeds=None), argv)
    s = QUICK if args.quick else FULL
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0)
    tc = TrainConfig(objective="elbo", epochs=s["epochs"], batch_size=100, lr=1e-3)
    x_ll = data.test_x[: s["n_ll"]]
    seeds = list(args.seeds or s["seeds"])
    lls, per, models = {}, {}, {}
    for seed in seeds:
        for run in RUNS:
            if run not in SEEDED and seed != seeds[0]:
                continue
            t0 = time.perf_counter()
            model, hist = train(run, data, tc, seed, latent=LATENT)
            if seed == seeds[0]:
                models[run] = model
            ll = log_likelihood(
                model.model, model.guide, x_ll, num_samples=s["S"], **measured_chunks(len(x_ll), s["S"], 10), seed=0
            )
            lls[run, seed] = ll.double()
            per[run, seed] = {
                "test_ll": float(ll.mean()),
                "test_elbo": float(elbo_per_datapoint(model.model, model.guide, x_ll, 100).mean()),
                "seconds_per_epoch": statistics.mean(h["seconds"] for h in hist),
            }
            print(
                f"[{run} seed {seed}] {time.perf_counter() - t0:.0f}s  test LL {per[run, seed]['test_ll']:.3f}  "
                f"test ELBO {per[run, seed]['test_elbo']:.3f}",
                flush=True,
            )
    out = {
        "test_ll": {},
        "test_elbo": {},
        "test_ll_diff_vs_vae": {},
        "test_ll_diff_vs_vae_std_error": {},
        "diff_vs_vae_seeds_positive": {},
        "by_seed": {},
    }
    for run in RUNS:
        sds = [sd for sd in seeds if (run, sd) in per]
        pairs = [paired(lls[run, sd], lls["vae", sd]) for sd in sds]
        d = [m for m, _ in pairs]
        mean_diff, se = over_seeds(pairs)
        out["test_ll"][run] = round(statistics.mean(per[run, sd]["test_ll"] for sd in sds), 3)
        out["test_elbo"][run] = round(statistics.mean(per[run, sd]["test_elbo"] for sd in sds), 3)
        out["test_ll_diff_vs_vae"][run] = round(mean_diff, 3)
        out["test_ll_diff_vs_vae_std_error"][run] = round(se, 3)
        out["diff_vs_vae_seeds_positive"][run] = f"{sum(v > 0 for v in d)}/{len(d)}"
        out["by_seed"][run] = {
            str(sd): {**{k: round(v, 4) for k, v in per[run, sd].items()}, "diff_vs_vae": round(dv, 4)}
            for sd, dv in zip(sds, d, strict=False)
        }
    x_gap = x_ll[: s["n_gap"]]
    g = gap_report(models["vae"], x_gap, "diag", s, lls["vae", seeds[0]][: s["n_gap"]])
    del g["_amortised"]
    out["vae_gaps"] = g
    richer = [r for r in RUNS if r != "vae"]
    out["claims"] = beats_vae(out, richer)
    out.update(
        {
            "training_seeds": seeds,
            "seeded_runs": list(SEEDED),
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
                "hidden": [200, 200],
                "ll_num_samples": s["S"],
                "epochs": s["epochs"],
                "batch_size": 100,
                "lr": 1e-3,
            },
        }
    )
    finish("guides_2d", out, args, device="cpu")


if __name__ == "__main__":
    main()
