"""The Variational Ladder Autoencoder (Zhao, Song & Ermon 2017) against the Markov hierarchical VAE under the
official code's protocol (ermongroup/Variational-Ladder-Autoencoder, read at its head; issue 35): the claim is
"the Markov VAE's upper layers go unused where the ladder's are used; the ladder's top layer is the most
informative; its log-likelihood is not worse".

Protocol, as the official code where one CPU core allows: ``vladder`` (3 layers × 2-d, the gated add) and ``hvae``
(3 Markov layers × 2-d) on Fashion-MNIST grey levels; the official likelihood ``reduce_mean(|x̂ − x|)·8·D`` = a
Laplace p(x|z) with scale b = 1/8 on a sigmoid mean (``model.likelihood: laplace``, ``laplace_scale: 0.125``);
BatchNorm after every hidden Linear (``model.options.batch_norm: true``, the official ``fc_bn_lrelu``); Adam 2e-4,
batch 100, ``--iterations`` optimiser steps (default 20,000: 37 epochs of the 54,000 training images); the KL
warm-up β = 1 − exp(−epoch/W) of ``ppl_vae/configs/vladder_fashion.yaml`` (W = 5 epochs of 540 steps:
``--kl-warmup-steps 2700``). Ours, not theirs: MLP ladder steps 256-256 as ``hierarchies.py`` (official: conv 64/128 +
FC 1024; the config's 512-512 is ``--hidden 512,512``), ReLU (official: leaky ReLU), fewer steps (the official
loop runs until stopped), Fashion-MNIST (MNIST is not here).
Variant ``--setting gaussian``: the Gaussian σ² = 1/8 likelihood of the official code's first version, no BatchNorm
(the setting of ``hierarchies.py``'s ``per_layer`` part).

Per layer l on held-out images: ``kl`` (E_q[log q(z_l|·) − log p(z_l|·)], 10 draws), ``active_units``
(Cov_x E_q[z_u] > 0.01), ``probe_logistic`` / ``probe_knn`` (5-NN) test accuracy from the layer's posterior mean
(``--probe-images`` labelled training codes); ``test_ll``: importance-sampled log p(x) (``--ll-samples`` draws on
``--ll-images`` test images; nats per image of the continuous density); the per-layer traversal (one layer's z over
a 7 × 7 grid on [−2, 2]², the others at their prior means: ``ppl_vae.viz.plot_layer_grids``) of the first seed,
``bench/results/vlae_official[_<setting>][_seed<s>]_<model>_traversal.png`` (seed 0: no ``_seed``).

    python bench/vlae_official.py --threads 1             # full: 20,000 steps per model, seed 0
    python bench/vlae_official.py --setting gaussian      # the variant
    python bench/vlae_official.py --quick                 # 2,000 images, 200 steps, seed 0 (< 5 min)
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import pyro
import torch
from _common import RESULTS, finish, layer_codes, parser, start

import ppl_vae
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import log_likelihood_summary
from ppl_vae.models import build_model
from ppl_vae.viz import plot_layer_grids

MODELS = ("vladder", "hvae")
METRICS = ("kl", "active_units", "probe_logistic", "probe_knn")
SETTINGS = {
    "official": dict(likelihood="laplace", laplace_scale=0.125, batch_norm=True),
    "gaussian": dict(likelihood="gaussian", sigma2=0.125, batch_norm=False),
}


def model_config(name: str, setting: str, hidden) -> ModelConfig:
    s = dict(SETTINGS[setting])
    options = {"layers": 3, "batch_norm": s.pop("batch_norm")}
    if name == "vladder":
        options["combination"] = "gated"
    return ModelConfig(name=name, link="sigmoid", arch="mlp", hidden=list(hidden), latent_dim=2, options=options, **s)


def run_one(name, seed, data, args, plan) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    m = build_model(model_config(name, args.setting, plan["hidden"]), data.shape, num_data=len(data.train_x))
    m = m.to(args.device)
    t0 = time.perf_counter()
    res = ppl_vae.train(
        m,
        data,
        TrainConfig(
            epochs=plan["epochs"],
            batch_size=100,
            lr=args.lr,
            kl_warmup_epochs=plan["warmup_epochs"],
            kl_warmup_shape="exp",
        ),
        seed=seed,
        device=args.device,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    m.eval()
    n_eval, n_probe = plan["eval_images"], plan["probe_images"]
    xt = data.test_x[:n_eval].to(args.device)
    xtr = data.train_x[:n_probe].to(args.device)
    t1 = time.perf_counter()
    with torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        layers = layer_codes(m, xtr, xt, data.train_y[:n_probe], data.test_y[:n_eval])
        ll = log_likelihood_summary(
            m.model, m.guide, data.test_x[: plan["ll_images"]].to(args.device), plan["ll_samples"], seed=seed
        )
    row = {
        "model": name,
        "seed": seed,
        "layers": layers,
        "test_ll": round(ll["log_likelihood"], 2),
        "test_ll_mc_se": round(ll["mc_std_error"], 3),
        "val_elbo_last": round(res.history[-1].get("val_elbo", float("nan")), 2),
        "train_seconds": round(seconds, 1),
        "eval_seconds": round(time.perf_counter() - t1, 1),
    }
    if plan["figures"] is not None and seed == plan["first_seed"]:
        path = Path(plan["figures"]) / f"{plan['stem']}_{name}_traversal.png"
        title = f"{name}, {args.setting}: one layer varies, the others at their prior means"
        plot_layer_grids(m, path, steps=7, span=2.0, title=title)
        row["traversal"] = str(path.relative_to(RESULTS.parents[1])) if path.is_relative_to(RESULTS) else str(path)
    return row


def _ms(values) -> dict:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.mean(values), 4), "sd": round(sd, 4), "per_seed": values}


def summarise(rows) -> dict:
    out = {}
    for name in MODELS:
        rs = [r for r in rows if r["model"] == name]
        if not rs:
            continue
        sites = sorted(rs[0]["layers"])
        out[name] = {
            "layers": {s: {k: _ms([r["layers"][s][k] for r in rs]) for k in METRICS} for s in sites},
            "test_ll": _ms([r["test_ll"] for r in rs]),
        }
    return out


def verdicts(s) -> dict:
    if not set(MODELS) <= set(s):
        return {}
    v, h = s["vladder"], s["hvae"]
    upper = ("z2", "z3")
    out = {
        "hvae_upper_active_units": [h["layers"][z]["active_units"]["mean"] for z in upper],
        "vladder_upper_active_units": [v["layers"][z]["active_units"]["mean"] for z in upper],
        "hvae_upper_unused": all(h["layers"][z]["active_units"]["mean"] == 0 for z in upper),
        "vladder_upper_used": all(v["layers"][z]["active_units"]["mean"] > 0 for z in upper),
    }
    probes = {z: v["layers"][z]["probe_logistic"]["mean"] for z in v["layers"]}
    kls = {z: v["layers"][z]["kl"]["mean"] for z in v["layers"]}
    out["vladder_most_informative_layer_probe"] = max(probes, key=probes.get)
    out["vladder_most_informative_layer_kl"] = max(kls, key=kls.get)
    out["vladder_top_layer_most_informative"] = out["vladder_most_informative_layer_probe"] == "z3"
    d = v["test_ll"]["mean"] - h["test_ll"]["mean"]
    spread = max(h["test_ll"]["sd"], v["test_ll"]["sd"])
    out["vladder_minus_hvae_test_ll"] = round(d, 2)
    out["vladder_ll_not_worse"] = d > -spread if spread > 0 else d >= 0
    return out


def main(argv=None):
    p = parser(__doc__, seeds="0", threads=1)
    p.add_argument("--setting", default="official", choices=tuple(SETTINGS), help="likelihood and BatchNorm")
    p.add_argument("--iterations", type=int, default=20000, help="optimiser steps per model (batch 100)")
    p.add_argument("--train-images", type=int, default=None, help="training images (default: all 54,000)")
    p.add_argument("--hidden", default="256,256", help="MLP widths of every ladder step (hierarchies.py's)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--kl-warmup-steps", type=int, default=2700, help="τ of β = 1 − exp(−t/τ), in steps")
    p.add_argument("--ll-samples", type=int, default=1000)
    p.add_argument("--ll-images", type=int, default=500)
    p.add_argument("--probe-images", type=int, default=5000)
    args = start(p, argv)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    if args.quick:
        seeds, limit, iterations, n_ll, S, n_eval, n_probe = (0,), 2000, 200, 50, 100, 500, 1000
    else:
        seeds, limit, iterations = args.seeds, args.train_images, args.iterations
        n_ll, S, n_eval, n_probe = args.ll_images, args.ll_samples, 2000, args.probe_images
    data = load_data("fashion_mnist", pixels="continuous", seed=0, limit=limit)
    steps_per_epoch = math.ceil(len(data.train_x) / 100)
    epochs = max(1, math.ceil(iterations / steps_per_epoch))
    tau = args.kl_warmup_steps * (iterations / args.iterations if args.quick else 1)  # quick: the same fraction
    warm = max(1, round(tau / steps_per_epoch))
    stem = "vlae_official" + ("" if args.setting == "official" else f"_{args.setting}")
    stem += "" if seeds[0] == 0 else f"_seed{seeds[0]}"  # another seed's figures beside seed 0's
    plan = {
        "hidden": hidden,
        "epochs": epochs,
        "warmup_epochs": warm,
        "eval_images": n_eval,
        "probe_images": n_probe,
        "ll_images": n_ll,
        "ll_samples": S,
        "first_seed": seeds[0],
        "stem": stem,
        "figures": tempfile.mkdtemp(prefix="vlae_official_") if args.quick else RESULTS,
    }
    rows = []
    for seed in seeds:
        for name in MODELS:
            rows.append(run_one(name, seed, data, args, plan))
            if not args.quick:  # each finished run also goes to a scratch file (a stopped run keeps them)
                with open(Path(tempfile.gettempdir()) / f"{stem}_rows.jsonl", "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
                print(f"{name} seed {seed}: {rows[-1]['train_seconds']} s train", flush=True)
    summary = summarise(rows)
    out = {
        "per_layer": summary,
        "test_ll": {m: v["test_ll"] for m, v in summary.items()},
        "verdicts": verdicts(summary),
        "runs": rows,
        "seeds": list(seeds),
        "setting": args.setting,
        "likelihood": SETTINGS[args.setting],
        "iterations": epochs * steps_per_epoch,
        "epochs": epochs,
        "kl_warmup": {"shape": "exp", "epochs": warm, "steps_per_epoch": steps_per_epoch},
        "train_images": len(data.train_x),
        "ll": {"images": n_ll, "samples": S},
        "probe": {"labelled_train_codes": n_probe, "test_images": n_eval},
        "model": f"MLP ladder steps {'-'.join(map(str, hidden))} ReLU, 3 layers x 2-d, sigmoid mean, Adam "
        f"{args.lr:g}, batch 100",
        "data": repr(data),
    }
    finish("vlae_official", out, args)


if __name__ == "__main__":
    main()
