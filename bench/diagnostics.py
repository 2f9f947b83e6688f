"""Posterior diagnostics of trained guides on dynamically binarised Fashion-MNIST: PSIS k̂ fractions for the VAE,
the Laplace guide (VLAE) and a Gaussian-mixture guide (GAMIX, K = 3), and the inference-gap report of the VAE and
the Laplace guide from the library call (``ppl_vae.evaluate.gap_report``) with NUTS reference posteriors for a
few images.

The runs are those of bench/guides.py (the same networks, 784–200–200–16 ReLU MLPs, Bernoulli likelihood, Adam
1e-3, batch 100; ``bench/_guide_runs.py``), trained with the first seed.
Measures:
  khat          per test image the Pareto k̂ of S guide draws' importance weights (``posterior_diagnostics`` +
                ``psis_diagnostics``, ArviZ through ``ppl_vae.evaluate.azcompat``); the fractions above 0.5 and
                0.7, the median, the median ESS fraction
  gaps          amortisation / approximation / inference gap (mean ± s.e. over images; the VAE's own diagonal
                family, the Laplace guide's full covariance), log p̂ from S importance draws of the guide
  nuts          per NUTS image: R-hat, ESS, divergences, and the approximation gap with log p̂ from the guide
                and from a Student-t fitted to the NUTS draws; guide-vs-NUTS mean error and variance log-ratio

Variant ``--protocol cremer`` (Cremer, Li & Duvenaud's own evaluation, chriscremer/Inference-Suboptimality
``test_different_dists/compute_gaps3.py``, ``models/optimize_local_q.py``, ``models/utils/ais4.py``): the gaps only
(the VAE and the Laplace guide; no k̂ runs; 20 test images), log p̂ the best of IWAE-5000 from the amortised guide,
IS-5000 from q* and AIS from the prior (5,000 linear steps, 10 leapfrog steps, step size adapted to 0.65
acceptance within [1e-4, 0.5]); q* by Adam at lr 1e-3 with 50 draws per step until 10 windows of 100 steps in a row
bring no better mean loss (at most 20,000 steps); ELBOs from 5,000 draws. Where it still differs: q* starts at the
amortised q (Cremer: at N(0, I)); HMC's step size is adapted per datapoint (Cremer: one for the batch); AIS runs 16
chains per image (Cremer: 100), for the CPU budget.

    python bench/diagnostics.py                     # full
    python bench/diagnostics.py --quick             # < 5 min
    python bench/diagnostics.py --protocol cremer   # the paper's gap protocol (a variant of the result file)
The last line of stdout is the JSON summary (full mode also writes bench/results/diagnostics.json).
"""

from __future__ import annotations

import time

from _common import finish, parser, start
from _guide_runs import train

from ppl_vae.config import TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import gap_report, posterior_diagnostics, psis_diagnostics

FULL = dict(
    limit=10000,
    epochs=20,
    n_khat=500,
    S=1000,
    n_gap=100,
    gap_S=1000,
    gap_steps=300,
    gap_particles=16,
    elbo_particles=500,
    nuts_images=3,
    nuts=dict(num_chains=4, num_samples=500, warmup_steps=500),
)
QUICK = dict(
    limit=600,
    epochs=2,
    n_khat=40,
    S=400,
    n_gap=8,
    gap_S=200,
    gap_steps=30,
    gap_particles=8,
    elbo_particles=100,
    nuts_images=1,
    nuts=dict(num_chains=2, num_samples=100, warmup_steps=100),
)
CREMER = dict(
    n_gap=20,  # the paper's per-image protocol on 20 test images (the CPU budget: AIS is 50,000 HMC gradients)
    gap_S=5000,
    elbo_particles=5000,
    gap_lr=1e-3,
    gap_particles=50,
    gap_steps=20000,
    patience=10,
    nuts_images=0,  # not part of the paper's protocol (the default study has its NUTS rows)
    # Cremer's AIS has 100 chains per image; 16 here (the CPU budget): the same 5,000-step annealing, a noisier mean
    ais=dict(num_steps=5000, num_chains=16, leapfrog_steps=10, schedule="linear", initial="prior"),
)
QUICK_AIS = dict(CREMER["ais"], num_steps=50, num_chains=8)
CREMER_QUICK = dict(CREMER, gap_S=200, elbo_particles=200, gap_steps=400, patience=2, ais=QUICK_AIS)
KHAT_RUNS = ("vae", "laplace", "gamix")
GAP_RUNS = {"vae": None, "laplace": None}  # each guide's own family (diagonal; full covariance)


