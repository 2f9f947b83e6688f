"""Reproduction of Lin, Roberts, Trigoni & Clark, "Balancing Reconstruction Quality and Regularisation in ELBO for
VAEs", on Fashion-MNIST with continuous pixels (Debian's dataset-fashion-mnist), one architecture for every row:
``sigma_vae`` with an MLP 784-256-256-z (ReLU) encoder and mirrored decoder, sigmoid mean, Adam, batch 100.

* Table 1 / Figure 1 (2-D latent): fixed σ² ∈ {1, 0.5, 0.1, 0.035, 0.01}, σ² learned by gradient, and σ² set in
  closed form (eq. 9) every step: test ELBO, FID (prior and fitted mixture), KL(q̂(z) ‖ p(z)) by Monte Carlo
  (10k samples × 10 repeats, mean ± std), the learned σ².
* Table 2 (16-D latent): FID of learned σ² vs VAE (σ² = 0.5) vs β-VAE (σ² = 1), sampling from the prior and from
  q̂(z), a 32-component full-covariance Gaussian mixture fitted (EM, scikit-learn) to one draw z ~ q(z|x) per
  training image.
* Table 3 (16-D latent): importance-sampled test log-likelihood (k = 20 on 500 test images, as in the paper, and
  k = 5000 on fewer) for the global σ² (Algorithm 1 stage 1, closed-form σ²), the per-pixel σ²(z) (stage 2),
  VAE σ² = 0.5 and β-VAE σ² = 1, with p(z) = N(0, I) and with p(z) = q̂(z).

FID features: a small CNN classifier trained on the same training images (``ppl_vae.evaluate.fid``, penultimate
layer, 128-d), never Inception: our FIDs are comparable with each other, not with the paper's Inception FIDs.

    python bench/sigma_vae.py            # full (sizes in FULL below); writes bench/results/sigma_vae.json
    python bench/sigma_vae.py --quick    # small sizes, < 5 min; prints the JSON only

The machine is shared: one torch thread by default (``--threads``); on this 2-core machine under load one thread
was 8-20× faster per step than two for these small MLPs (spin-waiting intra-op threads).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import pyro
import torch
from _common import finish, measured_chunks, one_seed, parser, start
from pyro.infer import Trace_ELBO

import ppl_vae
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import DataBundle, load_data
from ppl_vae.evaluate import FrechetDistance, log_likelihood, train_feature_classifier
from ppl_vae.evaluate.aggregate import fit_aggregate_posterior, kl_monte_carlo, use_prior
from ppl_vae.models import build_model
from ppl_vae.training import evaluate_elbo, load_checkpoint

FULL = dict(
    train=20000,
    val=2000,
    fid_images=5000,
    epochs_2d=30,
    epochs_16d=30,
    min_epochs_16d=10,
    stage2_epochs=15,
    stage_eps=1.0,
    ll_images=500,
    ll_images_5000=100,
    ll_k=(20, 5000),
    classifier_epochs=5,
    components=32,
    kl_samples=10_000,
    kl_repeats=10,
    lr=1e-3,
    hidden=(256, 256),
)
QUICK = dict(
    train=3000,
    val=300,
    fid_images=1000,
    epochs_2d=3,
    epochs_16d=3,
    min_epochs_16d=2,
    stage2_epochs=2,
    stage_eps=1.0,
    ll_images=100,
    ll_images_5000=20,
    ll_k=(20, 500),
    classifier_epochs=2,
    components=32,
    kl_samples=10_000,
    kl_repeats=10,
    lr=1e-3,
    hidden=(256, 256),
)
SWEEP = (1.0, 0.5, 0.1, 0.035, 0.01)

# Lin et al. (Fashion-MNIST unless said otherwise); Table 1 and Figure 1 are for MNIST only.
PAPER = {
    "table2_fid_fashion_inception": {"learned": 10.6, "vae_0.5": 123.8, "beta_vae_1": 281.5, "real_images": 0.7},
    "table3_test_ll_fashion_k20_500_images": {
        "global_sigma2": {"prior": 1145, "mixture": 1157},
        "per_pixel": {"prior": 5708, "mixture": 5724},
        "vae_0.5": {"prior": -463, "mixture": -462},
        "beta_vae_1": {"prior": -731, "mixture": -731},
    },
    "table1_kl_agg_prior_mnist_2d": {
        "1": "0.094 ± 0.003",
        "0.5": "0.132 ± 0.003",
        "0.035 (optimal)": "0.422 ± 0.011",
        "0.01": "1.552 ± 0.034",
    },
}


def build(mode: str, sigma2: float, latent: int, n: int, S: dict):
    cfg = ModelConfig(
        name="sigma_vae",
        likelihood="gaussian",
        sigma2=sigma2,
        latent_dim=latent,
        hidden=list(S["hidden"]),
        options={
            "sigma2_mode": mode,
            "stage1_mode": "closed_form",
            "stage2_epochs": S["stage2_epochs"],
            "stage2_stop_delta": S["stage_eps"],
            "stage2_min_epochs": 2,
        },
    )
    return build_model(cfg, (1, 28, 28), num_data=n)


def train(mode: str, sigma2: float, latent: int, data, S: dict, seed: int, epochs: int, tmp: Path):
    """Returns {row name: trained model} (two rows for the staged per-pixel run) and the training record.
    ``ppl_vae.train`` runs the model's plan: one stage, or Algorithm 1's ``stage1`` (until δELBO < ε₁, into
    ``tmp/stage1``) and ``stage2`` (σ²_dataset frozen, the per-pixel σ²(z); into ``tmp``) for ``per_pixel``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = build(mode, sigma2, latent, len(data.train_x), S)
    t0 = time.perf_counter()
    if mode == "per_pixel":
        tc = TrainConfig(
            objective="elbo",
            epochs=epochs,
            batch_size=100,
            lr=S["lr"],
            stop_delta=S["stage_eps"],
            min_epochs=S["min_epochs_16d"],
        )
        res = ppl_vae.train(model, data, tc, seed=seed, progress=False, run_dir=tmp)
        stage1 = res.stages["stage1"]
        glob = build(mode, sigma2, latent, len(data.train_x), S)  # the global-σ² model where stage 1 stopped
        glob.load_state_dict(load_checkpoint(Path(stage1.run_dir) / "checkpoint.pt")["module"])
        n1 = len(stage1.history)
        rec = {
            "epochs_stage1": n1,
            "epochs_stage2": len(res.history) - n1,
            "stage1_stopped_by_eps": stage1.stopped_early,
            "sigma2_dataset": model.sigma2(),
        }
        models = {"global": glob, "per_pixel": model}
    else:
        res = ppl_vae.train(
            model,
            data,
            TrainConfig(objective="elbo", epochs=epochs, batch_size=100, lr=S["lr"]),
            seed=seed,
            progress=False,
        )
        rec = {"epochs": len(res.history)}
        models = {"model": model}
    rec["train_seconds"] = round(time.perf_counter() - t0, 1)
    rec["final_train_elbo"] = round(res.history[-1]["train_elbo"], 2)
    return models, rec


