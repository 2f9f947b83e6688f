"""Typed, validated configuration: YAML files in ``configs/`` plus dotted overrides (``train.epochs=5``).

Errors name the field and the bad value: ``ConfigError: model.latent_dim must be a positive integer, got -3``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

DATASETS = ("digits", "mnist", "fashion_mnist", "kmnist", "omniglot", "celeba", "image_folder")
IDX_DATASETS = ("mnist", "fashion_mnist", "kmnist")  # data.storage: mmap reads their files in place
FOLDER_DATASETS = ("omniglot", "celeba", "image_folder")  # data.storage: files decodes them per batch
STORAGES = ("memory", "uint8", "mmap", "files")  # ppl_vae.data.storage
MULTIMODAL_KINDS = ("poly", "image_label")  # ppl_vae.data.multimodal
PIXELS = ("continuous", "dequantized", "binary_static", "binary_dynamic")
LIKELIHOODS = ("bernoulli", "gaussian", "laplace", "pixelcnn")
ARCHS = ("mlp", "conv", "resnet", "burda1", "burda2")
OBJECTIVES = ("auto", "elbo", "meanfield", "iwae")
SCHEDULES = ("none", "exponential", "step", "cosine")
WARMUP_SHAPES = ("linear", "exp")
# the Lightning path (ppl_vae.training.distributed) and the experiment loggers (ppl_vae.training.loggers)
STRATEGIES = ("auto", "single_device", "ddp")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu")
PRECISIONS = ("32-true", "bf16-mixed")
LOGGERS = ("none", "csv", "tensorboard", "mlflow")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(cond: bool, where: str, what: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{where} must be {what}, got {value!r}")


def _positive_int(where, v):
    _check(_is_int(v) and v > 0, where, "a positive integer", v)


def _one_of(where, v, options):
    _check(v in options, where, f"one of {list(options)}", v)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    download: bool = False
    pixels: str = "continuous"
    val_fraction: float = 0.1
    limit: int | None = None
    image_size: int | None = None
    storage: str = "memory"  # memory | uint8 | mmap (IDX files) | files (folder datasets): ppl_vae.data.storage
    workers: int = 0  # DataLoader processes reading the batches (storage != memory)
    multimodal: str | None = None  # 'poly' (PolyFashion-style) or 'image_label': ppl_vae.data.multimodal
    num_modalities: int = 3
    missing_rate: float = 0.0

    def validate(self, p="data"):
        _one_of(f"{p}.name", self.name, DATASETS)
        _one_of(f"{p}.pixels", self.pixels, PIXELS)
        _check(self.root is None or isinstance(self.root, str), f"{p}.root", "a folder path or null", self.root)
        _check(isinstance(self.download, bool), f"{p}.download", "true or false", self.download)
        _check(
            _is_num(self.val_fraction) and 0 <= self.val_fraction < 1,
            f"{p}.val_fraction",
            "a number in [0, 1)",
            self.val_fraction,
        )
        if self.limit is not None:
            _positive_int(f"{p}.limit", self.limit)
        if self.image_size is not None:
            _positive_int(f"{p}.image_size", self.image_size)
        _one_of(f"{p}.storage", self.storage, STORAGES)
        _check(_is_int(self.workers) and self.workers >= 0, f"{p}.workers", "an integer >= 0", self.workers)
        if self.workers and self.storage == "memory" and self.name not in FOLDER_DATASETS:
            raise ConfigError(
                f"{p}.workers = {self.workers} reads batches in worker processes, but {p}.storage = "
                f"'memory' holds {self.name!r} as float32 tensors already: set data.storage to uint8, "
                "mmap or files (or workers to 0)"
            )
        if self.multimodal is not None:
            _one_of(f"{p}.multimodal", self.multimodal, MULTIMODAL_KINDS)
            if self.storage != "memory":
                raise ConfigError(
                    f"{p}.storage = {self.storage!r} is not available with {p}.multimodal (its "
                    "modalities are built in memory from the images): use data.storage: memory"
                )
        _check(
            isinstance(self.num_modalities, int)
            and not isinstance(self.num_modalities, bool)
            and self.num_modalities >= 2,
            f"{p}.num_modalities",
            "an integer >= 2",
            self.num_modalities,
        )
        _check(
            _is_num(self.missing_rate) and 0 <= self.missing_rate < 1,
            f"{p}.missing_rate",
            "a number in [0, 1)",
            self.missing_rate,
        )


@dataclass
class ModelConfig:
    name: str = "vae"
    likelihood: str = "bernoulli"
    sigma2: float = 1.0
    laplace_scale: float = 0.1
    link: str = "sigmoid"
    arch: str = "mlp"
    latent_dim: int = 2
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    channels: int = 32
    pixelcnn_window: int = 0  # likelihood 'pixelcnn': 0 = full receptive field, k = the local k×k window
    pixelcnn_layers: int = 5
    options: dict = field(default_factory=dict)

    def validate(self, p="model"):
        _check(isinstance(self.name, str) and self.name != "", f"{p}.name", "a model name", self.name)
        _check(isinstance(self.options, dict), f"{p}.options", "a mapping of method-specific options", self.options)
        _one_of(f"{p}.likelihood", self.likelihood, LIKELIHOODS)
        _one_of(f"{p}.arch", self.arch, ARCHS)
        _one_of(f"{p}.link", self.link, ("sigmoid", "identity"))
        _one_of(f"{p}.activation", self.activation, ("relu", "tanh", "elu", "softplus", "leaky_relu"))
        _positive_int(f"{p}.latent_dim", self.latent_dim)
        _positive_int(f"{p}.channels", self.channels)
        _positive_int(f"{p}.pixelcnn_layers", self.pixelcnn_layers)
        _check(
            _is_int(self.pixelcnn_window)
            and (self.pixelcnn_window == 0 or (self.pixelcnn_window >= 3 and self.pixelcnn_window % 2 == 1)),
            f"{p}.pixelcnn_window",
            "0 (full receptive field) or an odd integer >= 3 (a local window)",
            self.pixelcnn_window,
        )
        _check(_is_num(self.sigma2) and self.sigma2 > 0, f"{p}.sigma2", "a positive number", self.sigma2)
        _check(
            _is_num(self.laplace_scale) and self.laplace_scale > 0,
            f"{p}.laplace_scale",
            "a positive number",
            self.laplace_scale,
        )
        _check(
            isinstance(self.hidden, list) and all(_is_int(h) and h > 0 for h in self.hidden),
            f"{p}.hidden",
            "a list of positive integers",
            self.hidden,
        )
        if self.name == "vae2" and self.arch not in ("burda2", "mlp"):
            raise ConfigError(f"{p}.arch must be 'burda2' or 'mlp' for model.name='vae2', got {self.arch!r}")
        if self.arch == "burda2" and self.name != "vae2":
            raise ConfigError(
                f"{p}.arch='burda2' is the two-stochastic-layer architecture: set model.name to "
                f"'vae2', got model.name={self.name!r}"
            )


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 100
    lr: float = 1e-3
    lr_schedule: str = "none"
    lr_gamma: float = 0.1
    lr_step: int = 10
    kl_warmup_epochs: int = 0
    kl_warmup_shape: str = "linear"
    patience: int | None = None
    objective: str = "auto"
    num_particles: int = 1
    estimator: str = "iwae"
    clip_norm: float | None = None
    eval_batch_size: int = 500
    stop_delta: float | None = None
    min_epochs: int = 1
    best_from_epoch: int = 1
    validate_every_step: bool = False
    jit: bool = False
    min_elbo: float | None = -1e6
    devices: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    precision: str = "32-true"
    logger: str = "csv"

    def validate(self, p="train"):
        _positive_int(f"{p}.epochs", self.epochs)
        _positive_int(f"{p}.batch_size", self.batch_size)
        _positive_int(f"{p}.eval_batch_size", self.eval_batch_size)
        _check(_is_num(self.lr) and self.lr > 0, f"{p}.lr", "a positive number", self.lr)
        _one_of(f"{p}.lr_schedule", self.lr_schedule, SCHEDULES)
        _check(_is_num(self.lr_gamma) and 0 < self.lr_gamma <= 1, f"{p}.lr_gamma", "a number in (0, 1]", self.lr_gamma)
        _positive_int(f"{p}.lr_step", self.lr_step)
        _check(
            _is_int(self.kl_warmup_epochs) and self.kl_warmup_epochs >= 0,
            f"{p}.kl_warmup_epochs",
            "a non-negative integer",
            self.kl_warmup_epochs,
        )
        _one_of(f"{p}.kl_warmup_shape", self.kl_warmup_shape, WARMUP_SHAPES)
        if self.patience is not None:
            _positive_int(f"{p}.patience", self.patience)
        _one_of(f"{p}.objective", self.objective, OBJECTIVES)
        _positive_int(f"{p}.num_particles", self.num_particles)
        _one_of(f"{p}.estimator", self.estimator, ("iwae", "dreg"))
        if self.clip_norm is not None:
            _check(
                _is_num(self.clip_norm) and self.clip_norm > 0,
                f"{p}.clip_norm",
                "a positive number or null",
                self.clip_norm,
            )
        if self.stop_delta is not None:
            _check(
                _is_num(self.stop_delta) and self.stop_delta >= 0,
                f"{p}.stop_delta",
                "a non-negative number or null",
                self.stop_delta,
            )
        _positive_int(f"{p}.min_epochs", self.min_epochs)
        _positive_int(f"{p}.best_from_epoch", self.best_from_epoch)
        _check(
            isinstance(self.validate_every_step, bool),
            f"{p}.validate_every_step",
            "true or false",
            self.validate_every_step,
        )
        _check(isinstance(self.jit, bool), f"{p}.jit", "true or false", self.jit)
        if self.min_elbo is not None:
            _check(_is_num(self.min_elbo), f"{p}.min_elbo", "a number (nats per datapoint) or null", self.min_elbo)
        _positive_int(f"{p}.devices", self.devices)
        _one_of(f"{p}.strategy", self.strategy, STRATEGIES)
        _one_of(f"{p}.accelerator", self.accelerator, ACCELERATORS)
        _one_of(f"{p}.precision", self.precision, PRECISIONS)
        _one_of(f"{p}.logger", self.logger, LOGGERS)
        if self.devices > 1 and self.batch_size < self.devices:
            raise ConfigError(
                f"{p}.batch_size must be at least {p}.devices ({self.devices}): each process takes a "
                f"share of the global batch, got {self.batch_size}"
            )
        if self.jit and self.objective == "iwae":
            raise ConfigError(f"{p}.jit must be false with {p}.objective='iwae' (TraceIWAE is not compiled), got true")
        if self.jit and self.kl_warmup_epochs > 0:
            raise ConfigError(
                f"{p}.jit must be false with {p}.kl_warmup_epochs > 0 (a compiled ELBO keeps the "
                f"warm-up weight it was traced with), got true"
            )

    @property
    def uses_fabric(self) -> bool:
        """Whether these settings ask for Lightning Fabric (several devices, a strategy or a precision)."""
        return self.devices > 1 or self.strategy != "auto" or self.precision != "32-true"

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
        """KL warm-up weight β of an epoch, W = ``kl_warmup_epochs``: ``linear`` from 1/W to 1 over W epochs;
        ``exp`` 1 − exp(−(epoch + 1)/W), the VLAE code's 1 − exp(−t/τ) at epoch granularity (τ = W epochs)."""
        if self.kl_warmup_epochs <= 0:
            return 1.0
        if self.kl_warmup_shape == "exp":
            return 1.0 - math.exp(-(epoch + 1) / self.kl_warmup_epochs)
        return min(1.0, (epoch + 1) / self.kl_warmup_epochs)


