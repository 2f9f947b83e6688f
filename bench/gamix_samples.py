"""GAMIX's own headline claim, side by side with the VAE: sample quality (Rivera, "How to train your VAE", 2023).

Rivera's claim is realistic samples, not a higher log-likelihood. In the author's code the "mixture of Gaussians"
is the minibatch's aggregate posterior, whose codes are moment-matched to one Gaussian and pulled to N(0, I) in
place of the per-datapoint KL, plus a regulariser that keeps posterior variances from collapsing (and a PatchGAN
loss that we do not reproduce). The library has both readings of the paper: a per-image mixture guide trained with
the ELBO plus the regulariser (``vae_gamix``, the default) and the author's objective (``options.kl="aggregate"``).
This script measures what each does to *prior samples*, in the setting of ``bench/guides.py`` (dynamically binarised
Fashion-MNIST, 10,000 training images, 20 epochs, 784-200-200-16 ReLU MLPs, Bernoulli likelihood, Adam 1e-3,
batch 100), with six runs per training seed:

  vae          diagonal-Gaussian guide, plain ELBO
  gamix        3-component mixture guide, ELBO + variance-collapse regulariser γ = 0.1 (``vae_gamix`` defaults)
  gamix_noreg  the same mixture, γ = 0 (the mixture alone)
  gamix_k1     one component, ELBO + γ = 0.1 (the regulariser alone, on a diagonal Gaussian)
  rivera       one component, Rivera's objective: −log p(x|z) + γ·penalty + KL of the batch's moment-matched codes
               (γ = 0.1, the author's code without its PatchGAN)
  rivera_k3    the same objective with the 3-component mixture guide

Measures (per run and training seed; differences are paired with the VAE of the same seed):
  sample_fid     Fréchet distance between the decoded means of 5,000 prior draws z ~ N(0, I) and the greyscale
                 test images (the Bernoulli mean of a decoder trained on dynamic binarisations estimates the grey
                 level), features of a small CNN classifier trained on the same greyscale training images
                 (``ppl_vae.evaluate.fid``; comparable between these rows only, never with Inception FIDs). Two
                 independent sets of prior draws; ``sample_fid`` is their mean, ``sample_fid_draw_spread`` half
                 their difference (the noise of the sample set, not of training).
  posterior_var  Rivera's "variance collapse": the posterior's per-coordinate variance averaged over test images
                 and latent coordinates: E_x[Σ_k π_k σ_k²] / d (component variances) and the fraction of
                 coordinates with a component variance below 0.01; for mixtures also how much they are mixtures:
                 the effective number of components exp(H(π)) and the share of the marginal variance that lies
                 *between* the components' means (0 when every component sits on the same mean)
  active_units   Burda et al. 2016: coordinates with Var_x(E_q[z|x]) > 0.01 over the test images
  test_ll        importance-sampled log p(x) (k = 1000 draws of the run's own guide) on 500 binarised test images
                 (context; the k = 5000 comparison of these guides is ``bench/guides.py``), with its Monte Carlo
                 s.e. from the effective sample size (Rivera's objective is not a bound: its guide is only a proposal)

``--runs`` trains other rows of ``_guide_runs.py``'s RUNS/EXTRA_RUNS the same way (``vae`` first, the baseline),
e.g. the recursive mixture or Rivera's objective with other γ (``rivera_g05``: γ = ½, the ELBO's own variance pull,
so that only the aggregate mean term differs from the VAE; ``rivera_g25``: γ = 2.5).

    python bench/gamix_samples.py                                           # full
    python bench/gamix_samples.py --runs vae,recursive_5,rivera_g05,rivera_g25   # a variant (same result file)
    python bench/gamix_samples.py --quick                                   # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/gamix_samples.json).
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from _common import (
    finish,
    ll_mc_std_error,
    measured_chunks,
    over_seeds,
    paired,
    parser,
    start,
)
from _guide_runs import HIDDEN, LATENT, run_config, train

from ppl_vae.config import TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import (
    FrechetDistance,
    elbo_per_datapoint,
    log_likelihood,
    train_feature_classifier,
)
from ppl_vae.guides.mixture import DiagNormalMixture, mixture_moments

FULL = dict(limit=10000, epochs=20, seeds=(0, 1, 2, 3, 4), fid_images=5000, n_ll=500, S=1000, classifier_epochs=5)
QUICK = dict(limit=2000, epochs=3, seeds=(0, 1), fid_images=1000, n_ll=50, S=200, classifier_epochs=2)
RUNS = ("vae", "gamix", "gamix_noreg", "gamix_k1", "rivera", "rivera_k3")


@torch.no_grad()
def posterior_stats(model, x: torch.Tensor) -> dict:
    """Mean component variance E_x[Σ_k π_k σ_k²]/d, the share of (image, coordinate) pairs whose weighted component
    variance is < 0.01, the mean marginal variance, and the active units of E_q[z|x] (Burda et al. 2016)."""
    q = model.guide_dist(x)
    if isinstance(q, DiagNormalMixture):
        lw = q.log_weights
        comp_var = (lw.exp().unsqueeze(-1) * q.scales.pow(2)).sum(-2)
        mean, marg_var = mixture_moments(lw, q.locs, q.scales)
        effective = float((-(lw.exp() * lw).sum(-1)).exp().mean())
    else:
        base = q.base_dist
        comp_var = marg_var = base.scale.pow(2)
        mean = base.loc
        effective = 1.0
    return {
        "component_var": float(comp_var.mean()),
        "collapsed_share": float((comp_var < 0.01).double().mean()),
        "marginal_var": float(marg_var.mean()),
        "active_units": int((mean.var(0) > 0.01).sum()),
        "effective_components": effective,
        "between_component_share": float(((marg_var - comp_var) / marg_var).clamp_min(0).mean()),
    }


@torch.no_grad()
def prior_samples(model, n: int, seed: int) -> torch.Tensor:
    """Decoded means of ``n`` prior draws, flattened to images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=gen)
    return torch.cat([model.decode(z[i : i + 500]) for i in range(0, n, 500)]).clamp(0, 1)


