"""Latent families: Gaussian vs Epanechnikov guides (Qin & Huang 2024) and Poisson vs Gaussian/Laplace codes
(Vafaii, Galor & Yates 2024) on Fashion-MNIST, with the sparse-coding figure on natural-image patches.

Every method has the same networks (MLP 784-256-256-d, ReLU), data (Fashion-MNIST grey levels in [0, 1], the
Bernoulli cross-entropy as p(x|z), as in the EVAE paper), optimiser (Adam 3e-4, batch 100), epochs and seeds;
``ppl_vae.train`` trains each with its own training plan. Methods: ``gaussian`` (vae, closed-form KL),
``epanechnikov`` (vae_epanechnikov, the paper's eq. 10 with B = 0.1), ``epanechnikov_exact_kl`` (the same model
trained by the ELBO with the exact KL: an ablation), ``laplace`` (Laplace prior and guide, a bench-local VAE)
and ``poisson`` (vae_poisson, temperature 1 → 0.05 over the first half).

Per method, latent size d and seed, on held-out test images:
``recon_fid`` — FID of the reconstructions (decoded posterior means) against the same real images, in the
features of the library's offline classifier (``ppl_vae.evaluate.fid``); ``sharpness`` — mean over images of
the variance of the Laplacian ([0 1 0; 1 −4 1; 0 1 0]) of each reconstruction (the real images' value is
``real_sharpness``); ``test_elbo`` (Trace_ELBO, one sample, nats); ``test_ll`` (importance sampling with the
defensive proposal for compact guides; ``test_ll_plain_is`` without it, for the Epanechnikov rows);
``sparsity`` (Poisson: the fraction of zero counts in hard posterior samples); ``probe_acc_by_labels`` —
accuracy on test images of a logistic regression (standardised codes = posterior means, or rates) trained on the
codes of the first 200, 1,000 or 5,000 training images; ``knn_acc_by_labels`` — the same with a 5-nearest-neighbour
classifier on the raw codes (the Poisson VAE paper's downstream classifier). The sparse-coding figure is
``bench/sparse_coding.py``.

    python bench/latent_families.py            # full: 20,000 training images, 15 epochs, d 8/16/32/64, seeds 0,1,2
    python bench/latent_families.py --quick    # 5,000 images, 2 epochs, d 8/32, seed 0
The full default run also draws bench/results/latent_families_epanechnikov.png (FID and sharpness against d).
    python bench/latent_families.py --dims 32 --methods gaussian,epanechnikov --support-length 1   # B sweep
"""

from __future__ import annotations

import itertools
import statistics

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from _common import RESULTS, finish, parser, start, subset_arg, variant
from pyro.infer import Trace_ELBO
from torch import nn
from tqdm import tqdm

import ppl_vae
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import log_likelihood_summary, probe_accuracy, sharpness
from ppl_vae.evaluate.fid import FrechetDistance, train_feature_classifier
from ppl_vae.models import VAE, build_model
from ppl_vae.training import evaluate_elbo

METHODS = ("gaussian", "epanechnikov", "epanechnikov_exact_kl", "laplace", "poisson")
LABELS = (200, 1000, 5000)


