"""Hierarchical and clustered latents: the Variational Ladder Autoencoder (Zhao, Song & Ermon 2017) against the
Markov hierarchical VAE and a flat VAE, and VLAC (Willetts, Roberts & Holmes 2019) against a flat mixture-prior
VAE and a VAE + GaussianMixture, side by side (same trunks, data, epochs and seeds), trained with ``ppl_vae.train``.

Part 1, ``per_layer`` (Fashion-MNIST grey levels, Gaussian p(x|z) with σ² = 1/8 on a sigmoid mean, the official
VLAE likelihood): ``vladder`` (3 layers × 2-d, gated add), ``hvae`` (3 Markov layers × 2-d) and ``vae`` (one
6-d layer); MLP steps 256-256, Adam 1e-3, batch 100, KL warm-up over the first 2 epochs. Per layer l on held-out
images: ``kl`` (E_q[log q(z_l|·) − log p(z_l|·)], 10 draws), ``active_units`` (Cov_x E_q[z_u] > 0.01), and
``probe_logistic`` / ``probe_knn`` (5-NN) accuracy from that layer's posterior mean (5,000 labelled training
codes); ``test_ll``: importance-sampled log p(x) (``--ll-samples`` draws per image: the largest this CPU budget
allows, not the paper's 5,000).

Part 2, ``cluster_acc`` (test split, 10 clusters, Hungarian-matched accuracy; NMI and ARI beside it) on sklearn's
digits and on Fashion-MNIST: ``vae_gmm`` (a VAE with a 10-d code, then a full-covariance GaussianMixture fitted to
the training codes), ``mixture_vae`` (``vlac`` with one layer: the flat mixture-prior VAE) and ``vlac`` (3 layers,
a mixture on every layer); Bernoulli p(x|z) on grey levels, MLP 256-256, Adam 1e-3, batch 100, mixture warm-up of
a third of the epochs. Score keys per method: ``chosen`` (the claim's test: the layer picked without labels, below),
``top`` (the top layer, fixed in advance: the earlier protocol, kept for comparison) and ``z1`` … ``zL`` (every
layer, so the cost of the choice is visible); ``vae_gmm`` has one code, its ``chosen`` is its ``top``.

Which layer clusters (``cluster_layers``, label-free, on training images only): per mixture layer l, ``kl`` =
E_x E_q[log q(z_l|x) − log p(z_l)] (10 draws; p the learned mixture), ``active_units`` (Cov_x E_q[z_u] > 0.01) and,
as a diagnostic only, ``mean_max_resp`` = E_x max_c p(c_l | μ_l(x)). A layer is *used* when it has ≥ 1 active unit;
the chosen layer is the used layer with the highest KL (no used layer: the highest KL). Why KL and not the
responsibilities: E_x KL(q(z_l|x) ‖ p(z_l)) = I_q(x; z_l) + KL(q(z_l) ‖ p(z_l)) bounds how much of x the layer
carries, and a collapsed layer (q(z_l|x) ≈ p(z_l) for every x) has KL ≈ 0 however its mixture is fitted; the
responsibilities are not safe that way, as a mixture fitted to a collapsed layer's noise can put every point in one
component with near-certainty, which reads as a confident (low-entropy) clustering. The layers all have the same
width, so their KLs are comparable.

    python bench/hierarchies.py            # full: 20,000 Fashion-MNIST images, 10 epochs (digits: 60), seeds 0-4
    python bench/hierarchies.py --quick    # 2,000 images, 2 epochs (digits: 6), seed 0
"""

from __future__ import annotations

import statistics

import pyro
import torch
from _common import finish, layer_codes, parser, start
from sklearn.mixture import GaussianMixture
from tqdm import tqdm

import ppl_vae
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import (
    active_units,
    cluster_scores,
    kl_per_site,
    log_likelihood_summary,
)
from ppl_vae.models import build_model

HIER = {
    "vladder": dict(name="vladder", latent_dim=2, options={"layers": 3, "combination": "gated"}),
    "hvae": dict(name="hvae", latent_dim=2, options={"layers": 3}),
    "vae": dict(name="vae", latent_dim=6, options={}),
}