def main(argv=None):
    ap = parser(__doc__, seeds=None)
    ap.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="comma-separated runs of _guide_runs.py's RUNS/EXTRA_RUNS; 'vae' first (the pairing baseline)",
    )
    args = start(ap, argv)
    runs = tuple(args.runs.split(","))
    if runs[0] != "vae":
        ap.error(f"--runs must start with vae (the baseline every difference is paired with), got {args.runs!r}")
    s = QUICK if args.quick else FULL
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0)
    grey = load_data("fashion_mnist", pixels="continuous", limit=s["limit"], seed=0)
    if not torch.equal(grey.train_x, data.train_x):
        raise RuntimeError("the greyscale and binarised bundles do not hold the same training images")
    tc = TrainConfig(objective="elbo", epochs=s["epochs"], batch_size=100, lr=1e-3)
    clf = train_feature_classifier(grey, epochs=s["classifier_epochs"], seed=0)
    real = grey.test_x
    fd = FrechetDistance(clf, real)
    n_ref = min(len(real), len(grey.train_x))
    reference_fid = fd.score(grey.train_x[:n_ref]).value
    print(
        f"classifier test accuracy {clf.info['test_accuracy']:.4f}; FID of {n_ref} greyscale training images "
        f"{reference_fid:.3f}",
        flush=True,
    )
    x_ll = data.test_x[: s["n_ll"]]
    seeds = list(args.seeds or s["seeds"])
    per, lls = {}, {}
    for seed in seeds:
        for run in runs:
            t0 = time.perf_counter()
            model, hist = train(run, data, tc, seed)
            fids = [fd.score(prior_samples(model, s["fid_images"], 1000 + j)).value for j in range(2)]
            r = {
                "sample_fid": statistics.mean(fids),
                "sample_fid_draw_spread": abs(fids[0] - fids[1]) / 2,
                **posterior_stats(model, data.test_x),
                "final_train_elbo": hist[-1]["train_elbo"],
                "seconds": time.perf_counter() - t0,
            }
            ll, ess = log_likelihood(
                model.model,
                model.guide,
                x_ll,
                num_samples=s["S"],
                **measured_chunks(len(x_ll), s["S"], 10),
                seed=0,
                return_ess=True,
            )
            lls[run, seed] = ll.double()
            r["test_ll"] = float(ll.mean())
            r["test_ll_mc_std_error"] = ll_mc_std_error(ess, s["S"])
            r["test_elbo"] = float(elbo_per_datapoint(model.model, model.guide, x_ll, 100).mean())
            per[run, seed] = r
            print(
                f"[{run} seed {seed}] {r['seconds']:.0f}s  FID {fids[0]:.2f}/{fids[1]:.2f}  "
                f"comp var {r['component_var']:.4f}  collapsed {r['collapsed_share']:.3f}  AU {r['active_units']}  "
                f"K_eff {r['effective_components']:.2f}  between {r['between_component_share']:.4f}  "
                f"test LL {r['test_ll']:.2f} (MC s.e. {r['test_ll_mc_std_error']:.3f})",
                flush=True,
            )
    out = {
        "sample_fid": {},
        "sample_fid_diff_vs_vae": {},
        "sample_fid_diff_vs_vae_std_error": {},
        "sample_fid_seeds_better": {},
        "component_var": {},
        "collapsed_share": {},
        "marginal_var": {},
        "effective_components": {},
        "between_component_share": {},
        "active_units": {},
        "test_ll": {},
        "test_ll_mc_std_error": {},
        "test_ll_diff_vs_vae": {},
        "test_ll_diff_vs_vae_std_error": {},
        "test_elbo": {},
        "by_seed": {},
    }
    for (run, seed), r in per.items():
        r["test_ll_diff_vs_vae"], r["test_ll_diff_vs_vae_std_error"] = paired(lls[run, seed], lls["vae", seed])
        r["sample_fid_diff_vs_vae"] = r["sample_fid"] - per["vae", seed]["sample_fid"]
        out["by_seed"].setdefault(run, {})[str(seed)] = {k: round(v, 4) for k, v in r.items()}
    for run in runs:
        rs = [per[run, sd] for sd in seeds]
        mean = lambda k, rs=rs: statistics.mean(r[k] for r in rs)  # noqa: E731
        out["sample_fid"][run] = round(mean("sample_fid"), 3)
        for k in (
            "component_var",
            "collapsed_share",
            "marginal_var",
            "effective_components",
            "between_component_share",
            "test_ll_mc_std_error",
        ):
            out[k][run] = round(mean(k), 4)
        out["active_units"][run] = round(mean("active_units"), 1)
        out["test_ll"][run] = round(mean("test_ll"), 3)
        out["test_elbo"][run] = round(mean("test_elbo"), 3)
        if run == "vae":
            continue
        # FID differences: spread over training seeds (the draw spread is reported separately and is much smaller)
        d = [r["sample_fid_diff_vs_vae"] for r in rs]
        out["sample_fid_diff_vs_vae"][run] = round(statistics.mean(d), 3)
        out["sample_fid_diff_vs_vae_std_error"][run] = (
            round(statistics.stdev(d) / math.sqrt(len(d)), 3) if len(d) > 1 else None
        )
        out["sample_fid_seeds_better"][run] = f"{sum(v < 0 for v in d)}/{len(d)}"
        m, se = over_seeds([(r["test_ll_diff_vs_vae"], r["test_ll_diff_vs_vae_std_error"]) for r in rs])
        out["test_ll_diff_vs_vae"][run], out["test_ll_diff_vs_vae_std_error"][run] = round(m, 3), round(se, 3)
    out["sample_fid_draw_spread"] = round(statistics.mean(r["sample_fid_draw_spread"] for r in per.values()), 3)

    def better(run):
        se = out["sample_fid_diff_vs_vae_std_error"][run]
        return se is not None and out["sample_fid_diff_vs_vae"][run] < -2 * se

    out["claims"] = {
        "lower_sample_fid_than_vae": {r: out["sample_fid_diff_vs_vae"][r] < 0 for r in runs[1:]},
        "lower_sample_fid_by_2_std_errors": {r: better(r) for r in runs[1:]},
        "less_variance_collapse_than_vae": {
            r: out["collapsed_share"][r] < out["collapsed_share"]["vae"] for r in runs[1:]
        },
    }
    out.update(
        {
            "training_seeds": seeds,
            "epochs": s["epochs"],
            "runs_trained": list(runs),
            "run_options": {r: run_config(r) for r in runs},
            "runs": {
                "vae": "diagonal Gaussian, ELBO",
                "gamix": "K=3 mixture, ELBO + var_reg 0.1",
                "gamix_noreg": "K=3 mixture, ELBO, var_reg 0",
                "gamix_k1": "K=1 (diagonal Gaussian), ELBO + var_reg 0.1",
                "rivera": "K=1, Rivera's objective (aggregate KL of the batch's codes + var_reg 0.1), no PatchGAN",
                "rivera_k3": "K=3 mixture, Rivera's objective",
                "rivera_g05": "K=1, Rivera's objective with var_reg 0.5 (the ELBO's own variance pull: only the "
                "aggregate mean term differs from the VAE)",
                "rivera_g25": "K=1, Rivera's objective with var_reg 2.5 (5x the ELBO's variance pull)",
                "recursive_5": "5-component recursive mixture (bench/guides.py's row)",
            },
            "data": {
                "name": "fashion_mnist",
                "pixels": "binary_dynamic for training and test LL; greyscale (continuous) "
                "test images as the real set of the FID and greyscale training images for its classifier",
                "limit": s["limit"],
                "train": len(data.train_x),
                "test": len(data.test_x),
                "test_used_for_ll": len(x_ll),
                "source": data.source,
            },
            "fid": {
                "extractor": fd.name,
                "classifier_test_accuracy": round(clf.info["test_accuracy"], 4),
                "real_images": len(real),
                "generated_images": s["fid_images"],
                "reference_fid_greyscale_training_images": round(reference_fid, 3),
                "reference_images": n_ref,
            },
            "sizes": {
                "latent_dim": LATENT,
                "hidden": HIDDEN,
                "activation": "relu",
                "likelihood": "bernoulli",
                "batch_size": 100,
                "lr": 1e-3,
                "ll_num_samples": s["S"],
            },
        }
    )
    finish("gamix_samples", out, args, device="cpu")


if __name__ == "__main__":
    main()
