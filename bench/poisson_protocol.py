"""Poisson VAE vs Gaussian VAE label efficiency under the official protocol (Vafaii, Galor & Yates 2024; code
hadivafaii/PoissonVAE, read at its head): does a P-VAE's latent with N labels classify as well as a Gaussian VAE's
with 5N? (Official MNIST table, K = 10: P-VAE 5-NN@200 = 0.815 vs Gaussian@1000 = 0.813.)

Training, as the official code where the CPU allows: K = 10 latents; both models with the official KL-β schedule
(β = 1e-4 for the first 1% of the optimiser steps, then linearly to 1 over the next 50%; ``kl_beta_schedule``),
the reconstruction term the summed squared error (a Gaussian likelihood with σ² = 1/2 on the decoder's raw output),
batch 100, learning rate 2e-3 with a cosine schedule; the P-VAE with the official prior log-rates
U[−6, −2], the posterior log-rate soft-clamped at 5 and the temperature 1 → 0.05 over the first half
(``vae_poisson`` options ``prior_init: uniform``, ``rate_clamp: 5``, ``kl_anneal_fraction: 0.5``,
``kl_constant_fraction: 0.01``). Ours, not theirs: MLP 784-256-256-K encoder and decoder (ReLU), Adam (official:
Adamax), far fewer epochs (official 400), Fashion-MNIST (MNIST is not on this machine).

Probe, as the official ``analysis/final.py`` (``analysis_mode='knn'``) and ``analysis/eval.py`` (``knn_analysis``):
the features are the P-VAE encoder's log δr (``softclamp_upper(encoder(x), 10)``, the key ``log_dr`` of
``model2key``) and the Gaussian encoder's posterior mean (``loc``) of the held-out images (the official
validation set = MNIST's test set; here our test split); its first half is the labelled pool, its second half the
evaluation images; a 5-NN classifier (scikit-learn ``KNeighborsClassifier(n_neighbors=5)``, Euclidean, uniform
weights) is fitted on ``--subsets`` random labelled subsets of 200 and 1,000 pool images (drawn without
replacement from one ``numpy.random.default_rng(seed)``, sizes in turn) and once on the whole pool ("all").
Variants computed on the same models: ``rates_random`` (P-VAE features = the posterior rates r·δr, the setting
of ``latent_families.py``) and ``first_n`` (the first n pool images instead of random subsets); ``ours`` = both
(raw rates, first-n subset).

    python bench/poisson_protocol.py            # full: 54,000 training images, 15 epochs, seeds 0,1,2 (1 thread)
    python bench/poisson_protocol.py --quick    # 5,000 images, 2 epochs, seed 0, 5 subsets
"""

from __future__ import annotations

import json
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from _common import RESULTS, finish, parser, start
from _common import variant as variant_key
from sklearn.neighbors import KNeighborsClassifier

import ppl_vae
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import load_data
from ppl_vae.models import VAE, build_model
from ppl_vae.models.vae_poisson import KLAnnealedELBO, kl_beta_schedule
from ppl_vae.training.plan import TrainingPlan, build_objective, training_plan

MODELS = ("poisson", "gaussian")
SIZES = ("200", "1000", "all")
FEATURES = {"official": ("log_dr", "random"), "rates_random": ("rates", "random"), "first_n": ("log_dr", "first")}
FEATURES["ours"] = ("rates", "first")
KL_SCHEDULE = {"start": 1e-4, "anneal_fraction": 0.5, "constant_fraction": 0.01}  # official MNIST, network decoder
POISSON_OPTIONS = {
    "prior_init": "uniform",
    "rate_clamp": 5.0,
    "kl_beta_start": KL_SCHEDULE["start"],
    "kl_anneal_fraction": KL_SCHEDULE["anneal_fraction"],
    "kl_constant_fraction": KL_SCHEDULE["constant_fraction"],
}


class AnnealedVAE(VAE):
    """The Gaussian VAE trained with the official KL-β schedule (the official trainer anneals every model type)."""


@training_plan(AnnealedVAE)
class AnnealedVAEPlan(TrainingPlan):
    """β of :func:`kl_beta_schedule` per optimiser step on the latent terms; validation at β = 1."""

    def objective(self, train):
        self.step, self.total = 0, train.epochs * math.ceil(self.model.num_data / train.batch_size)
        return KLAnnealedELBO(build_objective(train), lambda: kl_beta_schedule(self.step, self.total, **KL_SCHEDULE))

    def validation_objective(self, train):
        return build_objective(train)

    def on_step_end(self, x, y):
        self.step += 1


def build(name: str, K: int, shape, num_data: int):
    cfg = ModelConfig(
        name="vae_poisson" if name == "poisson" else "vae",
        likelihood="gaussian",
        sigma2=0.5,  # log p(x|z) = −Σ (x − x̂)² + const: the official summed squared error
        link="identity",
        arch="mlp",
        hidden=[256, 256],
        latent_dim=K,
        options=POISSON_OPTIONS if name == "poisson" else {},
    )
    m = build_model(cfg, shape, num_data=num_data)
    if name == "gaussian":
        m = AnnealedVAE(m.encoder, m.decoder, m.likelihood, K, prior=m.prior, num_data=num_data)
    return m