def fit(cfg: ModelConfig, data, epochs: int, seed: int, args, warmup_kl: int = 0, shape: str = "linear"):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    m = build_model(cfg, data.shape, num_data=len(data.train_x)).to(args.device)
    ppl_vae.train(
        m,
        data,
        TrainConfig(epochs=epochs, batch_size=100, lr=1e-3, kl_warmup_epochs=warmup_kl, kl_warmup_shape=shape),
        seed=seed,
        device=args.device,
        progress=False,
    )
    return m.eval()


def per_layer_run(method, data, epochs, seed, args, n_eval, n_ll, S) -> dict:
    spec = HIER[method]
    options = {**spec["options"], **({"combination": args.combination} if method == "vladder" else {})}
    cfg = ModelConfig(
        name=spec["name"],
        likelihood="gaussian",
        sigma2=0.125,
        link="sigmoid",
        arch="mlp",
        hidden=[256, 256],
        latent_dim=spec["latent_dim"],
        options=options,
    )
    m = fit(cfg, data, epochs, seed, args, warmup_kl=min(args.kl_warmup, epochs - 1), shape=args.kl_shape)
    xt = data.test_x[:n_eval].to(args.device)
    xtr = data.train_x[:5000].to(args.device)
    with torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        layers = layer_codes(m, xtr, xt, data.train_y[:5000], data.test_y[:n_eval])
        ll = log_likelihood_summary(m.model, m.guide, data.test_x[:n_ll].to(args.device), S)
    return {
        "method": method,
        "seed": seed,
        "layers": layers,
        "test_ll": round(ll["log_likelihood"], 3),
        "test_ll_mc_se": round(ll["mc_std_error"], 4),
    }


