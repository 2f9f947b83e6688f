"""LaDDer vs an N(0, I)-prior VAE vs WiSE-ALE on Fashion-MNIST (a subset; sizes in the JSON).

Runs (all share the outer MLP encoder/decoder, z of size 16 and the Laplace likelihood whose scale is learned and
floored at the batch MAE):
  vae           N(0, I) prior on z (LaDDer's class with ``prior: normal``)
  ladder_bgm    LaDDer, 2-D top latent t, BayesianGaussianMixture hyperprior refitted every epoch
  ladder_stick  LaDDer, 2-D top latent t, truncated stick-breaking mixture learned by the ELBO
  ladder_bgm_sigma1  ablation: ladder_bgm with the inner σ_in learned in [0.05, 1] (official code: [0.05, 0.1])
  vae_2d        the VAE with a 2-D z (N(0, I) prior, same outer networks): the baseline for LaDDer's 2-D t
  wise_ale      the VAE's model trained with the WiSE-ALE objective (analytic Jensen upper bound on the KL of the
  batch aggregate)
Measures: importance-sampled test log-likelihood (nats/image; for the ladder the proposal is the guide
q(z|x) q(t|z), i.e. joint importance sampling over both latents), test ELBO, k-NN and logistic-regression accuracy
of the codes (E[z|x]; for the ladder also E[t|z]), sample quality as a Fréchet distance ("FID") between decoded
ancestral samples (t → z → E[x|z]; z ~ N(0, I) for the VAE) and test images in the feature space of a small CNN
classifier trained on the same training images (``ppl_vae.evaluate.fid``; comparable between runs here, not with
Inception FIDs), and figures (t density with the fitted mixture, samples, interpolation strips).
Schedule (the official code's): ``warmup`` epochs with an N(0, I) prior (the inner VAE trains on the detached
codes), then the ladder; every run trains the same number of epochs and is evaluated at its last epoch.

    python bench/ladder.py --threads 1             # full: writes bench/results/ladder.json
    python bench/ladder.py --threads 1 --seeds 1   # full, training seed 1: a variant inside ladder.json
    python bench/ladder.py --quick                 # < 5 min
The last line of stdout is the JSON summary. One training seed per run (``--seeds N``, default 0); the figures of
a seed other than 0 carry ``_seed<N>`` in their names.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyro
import torch
from _common import (
    RESULTS,
    ROOT,
    finish,
    ll_mc_std_error,
    measured_chunks,
    one_seed,
    paired,
    parser,
    start,
)
from pyro.infer import Trace_ELBO

import ppl_vae
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import FrechetDistance, log_likelihood, train_feature_classifier
from ppl_vae.evaluate.interpolation import interpolate_images, plot_interpolation
from ppl_vae.models import build_model

FULL = dict(
    limit=30000,
    epochs=30,
    warmup=10,
    hidden=[256, 256],
    n_ll=1000,
    S=1000,
    n_probe_train=10000,
    fit_points=5000,
    inner_hidden=[256, 256],
    bgm_max_iter=200,
    fid_images=5000,
    classifier_epochs=5,
)
QUICK = dict(
    limit=1500,
    epochs=5,
    warmup=2,
    hidden=[128],
    n_ll=200,
    S=50,
    n_probe_train=1500,
    fit_points=1000,
    inner_hidden=[64, 64],
    bgm_max_iter=50,
    fid_images=500,
    classifier_epochs=1,
)
RUNS = ("vae", "ladder_bgm", "ladder_stick", "ladder_bgm_sigma1", "wise_ale", "vae_2d")


def model_cfg(run: str, s: dict) -> ModelConfig:
    common = dict(latent_dim=16, hidden=list(s["hidden"]), activation="relu", arch="mlp", link="sigmoid")
    if run in ("vae", "vae_2d"):
        if run == "vae_2d":  # the same outer networks with a 2-D z: a baseline for LaDDer's 2-D t
            common["latent_dim"] = 2
        return ModelConfig(name="ladder", options={"prior": "normal"}, **common)
    if run == "wise_ale":
        return ModelConfig(name="wise_ale", options={"kl_approx": "product", "kl_scale": "batch"}, **common)
    hp = "stick" if run == "ladder_stick" else "bgm"
    opts = {
        "hyperprior": hp,
        "warmup_epochs": s["warmup"],
        "num_components": 20,
        "fit_points": s["fit_points"],
        "inner_hidden": list(s["inner_hidden"]),
        "bgm_max_iter": s["bgm_max_iter"],
    }
    if run == "ladder_bgm_sigma1":  # ablation: σ_in learned in [0.05, 1] instead of the official [0.05, 0.1]
        opts["inner_sigma_max"] = 1.0
    return ModelConfig(name="ladder", options=opts, **common)


def train_run(run, data, s, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = build_model(model_cfg(run, s), data.shape, num_data=len(data.train_x))
    t0 = time.perf_counter()
    res = ppl_vae.train(
        model,
        data,
        TrainConfig(objective="elbo", epochs=s["epochs"], batch_size=100, lr=1e-3),
        seed=seed,
        progress=False,
    )
    secs = time.perf_counter() - t0
    model.eval()
    return model, res.history, secs


@torch.no_grad()
def codes(model, x, which="z"):
    out = []
    for xb in x.split(500):
        loc = model.encoder(xb)[0]  # E[z|x], the outer encoder's mean (LaDDer and the VAE-based WiSE-ALE)
        if which == "t":
            loc = model.inner_encoder(loc)[0]
        out.append(loc)
    return torch.cat(out).numpy()


def probes(train_codes, train_y, test_codes, test_y):
    """5-NN and logistic-regression accuracy on standardised codes; also the per-image correctness (for paired
    differences between runs on the same test images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(train_codes)
    a, b = sc.transform(train_codes), sc.transform(test_codes)
    hits = {
        "knn": KNeighborsClassifier(n_neighbors=5).fit(a, train_y).predict(b) == test_y,
        "logreg": LogisticRegression(max_iter=2000).fit(a, train_y).predict(b) == test_y,
    }
    return {k: round(float(v.mean()), 4) for k, v in hits.items()}, hits


def density_figure(models, data, path, n=2000):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(3.3 * len(models), 3.2), dpi=80)
    axes = np.atleast_1d(axes)
    x, y = data.test_x[:n], data.test_y[:n].numpy()
    for ax, (name, m) in zip(axes, models.items(), strict=False):
        t = codes(m, x, "t")
        lo, hi = np.percentile(t, 0.5, 0), np.percentile(t, 99.5, 0)
        pad = 0.15 * (hi - lo)
        gx, gy = np.meshgrid(
            np.linspace(lo[0] - pad[0], hi[0] + pad[0], 120), np.linspace(lo[1] - pad[1], hi[1] + pad[1], 120)
        )
        with torch.no_grad():
            ld = m.hyperprior.log_prob(torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float))
        ld = ld.reshape(120, 120).numpy()
        ax.contourf(gx, gy, np.maximum(ld, ld.max() - 10), levels=20, cmap="Greys")
        ax.scatter(t[:, 0], t[:, 1], c=y, s=2, cmap="tab10", alpha=0.6)
        ax.set_title(f"{name}: E[t|x] + log p(t)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def samples_figure(models, path, n=36, seed=0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(2.6 * len(models), 2.8), dpi=80)
    for ax, (name, m) in zip(np.atleast_1d(axes), models.items(), strict=False):
        torch.manual_seed(seed)
        with torch.no_grad():
            imgs = m.sample(n).clamp(0, 1)[:, 0]
        k = int(math.sqrt(n))
        grid = imgs.reshape(k, k, 28, 28).permute(0, 2, 1, 3).reshape(28 * k, 28 * k).numpy()
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"samples: {name}", fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    ap = parser(__doc__, seeds="0", threads=2)
    args = start(ap, argv)
    seed = one_seed(args)
    s = QUICK if args.quick else FULL
    data = load_data("fashion_mnist", pixels="continuous", limit=s["limit"], seed=0)
    runs = list(RUNS)
    models, out = (
        {},
        {
            "test_ll": {},
            "test_ll_std_error": {},
            "test_ll_mc_std_error": {},
            "test_elbo": {},
            "probe_acc": {},
            "sample_fid": {},
            "train_seconds": {},
            "final_train_elbo": {},
            "final_val_elbo": {},
            "inner_sigma": {},
            "hyperprior_active": {},
            "interpolation": {},
            "test_ll_diff_vs_vae": {},
            "probe_diff_vs_baseline": {},
        },
    )
    lls, hits = {}, {}
    clf = train_feature_classifier(data, epochs=s["classifier_epochs"], seed=0)
    fd = FrechetDistance(clf, data.test_x[: s["fid_images"]])
    out["sample_fid"]["train_images"] = round(fd.score(data.train_x[: s["fid_images"]]).value, 3)
    x_ll = data.test_x[: s["n_ll"]]
    ptr_x, ptr_y = data.train_x[: s["n_probe_train"]], data.train_y[: s["n_probe_train"]].numpy()
    for run in runs:
        model, hist, secs = train_run(run, data, s, seed=seed)
        models[run] = model
        out["train_seconds"][run] = round(secs, 1)
        out["final_train_elbo"][run] = round(hist[-1]["train_elbo"], 2)
        out["final_val_elbo"][run] = round(hist[-1]["val_elbo"], 2)
        if "inner_sigma" in hist[-1]:
            out["inner_sigma"][run] = round(hist[-1]["inner_sigma"], 4)
        torch.manual_seed(1)
        with torch.no_grad():
            fake = torch.cat([model.sample(500) for _ in range(math.ceil(s["fid_images"] / 500))])[: s["fid_images"]]
        out["sample_fid"][run] = round(fd.score(fake.clamp(0, 1)).value, 3)
        if "hyperprior_active" in hist[-1]:
            out["hyperprior_active"][run] = hist[-1]["hyperprior_active"]
        ll, ess = log_likelihood(
            model.model,
            model.guide,
            x_ll,
            num_samples=s["S"],
            seed=0,
            return_ess=True,
            **measured_chunks(len(x_ll), s["S"]),
        )
        out["test_ll"][run] = round(float(ll.mean()), 2)
        out["test_ll_std_error"][run] = round(float(ll.std() / math.sqrt(len(ll))), 2)
        out["test_ll_mc_std_error"][run] = round(ll_mc_std_error(ess, s["S"]), 3)
        with torch.no_grad():
            # the data plate scales the batch to the training-set size N: per image = −loss / N
            elbo = -Trace_ELBO(max_plate_nesting=1).loss(model.model, model.guide, x_ll) / len(data.train_x)
        out["test_elbo"][run] = round(float(elbo), 2)
        lls[run] = ll.double().numpy()
        out["probe_acc"][run], hits[run] = probes(
            codes(model, ptr_x), ptr_y, codes(model, data.test_x), data.test_y.numpy()
        )
        if run.startswith("ladder"):
            out["probe_acc"][run + "_t"], hits[run + "_t"] = probes(
                codes(model, ptr_x, "t"), ptr_y, codes(model, data.test_x, "t"), data.test_y.numpy()
            )
        print(
            f"[{run}] {secs:.0f}s  test LL {out['test_ll'][run]}  ELBO {out['test_elbo'][run]}  "
            f"probe {out['probe_acc'][run]}  FID {out['sample_fid'][run]}",
            flush=True,
        )

    # paired differences on the same test images: LL vs the VAE; probes of z vs the VAE's z and of LaDDer's 2-D t
    # vs the 2-D VAE's z
    for run in runs:
        if run != "vae":
            m, se = paired(lls[run], lls["vae"])
            out["test_ll_diff_vs_vae"][run] = {"mean": round(m, 3), "std_error": round(se, 3)}
    for name in hits:
        base = "vae_2d" if name.endswith("_t") else ("vae" if name != "vae" else None)
        if base is None or name == "vae_2d":
            continue
        out["probe_diff_vs_baseline"][name] = {
            "baseline": base,
            **{
                k: dict(
                    zip(
                        ("mean", "std_error"), (round(v, 4) for v in paired(hits[name][k], hits[base][k])), strict=False
                    )
                )
                for k in ("knn", "logreg")
            },
        }

    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = ("_quick" if args.quick else "") + (f"_seed{seed}" if seed else "")
    figs = []
    p = RESULTS / f"ladder_density{tag}.png"
    density_figure({k: models[k] for k in ("ladder_bgm", "ladder_stick")}, data, p)
    figs.append(p)
    p = RESULTS / f"ladder_samples{tag}.png"
    samples_figure({k: models[k] for k in runs}, p)
    figs.append(p)
    # interpolation strips: two test pairs of different classes, likelihood path vs straight line in t
    y = data.test_y
    pairs = []
    for ca, cb in ((0, 9), (1, 7)):  # T-shirt → ankle boot, trouser → sneaker
        ia, ib = int((y == ca).nonzero()[0]), int((y == cb).nonzero()[0])
        pairs.append((ia, ib))
    for k, (ia, ib) in enumerate(pairs):
        for run in ("ladder_bgm", "vae"):
            m = models[run]
            res, pimg, limg = interpolate_images(m, data.test_x[ia], data.test_x[ib], n_steps=8, iters=400)
            out["interpolation"][f"{run}_pair{k}"] = {
                "path": res.path_stats,
                "line": res.line_stats,
                "fallback": res.fallback,
            }
            if run == "ladder_bgm":
                p = RESULTS / f"ladder_interp{k}{tag}.png"
                plot_interpolation(
                    pimg, limg, p, res=res, log_density=m.prior_log_density, title=f"LaDDer (BGM) test {ia} -> {ib}"
                )
                figs.append(p)
    out.update(
        {
            "training_seed": seed,
            "fid": {
                "extractor": fd.name,
                "classifier_test_accuracy": round(clf.info["test_accuracy"], 4),
                "real_images": s["fid_images"],
                "generated_images": s["fid_images"],
                "note": "train_images: training images vs the same test images (the floor)",
            },
            "data": {
                "name": "fashion_mnist",
                "pixels": "continuous",
                "limit": s["limit"],
                "train": len(data.train_x),
                "val": len(data.val_x),
                "test": len(data.test_x),
                "test_used_for_ll": len(x_ll),
                "probe_train": len(ptr_x),
                "probe_test": len(data.test_x),
            },
            "sizes": {
                "z_dim": 16,
                "t_dim": 2,
                "hidden": s["hidden"],
                "inner_hidden": s["inner_hidden"],
                "num_components": 20,
                "bgm_max_iter": s["bgm_max_iter"],
                "fit_points": s["fit_points"],
                "ll_num_samples": s["S"],
                "batch_size": 100,
                "lr": 1e-3,
            },
            "epochs": s["epochs"],
            "warmup_epochs_ladder": s["warmup"],
            "claims": {
                "ladder_beats_vae_test_ll": {
                    r: out["test_ll"][r] > out["test_ll"]["vae"] for r in runs if r.startswith("ladder")
                },
                "ladder_beats_vae_sample_fid": {
                    r: out["sample_fid"][r] < out["sample_fid"]["vae"] for r in runs if r.startswith("ladder")
                },
                "ladder_beats_vae_probe": {
                    r: all(out["probe_acc"][r][k] > out["probe_acc"]["vae"][k] for k in ("knn", "logreg"))
                    for r in runs
                    if r.startswith("ladder")
                },
                "ladder_t_beats_vae_2d_probe": {
                    r + "_t": all(
                        out["probe_acc"][r + "_t"][k] > out["probe_acc"]["vae_2d"][k] for k in ("knn", "logreg")
                    )
                    for r in runs
                    if r.startswith("ladder")
                },
            },
            "ll_estimator": "ppl_vae.evaluate.log_likelihood: logmeanexp over S draws of log w; ladder: joint "
            "importance "
            "sampling of (z, t) from the guide q(z|x) q(t|z); likelihood = Laplace with the stored "
            "training-MAE floor (eval mode), a density on continuous pixels",
            "figures": [str(f.relative_to(ROOT)) for f in figs],
        }
    )
    finish("ladder", out, args, device="cpu")


if __name__ == "__main__":
    main()
