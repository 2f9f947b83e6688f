"""Parity: our Poisson VAE (``vae_poisson``) beside the authors' own (hadivafaii/PoissonVAE, Vafaii, Galor & Yates
2024) on the same Fashion-MNIST arrays, network, initial weights, optimiser, epochs, batch size and seeds.

Headline metric (the paper's MNIST table): 5-NN accuracy on the encoder's log δr of held-out images at 200 / 1,000 /
all labels (``bench/poisson_protocol.py``'s ``knn_accuracies`` — the official ``knn_analysis`` probe, which the
worker also runs on the official features as a cross-check), and the fraction of zero counts (the official
``sprs/portion_zeros``: hard counts, t = 0, of the held-out images).

Same on both sides: the exported arrays (our ``load_data("fashion_mnist", pixels="continuous", seed=0)`` train split
→ the official ``x_trn.npy``, our test split → its ``x_vld.npy``, the probe's images); K = 10; the network — our MLP
784-256-256-K ReLU encoder (log δr = first K outputs of its last layer) and K-256-256-784 decoder, put in place of the
official ``mlp`` modules (a shim below: the official ``mlp`` option is a 784-wide residual dense layer with
expansion 16, which we do not build) — with our initial weights and our initial prior log-rates (both U[−6, −2]);
Adam (β = 0.9, 0.999), lr 2e-3 with a cosine schedule, batch 100, the official KL-β schedule (1e-4 for 1% of the
steps, then linear to 1 over 50%), temperature 1 → 0.05 over the first half, posterior log-rate soft-clamped at 5,
summed squared error; no gradient clipping and no lr warm-up on either side (the official MNIST defaults are
clip 1000 and 1% warm-up; ours has neither).

Not the same (stated, not removed): the official trainer anneals temperature and cosine lr per step (lr floor 1e-5),
ours per epoch (temperature) / per epoch (lr, floor 0); the shuffling and the relaxed-count noise come from each
side's own random streams (same seed integers, different draws); the official default optimiser is Adamax (we run
both with Adam, the optimiser our trainer has).

    python bench/parity/poisson_vae.py --official /tmp/official/PoissonVAE            # full: 54,000 images,
                                                                                       # 15 epochs, seeds 0,1,2
    python bench/parity/poisson_vae.py --official /tmp/official/PoissonVAE --quick    # 1 seed, 2 epochs, < 5 min
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

REPO = "hadivafaii/PoissonVAE"
COMMIT = "d6accdc79b7510a6e388db6e11a5ad0202a4a178"  # head on 2026-02-06, "config base cleanup"
PROBE_FILE = "main/train_vae.py"
K = 10


# ------------------------------------------------------------------------------------------------ worker (official)
def _shims() -> None:
    """Stand-ins for modules the official import chain names but never calls on this path; our venv does not have
    them and they are not needed to train or probe (each only prints or draws)."""
    import builtins
    import importlib.util

    if importlib.util.find_spec("rich") is None:  # `from rich import print` (coloured printing) -> builtins.print
        rich = types.ModuleType("rich")
        rich.print = builtins.print
        sys.modules["rich"] = rich
    if importlib.util.find_spec("seaborn") is None:  # `import seaborn as sns` in utils/plotting (figures only)
        sys.modules["seaborn"] = types.ModuleType("seaborn")
    if importlib.util.find_spec("statsmodels") is None:  # analysis/stats multipletests (result tables only)
        for name in ("statsmodels", "statsmodels.stats", "statsmodels.stats.multitest"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["statsmodels.stats.multitest"].multipletests = None


def _our_networks(vae, state: dict) -> None:
    """Shim: replace the official ``mlp`` encoder/decoder (a 784-wide ResDenseLayer) by our 784-256-256-K ReLU MLP
    with our initial weights, and set the prior log-rates to ours, so both sides start from the same parameters.
    ``encode`` computes ``fc_enc(enc(flatten(x)))`` and ``decode`` ``dec(fc_dec(z))`` for the official ``mlp`` type,
    so the swap keeps the official forward pass, loss, distributions and trainer untouched."""
    import torch
    from torch import nn

    enc = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
    fc_enc = nn.Linear(256, K)
    fc_dec = nn.Linear(K, 256)
    dec = nn.Sequential(nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 784))
    with torch.no_grad():
        enc[0].weight.copy_(state["encoder.head.net.0.weight"])
        enc[0].bias.copy_(state["encoder.head.net.0.bias"])
        enc[2].weight.copy_(state["encoder.head.net.2.weight"])
        enc[2].bias.copy_(state["encoder.head.net.2.bias"])
        fc_enc.weight.copy_(state["encoder.head.net.4.weight"][:K])  # our log δr: the first K outputs (the loc)
        fc_enc.bias.copy_(state["encoder.head.net.4.bias"][:K])
        fc_dec.weight.copy_(state["decoder.net.0.weight"])
        fc_dec.bias.copy_(state["decoder.net.0.bias"])
        dec[1].weight.copy_(state["decoder.net.2.weight"])
        dec[1].bias.copy_(state["decoder.net.2.bias"])
        dec[3].weight.copy_(state["decoder.net.4.weight"])
        dec[3].bias.copy_(state["decoder.net.4.bias"])
        vae.log_rate.copy_(state["log_r"].reshape(vae.log_rate.shape))
    vae.enc, vae.fc_enc, vae.fc_dec, vae.dec = enc, fc_enc, fc_dec, dec


def worker(spec_path: str) -> None:
    """The official side (cwd = the checkout): train the official PoissonVAE with the official TrainerVAE, then its
    ``forward('vld', temp=0)`` features and its ``knn_analysis``; writes the spec's result JSON and features npz."""
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, ".")
    _shims()
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    from analysis.eval import knn_analysis
    from main.config_vae import ConfigPoisVAE, ConfigTrainVAE, default_configs
    from main.train_vae import TrainerVAE
    from main.vae import PoissonVAE

    cfg_vae, cfg_tr = default_configs(dataset="FashionMNIST", model_type="poisson", archi_type="mlp|mlp")
    cfg_vae.update(n_latents=K, seed=spec["seed"], save=False, data_dir=spec["data_dir"])
    cfg_tr.update(
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        optimizer="adam",  # official default adamax_fast; ours is Adam
        warmup_portion=0.0,  # official MNIST 0.01; our trainer has no lr warm-up
        grad_clip=None,  # official MNIST 1000; ours unclipped
    )
    vae = PoissonVAE(ConfigPoisVAE(**cfg_vae))
    _our_networks(vae, torch.load(spec["init"], weights_only=True))
    tr = TrainerVAE(model=vae, cfg=ConfigTrainVAE(**cfg_tr), device="cpu")
    tr.cfg.no_wandb = True
    t0 = time.perf_counter()
    tr.train(save=False)
    seconds = time.perf_counter() - t0
    data, loss, etc = tr.forward("vld", temp=0.0)
    y = tr.dl_vld.dataset.tensors[1].numpy().astype(int)
    _, summary = knn_analysis(x=etc["log_dr"], y=y, seed=spec["seed"], sizes=[200, 1000], n_iter=spec["subsets"])
    np.savez(spec["features"], log_dr=etc["log_dr"], counts=data["z"])
    kl = loss["kl_diag"].ravel()
    out = {
        "train_seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / spec["epochs"], 2),
        "zero_count_fraction": round(float(np.mean(data["z"] == 0)), 4),
        "active_latents": int((kl > 0.01).sum()),
        "kl_per_latent": [round(float(v), 4) for v in kl],
        "val_mse_per_image": round(float(loss["mse"].mean()), 2),
        "official_knn_analysis": {str(k): round(float(v), 4) for k, v in summary["mean"].items()},
        "n_exp_last": int(vae.n_exp),
    }
    Path(spec["result"]).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------ driver (ours)
