"""MMVM against the joint multimodal VAEs the way its paper's repository trains them (Sutter et al. 2024; issue 35).

The paper's claim: the mixture-of-experts prior (MMVM) gives a better latent representation — a linear probe of
the class on one modality's encoder mean — than aggregation-based joint VAEs, over the weights β of the KL term.
Its baselines are thomassutter/mmvmvae's ``mv_joint_vae.py`` (read at 14ef771): the same encoders and decoders,
one latent z from an aggregation of the experts, a one-sample ELBO, the loss rec(X) + β·M·KL(q_agg ‖ N(0, I)) (the
KL is counted once per modality), with the aggregations

  joint_poe    product of the experts, no prior expert     (``mvae``, subsets joint, aggregation product_no_prior)
  joint_moe    one expert per datapoint                    (``mmvae``, objective sampled_expert)
  joint_avg    mean of the experts' means and variances    (``mvae``, subsets joint, aggregation average)
  joint_mopoe  one subset's product per datapoint          (``mopoe``, objective sampled_subset; the repository's
               ``aggregate_latents_mopoe`` is empty, so this is the MoPoE paper's code, run beside ours in
               ``bench/parity/mopoe.py``)

and MMVM's loss rec(X) + β Σ_m [α KL(q_m ‖ N(0, I)) + (1 − α)/M Σ_m̃ KL(q_m ‖ q_m̃)], the pairwise KL in closed
form, α annealed from 1 to 0 (here over the first quarter of the epochs). ``run_polymnist.sh`` sweeps β; here
β ∈ {0.25, 1, 4} (``train.kl_weight``: β for MMVM, β·M for the joint models, as the repository weighs them), equal
epochs for every model. What stays ours (labelled, the same for every model): PolyFashion in place of translated
PolyMNIST, the MLP experts of ``bench/multimodal.py`` (784–256–16, latent 16) in place of ResNets with 512
latents, Bernoulli likelihoods in place of Laplace(0.75), 12 epochs in place of 500.

Measures (``bench/_common.multimodal_scores``, as in ``bench/multimodal.py``): ``probe_acc`` — the paper's
"unimodal" probe, a logistic regression of the class on each modality's encoder mean (mean over modalities; the
repository reports balanced accuracy, the classes here are balanced); ``coherence`` of one → other generation;
``test_ll`` log p̂(X) (none for MMVM); ``seconds_per_epoch``. The verdict counts, per β, the seeds on which MMVM's
probe is above every joint model's.

    python bench/mmvm_joint.py            # full: 5 models × 3 β × 3 seeds, two jobs at a time
    python bench/mmvm_joint.py --quick    # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/mmvm_joint.json and the figure
bench/results/mmvm_joint.png: probe and coherence against β, one line per model, bars ± s.e. over seeds).
"""

from __future__ import annotations

import statistics
import time

import pyro
import torch
from _common import (
    RESULTS,
    finish,
    mean_present,
    multimodal_data,
    multimodal_scores,
    parser,
    run_jobs,
    se_over,
    start,
    subset_arg,
)

import ppl_vae
from ppl_vae import ModelConfig, build_model
from ppl_vae.config import TrainConfig

FULL = dict(limit=6000, epochs=12, n_test=1000, n_ll=500, S=100, probe_train=2000, classifier_train=5000)
QUICK = dict(limit=400, epochs=2, n_test=100, n_ll=30, S=8, probe_train=200, classifier_train=400)
COMMON = dict(latent_dim=16, hidden=[256], arch="mlp", likelihood="bernoulli")
M = 3  # PolyFashion's modalities
MODELS = {
    "mmvm": ("mmvm", {"kl": "pairwise"}),
    "joint_poe": ("mvae", {"subsets": "joint", "aggregation": "product_no_prior"}),
    "joint_moe": ("mmvae", {"objective": "sampled_expert"}),
    "joint_avg": ("mvae", {"subsets": "joint", "aggregation": "average"}),
    "joint_mopoe": ("mopoe", {"objective": "sampled_subset"}),
}
KEYS = ("probe_acc", "coherence", "coherence_rest", "probe_acc_joint", "test_ll", "seconds_per_epoch")


