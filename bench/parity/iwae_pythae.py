"""Parity: our IWAE (``TraceIWAE``, K = 5, trained by ``ppl_vae.train``) beside pythae 0.1.2's ``IWAE`` (K = 5,
trained by its ``BaseTrainer``; clementchadebec/benchmark_VAE at tag v0.1.2) on the same data, networks, initial
weights, optimiser, epochs, batch size and seeds — with the ablation that locates a difference (issue 36 §4).

Headline metric: the test log-likelihood log p̂(x) (importance sampled, S = 1,000 draws from the guide, nats per
image) on the first ``n_test`` test images, computed by the same code for both sides: ``ppl_vae.evaluate.
log_likelihood`` on our ``VAE`` holding the trained weights (pythae's networks are the same modules, below, so its
trained weights load into our model; its log-variance head becomes an encoder with scale = exp(0.5·raw)).

Same on both sides: the data (``load_data("fashion_mnist", pixels="binary_static", limit=20000, seed=0)``: 20,000
statically binarised training images, its 2,223 validation images as pythae's ``eval_dataset``, its test split);
the networks — Burda et al.'s 784-200-200-(50+50) tanh encoder and 50-200-200-784 tanh decoder (our ``burda1``), in
pythae as a ``BaseEncoder`` whose first 50 outputs are the mean and last 50 the log-variance and a ``BaseDecoder``
returning sigmoid(logits), with our initial weights of the seed; Bernoulli likelihood (pythae: ``bce``), N(0, I)
prior; the bound — IWAE with K = 5 and the IWAE gradient (pythae's loss −Σ_k sg(w̃_k) log w_k has the gradient of
the bound); Adam lr 1e-3 (torch defaults), batch 100, 10 epochs, no clipping (our ``train.clip_norm`` defaults to
null), no schedule.

Not the same (each is an ablation row; ``--quick`` runs them all on one seed):

* the guide's scale head: pythae's encoder returns a log-variance, std = exp(0.5·raw); ours (``GaussianHead``)
  std = softplus(raw) + 1e-4. Rows ``ours_logvar_head`` (our trainer with pythae's head) and
  ``official_softplus_head`` (pythae's trainer with our head);
* the model kept: pythae keeps the epoch of the best eval loss (its ``_best_model``; the loss it logs is
  −Σ_k w̃_k log w_k, not the bound); ours evaluates the last epoch. Rows ``official_last_epoch`` and
  ``ours_best_epoch`` (our ``best.pt``: the best validation IWAE bound);
* the objective's scale: ours is −(N/B)·Σ_batch = −N·mean (the plate's subsample scale), pythae's −mean. Adam is
  invariant to it up to its ε; row ``ours_batch_sum_scale`` trains with ``num_data=None`` (plate scale 1: −B·mean,
  200× smaller than ours; a loss divided by B is not a ppl_vae option);
* the batch order and the reparameterised noise come from each side's own random streams.

``TraceIWAE``'s gradient was also checked outside this script against a hand-written IWAE gradient at the same
draws (identical to 3e-4 relative to gradients of order 1e3 in float32): the estimator is not a candidate.

    python bench/parity/iwae_pythae.py --official /tmp/official/pythae            # full: seeds 0,1,2,3
    python bench/parity/iwae_pythae.py --official /tmp/official/pythae --quick    # 1 seed, 1 epoch, < 5 min

``--official`` is the unpacked pythae 0.1.2 wheel (the folder holding ``pythae/``) or a clone of
benchmark_VAE at v0.1.2 (its ``src/`` is used); bench/parity/README.md says how to get either.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

REPO = "clementchadebec/benchmark_VAE"
COMMIT = "24939dc75842dfaf8f7dad77fbf27f65337f0817"  # tag v0.1.2 (2023-09-06) = the pythae 0.1.2 wheel on PyPI
PROBE_FILE = "pythae/models/iwae/iwae_model.py"
K = 5
LATENT = 50
FULL = dict(limit=20000, epochs=10, n_test=2000, S=1000)
QUICK = dict(limit=2000, epochs=1, n_test=200, S=100)
OURS_ROWS = ("ours", "ours_best_epoch", "ours_logvar_head", "ours_batch_sum_scale")
OFFICIAL_ROWS = ("official", "official_last_epoch", "official_softplus_head")


def _data(s: dict):
    from ppl_vae.data import load_data

    return load_data("fashion_mnist", pixels="binary_static", limit=s["limit"], seed=0)


def _nets(data_shape):
    """Our ``burda1`` encoder and decoder (784-200-200-(50+50) and 50-200-200-784, tanh)."""
    from ppl_vae.nn.networks import build_encoder_decoder

    return build_encoder_decoder("burda1", data_shape, LATENT)


def _logvar_encoder(enc):
    """Our encoder module with pythae's head: (loc, exp(0.5·raw)) from the same network (same parameter names)."""
    import torch

    from ppl_vae.nn.networks import MLPEncoder

    class LogVarEncoder(MLPEncoder):
        def forward(self, x, c=None):
            loc, raw = self.head.net(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
            return loc, torch.exp(0.5 * raw)

    out = LogVarEncoder(enc.data_shape, LATENT, (200, 200), "tanh")
    out.load_state_dict(enc.state_dict())
    return out


def _vae(data, head: str, nets=None, num_data=None):
    """Our ``VAE`` around the ``burda1`` networks with the ``softplus`` (ours) or ``logvar`` (pythae's) head."""
    from ppl_vae.distributions.likelihoods import BernoulliLikelihood
    from ppl_vae.models.vae import VAE

    enc, dec = nets if nets is not None else _nets(data.shape)
    if head == "logvar":
        enc = _logvar_encoder(enc)
    return VAE(enc, dec, BernoulliLikelihood(), LATENT, num_data=num_data)


def _load(vae, weights: dict):
    vae.encoder.head.net.load_state_dict(weights["enc"])
    vae.decoder.net.load_state_dict(weights["dec"])
    return vae


def _weights(vae) -> dict:
    return {
        "enc": {k: v.detach().clone() for k, v in vae.encoder.head.net.state_dict().items()},
        "dec": {k: v.detach().clone() for k, v in vae.decoder.net.state_dict().items()},
    }


# ------------------------------------------------------------------------------------------------ worker (official)
def worker(spec_path: str) -> None:
    """The official side (cwd = the checkout): pythae's ``IWAE`` around our networks, trained by its
    ``BaseTrainer`` with the validation split as ``eval_dataset``; writes the best-eval-loss model's weights (what
    pythae keeps and saves as ``final_model``) and the last epoch's, in our layout, with the losses per epoch."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    import pythae
    from pythae.data.datasets import BaseDataset
    from pythae.models import IWAE, IWAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    from ppl_vae.nn.networks import MIN_SCALE

    s, head = spec["settings"], spec["head"]
    data = _data(s)
    enc, dec = _nets(data.shape)
    init = torch.load(spec["init"], weights_only=True)
    enc.head.net.load_state_dict(init["enc"])
    dec.net.load_state_dict(init["dec"])

    class Encoder(BaseEncoder):
        """mean = first 50 outputs, log-variance = last 50 (``head="logvar"``: pythae's own convention); with
        ``head="softplus"`` the log-variance of our head, 2·log(softplus(raw) + 1e-4)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            loc, raw = self.net(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
            logvar = raw if head == "logvar" else 2 * torch.log(F.softplus(raw) + MIN_SCALE)
            return ModelOutput(embedding=loc, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    class Record(TrainingCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, training_config, logs, **kwargs):
            self.logs.append({k: float(v) for k, v in logs.items()})

    cfg = IWAEConfig(input_dim=tuple(data.shape), latent_dim=LATENT, reconstruction_loss="bce", number_samples=K)
    model = IWAE(cfg, encoder=Encoder(enc.head.net), decoder=Decoder(dec.net))
    flat = {split: getattr(data, f"{split}_x") for split in ("train", "val")}
    labels = {split: torch.as_tensor(getattr(data, f"{split}_y")) for split in ("train", "val")}
    tc = BaseTrainerConfig(
        output_dir=str(Path.home() / "pythae_out"),
        per_device_train_batch_size=100,
        per_device_eval_batch_size=100,
        num_epochs=s["epochs"],
        learning_rate=1e-3,
        seed=spec["seed"],
        no_cuda=True,
    )
    record = Record()
    trainer = BaseTrainer(
        model,
        train_dataset=BaseDataset(flat["train"], labels["train"]),
        eval_dataset=BaseDataset(flat["val"], labels["val"]),
        training_config=tc,
        callbacks=[record],
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    best = trainer._best_model
    out = {
        "best": {"enc": best.encoder.net.state_dict(), "dec": best.decoder.net.state_dict()},
        "last": {"enc": trainer.model.encoder.net.state_dict(), "dec": trainer.model.decoder.net.state_dict()},
    }
    torch.save(out, spec["trained"])
    evals = [r.get("eval_epoch_loss") for r in record.logs]
    result = {
        "train_seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / s["epochs"], 2),
        "best_epoch": 1 + min(range(len(evals)), key=evals.__getitem__) if evals else None,
        "epoch_losses": [{k: round(v, 3) for k, v in r.items()} for r in record.logs],
        "pythae_version": getattr(pythae, "__version__", None) or _dist_version(Path.cwd()),
    }
    Path(spec["result"]).write_text(json.dumps(result))


def _dist_version(root: Path) -> str | None:
    found = sorted(root.glob("pythae-*.dist-info"))
    return found[0].name.split("-")[1].removesuffix(".dist") if found else None


# ------------------------------------------------------------------------------------------------ driver (ours)
def _require_pythae(args) -> Path:
    """The ``--official`` folder holding ``pythae/`` (an unpacked wheel; a clone's ``src/`` is taken), or the
    parser's error (exit 2) saying how to get it."""
    from harness import require_checkout

    how = (
        f"pythae 0.1.2 = github.com/{REPO} at tag v0.1.2 ({COMMIT}): `pip download pythae==0.1.2 --no-deps -d "
        "/tmp/pythae_whl` and unpack the wheel into DIR (`python -m zipfile -e /tmp/pythae_whl/"
        f"pythae-0.1.2-py3-none-any.whl DIR`), or `git clone https://github.com/{REPO} DIR && git -C DIR checkout "
        f"{COMMIT}`; see bench/parity/README.md"
    )
    return require_checkout(args, REPO, COMMIT, PROBE_FILE, how=how, subdirs=("src",))


def _evaluate(vae, data, s: dict, seed: int) -> float:
    import torch

    from ppl_vae.evaluate import log_likelihood

    vae.eval()
    with torch.no_grad():
        ll = log_likelihood(vae.model, vae.guide, data.test_x[: s["n_test"]], num_samples=s["S"], seed=seed)
    return float(ll.mean())


def _train_ours(data, init: dict, s: dict, seed: int, *, head: str, num_data: int | None, run_dir: Path | None):
    import pyro

    import ppl_vae
    from ppl_vae.config import TrainConfig

    pyro.clear_param_store()
    vae = _load(_vae(data, head, num_data=num_data), init)
    tc = TrainConfig(epochs=s["epochs"], batch_size=100, lr=1e-3, objective="iwae", num_particles=K, estimator="iwae")
    t0 = time.perf_counter()
    res = ppl_vae.train(vae, data, tc, seed=seed, progress=False, run_dir=run_dir)
    sec = time.perf_counter() - t0
    info = {"train_seconds": round(sec, 1), "seconds_per_epoch": round(sec / s["epochs"], 2)}
    info["best_epoch"] = res.best_epoch
    info["val_bound_per_epoch"] = [round(float(r["val_elbo"]), 3) for r in res.history if "val_elbo" in r]
    return vae, info


def _best_weights(run_dir: Path) -> dict:
    """The encoder/decoder weights of our ``best.pt`` (its ``module`` state dict)."""
    from ppl_vae.training.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / "best.pt")["module"]
    return {
        part: {k.split(f"{prefix}.", 1)[1]: v for k, v in state.items() if k.startswith(f"{prefix}.")}
        for part, prefix in (("enc", "encoder.head.net"), ("dec", "decoder.net"))
    }


def _paired(a: list[float], b: list[float]) -> dict:
    d = [x - y for x, y in zip(a, b, strict=True)]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return {"mean": round(statistics.mean(d), 4), "sd": round(sd, 4), "se": round(sd / len(d) ** 0.5, 4)}


def _cause(rows: dict, off_band, paired_to_ours: dict, paired_to_official: dict, same: dict) -> str:
    """A sentence from the measured rows: whether ours is in the official band, which change of ours lands in it
    (the largest move up), how the changes of theirs move it, and the run-to-run floor (``ours_batch_sum_scale``
    is our algorithm again up to Adam's ε, so its paired sd with ``ours`` is the noise of one training run)."""
    lo, hi = off_band
    gap = paired_to_official["ours"]
    inside = lo <= rows["ours"]["mean"] <= hi
    head = (
        f"no disagreement here: ours − official = {gap['mean']:+.3f} ± {gap['se']:.3f} nats (paired s.e.), inside "
        f"the official band [{lo:.3f}, {hi:.3f}]"
        if inside
        else f"ours − official = {gap['mean']:+.3f} ± {gap['se']:.3f} nats (paired s.e.), outside the official band "
        f"[{lo:.3f}, {hi:.3f}]"
    )
    if not inside:
        landing = [r for r in OURS_ROWS[1:] if lo <= rows[r]["mean"] <= hi]
        if landing:
            best = max(landing, key=lambda r: paired_to_ours[r]["mean"])
            head += f"; {best} moves ours into it ({paired_to_ours[best]['mean']:+.3f} nats): the cause"
        else:
            head += "; no single change of ours moves it into the band"
    movers = [f"{r} {paired_to_ours[r]['mean']:+.3f} ± {paired_to_ours[r]['se']:.3f} vs ours" for r in OURS_ROWS[1:]]
    theirs = [
        f"{r} {paired_to_official[r]['mean']:+.3f} ± {paired_to_official[r]['se']:.3f} vs official"
        for r in OFFICIAL_ROWS[1:]
    ]
    lv, sp = same["logvar"], same["softplus"]
    heads = [
        f"same head on both sides (the trainers compared): logvar {lv['mean']:+.3f} ± {lv['se']:.3f} "
        f"(ours_logvar_head − official), softplus {sp['mean']:+.3f} ± {sp['se']:.3f} (ours − official_softplus_head)"
    ]
    floor = paired_to_ours["ours_batch_sum_scale"]["sd"]
    tail = f"run-to-run floor (sd of ours_batch_sum_scale − ours, one algorithm): {floor:.3f} nats"
    return "; ".join([head, *movers, *theirs, *heads, tail])


def main(argv=None):
    import harness

    p = harness.parity_parser(__doc__, seeds="0,1,2,3")
    p.add_argument("--epochs", type=int, default=FULL["epochs"])
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    args = harness.start(p, argv)
    checkout = _require_pythae(args)

    import pyro
    import torch

    s = dict(QUICK) if args.quick else dict(FULL, epochs=args.epochs)
    seeds = (0,) if args.quick else args.seeds
    data = _data(s)
    n_train = len(data.train_x)
    runs = []
    with tempfile.TemporaryDirectory(prefix="parity_iwae_") as tmp:
        for seed in seeds:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            init = _weights(_vae(data, "softplus"))  # the seed's initial weights, shared by every row
            init_path = Path(tmp) / f"init_{seed}.pt"
            torch.save(init, init_path)
            row: dict[str, dict] = {}

            run_dir = Path(tmp) / f"ours_{seed}"
            vae, info = _train_ours(data, init, s, seed, head="softplus", num_data=n_train, run_dir=run_dir)
            row["ours"] = {**info, "test_ll": _evaluate(vae, data, s, seed)}
            best = _load(_vae(data, "softplus"), _best_weights(run_dir))
            row["ours_best_epoch"] = {"best_epoch": info["best_epoch"], "test_ll": _evaluate(best, data, s, seed)}
            vae, info = _train_ours(data, init, s, seed, head="logvar", num_data=n_train, run_dir=None)
            row["ours_logvar_head"] = {**info, "test_ll": _evaluate(vae, data, s, seed)}
            vae, info = _train_ours(data, init, s, seed, head="softplus", num_data=None, run_dir=None)
            row["ours_batch_sum_scale"] = {**info, "test_ll": _evaluate(vae, data, s, seed)}

            for head, name in (("logvar", "official"), ("softplus", "official_softplus_head")):
                trained = Path(tmp) / f"official_{head}_{seed}.pt"
                spec = {"seed": seed, "settings": s, "init": str(init_path), "trained": str(trained), "head": head}
                info = harness.run_official(Path(__file__), spec, checkout, threads=args.threads)
                weights = torch.load(trained, weights_only=True)
                row[name] = {**info, "test_ll": _evaluate(_load(_vae(data, head), weights["best"]), data, s, seed)}
                if head == "logvar":
                    last = _load(_vae(data, head), weights["last"])
                    row["official_last_epoch"] = {"test_ll": _evaluate(last, data, s, seed)}
            runs.append({"seed": seed, **row})
            print(f"seed {seed}: " + ", ".join(f"{k} {v['test_ll']:.3f}" for k, v in row.items()), flush=True)

    ll = {r: [run[r]["test_ll"] for run in runs] for r in OURS_ROWS + OFFICIAL_ROWS}
    rows = {r: harness.spread(v) for r, v in ll.items()}
    verdict = harness.verdict(ll["ours"], ll["official"])
    to_ours = {r: _paired(ll[r], ll["ours"]) for r in OURS_ROWS[1:]}
    to_official = {r: _paired(ll[r], ll["official"]) for r in OURS_ROWS + OFFICIAL_ROWS[1:]}
    same = {  # the two trainers with the same guide head
        "logvar": _paired(ll["ours_logvar_head"], ll["official"]),
        "softplus": _paired(ll["ours"], ll["official_softplus_head"]),
    }
    spe = {side: [run[side]["seconds_per_epoch"] for run in runs] for side in ("ours", "official")}
    out = {
        "method": "IWAE (TraceIWAE K = 5, IWAE gradient) against pythae 0.1.2 IWAE (K = 5)",
        "official": {
            "repo": REPO,
            "commit": harness.checkout_commit(checkout),
            "expected_commit": COMMIT,
            "package": "pythae 0.1.2",
        },
        "headline": f"test log p(x) (nats), importance sampled with S = {s['S']} on the first {s['n_test']} test "
        "images, same evaluation code (ppl_vae.evaluate.log_likelihood) for both",
        "metrics": {"test_ll": {"ours": rows["ours"], "official": rows["official"]}},
        "verdicts": {"test_ll": verdict},
        "ablation": rows,
        "paired_vs_ours": to_ours,
        "paired_vs_official": to_official,
        "paired_same_head": same,
        "cause": _cause(rows, verdict["official_band"], to_ours, to_official, same),
        "seconds_per_epoch": {side: harness.spread(v, 2) for side, v in spe.items()},
        "runs": runs,
        "seeds": list(seeds),
        "settings": {**s, "K": K, "batch_size": 100, "lr": 1e-3, "clip_norm": None, "latent_dim": LATENT},
        "data": repr(data),
        "network": "both: Burda 784-200-200-(50+50) tanh encoder, 50-200-200-784 tanh decoder, our initial weights",
    }
    out["seconds_total"] = round(
        statistics.fsum(run[r].get("train_seconds", 0.0) for run in runs for r in OURS_ROWS + OFFICIAL_ROWS), 1
    )
    harness.finish("parity_iwae_pythae", out, args, device="cpu")


if __name__ == "__main__":
    main()
