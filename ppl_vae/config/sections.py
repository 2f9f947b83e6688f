"""Typed, validated configuration: a YAML file, or a shipped config by name (``ppl_vae/configs/``, package data),
plus dotted overrides (``train.epochs=5``).

Errors name the field and the bad value: ``ConfigError: model.latent_dim must be a positive integer, got -3``.

Why this module is long: every field of the four sections is declared here with its constraint and its ``doc=``
text (the configuration reference of the documentation and ``ppl-vae configs`` are generated from them), and the
reading of a file (YAML, overrides, shipped configs, resume rules) sits beside the fields it fills.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from ..data.atomic import temporary_beside
from ..data.bundle import PIXEL_MODES
from ..data.multimodal import MULTIMODAL_KINDS
from ..data.sources import DATASETS, FOLDER_DATASETS
from ..data.storage import STORAGES
from ..errors import ConfigError, did_you_mean
from .options import Section, _is_int, _is_num, _shown, option

LIKELIHOODS = ("bernoulli", "gaussian", "laplace", "pixelcnn")
ARCHS = ("mlp", "conv", "resnet", "burda1", "burda2")
ACTIVATIONS = ("relu", "tanh", "elu", "softplus", "leaky_relu")
OBJECTIVES = ("auto", "elbo", "meanfield", "iwae")
ESTIMATORS = ("iwae", "dreg")
SCHEDULES = ("none", "exponential", "step", "cosine")
WARMUP_SHAPES = ("linear", "exp")
STRATEGIES = ("auto", "single_device", "ddp")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
LOGGERS = ("none", "csv", "tensorboard", "mlflow", "wandb")


def _odd_window(v) -> bool:
    return _is_int(v) and (v == 0 or (v >= 3 and v % 2 == 1))


def _device_name(v) -> bool:
    return isinstance(v, str) and (v in ("auto", "cpu") or v.startswith("cuda"))


GIVEN_DATA = "given"  # data.name of a run whose data were passed to run_experiment (kept in the run folder)


def _function_name(v: str) -> bool:
    """``module:function``: a module (or a file's stem) and a function name, each an identifier path."""
    module, _, fn = v.partition(":")
    return bool(module) and fn.isidentifier() and all(part.isidentifier() for part in module.split("."))


def _module_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) and s for s in v)