def cluster_run(method, data, epochs, seed, args) -> dict:
    common = dict(likelihood="bernoulli", arch="mlp", hidden=[256, 256])
    warm = max(1, epochs // 3)
    if method == "vae_gmm":
        cfg = ModelConfig(name="vae", latent_dim=10, **common)
    else:
        layers = 1 if method == "mixture_vae" else 3
        cfg = ModelConfig(
            name="vlac",
            latent_dim=10 if layers == 1 else 4,
            **common,
            options={"layers": layers, "num_components": 10, "warmup_epochs": warm},
        )
    m = fit(cfg, data, epochs, seed, args)
    xt, yt = data.test_x.to(args.device), data.test_y
    layers, chosen = {}, None
    with torch.no_grad():
        if method == "vae_gmm":
            ztr = torch.cat([m.encode(xb)[0] for xb in data.train_x.to(args.device).split(1000)]).cpu().numpy()
            zte = torch.cat([m.encode(xb)[0] for xb in xt.split(1000)]).cpu().numpy()
            gmm = GaussianMixture(10, covariance_type="full", random_state=seed, reg_covar=1e-4).fit(ztr)
            pred = {"top": torch.as_tensor(gmm.predict(zte))}
            pred["chosen"] = pred["top"]
        else:
            layers = layer_use(m, data.train_x[:N_SELECT].to(args.device), seed)
            chosen = choose_layer(layers)
            pred = {"top": torch.cat([m.cluster(xb) for xb in xt.split(1000)]).cpu()}
            for l in m.mixture_layers:
                pred[f"z{l}"] = torch.cat([m.cluster(xb, l) for xb in xt.split(1000)]).cpu()
            pred["chosen"] = pred[chosen]
    scores = {k: {s: round(v, 4) for s, v in cluster_scores(yt, p).items()} for k, p in pred.items()}
    return {"method": method, "seed": seed, "scores": scores, "layers": layers, "chosen_layer": chosen}


N_SELECT = 2000  # training images for the label-free layer choice
LAYER_KEYS = ("kl", "active_units", "mean_max_resp")


def layer_use(m, x, seed) -> dict:
    """Per mixture layer of a trained ``vlac``, from (unlabelled) training images ``x``: KL(q(z_l|x) ‖ p(z_l))
    (10 draws), active units and the mean max responsibility E_x max_c p(c_l | μ_l(x))."""
    with torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        kl = kl_per_site(m.model, m.guide, x, num_samples=10)
        au = active_units(m.guide, x, num_samples=10)
    out = {}
    for l in m.mixture_layers:
        with torch.no_grad():
            mu = torch.cat([m.encoder(xb)[l - 1][0] for xb in x.split(1000)])
            resp = m.mixtures[str(l)].cluster_log_probs(mu).exp()
        out[f"z{l}"] = {
            "kl": round(kl[f"z{l}"], 3),
            "active_units": au[f"z{l}"]["active"],
            "dims": au[f"z{l}"]["dims"],
            "mean_max_resp": round(float(resp.max(-1).values.mean()), 4),
        }
    return out


def choose_layer(layers: dict) -> str:
    """The used layer (≥ 1 active unit) with the highest KL; with no used layer, the highest KL (module
    docstring)."""
    used = [k for k, v in layers.items() if v["active_units"] >= 1] or list(layers)
    return max(used, key=lambda k: layers[k]["kl"])


def _ms(values):
    values = list(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": round(statistics.mean(values), 4), "se": round(se, 4), "per_seed": values}


def summarise(per_layer_rows, cluster_rows) -> dict:
    per_layer = {}
    for method in HIER:
        rows = [r for r in per_layer_rows if r["method"] == method]
        if not rows:
            continue
        per_layer[method] = {
            "test_ll": _ms(r["test_ll"] for r in rows),
            "layers": {
                site: {
                    k: _ms(r["layers"][site][k] for r in rows)
                    for k in ("kl", "active_units", "probe_logistic", "probe_knn")
                }
                for site in rows[0]["layers"]
            },
        }
    clusters, layer_use_summary = {}, {}
    for dataset, rows in cluster_rows.items():
        if not rows:
            continue
        clusters[dataset] = {}
        for method in ("vae_gmm", "mixture_vae", "vlac"):
            mine = [r for r in rows if r["method"] == method]
            clusters[dataset][method] = {
                k: {s: _ms(r["scores"][k][s] for r in mine) for s in ("accuracy", "nmi", "ari")}
                for k in mine[0]["scores"]
            }
            if mine[0].get("layers"):
                use = layer_use_summary.setdefault(dataset, {})
                use[method] = {
                    "layers": {
                        site: {k: _ms(r["layers"][site][k] for r in mine) for k in LAYER_KEYS}
                        for site in mine[0]["layers"]
                    },
                    "used_layers": [sum(v["active_units"] >= 1 for v in r["layers"].values()) for r in mine],
                    "chosen_layer": [r["chosen_layer"] for r in mine],
                }
    return {"per_layer": per_layer, "cluster_acc": clusters, "cluster_layers": layer_use_summary}


def _ladder_verdicts(pl) -> dict:
    out = {}
    top = "z3"
    if not {"vladder", "hvae"} <= set(pl):
        return out
    out["hvae_top_kl_below_vladder"] = (
        pl["hvae"]["layers"][top]["kl"]["mean"] < pl["vladder"]["layers"][top]["kl"]["mean"]
    )
    out["hvae_top_au_below_vladder"] = (
        pl["hvae"]["layers"][top]["active_units"]["mean"] < pl["vladder"]["layers"][top]["active_units"]["mean"]
    )
    probes = {site: v["probe_logistic"]["mean"] for site, v in pl["vladder"]["layers"].items()}
    out["vladder_most_informative_layer"] = max(probes, key=probes.get)
    d = pl["vladder"]["test_ll"]["mean"] - pl["hvae"]["test_ll"]["mean"]
    spread = max(
        statistics.stdev(pl[m]["test_ll"]["per_seed"]) if len(pl[m]["test_ll"]["per_seed"]) > 1 else 0.0
        for m in ("vladder", "hvae")
    )
    out["vladder_minus_hvae_test_ll"] = round(d, 3)
    out["ll_within_seed_spread"] = d > -spread
    return out


def verdicts(s) -> dict:
    out = _ladder_verdicts(s["per_layer"])
    for dataset, c in s["cluster_acc"].items():
        acc = {m: c[m]["chosen"]["accuracy"]["mean"] for m in c}
        out[f"{dataset}_vlac_ge_mixture"] = acc["vlac"] >= acc["mixture_vae"]
        out[f"{dataset}_both_beat_vae_gmm"] = min(acc["vlac"], acc["mixture_vae"]) > acc["vae_gmm"]
        top = c["vlac"]["top"]["accuracy"]["mean"]
        out[f"{dataset}_vlac_top_layer_ge_mixture"] = top >= acc["mixture_vae"]  # the earlier, fixed-layer protocol
        use = s.get("cluster_layers", {}).get(dataset, {}).get("vlac")
        if use:
            out[f"{dataset}_vlac_min_used_layers"] = min(use["used_layers"])
            out[f"{dataset}_vlac_two_layers_used"] = min(use["used_layers"]) >= 2
    return out


def main(argv=None):
    p = parser(__doc__, seeds="0,1,2,3,4", threads=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--digits-epochs", type=int, default=60)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--ll-samples", type=int, default=1000)
    p.add_argument("--methods", default="vladder,hvae,vae", help="the per-layer rows to run (none: no per-layer part)")
    p.add_argument("--clusters", default="yes", choices=("yes", "no"), help="run the clustering part")
    p.add_argument("--combination", default="gated", choices=("gated", "concat"), help="vladder's combination")
    p.add_argument("--kl-warmup", type=int, default=2, help="KL warm-up epochs (per-layer part)")
    p.add_argument("--kl-shape", default="linear", choices=("linear", "exp"), help="KL warm-up shape")
    args = start(p, argv)
    if args.quick:
        seeds, epochs, d_epochs, limit, n_eval, n_ll, S = (0,), 2, 6, 2000, 500, 50, 100
    else:
        seeds, epochs, d_epochs, limit = args.seeds, args.epochs, args.digits_epochs, args.train_images
        n_eval, n_ll, S = 2000, 500, args.ll_samples
    fashion = load_data("fashion_mnist", pixels="continuous", seed=0, limit=limit)
    digits = load_data("digits", seed=0)
    methods = [m for m in args.methods.split(",") if m and m != "none"]
    if not set(methods) <= set(HIER):
        p.error(f"--methods must name rows among {sorted(HIER)}, got {args.methods!r}")
    clusters = ("vae_gmm", "mixture_vae", "vlac") if args.clusters == "yes" else ()
    jobs = (
        [("per_layer", m, s) for s in seeds for m in methods]
        + [("digits", m, s) for s in seeds for m in clusters]
        + [("fashion_mnist", m, s) for s in seeds for m in clusters]
    )
    per_layer_rows, cluster_rows = [], {"digits": [], "fashion_mnist": []}
    for part, method, seed in tqdm(jobs, desc="hierarchies", disable=args.quick):
        if part == "per_layer":
            per_layer_rows.append(per_layer_run(method, fashion, epochs, seed, args, n_eval, n_ll, S))
        else:
            data, e = (digits, d_epochs) if part == "digits" else (fashion, epochs)
            cluster_rows[part].append(cluster_run(method, data, e, seed, args))
    summary = summarise(per_layer_rows, cluster_rows)
    out = {
        **summary,
        "test_ll": {m: v["test_ll"] for m, v in summary["per_layer"].items()},
        "verdicts": verdicts(summary),
        "runs": {"per_layer": per_layer_rows, "cluster": cluster_rows},
        "seeds": list(seeds),
        "epochs": epochs,
        "digits_epochs": d_epochs,
        "ll": {"images": n_ll, "samples": S},
        "data": {"fashion_mnist": repr(fashion), "digits": repr(digits)},
    }
    finish("hierarchies", out, args)


if __name__ == "__main__":
    main()
