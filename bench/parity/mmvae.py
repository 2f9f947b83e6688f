"""Parity: our MMVAE (``mmvae``, stratified IWAE with DReG) beside the authors' own (iffsid/mmvae, Shi, Siddharth,
Paige & Torr 2019) on the same PolyFashion data, networks, initial weights, optimiser, epochs, batch size and seeds.

Headline metrics (``bench/multimodal.py``'s, which follow the paper's MNIST-SVHN table): cross-modal coherence
(``cross_mean``: modality i alone → each other j, judged by classifiers fitted on real data) and the test
log-likelihood log p̂(X) (importance sampled, S = 100), plus the latent probe accuracy. Both sides are evaluated by
the same code: the official model's trained encoder/decoder weights are loaded into our ``MMVAE`` (the networks are
the same modules, below) and go through ``multimodal_summary`` and ``joint_log_likelihood``; the worker also reports
the official ``m_iwae`` estimate (K = S) of the official model as a cross-check of the likelihood estimate.

Same on both sides: the data (``make_multimodal(load_data("fashion_mnist", limit), "poly", 3)``, exported as one
tensor per modality); the networks — our per-modality MLP experts 784-256-(16+16) and decoders 16-256-784 are the
``enc``/``dec`` of the official ``VAE`` class (a shim: the official code ships only MNIST/SVHN/CUB networks), with our
initial weights; Normal experts and an N(0, I) prior (official MNIST-SVHN: Laplace with a learnt prior scale, the
difference our model's docstring states); Bernoulli likelihoods with logits on the grey levels, llik_scaling 1; the
objective — the official ``m_dreg_looser`` (the stratified DReG bound of the paper's ``--obj dreg --looser``) with
K = 4, ours ``StratifiedIWAE`` K = 4 with DReG; Adam lr 1e-3 (official: ``amsgrad=True``; ours has no AMSGrad, so
the worker runs plain Adam), batch 128, the same epochs and seeds.

Not the same: the training loop on the official side is the five lines of the official ``main.py`` ``train`` (zero
grad, loss = −objective(model, data, K), backward, step) written in the worker over a torch ``DataLoader`` (their
loaders read MNIST-SVHN files); the shuffling and the reparameterised noise come from each side's own random streams.

    python bench/parity/mmvae.py --official /tmp/official/mmvae            # full: seeds 0,1,2
    python bench/parity/mmvae.py --official /tmp/official/mmvae --quick    # 1 seed, 1 epoch, < 5 min
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

REPO = "iffsid/mmvae"
COMMIT = "54398d75c144e9b6c06ef5c33a0ee9a162638b7d"  # head, 2021-05-28 ("add license")
PROBE_FILE = "src/objectives.py"
COMMON = dict(latent_dim=16, hidden=[256], arch="mlp", likelihood="bernoulli")
FULL = dict(limit=4000, epochs=10, n_test=1000, n_ll=500, S=100, probe_train=2000, classifier_train=3000)
QUICK = dict(limit=400, epochs=1, n_test=100, n_ll=30, S=8, probe_train=200, classifier_train=400)
K = 4


def _model(data):
    from ppl_vae import ModelConfig, build_model

    return build_model(ModelConfig(name="mmvae", **COMMON), data.shape, num_data=len(data.train_x))


# ------------------------------------------------------------------------------------------------ worker (official)
def _shims() -> None:
    """Stand-ins for modules the official import chain names (utils → datasets, models → vis) but never calls on
    this path: ``nltk`` (CUB sentences), ``umap`` and ``seaborn`` (plots), ``torchnet`` (MNIST-SVHN loaders)."""
    import importlib.util

    stubs = {
        "nltk": (),
        "nltk.tokenize": ("sent_tokenize", "word_tokenize"),
        "umap": ("UMAP",),
        "seaborn": (),
        "torchnet": (),
        "torchnet.dataset": ("TensorDataset", "ResampleDataset"),
    }
    missing = {n.split(".")[0] for n in stubs if importlib.util.find_spec(n.split(".")[0]) is None}
    for name, attrs in stubs.items():
        if name.split(".")[0] in missing:
            mod = sys.modules.setdefault(name, types.ModuleType(name))
            for a in attrs:
                setattr(mod, a, None)


def worker(spec_path: str) -> None:
    """The official side (cwd = the checkout): the official ``MMVAE``/``VAE`` classes around our networks, trained
    with the official ``m_dreg_looser``; writes the trained weights (in our model's state-dict layout) and the
    official ``m_iwae`` test estimate."""
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(Path("src").resolve()))
    _shims()
    import torch
    import torch.distributions as dist
    from torch import nn

    torch.set_num_threads(spec["threads"])
    # shim: grey levels in [0, 1] as Bernoulli targets (as ours: validate_args=False); current torch validates
    # the support by default and would reject them
    dist.Distribution.set_default_validate_args(False)
    import harness
    import objectives
    from models.mmvae import MMVAE
    from models.vae import VAE

    s = spec["settings"]
    data = harness.polyfashion_data(s)
    ours = _model(data)  # only a container of the per-modality networks, with the initial weights below
    ours.load_state_dict(torch.load(spec["init"], weights_only=True))
    names = data.layout.names

    class TupleDecoder(nn.Module):
        """The official ``VAE`` calls ``px_z(*dec(z))``: our decoder's logits as a 1-tuple."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, z):
            return (self.net(z),)

    def bernoulli(logits):
        return dist.Bernoulli(logits=logits)

    def expert(m: int):
        class Expert(VAE):
            def __init__(self, params):
                super().__init__(dist.Normal, bernoulli, dist.Normal, ours.encoders[m], TupleDecoder(ours.decoders[m]),
                                 params)  # fmt: skip
                self.modelName = names[m]

        return Expert

    class Poly(MMVAE):
        """The official MMVAE over three modalities with an N(0, I) prior (as ours; official: learnt Laplace)."""

        def __init__(self, params):
            super().__init__(dist.Normal, params, *[expert(m) for m in range(len(names))])
            self.register_buffer("_zero", torch.zeros(1, COMMON["latent_dim"]))

        @property
        def pz_params(self):
            return self._zero, torch.ones_like(self._zero)

    torch.manual_seed(spec["seed"])
    model = Poly(types.SimpleNamespace(latent_dim=COMMON["latent_dim"]))
    split = data.layout.split
    train = [split(data.train_x)[n] for n in names]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=128, shuffle=True)
    optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=1e-3)  # no amsgrad
    t0 = time.perf_counter()
    for _ in range(s["epochs"]):  # the official main.py train(): the same five lines per batch
        model.train()
        for batch in loader:
            optimizer.zero_grad()
            loss = -objectives.m_dreg_looser(model, list(batch), K=K)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - t0
    model.eval()
    test = [split(data.test_x[: s["n_ll"]])[n] for n in names]
    with torch.no_grad():
        m_iwae = float(objectives.m_iwae(model, test, K=s["S"])) / len(test[0])
    torch.save(ours.state_dict(), spec["trained"])
    out = {"train_seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / s["epochs"], 2)}
    out["official_m_iwae_test"] = round(m_iwae, 3)
    Path(spec["result"]).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------ driver (ours)
def main(argv=None):
    import harness

    p = harness.parity_parser(__doc__)
    p.add_argument("--epochs", type=int, default=FULL["epochs"])
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    args = harness.start(p, argv)
    checkout = harness.require_checkout(args, REPO, COMMIT, PROBE_FILE)

    import pyro
    import torch

    import ppl_vae
    from ppl_vae.config import TrainConfig

    s = dict(QUICK) if args.quick else dict(FULL, epochs=args.epochs)
    seeds = (0,) if args.quick else args.seeds
    data, classifiers = harness.polyfashion(s)
    runs = []
    with tempfile.TemporaryDirectory(prefix="parity_mmvae_") as tmp:
        for seed in seeds:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            model = _model(data)
            init, trained = Path(tmp) / f"init_{seed}.pt", Path(tmp) / f"trained_{seed}.pt"
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, init)
            tc = TrainConfig(
                epochs=s["epochs"], batch_size=128, lr=1e-3, objective="iwae", num_particles=K, estimator="dreg"
            )
            t0 = time.perf_counter()
            ppl_vae.train(model, data, tc, seed=seed, progress=False)
            sec = time.perf_counter() - t0
            row_ours = {"train_seconds": round(sec, 1), "seconds_per_epoch": round(sec / s["epochs"], 2)}
            row_ours.update(harness.multimodal_metrics(model, data, classifiers, s, seed))
            spec = {"seed": seed, "settings": s, "init": str(init), "trained": str(trained)}
            row_off = harness.run_official(Path(__file__), spec, checkout, threads=args.threads)
            official = _model(data)
            official.load_state_dict(torch.load(trained, weights_only=True))
            row_off.update(harness.multimodal_metrics(official, data, classifiers, s, seed))
            runs.append({"seed": seed, "ours": row_ours, "official": row_off})
            if not args.quick:
                print(f"seed {seed}: ours {row_ours}, official {row_off}", flush=True)

    out = {
        "method": "MMVAE (mmvae, stratified IWAE K = 4, DReG)",
        "official": {"repo": REPO, "commit": harness.checkout_commit(checkout), "expected_commit": COMMIT},
        "headline": "cross-modal coherence (cross_mean) and test log p(X) (IS, S draws), same evaluation code",
        **harness.multimodal_results(runs),
        "official_m_iwae_test": harness.spread([r["official"]["official_m_iwae_test"] for r in runs], 3),
        "runs": runs,
        "seeds": list(seeds),
        "settings": {**s, **COMMON, "batch_size": 128, "lr": 1e-3, "K": K},
        "data": repr(data),
        "network": "both: per-modality MLP experts 784-256-(16+16), decoders 16-256-784, our initial weights",
    }
    out["seconds_total"] = statistics.fsum(r[side]["train_seconds"] for r in runs for side in ("ours", "official"))
    harness.finish("parity_mmvae", out, args, device="cpu")


if __name__ == "__main__":
    main()
