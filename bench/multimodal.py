"""Multimodal VAEs side by side: PoE (mvae), MoE (mmvae), MoPoE (mopoe), sum pooling (sumpool) and MMVM (mmvm),
on PolyFashion (3 modalities: textured, inverted, blurred Fashion-MNIST images of one class) and on image + label.

Identical per-modality MLP experts and decoders (784–256–16 and 16–256–784; a label modality 10–256–16),
Bernoulli image likelihoods on the [0, 1] grey levels, a categorical label likelihood, latent 16, Adam 1e-3,
batch 128; each method trains with its own objective as shipped in configs/<name>_polyfashion.yaml
(mmvae: stratified IWAE, K = 4, DReG; mopoe: stratified ELBO with the exact mixture density; mvae: the
sub-sampled ELBOs; sumpool: the masked bound; mmvm: the pairwise bound, α annealed over the first quarter;
``--mmvm-kl mixture`` the exact KL to the mixture).
Measures on the test split (``ppl_vae.evaluate.multimodal_summary``):
  coherence   cross-modal coherence: ``cross_mean`` (modality i alone → each other j, mean over i ≠ j) and
              ``rest_mean`` (all other modalities → j); the classifiers are logistic regressions on real data of
              each modality (their accuracy in ``classifier_acc``)
  probe_acc   logistic probe of the class on E[z | x]: ``unimodal_mean`` (one modality given) and ``joint``
  test_ll     importance-sampled log p̂(X) (S guide draws, first ``n_ll`` test points; None for MMVM, whose
              prior depends on X)
  imputation  mean squared error per pixel of a missing image modality predicted from the others (mean over
              image modalities); ``label_error`` for image + label
  sharpness   variance of the Laplacian of images generated from one other modality (mean over pairs; the real
              images' value in ``real_sharpness``)
  seconds_per_epoch
``--missing-rate r`` drops each training modality with probability r (one always stays; test data complete):
the classifiers and probes are then fitted on the complete training datapoints. Means over the training seeds,
with per-seed values; jobs run ``--workers`` at a time (one torch thread each).

    python bench/multimodal.py            # full (3 seeds, both datasets)
    python bench/multimodal.py --quick    # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/multimodal.json and, for the default
run, the figure bench/results/multimodal.png: coherence and probe per model and data set, ± s.e. over seeds).
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
    variant,
)

import ppl_vae
from ppl_vae import ModelConfig, build_model
from ppl_vae.config import TrainConfig

FULL = dict(limit=6000, epochs=12, n_test=1000, n_ll=500, S=100, probe_train=2000, classifier_train=5000)
QUICK = dict(limit=400, epochs=1, n_test=100, n_ll=30, S=8, probe_train=200, classifier_train=400)
COMMON = dict(latent_dim=16, hidden=[256], arch="mlp", likelihood="bernoulli")
DATASETS = {"polyfashion": ("poly", 3), "image_label": ("image_label", 2)}
MODELS = ("mvae", "mmvae", "mopoe", "sumpool", "mmvm")
KEYS = ("coherence", "probe_acc", "test_ll", "imputation", "sharpness", "seconds_per_epoch")


def objective(name: str, epochs: int, kl: str = "pairwise") -> tuple[dict, dict]:
    """(model options, train settings) of a method, as its shipped config has them."""
    if name == "mmvae":
        return {}, dict(objective="iwae", num_particles=4, estimator="dreg")
    if name == "mopoe":
        return {}, dict(estimator="dreg")
    if name == "mmvm":
        return {"kl": kl, "anneal_epochs": max(epochs // 4, 0)}, {}
    return {}, {}


def one_run(job) -> tuple:
    key, name, seed, s = job
    torch.set_num_threads(1)
    data = multimodal_data(DATASETS[key], s)
    opts, train = objective(name, s["epochs"], s["mmvm_kl"])
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = build_model(ModelConfig(name=name, options=opts, **COMMON), data.shape, num_data=len(data.train_x))
    tc = TrainConfig(epochs=s["epochs"], batch_size=128, lr=1e-3, **train)
    t0 = time.perf_counter()
    ppl_vae.train(model, data, tc, seed=seed, progress=False)
    sec = (time.perf_counter() - t0) / s["epochs"]
    r = {**multimodal_scores(model, data, s, seed), "seconds_per_epoch": sec}
    print(
        f"[{key} {name} seed {seed}] " + ", ".join(f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, float)),
        flush=True,
    )
    return key, name, seed, r


def figure(out: dict, path) -> str:
    """Coherence (one → other) and the one-modality probe per model, one panel per data set, ± s.e. over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(out["by_seed"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        models = list(out["by_seed"][k])
        for j, (metric, label) in enumerate(
            (("coherence", "coherence one → other"), ("probe_acc", "probe (one modality)"))
        ):
            vals = [[r[metric] for r in out["by_seed"][k][m].values()] for m in models]
            err = [se_over(v) or 0.0 for v in vals]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(models))]
            ax.bar(xs, [statistics.mean(v) for v in vals], width=0.36, yerr=err, capsize=3, label=label)
        ax.set_xticks(range(len(models)), models)
        ax.set_ylim(0, 1)
        ax.set_title(k)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None):
    ap = parser(__doc__, seeds="0,1,2", threads=1, workers=2)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {list(DATASETS)}")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: the mode's)")
    ap.add_argument("--missing-rate", type=float, default=0.0, help="share of training modalities dropped")
    ap.add_argument("--mmvm-kl", default="pairwise", choices=("pairwise", "mixture"), help="MMVM's KL term")
    args = start(ap, argv)
    models = [m for m in args.models.split(",") if m]
    keys = [d for d in args.datasets.split(",") if d]
    if any(m not in MODELS for m in models) or any(d not in DATASETS for d in keys):
        ap.error(f"--models must name some of {list(MODELS)} and --datasets some of {list(DATASETS)}")
    s = dict(QUICK if args.quick else FULL, missing_rate=args.missing_rate, mmvm_kl=args.mmvm_kl)
    if args.epochs is not None:
        s["epochs"] = args.epochs
    seeds = args.seeds[:1] if args.quick else args.seeds
    jobs = [(k, m, sd, s) for sd in seeds for k in keys for m in models]
    done = run_jobs(one_run, jobs, args.workers)
    by = {k: {m: {} for m in models} for k in keys}
    for k, m, sd, r in done:
        by[k][m][str(sd)] = r
    out = {
        key: {k: {m: mean_present([by[k][m][str(sd)][key] for sd in seeds]) for m in models} for k in keys}
        for key in KEYS
    }
    out["by_seed"] = by
    out["seeds"] = list(seeds)
    out["settings"] = {**s, **COMMON, "batch_size": 128, "lr": 1e-3, "workers": args.workers}
    claims = {}
    for k in keys:
        coh, probe, sharp, ll = (out[key][k] for key in ("coherence", "probe_acc", "sharpness", "test_ll"))
        tests = {
            "mmvm_best_probe": lambda probe=probe: all(probe["mmvm"] > probe[m] for m in models if m != "mmvm"),
            "poe_less_coherent_than_moe": lambda coh=coh: coh["mvae"] < coh["mmvae"],
            "poe_sharper_than_moe": lambda sharp=sharp: sharp["mvae"] > sharp["mmvae"],
            "mopoe_more_coherent_than_poe": lambda coh=coh: coh["mopoe"] > coh["mvae"],
            "mopoe_sharper_than_moe": lambda sharp=sharp: sharp["mopoe"] > sharp["mmvae"],
            "mopoe_ll_above_moe": lambda ll=ll: ll["mopoe"] > ll["mmvae"],
        }
        claims[k] = {}
        for name, test in tests.items():  # a claim whose runs were not all trained is left out
            try:
                claims[k][name] = bool(test())
            except KeyError:
                pass
    out["claims"] = claims
    if not args.quick and variant(args) is None:
        figure(out, RESULTS / "multimodal.png")
    finish("multimodal", out, args, device="cpu")


if __name__ == "__main__":
    main()