class LaplacePrior(nn.Module):
    """p(z) = Π_k Laplace(0, 1/√2) (unit variance)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("_zero", torch.zeros(()))

    def forward(self, batch_size: int):
        loc = self._zero.new_zeros(batch_size, self.latent_dim)
        return dist.Laplace(loc, torch.full_like(loc, 2**-0.5)).to_event(1)


class LaplaceVAE(VAE):
    """A VAE with a Laplace prior and guide q(z|x) = Π_k Laplace(μ_k(x), b_k(x)) (closed-form KL)."""

    def guide_dist(self, x, c=None):
        loc, scale = self.encoder(x, c)
        return dist.Laplace(loc, scale).to_event(1)


def build(method: str, d: int, shape, num_data: int, likelihood="bernoulli", **model_kw):
    name, options = {
        "gaussian": ("vae", {}),
        "laplace": ("vae", {}),
        "epanechnikov": ("vae_epanechnikov", {"objective": "kernel_bound", "support_length": 0.1}),
        "epanechnikov_exact_kl": ("vae_epanechnikov", {"objective": "exact"}),
        "poisson": ("vae_poisson", {}),
    }[method]
    options = {**options, **model_kw.pop("options", {})}
    cfg = ModelConfig(
        name=name,
        likelihood=likelihood,
        arch="mlp",
        hidden=model_kw.pop("hidden", [256, 256]),
        latent_dim=d,
        options=options,
        **model_kw,
    )
    m = build_model(cfg, shape, num_data=num_data)
    if method == "laplace":
        m = LaplaceVAE(m.encoder, m.decoder, m.likelihood, d, prior=LaplacePrior(d), num_data=num_data)
    return m


def codes(model, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model.encode(x[s : s + 1000])[0] for s in range(0, len(x), 1000)]).cpu().numpy()


def probe(model, data, n_test: int) -> tuple[dict, dict]:
    """Accuracies by number of labels of a logistic regression on standardised codes and of a 5-NN classifier
    on the raw codes (the Poisson VAE paper's downstream classifier)."""
    ztr, zte = codes(model, data.train_x[: max(LABELS)]), codes(model, data.test_x[:n_test])
    ytr, yte = data.train_y[: max(LABELS)].numpy(), data.test_y[:n_test].numpy()
    return tuple(
        {str(n): round(acc, 4) for n, acc in probe_accuracy(ztr, ytr, zte, yte, LABELS, kind).items()}
        for kind in ("logistic", "knn")
    )


def evaluate(method, model, data, fid: FrechetDistance, args, S: int, n_ll: int, n_eval: int, seed: int) -> dict:
    model.eval()
    x = data.test_x[:n_eval]
    with torch.no_grad():
        rec = torch.cat([model.reconstruct(x[s : s + 500].to(args.device)).cpu() for s in range(0, len(x), 500)])
    rec = rec.clamp(0, 1)
    row = {"recon_fid": round(float(fid.score(rec)), 3), "sharpness": round(sharpness(rec), 5)}
    with torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        row["test_elbo"] = round(
            evaluate_elbo(
                model.model,
                model.guide,
                data,
                Trace_ELBO(max_plate_nesting=1),
                "test",
                500,
                args.device,
                len(data.train_x),
            ),
            3,
        )
        ll = log_likelihood_summary(model.model, model.guide, data.test_x[:n_ll].to(args.device), S)
        row["test_ll"], row["test_ll_mc_se"] = round(ll["log_likelihood"], 3), round(ll["mc_std_error"], 4)
        row["defensive_sites"] = ll["defensive_sites"]
        if method.startswith("epanechnikov"):
            plain = log_likelihood_summary(
                model.model, model.guide, data.test_x[:n_ll].to(args.device), S, defensive=False
            )
            row["test_ll_plain_is"] = round(plain["log_likelihood"], 3)
        if method == "poisson":
            with torch.no_grad():
                z = model.guide_dist(x.to(args.device)).sample()  # hard counts (eval mode)
            row["sparsity"] = round(float((z == 0).float().mean()), 4)
            row["mean_count"] = round(float(z.mean()), 4)
    row["probe_acc_by_labels"], row["knn_acc_by_labels"] = probe(model, data, n_eval)
    return row


# ------------------------------------------------------------------------------------------------ summary
def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "mean": round(statistics.mean(values), 4),
        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def summarise(rows: list[dict], dims, methods) -> dict:
    out = {k: {} for k in ("recon_fid", "sharpness", "test_elbo", "test_ll", "test_ll_plain_is", "sparsity")}
    out["probe_acc_by_labels"], out["knn_acc_by_labels"] = {}, {}
    for m in methods:
        for per_method in out.values():
            per_method[m] = {}
        for d in dims:
            mine = [r for r in rows if r["method"] == m and r["d"] == d]
            for key in ("recon_fid", "sharpness", "test_elbo", "test_ll", "test_ll_plain_is", "sparsity"):
                s = _mean_sd([r.get(key) for r in mine])
                if s is not None:
                    out[key][m][str(d)] = s
            for key in ("probe_acc_by_labels", "knn_acc_by_labels"):
                out[key][m][str(d)] = {str(n): _mean_sd([r[key][str(n)] for r in mine]) for n in LABELS}
    for key in list(out):
        out[key] = {m: v for m, v in out[key].items() if v}
    return out


def _n_vs_5n(acc: dict, dims) -> dict:
    """accuracy(method, N labels) − accuracy(gaussian, 5N labels), per d."""
    return {
        m: {
            str(d): {
                f"{m}@{n}-gaussian@{5 * n}": round(
                    acc[m][str(d)][str(n)]["mean"] - acc["gaussian"][str(d)][str(5 * n)]["mean"], 4
                )
                for n in LABELS
                if 5 * n in LABELS
            }
            for d in dims
        }
        for m in ("poisson", "laplace")
        if m in acc
    }


def verdicts(s: dict, dims) -> dict:
    fid, sharp = s["recon_fid"], s["sharpness"]
    if not {"gaussian", "epanechnikov"} <= set(fid):
        return {}
    gap = {str(d): round(fid["gaussian"][str(d)]["mean"] - fid["epanechnikov"][str(d)]["mean"], 3) for d in dims}
    sharper = {str(d): sharp["epanechnikov"][str(d)]["mean"] > sharp["gaussian"][str(d)]["mean"] for d in dims}
    return {
        "fid_gaussian_minus_epanechnikov": gap,
        "epanechnikov_sharper": sharper,
        "fid_gap_grows_with_d": all(gap[str(a)] < gap[str(b)] for a, b in itertools.pairwise(dims)),
        "probe_n_vs_gaussian_5n": _n_vs_5n(s["probe_acc_by_labels"], dims),
        "knn_n_vs_gaussian_5n": _n_vs_5n(s["knn_acc_by_labels"], dims),
    }


def figure(summary: dict, path) -> str:
    """Reconstruction FID and sharpness against the latent size d (mean ± sd over seeds), one line per method that
    has them (the Gaussian and Epanechnikov rows and the exact-KL ablation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    panels = (
        ("recon_fid", "reconstruction FID (lower is better)"),
        ("sharpness", "sharpness (variance of Laplacian)"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for m in ("gaussian", "epanechnikov", "epanechnikov_exact_kl"):
            per_d = summary[key].get(m, {})
            if not per_d:
                continue
            dims = sorted(per_d, key=int)
            ax.errorbar(
                [int(d) for d in dims],
                [per_d[d]["mean"] for d in dims],
                yerr=[per_d[d]["sd"] for d in dims],
                marker="o",
                capsize=3,
                label=m,
            )
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ticks = sorted({int(d) for m in summary[key].values() for d in m})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("latent size d")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None):
    p = parser(__doc__, seeds="0,1,2", threads=1)
    p.add_argument("--dims", default="8,16,32,64")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--ll-samples", type=int, default=500)
    p.add_argument("--ll-images", type=int, default=500)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    p.add_argument("--support-length", type=float, default=0.1, help="B of the epanechnikov method's weight 3B/(5M)")
    args = start(p, argv)
    methods = tuple(subset_arg(p, "--methods", args.methods, METHODS, allow_empty=False))
    if args.support_length <= 0:
        p.error(f"--support-length must be positive, got {args.support_length}")
    if args.quick:
        dims, seeds, epochs, limit, S, n_ll, n_eval = (8, 32), (0,), 2, 5000, 100, 50, 500
    else:
        dims, seeds, epochs, limit = (
            tuple(int(d) for d in args.dims.split(",")),
            args.seeds,
            args.epochs,
            args.train_images,
        )
        S, n_ll, n_eval = args.ll_samples, args.ll_images, 2000
    data = load_data("fashion_mnist", pixels="continuous", seed=0, limit=limit)
    extractor = train_feature_classifier(data, epochs=5, seed=0, device=args.device)
    fid = FrechetDistance(extractor, data.test_x[:n_eval])
    rows = []
    jobs = [(s, d, m) for s in seeds for d in dims for m in methods]
    for seed, d, method in tqdm(jobs, desc="latent_families", disable=args.quick):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        extra = {"options": {"support_length": args.support_length}} if method == "epanechnikov" else {}
        model = build(method, d, data.shape, len(data.train_x), **extra).to(args.device)
        res = ppl_vae.train(
            model,
            data,
            TrainConfig(objective="auto", epochs=epochs, batch_size=100, lr=3e-4),
            seed=seed,
            device=args.device,
            progress=False,
        )
        row = {
            "method": method,
            "d": d,
            "seed": seed,
            "val_loss_last": round(res.history[-1]["val_elbo"], 3),
            **evaluate(method, model, data, fid, args, S, n_ll, n_eval, seed),
        }
        rows.append(row)
    summary = summarise(rows, dims, methods)
    out = {
        **summary,
        "real_sharpness": round(sharpness(data.test_x[:n_eval]), 5),
        "verdicts": verdicts(summary, dims),
        "runs": rows,
        "dims": list(dims),
        "seeds": list(seeds),
        "epochs": epochs,
        "train_images": len(data.train_x),
        "test_images_eval": n_eval,
        "ll": {"images": n_ll, "samples": S},
        "fid_extractor": {"name": fid.name, "test_accuracy": extractor.info.get("test_accuracy")},
        "data": repr(data),
        "model": "MLP 784-256-256-d ReLU, Bernoulli on grey levels, Adam 3e-4, batch 100",
        "support_length": args.support_length,
    }
    if not args.quick and variant(args) is None:
        figure(summary, RESULTS / "latent_families_epanechnikov.png")
    finish("latent_families", out, args)


if __name__ == "__main__":
    main()