@dataclass
class DataConfig(Section):
    """The ``data`` section: which data set, how its pixels are presented, split and stored."""

    _prefix = "data"

    name: str = option(
        "digits",
        check=lambda v: isinstance(v, str) and (v in DATASETS or v == GIVEN_DATA or _function_name(v)),
        what=f"one of {list(DATASETS)}, 'module:function' (your data, from a module listed under imports:) or "
        f"{GIVEN_DATA!r} (the data passed to run_experiment, kept in the run folder)",
        suggest=DATASETS,
        doc="a dataset by name, or your own: 'module:function' names a function of a module or file listed under "
        "imports: that returns tensors, arrays, a Dataset or a DataBundle (ppl_vae.data.as_data)",
    )
    root: str | None = option(
        None,
        check=lambda v: v is None or isinstance(v, str),
        what="a folder path or null",
        doc="a folder holding the dataset's files (e.g. the raw IDX files of mnist/fashion_mnist/kmnist, gzipped or "
        "not; the class subfolders of image_folder); null: torchvision's default, and Debian's "
        "dataset-fashion-mnist folder is found by itself",
    )
    download: bool = option(
        False, doc="let torchvision download a missing dataset (needs the internet); false reads only what is on disk"
    )
    pixels: str = option(
        "continuous",
        choices=PIXEL_MODES,
        doc="how pixel values are presented: continuous grey levels in [0, 1], dequantized (uniform noise added once "
        "per image), binary_static (one fixed Bernoulli draw) or binary_dynamic (a fresh draw every epoch, from "
        "the seed)",
    )
    val_fraction: float = option(
        0.1,
        ge=0,
        lt=1,
        doc="share of the training images held out for validation (best checkpoint, early stopping); the test split "
        "is the dataset's own",
    )
    limit: int | None = option(
        None,
        gt=0,
        doc="keep at most this many training images (validation and test cut by the same factor), drawn from the "
        "seed; null: all",
    )
    image_size: int | None = option(
        None,
        gt=0,
        doc="resize (and centre-crop) images to this many pixels a side; null: the dataset's size (64 for celeba and "
        "image_folder)",
    )
    storage: str = option(
        "memory",
        choices=STORAGES,
        doc="where pixels live between batches: memory (float32 tensors), uint8 (8-bit, converted per batch), mmap "
        "(the IDX files mapped in place) or files (decoded per batch); batches are identical whichever",
    )
    workers: int = option(0, ge=0, doc="DataLoader processes reading the batches (storage != memory)")
    multimodal: str | None = option(
        None,
        choices=MULTIMODAL_KINDS,
        doc="make the data multimodal: poly (PolyFashion, data.num_modalities views of a class) or image_label "
        "(each image with its one-hot label); null: one modality (ppl_vae.data.multimodal)",
    )
    num_modalities: int = option(
        3,
        ge=2,
        doc="modalities per datapoint of data.multimodal: poly (each a different image of the same class under its "
        "own transform)",
    )
    missing_rate: float = option(
        0.0,
        ge=0,
        lt=1,
        doc="probability that a modality of a training or validation datapoint is dropped (one always stays; test "
        "data are complete)",
    )

    def check(self, p: str) -> None:
        if self.name not in DATASETS:  # your own data: what only a named dataset has is refused, not ignored
            for field, default in (
                ("root", None),
                ("download", False),
                ("limit", None),
                ("image_size", None),
                ("storage", "memory"),
                ("workers", 0),
            ):
                if getattr(self, field) != default:
                    raise ConfigError(
                        f"{p}.{field} = {getattr(self, field)!r} applies to the named datasets, not to "
                        f"{p}.name = {self.name!r} (your data are what your function returns): remove it"
                    )
        if self.workers and self.storage == "memory" and self.name not in FOLDER_DATASETS:
            raise ConfigError(
                f"{p}.workers = {self.workers} reads batches in worker processes, but {p}.storage = "
                f"'memory' holds {self.name!r} as float32 tensors already: set data.storage to uint8, "
                "mmap or files (or workers to 0)"
            )
        if self.multimodal is not None and self.storage != "memory":
            raise ConfigError(
                f"{p}.storage = {self.storage!r} is not available with {p}.multimodal (its "
                "modalities are built in memory from the images): use data.storage: memory"
            )


@dataclass
class ModelConfig(Section):
    """The ``model`` section: the method, its likelihood and networks, and its own ``options``."""

    _prefix = "model"

    name: str = option(
        "vae",
        check=lambda v: isinstance(v, str) and v != "",
        what="a model name",
        doc="the method: a registered name (ppl-vae configs lists the shipped runs; the Methods pages list them all) "
        "or one registered by a module under imports:",
    )
    likelihood: str = option(
        "bernoulli",
        choices=LIKELIHOODS,
        doc="p(x | z): bernoulli (grey levels or binary pixels), gaussian (variance model.sigma2), laplace (scale "
        "model.laplace_scale) or pixelcnn (an autoregressive decoder for binary images)",
    )
    sigma2: float = option(
        1.0,
        gt=0,
        doc="variance of the gaussian likelihood (0.5 is the original VAE's weighting, 1 a beta-VAE; sigma_vae can "
        "learn it)",
    )
    laplace_scale: float = option(0.1, gt=0, doc="scale b of the laplace likelihood")
    link: str = option(
        "sigmoid",
        choices=("sigmoid", "identity"),
        doc="maps the decoder's output to the mean of a gaussian or laplace likelihood: sigmoid (pixels in [0, 1]) or"
        " identity (any real values)",
    )
    arch: str = option(
        "mlp",
        choices=ARCHS,
        doc="encoder and decoder networks: mlp (through model.hidden), conv, resnet (pre-activation residual blocks),"
        " burda1 / burda2 (Burda et al.'s 1- and 2-layer tanh MLPs)",
    )
    latent_dim: int = option(2, gt=0, doc="size of the latent z (of each layer, for the hierarchical methods)")
    hidden: list[int] = option(
        [256, 256], item_gt=0, doc="hidden layer sizes of the mlp encoder and decoder (the decoder mirrors them)"
    )
    activation: str = option("relu", choices=ACTIVATIONS, doc="nonlinearity of the hidden layers")
    channels: int = option(32, gt=0, doc="channels of the conv / resnet networks and of the PixelCNN layers")
    pixelcnn_window: int = option(
        0,
        check=_odd_window,
        what="0 (full receptive field) or an odd integer >= 3 (a local window)",
        doc="receptive field of the pixelcnn likelihood: 0 the full gated PixelCNN, k a local k x k window of "
        "preceding pixels (the Variational Lossy Autoencoder's decoder)",
    )
    pixelcnn_layers: int = option(5, gt=0, doc="masked layers of the pixelcnn likelihood")
    options: dict = option(
        {},
        check=lambda v: isinstance(v, dict),
        what="a mapping of method-specific options",
        doc="the method's own settings, checked by its options dataclass (see the method's page and the method "
        "options reference)",
    )