def _round(d, nd=4):
    if isinstance(d, dict):
        return {k: _round(v, nd) for k, v in d.items()}
    if isinstance(d, list):
        return [_round(v, nd) for v in d]
    return round(d, nd) if isinstance(d, float) else d


def gaps(out: dict, run: str, model, x, s: dict, seed: int, protocol: str = "ours") -> None:
    """The gap report of one trained run into ``out["gaps"][run]`` (per-image values and NUTS draws dropped)."""
    t0 = time.perf_counter()
    cremer = protocol == "cremer"
    r = gap_report(
        model.model,
        model.guide,
        x[: s["n_gap"]],
        num_samples=s["gap_S"],
        family=GAP_RUNS[run],
        steps=s["gap_steps"],
        num_particles=s["gap_particles"],
        elbo_particles=s["elbo_particles"],
        parameters=list(model.parameters()),
        seed=seed,
        nuts_images=s["nuts_images"],
        nuts=s["nuts"],
        **(dict(lr=s["gap_lr"], patience=s["patience"], log_px_from="best", ais=s["ais"]) if cremer else {}),
    )
    r.pop("per_image")
    for row in r.get("nuts", {}).get("images", []):
        for key in ("nuts_mean", "guide_mean", "nuts_var", "guide_var"):
            row.pop(key)
    r["seconds_total"] = time.perf_counter() - t0
    out["gaps"][run] = _round(r)
    print(
        f"[gaps {run}] amortisation {r['amortisation']} approximation {r['approximation']} "
        f"nuts {_round({k: v for k, v in r.get('nuts', {}).items() if k != 'images'})}",
        flush=True,
    )


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--protocol", choices=("ours", "cremer"), default="ours", help="the gap protocol (docstring)")
    args = start(ap, argv)
    s = QUICK if args.quick else FULL
    cremer = args.protocol == "cremer"
    if cremer:
        s = {**s, **(CREMER_QUICK if args.quick else CREMER)}
    seed = args.seeds[0]
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=seed)
    tc = TrainConfig(objective="elbo", epochs=s["epochs"], batch_size=100, lr=1e-3)
    x = data.test_x[: max(s["n_khat"], s["n_gap"])]
    out = {"settings": {k: v for k, v in s.items()}, "seed": seed, "khat": {}, "gaps": {}, "train_seconds": {}}
    for run in KHAT_RUNS:
        if cremer and run not in GAP_RUNS:
            continue
        t0 = time.perf_counter()
        model, _ = train(run, data, tc, seed=seed)
        out["train_seconds"][run] = round(time.perf_counter() - t0, 1)
        if cremer:
            gaps(out, run, model, x, s, seed, protocol="cremer")
            continue
        idata = posterior_diagnostics(model.model, model.guide, x[: s["n_khat"]], num_samples=s["S"], seed=seed)
        d = psis_diagnostics(idata)
        k = d["khat"]
        out["khat"][run] = _round(
            {
                "num_images": len(k),
                "num_samples": s["S"],
                "fraction_above_0.5": float((k > 0.5).mean()),
                "fraction_above_0.7": float((k > 0.7).mean()),
                "median": float(sorted(k)[len(k) // 2]),
                "median_ess_fraction": float(sorted(d["ess_fraction"])[len(k) // 2]),
            },
            3,
        )
        print(f"[khat {run}] {out['khat'][run]}", flush=True)
        if run in GAP_RUNS:
            gaps(out, run, model, x, s, seed)
    laplace, vae = out["gaps"]["laplace"], out["gaps"]["vae"]
    if cremer:
        out["claims"] = {
            "laplace_smaller_amortisation_gap": laplace["amortisation"]["mean"] < vae["amortisation"]["mean"],
            "laplace_smaller_approximation_gap": laplace["approximation"]["mean"] < vae["approximation"]["mean"],
            "q_star_converged": all(g["optimisation"]["converged"] for g in out["gaps"].values()),
        }
        return finish("diagnostics", out, args, device="cpu")
    out["claims"] = {
        "laplace_smaller_amortisation_gap": laplace["amortisation"]["mean"] < vae["amortisation"]["mean"],
        "laplace_fewer_khat_above_0.7": out["khat"]["laplace"]["fraction_above_0.7"]
        < out["khat"]["vae"]["fraction_above_0.7"],
        "nuts_chains_converged": max(g["nuts"]["max_rhat"] for g in out["gaps"].values()) < 1.05,
    }
    finish("diagnostics", out, args, device="cpu")


if __name__ == "__main__":
    main()
