"""Parity: our MoPoE-VAE (``mopoe``, ``objective: sampled_subset``) beside the authors' own (thomassutter/MoPoE,
Sutter, Daunhawer & Vogt, "Generalized Multimodal ELBO", ICLR 2021) on the same PolyFashion data, networks, initial
weights, optimiser, epochs, batch size and seeds.

Headline metrics (``bench/multimodal.py``'s, as ``mmvae.py``): cross-modal coherence (``cross_mean``), the test
log-likelihood log p̂(X) (importance sampled with the model's mixture guide, S = 100) and the latent probe accuracy.
Both sides are evaluated by the same code: the official model's trained encoder/decoder weights are loaded into our
``MoPoE`` and go through ``multimodal_summary`` and ``joint_log_likelihood`` (the official likelihood estimator
``eval_metrics/likelihood.py`` handles image-shaped tensors only, so there is no official cross-check of log p̂(X)).

The official side runs the official PolyMNIST pieces: the ``mmnist/flags.py`` parser (``--method joint_elbo``, the
MoPoE objective, with ``main_mmnist.py``'s flag post-processing), ``CMNIST`` modalities, ``VAEMMNIST``
(``utils/BaseMMVae.py``), the rec/style weights and Adam of ``MMNISTExperiment`` and the training epoch
``run_epochs.train`` with its loss ``basic_routine_epoch``. What that objective is (read from the code at the
commit below): the guide is the uniform mixture over the 7 non-empty subsets of the PoE of their experts
(``inference``; the empty subset is skipped); the KL term is the mean over subsets of KL(q̃_A ‖ N(0, I)) in closed
form (``divergence_static_prior`` → ``calc_group_divergence_moe``, subset weights 1/7); the reconstruction is
Σ_m log p(x_m | z) with one z per datapoint from one subset (``moe_fusion`` → ``mixture_component_selection``);
rec_weights 1 per modality (``set_rec_weights``), ``beta`` 1 (set here; the flag default is 5 and the PolyMNIST job
uses 2.5: 1 is the bound itself), ``beta_content`` 1, no style latents (``--style_dim 0``, no
``--factorized_representation``); both terms divided by the batch size (a mean over the batch; ours is the sum
scaled to the data set, the same gradient direction up to a constant factor that Adam removes). That is our
``sampled_subset`` (``ppl_vae.infer.component_average.ComponentAverageELBO``), the headline comparison. A check
of that: each side's loss (−bound per datapoint, mean of 100 draws) on the first 128 training points at the shared
initial weights (``loss_at_init``; the official one through ``basic_routine_epoch``, reshuffled each draw).

Same on both sides: the data (``make_multimodal(load_data("fashion_mnist", limit), "poly", 3)``); the networks —
our per-modality MLP experts 784-256-(16+16) and decoders 16-256-784 in the official modalities (a shim: the
official PolyMNIST networks are convolutional), with our initial weights; Normal experts, an N(0, I) prior;
Bernoulli likelihoods with logits on the grey levels (the official ``--likelihood bernoulli`` (``dist.Bernoulli``);
its PolyMNIST job uses a Laplace of scale 0.75); Adam lr 1e-3 (betas 0.9, 0.999), batch 128, the same epochs/seeds.

Not the same (each stated; none can be matched without changing the official objective, as the diagnostic variant
``--official-prior-expert off`` does for the first):

* **the prior expert**: ``poe_fusion`` adds the N(0, I) expert to the product of *all M* modalities only (its test
  ``mus.shape[0] == len(self.modalities)``; for ``joint_elbo``, ``modality_poe`` is False), so the official full
  subset is PoE(q_1, q_2, q_3, p); ours has no prior expert in any subset (``ppl_vae/models/mopoe.py``). The
  evaluation loads the official weights into our model, i.e. evaluates them without it;
* **which subset reconstructs which datapoint**: the official ``mixture_component_selection`` is deterministic
  by position in the (shuffled) batch — the first ⌊128/7⌋ = 18 datapoints use the first subset (in the official
  order m0, m1, m2, m0m1, m0m2, m1m2, m0m1m2), ..., and the last subset takes the remaining 20 — while ours draws
  the subset of each datapoint independently and uniformly (unbiased for the mean of the subsets' ELBOs; the
  official one weights the full subset 20/128 instead of 1/7 in the reconstruction term);
* ``poe`` adds 1e-8 to each expert's variance; the official loop drops the last partial batch (``drop_last``:
  31 of the 32 batches of 4,000 points per epoch), ours keeps it;
* the shuffling and the reparameterised noise come from each side's own random streams.

Shims (in the worker, each a function below): stand-ins for ``tensorboardX`` and ``scipy.misc.imread`` (named by
the import chain, never called here); our networks in the official encoder/decoder call signatures; the official
``run_epochs.DataLoader`` with ``num_workers=0`` (the official train spawns 8 loader processes); torch's default
argument validation off (grey levels as Bernoulli targets, as ours); only in the variant ``--official-prior-expert
off``, ``poe_fusion`` without the prior expert. ``--ours-objective stratified`` trains ours with our default (the
mixture's own ELBO, tighter than the paper's bound): a labelled variant, not a parity comparison.

    python bench/parity/mopoe.py --official /tmp/official/MoPoE            # full: seeds 0-9 (~6 min)
    python bench/parity/mopoe.py --official /tmp/official/MoPoE --quick    # 1 seed, 1 epoch, < 5 min
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

REPO = "thomassutter/MoPoE"
COMMIT = "0ad2d564e0dc10704334f62ac2f45de57c56b2ab"  # head, 2022-11-12 ("Update README.md")
PROBE_FILE = "utils/BaseMMVae.py"
COMMON = dict(latent_dim=16, hidden=[256], arch="mlp", likelihood="bernoulli")
FULL = dict(limit=4000, epochs=10, n_test=1000, n_ll=500, S=100, probe_train=2000, classifier_train=3000)
QUICK = dict(limit=400, epochs=1, n_test=100, n_ll=30, S=8, probe_train=200, classifier_train=400)
BATCH, LR = 128, 1e-3
INIT_DRAWS = 100  # draws of the objective at the initial weights (the objective-value check)


def _model(data, objective: str = "sampled_subset"):
    from ppl_vae import ModelConfig, build_model

    cfg = ModelConfig(name="mopoe", options={"objective": objective}, **COMMON)
    return build_model(cfg, data.shape, num_data=len(data.train_x))


# ------------------------------------------------------------------------------------------------ worker (official)
def _shims() -> None:
    """Stand-ins for what the official import chain (run_epochs → utils.TBLogger, eval_metrics.sample_quality →
    fid.fid_score) names but never calls on this path: ``tensorboardX.SummaryWriter`` (not installed) and
    ``scipy.misc.imread`` (removed from SciPy; FID only)."""
    import importlib.util

    import scipy.misc

    if importlib.util.find_spec("tensorboardX") is None:
        sys.modules.setdefault("tensorboardX", types.ModuleType("tensorboardX")).SummaryWriter = None
    if not hasattr(scipy.misc, "imread"):
        scipy.misc.imread = None


def _no_loader_workers(run_epochs) -> None:
    """Shim: the official ``train`` builds ``DataLoader(..., num_workers=8, drop_last=True)``; the same loader with
    ``num_workers=0`` (one process, as our trainer; the shuffle then comes from the seeded torch stream)."""
    from torch.utils.data import DataLoader

    def loader(*args, **kwargs):
        return DataLoader(*args, **{**kwargs, "num_workers": 0})

    run_epochs.DataLoader = loader


def _without_prior_expert(base_mmvae) -> None:
    """Diagnostic shim, only with ``--official-prior-expert off`` (a variant, never the headline): the official
    ``BaseMMVae.poe_fusion`` without the N(0, I) expert it appends to the product of all M modalities — the
    official ``poe`` of the subset's experts alone, as ours (for ``joint_elbo`` that is the only change)."""
    from divergence_measures.mm_div import poe

    def poe_fusion(self, mus, logvars, weights=None):
        return list(poe(mus, logvars))

    base_mmvae.poe_fusion = poe_fusion