@dataclass
class TrainConfig(Section):
    """The ``train`` section: the optimiser, the objective, stopping rules, warm-up and scale-out."""

    _prefix = "train"

    epochs: int = option(50, gt=0, doc="passes over the training data (shared by a method's stages)")
    batch_size: int = option(
        100, gt=0, doc="datapoints per optimiser step (the global batch, split over processes with devices > 1)"
    )
    lr: float = option(1e-3, gt=0, doc="Adam's learning rate (at epoch 0, before lr_schedule)")
    lr_schedule: str = option(
        "none",
        choices=SCHEDULES,
        doc="learning rate per epoch: none, exponential (lr · lr_gamma^(epoch / (epochs − 1))), step (× lr_gamma "
        "every lr_step epochs) or cosine (to 0 at the last epoch)",
    )
    lr_gamma: float = option(0.1, gt=0, le=1, doc="factor of the exponential and step schedules")
    lr_step: int = option(10, gt=0, doc="epochs between the step schedule's decays")
    kl_warmup_epochs: int = option(
        0,
        ge=0,
        doc="epochs over which the weight β of the latent terms rises to 1 (0: no warm-up); epochs with β < 1 do not "
        "count for best.pt or early stopping",
    )
    kl_warmup_shape: str = option(
        "linear",
        choices=WARMUP_SHAPES,
        doc="linear (β = (epoch + 1)/W) or exp (β = 1 − exp(−(epoch + 1)/W), the VLAE code's warm-up)",
    )
    kl_weight: float = option(
        1.0,
        gt=0,
        doc="weight of the latent terms (the KL) in the training objective once warmed up: β of a β-VAE "
        "(Higgins et al. 2017); validation, best.pt and evaluation use the ELBO itself",
    )
    patience: int | None = option(
        None, gt=0, doc="stop after this many epochs without a better validation ELBO; null: never stop early"
    )
    objective: str = option(
        "auto",
        choices=OBJECTIVES,
        doc="the Pyro ELBO of the default plan: auto (the KL in closed form where it exists), elbo (Trace_ELBO), "
        "meanfield (TraceMeanField_ELBO) or iwae (TraceIWAE); a method's plan may use its own",
    )
    num_particles: int = option(1, gt=0, doc="samples per datapoint: the ELBO's particles, or K of the IWAE bound")
    estimator: str = option(
        "iwae",
        choices=ESTIMATORS,
        doc="gradient of the IWAE bounds: iwae (standard) or dreg (doubly reparameterised, Tucker et al. 2018)",
    )
    clip_norm: float | None = option(None, gt=0, doc="clip the gradient's global norm to this value; null: no clipping")
    eval_batch_size: int = option(500, gt=0, doc="datapoints per batch of the validation ELBO")
    stop_delta: float | None = option(
        None,
        ge=0,
        doc="stop once the validation ELBO improves by less than this (nats) after min_epochs epochs (the δELBO < ε "
        "rule of Lin et al.'s Algorithm 1); null: off",
    )
    min_epochs: int = option(1, gt=0, doc="epochs before stop_delta may stop a run")
    best_from_epoch: int = option(1, gt=0, doc="first epoch (1-based) that may become best.pt or count for patience")
    validate_every_step: bool = option(
        False, doc="keep Pyro's argument and shape checks on at every step (by default they run on the first step only)"
    )
    jit: bool = option(
        False, doc="compile the ELBO (traced once per batch shape; objective elbo or meanfield, no KL warm-up)"
    )
    compile: bool = option(
        False,
        doc="train with torch.compile: the objective (auto, elbo, meanfield or iwae, with a reparameterised guide) "
        "and its gradients traced once per batch shape through the Pyro program into one compiled graph; otherwise "
        "(a plan's own objective, several processes) the model's networks (encoder, decoder, or the names in its "
        "compiled_networks) compiled, with one warning where the objective could not be traced; each batch shape "
        "compiles once (seconds to tens of seconds on a CPU)",
    )
    min_elbo: float | None = option(
        -1e6,
        check=lambda v: v is None or _is_num(v),
        what="a number (nats per datapoint) or null",
        doc="a training ELBO per datapoint below this stops the run as diverged (finite but absurd); null: only NaN "
        "or inf does",
    )
    devices: int = option(1, gt=0, doc="devices (processes) per node")
    num_nodes: int = option(
        1, gt=0, doc="machines of a multi-node job (launched by SLURM, torchrun or one command per node)"
    )
    strategy: str = option(
        "auto", choices=STRATEGIES, doc="how processes share the work (Lightning Fabric): auto, single_device or ddp"
    )
    accelerator: str = option(
        "auto", choices=ACCELERATORS, doc="the device kind of Lightning Fabric: auto, cpu, cuda or gpu"
    )
    precision: str = option(
        "32-true", choices=PRECISIONS, doc="numeric precision of Lightning Fabric: 32-true, bf16-mixed or 16-mixed"
    )
    logger: str = option(
        "csv",
        choices=LOGGERS,
        doc="where every epoch's scalars also go: csv (in the run folder), tensorboard, mlflow, wandb, or none",
    )
    threads: int | None = option(
        None,
        gt=0,
        doc="CPU threads of each process (torch.set_num_threads); null: half the cores, 1 to 4 — torch's default "
        "of one per core collapses on a machine shared with another busy process (bench/threads.py)",
    )
    flush_denormal: bool = option(
        True,
        doc="on a CPU, treat floats below 1.2e-38 as zero while training (torch.set_flush_denormal): importance "
        "weights and their gradients underflow into that range, where CPU arithmetic is tens of times slower "
        "(bench/denormals.py)",
    )

    def check(self, p: str) -> None:
        if self.world_size > 1 and self.batch_size < self.world_size:
            raise ConfigError(
                f"{p}.batch_size must be at least {p}.devices × {p}.num_nodes ({self.world_size}): each process "
                f"takes a share of the global batch, got {self.batch_size}"
            )
        if self.num_nodes > 1 and self.strategy != "ddp":
            raise ConfigError(
                f"{p}.strategy must be 'ddp' with {p}.num_nodes > 1 (one process group over the machines), "
                f"got {self.strategy!r}"
            )
        if self.jit and self.compile:
            raise ConfigError(
                f"{p}.jit and {p}.compile are two ways of compiling: set one of them to false (compile is "
                "torch.compile of the traced ELBO, jit TorchScript of it)"
            )
        if self.jit and self.objective == "iwae":
            raise ConfigError(f"{p}.jit must be false with {p}.objective='iwae' (TraceIWAE is not compiled), got true")
        if self.jit and self.kl_warmup_epochs > 0:
            raise ConfigError(
                f"{p}.jit must be false with {p}.kl_warmup_epochs > 0 (a compiled ELBO keeps the "
                f"warm-up weight it was traced with), got true"
            )
        if self.objective == "iwae" and self.kl_weight != 1.0:
            raise ConfigError(
                f"{p}.kl_weight must be 1 with {p}.objective='iwae' (the IWAE bound has no KL term to weigh), "
                f"got {self.kl_weight}"
            )
        if self.objective == "iwae" and self.kl_warmup_epochs > 0:
            raise ConfigError(
                f"{p}.kl_warmup_epochs must be 0 with {p}.objective='iwae' (the IWAE bound has no KL term to "
                f"anneal), got {self.kl_warmup_epochs}"
            )

    @property
    def uses_fabric(self) -> bool:
        """Whether these settings ask for Lightning Fabric (several devices, a strategy or a precision)."""
        return self.devices > 1 or self.num_nodes > 1 or self.strategy != "auto" or self.precision != "32-true"

    @property
    def world_size(self) -> int:
        """Processes of the job: ``devices`` on each of ``num_nodes`` machines."""
        return self.devices * self.num_nodes

    def lr_at(self, epoch: int) -> float:
        """Learning rate of a (0-based) epoch: a pure function of the epoch, so resumed runs match."""
        if self.lr_schedule == "exponential":
            return self.lr * self.lr_gamma ** (epoch / max(self.epochs - 1, 1))
        if self.lr_schedule == "step":
            return self.lr * self.lr_gamma ** (epoch // self.lr_step)
        if self.lr_schedule == "cosine":
            return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / max(self.epochs, 1)))
        return self.lr

    def beta_at(self, epoch: int) -> float:
        """Weight β of the latent terms in an epoch: ``kl_weight`` times the warm-up, W = ``kl_warmup_epochs``:
        ``linear`` from 1/W to 1 over W epochs; ``exp`` 1 − exp(−(epoch + 1)/W), the VLAE code's 1 − exp(−t/τ) at
        epoch granularity (τ = W epochs)."""
        if self.kl_warmup_epochs <= 0:
            warm = 1.0
        elif self.kl_warmup_shape == "exp":
            warm = 1.0 - math.exp(-(epoch + 1) / self.kl_warmup_epochs)
        else:
            warm = min(1.0, (epoch + 1) / self.kl_warmup_epochs)
        return self.kl_weight * warm