def features(model, name: str, x: torch.Tensor, kind: str) -> np.ndarray:
    """The probe's features of images ``x``: P-VAE ``log_dr`` (log δr) or ``rates`` (r·δr); Gaussian: loc."""
    out = []
    with torch.no_grad():
        for s in range(0, len(x), 1000):
            xb = x[s : s + 1000]
            if name == "gaussian":
                out.append(model.encode(xb)[0])
            elif kind == "log_dr":
                out.append(model.log_delta(xb))
            else:
                out.append(model.encode(xb)[0])
    return torch.cat(out).cpu().numpy()


def knn_accuracies(z: np.ndarray, y: np.ndarray, subsets: int, seed: int, mode: str) -> dict:
    """{size: [accuracy per labelled subset]}: pool = first half of (z, y), evaluation = second half; ``random``
    draws ``subsets`` subsets per size from one rng (the official order: sizes in turn), ``first`` takes the first
    n pool images once; "all" is the whole pool once."""
    half = len(z) // 2
    pool, z_eval, y_eval = np.arange(half), z[half:], y[half:]
    rng = np.random.default_rng(seed)
    out = {}
    for size in SIZES:
        n = half if size == "all" else int(size)
        if n > half:
            out[size] = None
            continue
        draws = 1 if (size == "all" or mode == "first") else subsets
        accs = []
        for _ in range(draws):
            idx = pool[:n] if (mode == "first" or size == "all") else rng.choice(pool, size=n, replace=False)
            knn = KNeighborsClassifier(n_neighbors=5).fit(z[idx], y[idx])
            accs.append(float((knn.predict(z_eval) == y_eval).mean()))
        out[size] = accs
    return out


def _summary(accs: list[float] | None) -> dict | None:
    if accs is None:
        return None
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return {"mean": round(statistics.mean(accs), 4), "sd": round(sd, 4), "se": round(sd / math.sqrt(len(accs)), 4)}