def _official_networks(ours, m: int):
    """Shim: our modality-m expert and decoder in the official call signatures. The official encoder returns
    (style μ, style log σ², μ, log σ²) (no style latents: None, None); ours gives (μ, σ), so log σ² = 2 log σ — the
    same distribution. The official decoder takes (style, z) and its output tuple is splatted into the likelihood
    class, ``dist.Bernoulli(*out)``: (None, logits) makes that ``Bernoulli(probs=None, logits=logits)``."""
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            loc, scale = self.net(x)
            return None, None, loc, 2 * scale.log()

    class Decoder(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, style, z):
            return None, self.net(z)

    return Encoder(ours.encoders[m]), Decoder(ours.decoders[m])


def _official_flags(epochs: int):
    """The official flags (``mmnist/flags.py``) for MoPoE on this data, post-processed as ``main_mmnist.py`` does
    (method → ``joint_elbo``; ``alpha_modalities`` 1/(M+1) each, used only by the JSD/MoE fusions' defaults)."""
    import torch
    from mmnist.flags import parser

    argv = ["--method", "joint_elbo", "--style_dim", "0", "--class_dim", str(COMMON["latent_dim"]), "--beta", "1",
            "--likelihood", "bernoulli", "--batch_size", str(BATCH), "--initial_learning_rate", str(LR),
            "--end_epoch", str(epochs)]  # fmt: skip
    flags = parser.parse_args(argv)
    flags.device = torch.device("cpu")
    flags.joint_elbo = True
    flags.num_mods = 3
    flags.div_weight_uniform_content = 1 / (flags.num_mods + 1)
    flags.div_weight = 1 / (flags.num_mods + 1)
    flags.alpha_modalities = [flags.div_weight_uniform_content] + [flags.div_weight] * flags.num_mods
    return flags