def one_run(job) -> tuple:
    label, beta, seed, s = job
    torch.set_num_threads(1)
    data = multimodal_data(("poly", M), s)
    name, opts = MODELS[label]
    if name == "mmvm":
        opts = {**opts, "anneal_epochs": max(s["epochs"] // 4, 0)}
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = build_model(ModelConfig(name=name, options=opts, **COMMON), data.shape, num_data=len(data.train_x))
    weight = beta if name == "mmvm" else beta * M
    tc = TrainConfig(epochs=s["epochs"], batch_size=128, lr=1e-3, kl_weight=weight)
    t0 = time.perf_counter()
    ppl_vae.train(model, data, tc, seed=seed, progress=False)
    sec = (time.perf_counter() - t0) / s["epochs"]
    r = {**multimodal_scores(model, data, s, seed), "seconds_per_epoch": sec, "kl_weight": weight}
    print(f"[{label} β={beta:g} seed {seed}] probe {r['probe_acc']:.4f} coherence {r['coherence']:.4f}", flush=True)
    return label, beta, seed, r


def figure(out: dict, path) -> str:
    """Probe and coherence (mean ± s.e. over seeds) against β, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by, seeds = out["by_seed"], [str(s) for s in out["seeds"]]
    betas = sorted(by, key=float)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.9))
    panels = (("probe_acc", "unimodal probe"), ("coherence", "coherence one → other"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for m in by[betas[0]]:
            vals = [[by[b][m][s][key] for s in seeds] for b in betas]
            mean = [statistics.mean(v) for v in vals]
            err = [se_over(v) or 0.0 for v in vals]
            ax.errorbar([float(b) for b in betas], mean, yerr=err, marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([float(b) for b in betas], betas)
        ax.set_xlabel("β (train.kl_weight: β for MMVM, 3β for the joint models)")
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None):
    ap = parser(__doc__, seeds="0,1,2", threads=1, workers=2)
    ap.add_argument("--betas", default="0.25,1,4", help="comma-separated KL weights β")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: the mode's)")
    args = start(ap, argv)
    models = subset_arg(ap, "--models", args.models, MODELS)
    try:
        betas = [float(b) for b in args.betas.split(",") if b]
    except ValueError:
        ap.error(f"--betas must be comma-separated positive numbers, got {args.betas!r}")
    if not betas or any(b <= 0 for b in betas):
        ap.error(f"--betas must be comma-separated positive numbers, got {args.betas!r}")
    s = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        s["epochs"] = args.epochs
    seeds = args.seeds[:1] if args.quick else args.seeds
    jobs = [(m, b, sd, s) for sd in seeds for b in betas for m in models]
    done = run_jobs(one_run, jobs, args.workers)
    by = {f"{b:g}": {m: {} for m in models} for b in betas}
    for m, b, sd, r in done:
        by[f"{b:g}"][m][str(sd)] = r

    def over_seeds(fn, key):  # {β: {model: fn(the seeds' values of key)}}
        return {bk: {m: fn([by[bk][m][str(sd)][key] for sd in seeds]) for m in models} for bk in by}

    out: dict = {key: over_seeds(mean_present, key) for key in KEYS}
    out["probe_acc_se"] = over_seeds(se_over, "probe_acc")
    verdict = {}
    if "mmvm" in models and len(models) > 1:
        for bk in by:
            margin = [  # MMVM's probe minus the best joint model's: > 0 exactly when MMVM beats every one
                by[bk]["mmvm"][str(sd)]["probe_acc"]
                - max(by[bk][m][str(sd)]["probe_acc"] for m in models if m != "mmvm")
                for sd in seeds
            ]
            wins = sum(d > 0 for d in margin)
            verdict[bk] = {"mmvm_best_probe_seeds": wins, "of": len(seeds), "margin_over_best_joint": margin}
    out["mmvm_best_probe"] = verdict
    out["by_seed"] = by
    out["seeds"] = list(seeds)
    out["settings"] = {**s, **COMMON, "betas": betas, "batch_size": 128, "lr": 1e-3, "workers": args.workers}
    if not args.quick:
        figure(out, RESULTS / "mmvm_joint.png")
    finish("mmvm_joint", out, args, device="cpu")


if __name__ == "__main__":
    main()