def over_seeds(values: list[float]) -> dict:
    """Mean over training seeds and its standard error (sd over seeds / √n)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": round(statistics.mean(values), 4),
        "se": round(sd / math.sqrt(len(values)), 4),
        "per_seed": [round(v, 4) for v in values],
    }


def run_one(name: str, seed: int, data, epochs: int, lr: float, K: int, subsets: int, device) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = build(name, K, data.shape, len(data.train_x)).to(device)
    t0 = time.perf_counter()
    res = ppl_vae.train(
        model,
        data,
        TrainConfig(objective="auto", epochs=epochs, batch_size=100, lr=lr, lr_schedule="cosine"),
        seed=seed,
        device=device,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    model.eval()
    x, y = data.test_x.to(device), data.test_y.numpy()
    row = {
        "model": name,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "val_elbo_last": round(res.history[-1]["val_elbo"], 3),
        "val_elbo_per_epoch": [round(r["val_elbo"], 2) for r in res.history],
    }
    if name == "poisson":
        row["kl_beta_per_epoch"] = [round(r["kl_beta"], 4) for r in res.history]
        with torch.no_grad():
            q = model.guide_dist(x)
            counts = q.sample()  # hard counts (eval mode)
            prior_log_r = model.log_r.detach()
            kl = (q.rate * (q.log_rate - prior_log_r) - q.rate + prior_log_r.exp()).mean(0)
        row["zero_count_fraction"] = round(float((counts == 0).float().mean()), 4)
        row["prior_rates"] = [round(v, 4) for v in prior_log_r.exp().tolist()]
    else:
        with torch.no_grad():
            loc, scale = model.encode(x)
            kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).mean(0)
    row["kl_per_latent"] = [round(v, 4) for v in kl.tolist()]
    row["active_latents"] = int((kl > 0.01).sum())  # the official trainer's n_active rule
    row["knn"] = {}
    for variant, (kind, mode) in FEATURES.items():
        if name == "gaussian" and kind == "rates":
            continue  # the Gaussian's features are its posterior mean in every variant
        z = features(model, name, x, kind)
        row["knn"][variant] = knn_accuracies(z, y, subsets, seed, mode)
    return row


def summarise(rows: list[dict], seeds) -> dict:
    def per_seed(model: str, variant: str, size: str) -> list[float] | None:
        out = []
        for s in seeds:
            r = next(r for r in rows if r["model"] == model and r["seed"] == s)
            same = {"rates_random": "official", "ours": "first_n"}.get(variant, variant)  # Gaussian: loc always
            accs = r["knn"].get(variant, r["knn"][same])[size]
            if accs is None:
                return None
            out.append(statistics.mean(accs))
        return out

    acc = {}
    for variant in FEATURES:
        acc[variant] = {}
        for m in MODELS:
            acc[variant][m] = {}
            for size in SIZES:
                vals = per_seed(m, variant, size)
                acc[variant][m][size] = None if vals is None else over_seeds(vals)

    def diff(variant, a, b):
        va, vb = per_seed("poisson", variant, a), per_seed("gaussian", variant, b)
        if va is None or vb is None:
            return None
        return over_seeds([x - y for x, y in zip(va, vb, strict=True)])

    comparisons = {
        v: {
            "poisson@200-gaussian@1000": diff(v, "200", "1000"),
            "poisson@200-gaussian@200": diff(v, "200", "200"),
            "poisson@1000-gaussian@1000": diff(v, "1000", "1000"),
            "poisson@1000-gaussian@all": diff(v, "1000", "all"),
            "poisson@all-gaussian@all": diff(v, "all", "all"),
        }
        for v in FEATURES
    }
    return {"knn_accuracy": acc, "comparisons": comparisons}


def figure(summary: dict, sizes_n: dict, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    styles = {"official": "-", "ours": ":"}
    colors = {"poisson": "C3", "gaussian": "C0"}
    for variant, ls in styles.items():
        for m in MODELS:
            pts = [(sizes_n[s], summary["knn_accuracy"][variant][m][s]) for s in SIZES]
            pts = [(n, v) for n, v in pts if v is not None]
            if not pts:
                continue
            ax.errorbar(
                [n for n, _ in pts],
                [v["mean"] for _, v in pts],
                yerr=[v["se"] for _, v in pts],
                ls=ls,
                marker="o",
                capsize=3,
                color=colors[m],
                label=f"{'P-VAE' if m == 'poisson' else 'Gaussian VAE'} — "
                + ("official: " if variant == "official" else "ours: ")
                + ("log δr" if (m, variant) == ("poisson", "official") else "rates" if m == "poisson" else "loc")
                + (", random subsets" if variant == "official" else ", first n"),
            )
    ax.set_xscale("log")
    ax.set_xticks(sorted(sizes_n.values()), [str(n) for n in sorted(sizes_n.values())])
    ax.minorticks_off()
    ax.set_xlabel("labelled images")
    ax.set_ylabel("5-NN accuracy (held-out half)")
    ax.set_title("Fashion-MNIST, K = 10: mean ± s.e. over training seeds")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def redraw(path=RESULTS / "poisson_protocol.json") -> str:
    """The figure again from a result file (``python -c "import poisson_protocol as p; p.redraw()"`` in bench/)."""
    res = json.loads(path.read_text())
    return figure(res, {"200": 200, "1000": 1000, "all": res["probe_pool"]}, RESULTS / "poisson_protocol.png")


def main(argv=None):
    p = parser(__doc__, seeds="0,1,2", threads=1)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-images", type=int, default=None, help="training images (default: all 54,000)")
    p.add_argument("--subsets", type=int, default=100, help="random labelled subsets per size (official: 100)")
    p.add_argument("--latents", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-3)
    args = start(p, argv)
    if args.quick:
        seeds, epochs, limit, subsets = (0,), 2, 5000, 5
    else:
        seeds, epochs, limit, subsets = args.seeds, args.epochs, args.train_images, args.subsets
    data = load_data("fashion_mnist", pixels="continuous", seed=0, limit=limit)
    rows = []
    for seed in seeds:
        for name in MODELS:
            rows.append(run_one(name, seed, data, epochs, args.lr, args.latents, subsets, args.device))
            if not args.quick:  # each finished run also goes to a scratch file (a long run stopped keeps them)
                with open(Path(tempfile.gettempdir()) / "poisson_protocol_rows.jsonl", "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
                print(f"{name} seed {seed}: {rows[-1]['train_seconds']} s", flush=True)
    summary = summarise(rows, seeds)
    half = len(data.test_x) // 2
    sizes_n = {"200": 200, "1000": 1000, "all": half}
    out = {
        **summary,
        "verdict_inputs": {
            "paper_mnist": {"poisson@200": 0.815, "gaussian@1000": 0.813},
            "claim": "poisson@200 >= gaussian@1000 (N labels vs 5N)",
        },
        "runs": rows,
        "seeds": list(seeds),
        "epochs": epochs,
        "subsets_per_size": subsets,
        "latents": args.latents,
        "train_images": len(data.train_x),
        "probe_pool": half,
        "probe_eval": len(data.test_x) - half,
        "data": repr(data),
        "model": "MLP 784-256-256-K ReLU, Gaussian σ²=1/2 identity link (summed squared error), Adam lr cosine, "
        "batch 100, KL-β 1e-4 → 1 (1% constant, 50% linear) for both; P-VAE prior U[−6,−2], rate clamp 5",
        "figure": None,
    }
    if not args.quick:
        key = variant_key(args)  # a variant's figure beside the default's, e.g. poisson_protocol_epochs30.png
        name = "poisson_protocol" + ("" if key is None else "_" + re.sub(r"[^A-Za-z0-9]+", "", key))
        figure(summary, sizes_n, RESULTS / f"{name}.png")
        out["figure"] = f"bench/results/{name}.png"
    finish("poisson_protocol", out, args)


if __name__ == "__main__":
    main()