@torch.no_grad()
def decode(model, z):
    return torch.cat([model.decode(z[s : s + 1000]) for s in range(0, len(z), 1000)])


def evaluate(model, data, S: dict, fd: FrechetDistance, seed: int, ll: bool) -> dict:
    pyro.clear_param_store()
    model.eval()
    n_train = len(data.train_x)
    with torch.random.fork_rng(devices=[]):
        pyro.set_rng_seed(seed)
        elbo = evaluate_elbo(
            model.model, model.guide, data, Trace_ELBO(max_plate_nesting=1), "test", 1000, "cpu", n_train
        )
    q = fit_aggregate_posterior(model, data.train_x, num_components=S["components"], seed=seed)
    kl_mean, kl_std = kl_monte_carlo(q, num_samples=S["kl_samples"], repeats=S["kl_repeats"], seed=seed)
    n = S["fid_images"]
    z_prior = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    out = {
        "test_elbo": round(elbo, 2),
        "sigma2": model.sigma2(),
        "kl_agg_prior": {"mean": round(kl_mean, 4), "std": round(kl_std, 4)},
        "fid": {
            "prior": round(fd.score(decode(model, z_prior)).value, 3),
            "mixture": round(fd.score(decode(model, q.sample(n, seed=seed))).value, 3),
        },
    }
    if ll:
        out["test_ll"] = {}
        for k, m in zip(S["ll_k"], (S["ll_images"], S["ll_images_5000"]), strict=False):
            x = data.test_x[:m]
            row = {}
            for where, prior in (("prior", None), ("mixture", q)):
                kw = dict(num_samples=k, seed=seed, **measured_chunks(m, k, min(m, 100)))
                if prior is None:
                    lp = log_likelihood(model.model, model.guide, x, **kw)
                else:
                    with use_prior(model, prior):
                        lp = log_likelihood(model.model, model.guide, x, **kw)
                row[where] = {"mean": round(float(lp.mean()), 2), "se": round(float(lp.std() / math.sqrt(m)), 2)}
                if k == S["ll_k"][0] and where == "prior":
                    out["_log_px"] = lp.double()  # per image, for paired comparisons (not written)
            out["test_ll"][f"k={k}, {m} images"] = row
    return out


def _ll_wins(runs: dict) -> int:
    """(run, k) pairs whose mixture-prior test log-likelihood beats the prior's."""
    return sum(v["mixture"]["mean"] > v["prior"]["mean"] for r in runs.values() for v in r.get("test_ll", {}).values())


