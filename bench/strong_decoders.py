"""Strong decoders and posterior collapse on dynamically binarised Fashion-MNIST at 14×14 (a CPU-sized setting):
a factorised decoder, a full-receptive-field PixelCNN, the Variational Lossy Autoencoder and the MAE regulariser.

Runs (identical MLP encoders 196–256–16, the same 256-unit MLP decoder trunk h(z); Adam 1e-3, batch 100):
  (a) vae        factorised Bernoulli decoder, N(0, I) prior
  (b) vae_pixel  full gated PixelCNN (5 layers, 32 channels), N(0, I)           — expected to collapse
  (c) vlossy     local PixelCNN (3×3 window, 3 layers), autoregressive-flow prior (2 MADE flows)
  (d) vlossy_n   (c) with an N(0, I) prior (the prior ablation)
  (e) mae        (b) trained with the MAE regulariser (η = 1, γ = 0.5)
Issue 35's receptive-field sweep (``--runs``; a gated layer reaches one row further up): ``vae_pixel3`` (3 gated
layers, 3 of 14 rows), ``vlossy_g3`` (VLossy with that decoder: Chen et al.'s kind of local decoder),
``vae_pixel14`` (14 layers: every preceding pixel, the full PixelCNN) and ``mae14`` (MAE on it).
Measures per run on the first ``n_test`` test images: test_ll (importance-sampled log p̂(x), ``S`` draws of the
guide, nats, with its Monte Carlo s.e.), kl (KL(q ‖ p) per image, Monte Carlo: the prior may be a flow),
active_units (of 16; Burda et al.'s 0.01 threshold), mutual_information I_q(x; z), probe_acc (logistic probe of
the class from E_q[z | x], fitted on 2000 training images) and seconds per epoch; means over the training seeds.
``kl_by_epoch`` (per run and seed): KL(q ‖ p) on 200 test images after every epoch (one draw).
Figures: "lossy" reconstructions of (c) — one z = E_q[z | x] decoded four times
(bench/results/strong_decoders_lossy.png); ``kl_by_epoch`` per run and seed (strong_decoders_kl.png, for a variant
strong_decoders_kl_<runs>.png).

    python bench/strong_decoders.py --threads 1          # full (3 seeds)
    python bench/strong_decoders.py --runs vae_pixel --epochs 30 --seeds 0   # an ablation: a variant
    python bench/strong_decoders.py --quick              # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/strong_decoders.json).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pyro
import torch
from _common import RESULTS, finish, ll_mc_std_error, parser, start, subset_arg, variant

import ppl_vae
from ppl_vae import ModelConfig, build_model
from ppl_vae.config import TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import kl_per_site, latent_summary, log_likelihood
from ppl_vae.viz import save_image_grid

FULL = dict(limit=6000, epochs=8, n_test=500, S=100, probe_train=2000)
QUICK = dict(limit=500, epochs=1, n_test=50, S=20, probe_train=300)
COMMON = dict(latent_dim=16, hidden=[256], arch="mlp", channels=32)
RUNS = {
    "vae": dict(name="vae", likelihood="bernoulli"),
    "vae_pixel": dict(name="vae", likelihood="pixelcnn", pixelcnn_window=0, pixelcnn_layers=5),
    "vlossy": dict(
        name="vlossy",
        likelihood="pixelcnn",
        pixelcnn_window=3,
        pixelcnn_layers=3,
        options={"prior": "af", "num_flows": 2, "flow_hidden": [64, 64]},
    ),
    "vlossy_n": dict(
        name="vlossy", likelihood="pixelcnn", pixelcnn_window=3, pixelcnn_layers=3, options={"prior": "normal"}
    ),
    "mae": dict(
        name="mae", likelihood="pixelcnn", pixelcnn_window=0, pixelcnn_layers=5, options={"eta": 1.0, "gamma": 0.5}
    ),
    # issue 35: the receptive field as a sweep. A gated layer reaches one more row up, so 5 layers see 5 of 14 rows
    # (Chen et al.'s local decoder, 6 masked 3×3 layers at 28×28, sees ~6 of 28); 14 layers see every preceding
    # pixel of a 14×14 image: the full PixelCNN the collapse claim is about.
    "vae_pixel14": dict(name="vae", likelihood="pixelcnn", pixelcnn_window=0, pixelcnn_layers=14),
    "mae14": dict(
        name="mae", likelihood="pixelcnn", pixelcnn_window=0, pixelcnn_layers=14, options={"eta": 1.0, "gamma": 0.5}
    ),
    "vlossy_g3": dict(  # VLossy with Chen's kind of local decoder: stacked masked 3×3 layers, 3 of 14 rows
        name="vlossy",
        likelihood="pixelcnn",
        pixelcnn_window=0,
        pixelcnn_layers=3,
        options={"prior": "af", "num_flows": 2, "flow_hidden": [64, 64]},
    ),
    "vae_pixel3": dict(name="vae", likelihood="pixelcnn", pixelcnn_window=0, pixelcnn_layers=3),
}
DEFAULT_RUNS = ("vae", "vae_pixel", "vlossy", "vlossy_n", "mae")
KEYS = ("test_ll", "test_ll_mc_std_error", "kl", "active_units", "mutual_information", "probe_acc", "seconds_per_epoch")


def one_run(run: str, data, s: dict, seed: int) -> tuple[dict, object]:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = build_model(ModelConfig(**COMMON, **RUNS[run]), data.shape, num_data=len(data.train_x))
    tc = TrainConfig(objective="elbo", epochs=s["epochs"], batch_size=100, lr=1e-3)
    plan, kl_by_epoch = ppl_vae.plan_for(model), []
    x_kl = data.test_x[:200]

    def track(epoch, record, data_, _hook=plan.on_epoch_end):  # KL(q ‖ p) on 200 test images after each epoch
        _hook(epoch, record, data_)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            kl_by_epoch.append(round(float(sum(kl_per_site(model.model, model.guide, x_kl, 1).values())), 3))

    plan.on_epoch_end = track
    t0 = time.perf_counter()
    history = ppl_vae.train(model, data, tc, plan=plan, seed=seed, progress=False).history
    sec = (time.perf_counter() - t0) / s["epochs"]
    model.eval()
    x, y = data.test_x[: s["n_test"]], data.test_y[: s["n_test"]]
    ll, ess = log_likelihood(model.model, model.guide, x, num_samples=s["S"], seed=seed, return_ess=True)
    n = s["probe_train"]
    lat = latent_summary(model.model, model.guide, x, y, data.train_x[:n], data.train_y[:n], seed=seed)
    r = {
        "test_ll": float(ll.mean()),
        "test_ll_mc_std_error": ll_mc_std_error(ess, s["S"]),
        "kl": lat["kl_total"],
        "active_units": lat["active_units"]["z"],
        "mutual_information": lat["mutual_information"],
        "probe_acc": lat["probe_accuracy"],
        "seconds_per_epoch": sec,
        "final_val_elbo": history[-1]["val_elbo"],
        "kl_by_epoch": kl_by_epoch,
    }
    print(
        f"[{run} seed {seed}] "
        + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "kl_by_epoch")
        + f", KL by epoch {kl_by_epoch}",
        flush=True,
    )
    return r, model


def lossy_figure(model, x: torch.Tensor, path: Path) -> str:
    """Row per image: the input, then four decodings of the same z = E_q[z | x]."""
    torch.manual_seed(0)
    rec = model.lossy_reconstructions(x, repeats=4)  # (B, 4, C, H, W)
    tiles = torch.cat([x[:, None], rec], 1).reshape(-1, *x.shape[1:])
    return save_image_grid(tiles, path, nrow=5)


def kl_figure(by_seed: dict, path: Path) -> str:
    """KL(q ‖ p) on 200 test images after each epoch, one line per run and seed (``kl_by_epoch``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (run, seeds) in enumerate(by_seed.items()):
        for k, (_seed, r) in enumerate(sorted(seeds.items())):
            epochs = range(1, len(r["kl_by_epoch"]) + 1)
            ax.plot(epochs, r["kl_by_epoch"], color=f"C{i}", marker="o", ms=3, label=run if k == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("KL(q ‖ p), nats per image")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("KL after each epoch (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None):
    ap = parser(__doc__, seeds="0,1,2")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated subset of {list(RUNS)}")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: the mode's)")
    args = start(ap, argv)
    runs = subset_arg(ap, "--runs", args.runs, RUNS)
    s = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        s["epochs"] = args.epochs
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0, image_size=14)
    seeds = args.seeds[:1] if args.quick else args.seeds
    by_seed = {run: {} for run in runs}
    for seed in seeds:
        for run in runs:
            r, model = one_run(run, data, s, seed)
            by_seed[run][seed] = r
            if run == "vlossy" and seed == seeds[0] and not args.quick:
                lossy_figure(model, data.test_x[:8], RESULTS / "strong_decoders_lossy.png")
    out = {k: {run: statistics.mean(by_seed[run][sd][k] for sd in seeds) for run in runs} for k in KEYS}
    if not args.quick:
        name = "strong_decoders_kl.png" if variant(args) is None else f"strong_decoders_kl_{'_'.join(runs)}.png"
        kl_figure(by_seed, RESULTS / name)
    out["seeds"] = list(seeds)
    out["settings"] = {**s, **COMMON, "image_size": 14, "pixels": "binary_dynamic"}
    out["by_seed"] = {run: {str(k): v for k, v in d.items()} for run, d in by_seed.items()}
    ll, kl, au, probe = out["test_ll"], out["kl"], out["active_units"], out["probe_acc"]
    claims = {
        "pixelcnn_collapses": lambda: kl["vae_pixel"] < 1.0 and au["vae_pixel"] <= 1,
        "vlossy_and_mae_keep_the_code": lambda: (
            kl["vlossy"] > 1.0 and au["vlossy"] > 0 and kl["mae"] > 1.0 and au["mae"] > 0
        ),
        "vlossy_beats_factorised_vae_ll": lambda: ll["vlossy"] > ll["vae"],
        "af_prior_beats_normal_prior_ll": lambda: ll["vlossy"] > ll["vlossy_n"],
        "mae_probe_above_collapsed": lambda: probe["mae"] > probe["vae_pixel"] + 0.05,
        "mae_ll_within_3_nats_of_pixelcnn_vae": lambda: abs(ll["mae"] - ll["vae_pixel"]) < 3.0,
    }
    out["claims"] = {}
    for name, test in claims.items():  # a claim whose runs were not all trained is left out
        try:
            out["claims"][name] = bool(test())
        except KeyError:
            pass
    finish("strong_decoders", out, args, device="cpu")


if __name__ == "__main__":
    main()