@dataclass
class EvalConfig:
    num_samples: int = 1000
    batch_size: int = 100
    max_test: int | None = None

    def validate(self, p="eval"):
        _positive_int(f"{p}.num_samples", self.num_samples)
        _positive_int(f"{p}.batch_size", self.batch_size)
        if self.max_test is not None:
            _positive_int(f"{p}.max_test", self.max_test)


@dataclass
class Config:
    name: str = "vae_digits"
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs"
    imports: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        _check(isinstance(self.name, str) and self.name != "", "name", "a non-empty string", self.name)
        _check(_is_int(self.seed) and self.seed >= 0, "seed", "a non-negative integer", self.seed)
        _check(
            isinstance(self.device, str) and (self.device in ("auto", "cpu") or self.device.startswith("cuda")),
            "device",
            "'auto', 'cpu' or 'cuda[:N]'",
            self.device,
        )
        _check(
            isinstance(self.imports, list) and all(isinstance(v, str) and v for v in self.imports),
            "imports",
            "a list of Python modules or .py files that register methods",
            self.imports,
        )
        self.data.validate()
        self.model.validate()
        self.train.validate()
        self.eval.validate()
        if self.train.objective == "iwae" and self.train.kl_warmup_epochs > 0:
            raise ConfigError(
                "train.kl_warmup_epochs must be 0 with train.objective='iwae' (the IWAE bound has no "
                f"KL term to anneal), got {self.train.kl_warmup_epochs}"
            )
        if self.model.name == "cvae" and self.data.name == "celeba":
            raise ConfigError("model.name='cvae' needs class labels, which data.name='celeba' does not have")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'the configuration'} must be a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, val in values.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"unknown field {where!r}; known fields: {sorted(known)}")
        if key in _SECTIONS and cls is Config:
            kwargs[key] = _build(_SECTIONS[key], val or {}, key)
        else:
            kwargs[key] = _coerce(known[key], val)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, val):
    """YAML gives ints for floats written without a dot (``lr: 1``); accept those for float fields."""
    if f.type in ("float", "float | None") and _is_int(val):
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