def main(argv=None):
    ap = parser(__doc__, seeds="0", threads=1)
    args = start(ap, argv)
    seed = one_seed(args)
    S = QUICK if args.quick else FULL
    full = load_data("fashion_mnist", pixels="continuous", seed=seed)
    data = DataBundle.from_tensors(
        full.train_x[: S["train"]],
        full.train_y[: S["train"]],
        full.val_x[: S["val"]],
        full.val_y[: S["val"]],
        full.test_x,
        full.test_y,
        name="fashion_mnist",
        num_classes=10,
    )
    data.pixels = "continuous"
    clf = train_feature_classifier(data, epochs=S["classifier_epochs"], seed=seed)
    real = data.test_x[: S["fid_images"]]
    fd = FrechetDistance(clf, real)
    fid_real = fd.score(full.train_x[-S["fid_images"] :]).value  # held-out-of-training images vs test images
    runs, training = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(f"2d/sigma2={s}", "fixed", s, 2) for s in SWEEP]
        rows += [("2d/learned", "learned", 1.0, 2), ("2d/closed_form", "closed_form", 1.0, 2)]
        rows += [
            ("16d/staged", "per_pixel", 1.0, 16),
            ("16d/vae_0.5", "fixed", 0.5, 16),
            ("16d/beta_vae_1", "fixed", 1.0, 16),
        ]
        for name, mode, s2, latent in rows:
            epochs = S["epochs_2d"] if latent == 2 else S["epochs_16d"]
            models, rec = train(mode, s2, latent, data, S, seed, epochs, Path(tmp) / name.replace("/", "_"))
            training[name] = rec
            for sub, model in models.items():
                key = name if sub == "model" else f"16d/{sub}"
                runs[key] = evaluate(model, data, S, fd, seed, ll=latent == 16)
                if not args.quick:
                    print(key, rec, {k: v for k, v in runs[key].items() if not k.startswith("_")}, flush=True)

    sweep = {k: v for k, v in runs.items() if k.startswith("2d/")}
    best_elbo = max(sweep, key=lambda k: sweep[k]["test_elbo"])
    g, pp = runs["16d/global"], runs["16d/per_pixel"]
    paired = pp.pop("_log_px") - g.pop("_log_px")  # same test images: the paired difference's standard error
    diff, diff_se = float(paired.mean()), float(paired.std() / math.sqrt(len(paired)))
    for r in runs.values():
        r.pop("_log_px", None)
    learned_rows = ("2d/learned", "2d/closed_form")
    claims = {
        "best_elbo_row_2d": best_elbo,
        "learned_sigma2_best_elbo_of_2d_sweep": best_elbo in learned_rows,
        **{
            f"{r}_fid_better_than_fixed_0.5_and_1_2d_{w}": all(
                sweep[r]["fid"][w] < sweep[f"2d/sigma2={s}"]["fid"][w] for s in (0.5, 1.0)
            )
            for r in learned_rows
            for w in ("prior", "mixture")
        },
        **{
            f"learned_fid_better_than_vae_and_beta_vae_16d_{w}": g["fid"][w]
            < min(runs["16d/vae_0.5"]["fid"][w], runs["16d/beta_vae_1"]["fid"][w])
            for w in ("prior", "mixture")
        },
        "per_pixel_minus_global_test_ll": {
            "nats": round(diff, 2),
            "paired_se": round(diff_se, 2),
            "k": S["ll_k"][0],
            "images": S["ll_images"],
        },
        "per_pixel_ll_higher_than_global_by_5_se": diff > 5 * diff_se,
        "mixture_beats_prior_fid": f"{sum(r['fid']['mixture'] < r['fid']['prior'] for r in runs.values())} of "
        f"{len(runs)} runs",
        "mixture_beats_prior_test_ll": f"{_ll_wins(runs)} of "
        f"{sum(len(r.get('test_ll', {})) for r in runs.values())} (run, k) pairs",
    }
    s2d = training["16d/staged"]["sigma2_dataset"]
    result = {
        "fid": {k: v["fid"] for k, v in runs.items()},
        "test_ll": {k: v["test_ll"] for k, v in runs.items() if "test_ll" in v},
        "sigma2_learned": {
            k: round(v["sigma2"], 5)
            for k, v in runs.items()
            if k in ("2d/learned", "2d/closed_form", "16d/global", "16d/per_pixel")
        },
        "kl_agg_prior": {k: v["kl_agg_prior"] for k, v in runs.items()},
        "test_elbo": {k: v["test_elbo"] for k, v in runs.items()},
        "claims": claims,
        "fid_extractor": fd.name,
        "fid_classifier_test_accuracy": round(clf.info["test_accuracy"], 4),
        "fid_real_train_vs_test": round(fid_real, 3),
        # σ²_k(z) ≥ σ²_dataset/2 bounds log N(x; g, σ²_k) ≤ −½ log(2π σ²_dataset/2) per pixel
        "per_pixel_ll_upper_bound": round(784 * -0.5 * math.log(2 * math.pi * s2d / 2), 1),
        "training": training,
        "paper": PAPER,
        "settings": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in S.items()},
            "sweep": list(SWEEP),
            "mixture": "sklearn GaussianMixture, full covariance, one z ~ q(z|x) per training image",
            "model": "sigma_vae, MLP 784-256-256-z ReLU, sigmoid mean, Adam, batch 100",
            "data": f"fashion_mnist continuous [0,1]: first {S['train']} of the 54k training split, "
            f"{S['val']} validation, {len(data.test_x)} test images",
        },
    }
    finish("sigma_vae", result, args, device="cpu")


if __name__ == "__main__":
    main()