@dataclass
class EvalConfig(Section):
    """The ``eval`` section: the defaults of ``ppl-vae evaluate`` and ``diagnose``."""

    _prefix = "eval"

    num_samples: int = option(
        1000, gt=0, doc="importance samples per test image of log p̂(x) (the default of ppl-vae evaluate and diagnose)"
    )
    batch_size: int = option(100, gt=0, doc="test images per batch of the evaluation")
    max_test: int | None = option(
        None, gt=0, doc="evaluate the first max_test test images only; null: the whole test split"
    )


@dataclass
class Config(Section):
    """A whole configuration: the top-level fields and the four sections ``data``, ``model``, ``train`` and
    ``eval`` (:func:`load_config` reads one from YAML and :func:`config_from_dict` from a mapping, both validated)."""

    name: str = option("vae_digits", doc="the run's name: the prefix of its folder (<output_dir>/<name>-<timestamp>)")
    seed: int = option(
        0,
        ge=0,
        le=2**32 - 1,  # numpy's limit (pyro.set_rng_seed seeds numpy too)
        doc="seeds everything a run draws: splits, initial weights, minibatch order, binarisation, samples",
    )
    device: str = option(
        "auto",
        check=_device_name,
        what="'auto', 'cpu' or 'cuda[:N]'",
        doc="where to train: auto (CUDA when available), cpu, cuda or cuda:N",
    )
    output_dir: str = option("runs", doc="the folder that receives the run folders")
    imports: list[str] = option(
        [],
        check=_module_list,
        what="a list of Python modules or .py files that register methods",
        doc="modules or .py files (relative to the config file) to import before the model is built; a run "
        "copies the files into its folder (imports/, with their SHA-256 in imports/SHA256SUMS)",
    )
    resumes: list[dict] = option(
        [],
        check=lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v),
        what="a list of mappings (written by --resume)",
        doc="written by the library: one entry per resume that changed a field — the epoch it resumed after and "
        "each changed field as [before, after]",
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'the configuration'} must be a mapping, got {_shown(values)}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, val in values.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in known:
            hint = did_you_mean(key, known, f"{prefix}." if prefix else "")
            raise ConfigError(f"unknown field {where!r}{hint}; known fields: {sorted(known)}")
        if key in _SECTIONS and cls is Config:
            kwargs[key] = _build(_SECTIONS[key], {} if val is None else val, key)  # `data:` alone: defaults
        else:
            kwargs[key] = _coerce(known[key], val)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, val):
    """YAML gives ints for floats written without a dot (``lr: 1``); accept those for float fields."""
    if f.type in ("float", "float | None") and _is_int(val) and _is_num(val):  # not one too large for a float
        return float(val)
    return val


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` and ``5e-4`` as strings (its floats need a dot); here they are numbers, as they
    are in YAML 1.2, JSON and Python — the way most people write a learning rate."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """``yaml.safe_dump`` that quotes the strings :class:`_Loader` would read as numbers (``'1e5'``), so that a
    saved configuration reads back as it was."""


for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        if _tag == "tag:yaml.org,2002:float" and (_tag, _regexp) not in yaml.SafeDumper.yaml_implicit_resolvers.get(
            _first, []
        ):
            _Dumper.add_implicit_resolver(_tag, _regexp, [_first])


def load_yaml(text: str):
    """``yaml.safe_load`` that reads scientific notation without a dot (``1e-3``) as a number."""
    return yaml.load(text, Loader=_Loader)


# what reading a YAML text raises besides yaml.YAMLError: PyYAML's constructors fail on a value they cannot build
# with ValueError (``2001-13-01``, ``!!int x``, an integer of more than 4300 digits), KeyError (``!!bool maybe``),
# AttributeError (``!!timestamp x``), ...; deep nesting ends in RecursionError
_YAML_FAULTS = (yaml.YAMLError, ValueError, LookupError, AttributeError, TypeError, OverflowError, RecursionError)


def _yaml_problem(e: BaseException) -> str:
    """What is wrong in a YAML text and where, on one line (PyYAML's messages span several)."""
    if isinstance(e, RecursionError):
        return "it is nested too deeply"
    if isinstance(e, yaml.MarkedYAMLError):
        text = ", ".join(p for p in (e.context, e.problem) if p) or type(e).__name__
        mark = e.problem_mark or e.context_mark
        if mark is not None:
            text += f" (line {mark.line + 1}, column {mark.column + 1})"
    elif isinstance(e, yaml.YAMLError):
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, yaml.reader.ReaderError):
            text += f" (position {e.position})"
    else:
        text = f"a value it cannot build ({type(e).__name__}: {e})"
    return " ".join(text.split())


def config_from_dict(values: dict | None) -> Config:
    """A validated :class:`Config` from a mapping of sections (missing fields take their defaults; unknown ones
    and wrong values raise :class:`~ppl_vae.errors.ConfigError` naming the field)."""
    return _build(Config, {} if values is None else values, "").validate()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=5"`` → (["train", "epochs"], 5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"an override must look like section.field=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key or any(not k for k in key.split(".")):
        raise ConfigError(f"an override must look like section.field=value, got {text!r}")
    try:
        value = load_yaml(raw) if raw != "" else None
    except _YAML_FAULTS as e:
        raise ConfigError(f"could not parse the value of override {key!r}: {raw!r} ({_yaml_problem(e)})") from None
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """A copy of the mapping ``values`` with the command line's dotted overrides applied (``train.epochs=5``,
    ``model.options.num_components=3``; each value read as YAML)."""
    out = dict(values)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for k in path[:-1]:
            sub = node.get(k)
            node[k] = dict(sub) if isinstance(sub, dict) else {}
            node = node[k]
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file ← dotted overrides, then validation. ``path`` is a YAML file or, when no such file
    exists, the name of a shipped config (``vae_fashion`` or ``vae_fashion.yaml``: :func:`shipped_configs`)."""
    values: dict = {}
    if path is not None:
        try:
            where, text = _read_config(path)
        except OSError as e:  # a name too long for the file system, a file that cannot be read
            raise ConfigError(f"config file {os.fspath(path)!r} cannot be read: {e.strerror or e}") from None
        try:
            values = load_yaml(text)
        except _YAML_FAULTS as e:
            raise ConfigError(f"config file {where!r} is not valid YAML: {_yaml_problem(e)}") from None
        if values is None:  # an empty file (or only comments): the defaults
            values = {}
        if not isinstance(values, dict):  # also 0, false, [] and '', which were the defaults before
            raise ConfigError(f"config file {where!r} must hold a mapping of sections, got {type(values).__name__}")
        if isinstance(values.get("imports"), list) and Path(where).is_file():
            values["imports"] = _imports_beside(Path(where).parent, values["imports"])
    return config_from_dict(apply_overrides(values, overrides or []))


def _imports_beside(folder: Path, entries: list) -> list:
    """A config file's ``imports:`` files are found relative to the file (a run folder's own copies, a method
    file beside its config), whatever the current folder; an entry not found there keeps its meaning (the current
    folder) and its error if it is found nowhere."""
    out = []
    for e in entries:
        relative = isinstance(e, str) and not e.startswith("~") and not Path(e).is_absolute()  # ~user: home's
        if relative and (e.endswith(".py") or "/" in e):
            beside = folder / e
            try:
                e = str(beside.resolve()) if beside.is_file() else e
            except OSError:  # a name too long for the file system: left as it is (it fails at import, named)
                pass
        out.append(e)
    return out


def shipped_configs() -> dict[str, Traversable]:
    """The configs that ship inside the package (``ppl_vae/configs/<name>.yaml``, read through importlib.resources
    so that they are found in a wheel too), by name, sorted."""
    folder = resources.files("ppl_vae").joinpath("configs")
    found = {e.name[: -len(".yaml")]: e for e in folder.iterdir() if e.name.endswith(".yaml") and e.is_file()}
    return dict(sorted(found.items()))


def shipped_config(name: str, stacklevel: int = 2) -> tuple[str, Traversable]:
    """A shipped config by its name (``vae_fashion`` or ``vae_fashion.yaml``; an earlier name of
    :data:`RENAMED_CONFIGS` with a DeprecationWarning): (its name, its file). ConfigError listing the names if none."""
    shipped = shipped_configs()
    name = name.removesuffix(".yaml").removesuffix(".yml")
    if name in shipped:
        return name, shipped[name]
    new = RENAMED_CONFIGS.get(f"{name}.yaml", "").removesuffix(".yaml")
    if new in shipped:
        msg = f"{name} is now called {new}; the old name goes in the next release"
        warnings.warn(msg, DeprecationWarning, stacklevel=stacklevel)
        return new, shipped[new]
    raise ConfigError(
        f"no shipped config is called {name!r}{did_you_mean(name, shipped)}; shipped configs: {', '.join(shipped)} "
        "(`ppl-vae configs` lists them with their method and data)"
    )


def _is_bare_name(path: str | Path) -> bool:
    """``vae_fashion`` or ``vae_fashion.yaml``: no folder part, so it may name a shipped config."""
    text = os.fspath(path)
    return bool(text) and "/" not in text and os.sep not in text and not (os.altsep and os.altsep in text)


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {where!r} is not UTF-8 text (byte {data[e.start]:#04x} at position {e.start}): save it "
            "as UTF-8"
        ) from None


def _read_config(path: str | Path) -> tuple[str, str]:
    """(what to call it in a message, its text): a file wins over a shipped config of the same name."""
    p = _renamed(Path(path))
    if p.is_file():
        return str(p), _utf8(p.read_bytes(), str(p))
    if p.exists():
        raise ConfigError(f"config file {str(p)!r} is a folder: give a YAML file or the name of a shipped config")
    if _is_bare_name(path):
        try:
            name, file = shipped_config(os.fspath(path), stacklevel=4)
        except ConfigError as e:
            raise ConfigError(f"config file {str(p)!r} does not exist, and {e}") from None
        return f"{name} (shipped)", file.read_text()
    hint = ""
    if p.suffix in (".yaml", ".yml") and p.stem in shipped_configs():
        hint = f"; a shipped config has that name: `ppl-vae train {p.stem}` uses it"
    raise ConfigError(f"config file {str(p)!r} does not exist{hint}")


# the shipped configs before they were named <method>_<data>[_variant].yaml (kept loading for one release)
RENAMED_CONFIGS = {
    "guides_gamix.yaml": "gamix_fashion.yaml",
    "guides_laplace.yaml": "vlae_fashion.yaml",
    "guides_recursive.yaml": "rme_fashion.yaml",
    "guides_rivera.yaml": "gamix_fashion_aggregate.yaml",
    "guides_rivera_published.yaml": "gamix_fashion_published.yaml",
    "hierarchy_hvae_fashion.yaml": "hvae_fashion.yaml",
    "hierarchy_vlac_digits.yaml": "vlac_digits.yaml",
    "hierarchy_vladder_fashion.yaml": "vladder_fashion.yaml",
    "iwae_fashion.yaml": "vae2_fashion_iwae.yaml",
    "latent_epanechnikov_fashion.yaml": "vae_epanechnikov_fashion.yaml",
    "latent_poisson_fashion.yaml": "vae_poisson_fashion.yaml",
    "multimodal_mmvae_polyfashion.yaml": "mmvae_polyfashion.yaml",
    "multimodal_mmvm_polyfashion.yaml": "mmvm_polyfashion.yaml",
    "multimodal_mopoe_polyfashion.yaml": "mopoe_polyfashion.yaml",
    "multimodal_mvae_polyfashion.yaml": "mvae_polyfashion.yaml",
    "multimodal_sumpool_polyfashion.yaml": "sumpool_polyfashion.yaml",
    "strong_mae_fashion14.yaml": "mae_fashion14.yaml",
    "strong_vlossy_fashion14.yaml": "vlossy_fashion14.yaml",
}


def _renamed(path: Path) -> Path:
    """A shipped config asked for by its earlier name: the renamed file beside it, with a DeprecationWarning."""
    new = RENAMED_CONFIGS.get(path.name)
    if path.is_file() or new is None or not path.with_name(new).is_file():
        return path
    warnings.warn(
        f"{path.name} is now called {new}; the old name goes in the next release", DeprecationWarning, stacklevel=4
    )
    return path.with_name(new)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the configuration as YAML atomically (a temporary file in the same folder, then a rename): a killed
    process never leaves a half-written config.yaml."""
    path = Path(path)
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# fields that a resumed run may change: how the remaining epochs train (how long, the learning rate and its
# schedule, the KL warm-up, early stopping, logging), not what it trains; each change is recorded in the run's
# config.yaml (``resumes:``) and the epoch records carry the lr and β each epoch used
RESUMABLE = (
    "train.epochs",
    "train.lr",
    "train.lr_schedule",
    "train.lr_gamma",
    "train.lr_step",
    "train.kl_warmup_epochs",
    "train.kl_warmup_shape",
    "train.clip_norm",
    "train.stop_delta",
    "train.min_epochs",
    "train.best_from_epoch",
    "train.min_elbo",
    "train.patience",
    "train.eval_batch_size",
    "train.validate_every_step",
    "train.logger",
    "train.threads",
    "train.flush_denormal",
    "device",
    "output_dir",
    "eval.num_samples",
    "eval.batch_size",
    "eval.max_test",
)


def resume_changes(saved: dict, cfg: Config) -> dict[str, list]:
    """The fields of :data:`RESUMABLE` whose value in ``cfg`` differs from the configuration ``saved`` with a
    checkpoint, as ``{"train.lr": [before, after]}``; ConfigError for a changed field of ``train``/``eval`` that may
    not change (the model, the data and the seed are compared by the checkpoint check)."""
    now, defaults = cfg.to_dict(), Config().to_dict()
    changed: dict[str, list] = {}
    for section in ("train", "eval"):
        then = saved.get(section) or {}
        for key, value in now[section].items():
            before = then.get(key, defaults[section][key])
            if before == value:
                continue
            name = f"{section}.{key}"
            if name not in RESUMABLE:
                raise ConfigError(
                    f"--resume: {name} cannot change in a resumed run ({before!r} in the checkpoint, {value!r} "
                    f"now): it would train another model than the checkpoint holds; fields that may change: "
                    f"{', '.join(RESUMABLE)}. Start a new run for other settings"
                )
            changed[name] = [before, value]
    return changed


def check_resume_overrides(overrides: list[str], saved: Config | None = None) -> None:
    """Refuse overrides of a resumed run that change a field other than :data:`RESUMABLE` (an override repeating
    the value of ``saved``, the run's configuration, changes nothing): the run's own config.yaml is the source of
    truth for the model, the data and the optimisation."""
    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(path)
        if key in RESUMABLE:
            continue
        if saved is not None:
            now: Any = saved.to_dict()
            for part in path:
                now = now.get(part, _MISSING) if isinstance(now, dict) else _MISSING
            if now == value:
                continue
        raise ConfigError(
            f"--resume: {key} cannot change in a resumed run (it would train another model than the "
            f"checkpoint holds); fields that may change: {', '.join(RESUMABLE)}. Start a new run "
            f"with --run-dir for other settings"
        )


_MISSING = object()