def load_yaml(text: str):
    """``yaml.safe_load`` that reads scientific notation without a dot (``1e-3``) as a number."""
    return yaml.load(text, Loader=_Loader)


def config_from_dict(values: dict | None) -> Config:
    return _build(Config, values or {}, "").validate()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=5"`` → (["train", "epochs"], 5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"an override must look like section.field=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key or any(not k for k in key.split(".")):
        raise ConfigError(f"an override must look like section.field=value, got {text!r}")
    try:
        value = load_yaml(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"could not parse the value of override {key!r}: {raw!r} ({e})") from None
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
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
    """Defaults ← YAML file ← dotted overrides, then validation."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            values = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(values).__name__}")
    return config_from_dict(apply_overrides(values, overrides or []))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the configuration as YAML atomically (a temporary file in the same folder, then a rename): a killed
    process never leaves a half-written config.yaml."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# fields that a resumed run may change: how long and how it runs, not what it trains
RESUMABLE = (
    "train.epochs",
    "train.patience",
    "train.eval_batch_size",
    "train.validate_every_step",
    "train.logger",
    "device",
    "output_dir",
    "eval.num_samples",
    "eval.batch_size",
    "eval.max_test",
)


def check_resume_overrides(overrides: list[str]) -> None:
    """Refuse overrides of a resumed run other than :data:`RESUMABLE`: the run's own config.yaml is the source of
    truth for the model, the data and the optimisation."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key not in RESUMABLE:
            raise ConfigError(
                f"--resume: {key} cannot change in a resumed run (it would train another model than the "
                f"checkpoint holds); fields that may change: {', '.join(RESUMABLE)}. Start a new run "
                f"with --run-dir for other settings"
            )