def _export(data, folder: Path) -> None:
    """Our arrays as the official FashionMNIST ``processed`` folder (x_trn/y_trn/x_vld/y_vld .npy, N×1×28×28)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "x_trn.npy", data.train_x.numpy().astype(np.float32))
    np.save(folder / "y_trn.npy", data.train_y.numpy().astype(np.int64))
    np.save(folder / "x_vld.npy", data.test_x.numpy().astype(np.float32))
    np.save(folder / "y_vld.npy", data.test_y.numpy().astype(np.int64))


def ours(seed: int, data, epochs: int, lr: float, init_path: Path) -> tuple[dict, object]:
    """Train our P-VAE (``bench/poisson_protocol.py``'s build and schedules) from the initial weights saved at
    ``init_path``; returns (row, features of the test images)."""
    import poisson_protocol as pp
    import pyro
    import torch

    import ppl_vae
    from ppl_vae.config import TrainConfig

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = pp.build("poisson", K, data.shape, len(data.train_x))
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, init_path)
    t0 = time.perf_counter()
    ppl_vae.train(
        model,
        data,
        TrainConfig(objective="auto", epochs=epochs, batch_size=100, lr=lr, lr_schedule="cosine"),
        seed=seed,
        device="cpu",
        progress=False,
    )
    seconds = time.perf_counter() - t0
    model.eval()
    x = data.test_x
    with torch.no_grad():
        q = model.guide_dist(x)
        counts = q.sample()  # hard counts (eval mode: t = 0)
        log_r = model.log_r.detach()
        kl = (q.rate * (q.log_rate - log_r) - q.rate + log_r.exp()).mean(0)
        recon = model.decoder(counts)
        recon = recon[0] if isinstance(recon, tuple) else recon
        mse = ((recon.reshape(len(x), -1) - x.reshape(len(x), -1)) ** 2).sum(1).mean()
    row = {
        "train_seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / epochs, 2),
        "zero_count_fraction": round(float((counts == 0).float().mean()), 4),
        "active_latents": int((kl > 0.01).sum()),
        "kl_per_latent": [round(float(v), 4) for v in kl],
        "val_mse_per_image": round(float(mse), 2),
    }
    return row, pp.features(model, "poisson", x, "log_dr")


def main(argv=None):
    import harness

    p = harness.parity_parser(__doc__)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-images", type=int, default=None, help="training images (default: all 54,000)")
    p.add_argument("--subsets", type=int, default=100, help="random labelled subsets per size (official: 100)")
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    args = harness.start(p, argv)
    checkout = harness.require_checkout(args, REPO, COMMIT, PROBE_FILE)

    import numpy as np
    import poisson_protocol as pp

    from ppl_vae.data import load_data

    if args.quick:
        seeds, epochs, limit, subsets = (0,), 2, 5000, 5
    else:
        seeds, epochs, limit, subsets = args.seeds, args.epochs, args.train_images, args.subsets
    data = load_data("fashion_mnist", pixels="continuous", seed=0, limit=limit)
    y = data.test_y.numpy()
    runs = []
    with tempfile.TemporaryDirectory(prefix="parity_poisson_") as tmp:
        tmp = Path(tmp)
        _export(data, tmp / "Datasets" / "FashionMNIST" / "processed")
        for seed in seeds:
            init = tmp / f"init_{seed}.pt"
            row_ours, z_ours = ours(seed, data, epochs, args.lr, init)
            row_ours["knn"] = pp.knn_accuracies(z_ours, y, subsets, seed, "random")
            spec = {
                "seed": seed,
                "epochs": epochs,
                "batch_size": 100,
                "lr": args.lr,
                "subsets": subsets,
                "data_dir": str(tmp / "Datasets"),
                "init": str(init),
                "features": str(tmp / f"official_{seed}.npz"),
            }
            row_off = harness.run_official(Path(__file__), spec, checkout, threads=args.threads)
            z_off = np.load(spec["features"])["log_dr"]
            row_off["knn"] = pp.knn_accuracies(z_off, y, subsets, seed, "random")
            runs.append({"seed": seed, "ours": row_ours, "official": row_off})
            if not args.quick:
                print(f"seed {seed}: ours {row_ours['train_seconds']} s, official {row_off['train_seconds']} s")

    def per_seed(side: str, key: str) -> list[float] | None:
        if key.startswith("knn@"):
            accs = [r[side]["knn"][key[4:]] for r in runs]
            return None if None in accs else [statistics.mean(a) for a in accs]  # None: size > probe pool
        return [r[side][key] for r in runs]

    metrics = [f"knn@{s}" for s in pp.SIZES] + ["zero_count_fraction", "seconds_per_epoch", "val_mse_per_image"]
    metrics = [m for m in metrics if per_seed("ours", m) is not None]
    table = {m: {side: harness.spread(per_seed(side, m)) for side in ("ours", "official")} for m in metrics}
    verdicts = {
        m: harness.verdict(per_seed("ours", m), per_seed("official", m))
        for m in metrics
        if m.startswith("knn@") or m == "zero_count_fraction"
    }
    # the probe itself: our knn_accuracies vs the official knn_analysis on the same official features
    probe_check = [
        {s: [round(statistics.mean(r["official"]["knn"][s]), 4), r["official"]["official_knn_analysis"].get(s)]}
        for r in runs
        for s in ("200", "1000")
        if r["official"]["knn"][s] is not None
    ]
    out = {
        "method": "Poisson VAE (vae_poisson)",
        "official": {"repo": REPO, "commit": harness.checkout_commit(checkout), "expected_commit": COMMIT},
        "headline": "5-NN accuracy on log δr at 200/1000/all labels (held-out half), fraction of zero counts",
        "metrics": table,
        "verdicts": verdicts,
        "probe_check_ours_vs_official_knn_analysis": probe_check,
        "runs": runs,
        "seeds": list(seeds),
        "epochs": epochs,
        "batch_size": 100,
        "lr": args.lr,
        "latents": K,
        "subsets_per_size": subsets,
        "train_images": len(data.train_x),
        "probe_pool": len(data.test_x) // 2,
        "data": repr(data),
        "network": "both: MLP 784-256-256-K ReLU encoder, K-256-256-784 decoder, our initial weights and prior",
    }
    harness.finish("parity_poisson_vae", out, args, device="cpu")


if __name__ == "__main__":
    main()