def worker(spec_path: str) -> None:
    """The official side (cwd = the checkout): the official ``VAEMMNIST`` around our networks, trained by the
    official ``run_epochs.train`` (loss ``basic_routine_epoch``, method ``joint_elbo``); writes the trained weights
    (in our model's state-dict layout) and the official loss of the last epoch."""
    spec = json.loads(Path(spec_path).read_text())
    _shims()
    import torch
    import torch.distributions as dist

    torch.set_num_threads(spec["threads"])
    import run_epochs
    from mmnist.experiment import MMNISTExperiment
    from modalities.CMNIST import CMNIST
    from utils.BaseExperiment import BaseExperiment

    _no_loader_workers(run_epochs)
    if not spec["prior_expert"]:
        from utils.BaseMMVae import BaseMMVae

        _without_prior_expert(BaseMMVae)
    import harness

    s = spec["settings"]
    data = harness.polyfashion_data(s)
    ours = _model(data)  # only a container of the per-modality networks, with the initial weights below
    ours.load_state_dict(torch.load(spec["init"], weights_only=True))
    names = data.layout.names
    flags = _official_flags(s["epochs"])
    # shim: grey levels in [0, 1] as Bernoulli targets (as ours: validate_args=False); current torch validates
    # the support by default and would reject them (set after our imports: importing pyro turns it back on)
    dist.Distribution.set_default_validate_args(False)

    # the MMNISTExperiment's attributes that train() uses, set by its own methods (its __init__ also reads the
    # PolyMNIST image folders, pretrained classifiers and FID paths, which this run has no use for)
    exp = types.SimpleNamespace(flags=flags, num_modalities=len(names))
    exp.modalities = {
        f"m{m}": CMNIST(f"m{m}", *_official_networks(ours, m), flags.class_dim, flags.style_dim, flags.likelihood)
        for m in range(len(names))
    }
    exp.subsets = BaseExperiment.set_subsets(exp)
    torch.manual_seed(spec["seed"])
    exp.mm_vae = MMNISTExperiment.set_model(exp)
    exp.rec_weights = MMNISTExperiment.set_rec_weights(exp)
    exp.style_weights = MMNISTExperiment.set_style_weights(exp)
    MMNISTExperiment.set_optimizer(exp)
    split = data.layout.split(data.train_x)
    labels = torch.as_tensor(data.train_labels)

    class Pairs(torch.utils.data.Dataset):
        """The official dataset item: ({"m0": x0, "m1": x1, "m2": x2}, label)."""

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return {f"m{m}": split[n][i] for m, n in enumerate(names)}, labels[i]

    exp.dataset_train = Pairs()
    with torch.no_grad(), torch.random.fork_rng():  # training's random stream is left as it was
        first = [split[n][:BATCH] for n in names]
        init_losses = []
        for _ in range(INIT_DRAWS):  # a new order each draw: which subset reconstructs which datapoint
            perm = torch.randperm(BATCH)
            batch = ({f"m{m}": x[perm] for m, x in enumerate(first)}, labels[:BATCH][perm])
            init_losses.append(float(run_epochs.basic_routine_epoch(exp, batch)["total_loss"]))
    losses = []

    class Logger:
        """Stand-in for the official ``TBLogger`` (tensorboard): keeps the training losses."""

        def write_training_logs(self, results, total_loss, log_probs, klds):
            losses.append(float(total_loss))

    t0 = time.perf_counter()
    for epoch in range(s["epochs"]):
        losses.clear()
        run_epochs.train(epoch, exp, Logger())
    seconds = time.perf_counter() - t0
    torch.save(ours.state_dict(), spec["trained"])
    out = {"train_seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / s["epochs"], 2)}
    out["official_loss_last_epoch"] = round(statistics.fmean(losses), 3)  # −bound per datapoint, training batches
    out["loss_at_init"] = round(statistics.fmean(init_losses), 3)  # the same, first batch, initial weights
    out["official_subsets"] = list(exp.subsets)
    Path(spec["result"]).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------ driver (ours)
def loss_at_init(model, x) -> float:
    """Our training objective (−bound per datapoint, the mean over ``INIT_DRAWS`` draws) on the batch ``x`` at the
    model's current weights, without touching the random stream training uses; the official worker reports its
    ``basic_routine_epoch`` loss on the same batch at the same weights (``loss_at_init``)."""
    import torch

    from ppl_vae import plan_for
    from ppl_vae.config import TrainConfig

    elbo = plan_for(model).objective(TrainConfig(num_particles=1))
    with torch.no_grad(), torch.random.fork_rng():
        draws = [float(elbo.loss_and_surrogate(model.model, model.guide, x)[0]) for _ in range(INIT_DRAWS)]
    return statistics.fmean(draws) / model.num_data  # the data plate scales the batch's sum to the data set


def main(argv=None):
    import harness

    p = harness.parity_parser(__doc__, seeds="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--epochs", type=int, default=FULL["epochs"])
    p.add_argument(
        "--official-prior-expert",
        default="on",
        choices=("on", "off"),
        help="on: the official code as shipped (N(0, I) expert in the product of all M modalities); off: a "
        "diagnostic variant with that expert removed by a shim (as ours)",
    )
    p.add_argument(
        "--ours-objective",
        default="sampled_subset",
        choices=("sampled_subset", "stratified"),
        help="our MoPoE objective: sampled_subset (the paper's, the headline) or stratified (our default, tighter: a "
        "labelled variant)",
    )
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
    with tempfile.TemporaryDirectory(prefix="parity_mopoe_") as tmp:
        for seed in seeds:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            model = _model(data, args.ours_objective)
            init, trained = Path(tmp) / f"init_{seed}.pt", Path(tmp) / f"trained_{seed}.pt"
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, init)
            init_value = loss_at_init(model, data.train_x[:BATCH])
            tc = TrainConfig(epochs=s["epochs"], batch_size=BATCH, lr=LR, num_particles=1)
            t0 = time.perf_counter()
            ppl_vae.train(model, data, tc, seed=seed, progress=False)
            sec = time.perf_counter() - t0
            row_ours = {"train_seconds": round(sec, 1), "seconds_per_epoch": round(sec / s["epochs"], 2)}
            row_ours["loss_at_init"] = round(init_value, 3)
            row_ours.update(harness.multimodal_metrics(model, data, classifiers, s, seed))
            spec = {"seed": seed, "settings": s, "init": str(init), "trained": str(trained)}
            spec["prior_expert"] = args.official_prior_expert == "on"
            row_off = harness.run_official(Path(__file__), spec, checkout, threads=args.threads)
            official = _model(data)
            official.load_state_dict(torch.load(trained, weights_only=True))
            row_off.update(harness.multimodal_metrics(official, data, classifiers, s, seed))
            runs.append({"seed": seed, "ours": row_ours, "official": row_off})
            if not args.quick:
                print(f"seed {seed}: ours {row_ours}, official {row_off}", flush=True)

    out = {
        "method": f"MoPoE (mopoe, objective {args.ours_objective}) vs official joint_elbo",
        "official": {"repo": REPO, "commit": harness.checkout_commit(checkout), "expected_commit": COMMIT},
        "headline": "cross-modal coherence (cross_mean) and test log p(X) (IS, S draws), same evaluation code",
        **harness.multimodal_results(runs),
        "loss_at_init": {
            side: harness.spread([r[side]["loss_at_init"] for r in runs], 3) for side in ("ours", "official")
        },
        "official_loss_last_epoch": harness.spread([r["official"]["official_loss_last_epoch"] for r in runs], 3),
        "runs": runs,
        "seeds": list(seeds),
        "settings": {
            **s,
            **COMMON,
            "batch_size": BATCH,
            "lr": LR,
            "ours_objective": args.ours_objective,
            "official_prior_expert": args.official_prior_expert,
        },
        "data": repr(data),
        "network": "both: per-modality MLP experts 784-256-(16+16), decoders 16-256-784, our initial weights",
    }
    out["seconds_total"] = statistics.fsum(r[side]["train_seconds"] for r in runs for side in ("ours", "official"))
    harness.finish("parity_mopoe", out, args, device="cpu")


if __name__ == "__main__":
    main()
