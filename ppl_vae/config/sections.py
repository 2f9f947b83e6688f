"""Typed, validated configuration: a YAML file, or a shipped config by name (``ppl_vae/configs/``, package data),
plus dotted overrides (``train.epochs=5``).

Errors name the field and the bad value: ``ConfigError: model.latent_dim must be a positive integer, got -3``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from ..data.bundle import PIXEL_MODES
from ..data.multimodal import MULTIMODAL_KINDS
from ..data.sources import DATASETS, FOLDER_DATASETS
from ..data.storage import STORAGES
from ..errors import ConfigError
from .options import Section, _is_int, _is_num, option

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
    _prefix = "data"

    name: str = option(
        "digits",
        check=lambda v: isinstance(v, str) and (v in DATASETS or v == GIVEN_DATA or _function_name(v)),
        what=f"one of {list(DATASETS)}, 'module:function' (your data, from a module listed under imports:) or "
        f"{GIVEN_DATA!r} (the data passed to run_experiment, kept in the run folder)",
        doc="a dataset by name, or your own: 'module:function' names a function of a module or file listed under "
        "imports: that returns tensors, arrays, a Dataset or a DataBundle (ppl_vae.data.as_data)",
    )
    root: str | None = option(None, check=lambda v: v is None or isinstance(v, str), what="a folder path or null")
    download: bool = option(False)
    pixels: str = option("continuous", choices=PIXEL_MODES)
    val_fraction: float = option(0.1, ge=0, lt=1)
    limit: int | None = option(None, gt=0)
    image_size: int | None = option(None, gt=0)
    storage: str = option("memory", choices=STORAGES, doc="where pixels live between batches: ppl_vae.data.storage")
    workers: int = option(0, ge=0, doc="DataLoader processes reading the batches (storage != memory)")
    multimodal: str | None = option(None, choices=MULTIMODAL_KINDS, doc="ppl_vae.data.multimodal")
    num_modalities: int = option(3, ge=2)
    missing_rate: float = option(0.0, ge=0, lt=1)

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
    _prefix = "model"

    name: str = option("vae", check=lambda v: isinstance(v, str) and v != "", what="a model name")
    likelihood: str = option("bernoulli", choices=LIKELIHOODS)
    sigma2: float = option(1.0, gt=0)
    laplace_scale: float = option(0.1, gt=0)
    link: str = option("sigmoid", choices=("sigmoid", "identity"))
    arch: str = option("mlp", choices=ARCHS)
    latent_dim: int = option(2, gt=0)
    hidden: list[int] = option([256, 256], item_gt=0)
    activation: str = option("relu", choices=ACTIVATIONS)
    channels: int = option(32, gt=0)
    pixelcnn_window: int = option(
        0, check=_odd_window, what="0 (full receptive field) or an odd integer >= 3 (a local window)"
    )
    pixelcnn_layers: int = option(5, gt=0)
    options: dict = option({}, check=lambda v: isinstance(v, dict), what="a mapping of method-specific options")


@dataclass
class TrainConfig(Section):
    _prefix = "train"

    epochs: int = option(50, gt=0)
    batch_size: int = option(100, gt=0)
    lr: float = option(1e-3, gt=0)
    lr_schedule: str = option("none", choices=SCHEDULES)
    lr_gamma: float = option(0.1, gt=0, le=1)
    lr_step: int = option(10, gt=0)
    kl_warmup_epochs: int = option(0, ge=0)
    kl_warmup_shape: str = option("linear", choices=WARMUP_SHAPES)
    patience: int | None = option(None, gt=0)
    objective: str = option("auto", choices=OBJECTIVES)
    num_particles: int = option(1, gt=0)
    estimator: str = option("iwae", choices=ESTIMATORS)
    clip_norm: float | None = option(None, gt=0)
    eval_batch_size: int = option(500, gt=0)
    stop_delta: float | None = option(None, ge=0)
    min_epochs: int = option(1, gt=0)
    best_from_epoch: int = option(1, gt=0)
    validate_every_step: bool = option(False)
    jit: bool = option(False)
    min_elbo: float | None = option(
        -1e6, check=lambda v: v is None or _is_num(v), what="a number (nats per datapoint) or null"
    )
    devices: int = option(1, gt=0, doc="devices (processes) per node")
    num_nodes: int = option(
        1, gt=0, doc="machines of a multi-node job (launched by SLURM, torchrun or one command per node)"
    )
    strategy: str = option("auto", choices=STRATEGIES)
    accelerator: str = option("auto", choices=ACCELERATORS)
    precision: str = option("32-true", choices=PRECISIONS)
    logger: str = option("csv", choices=LOGGERS)

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
        if self.jit and self.objective == "iwae":
            raise ConfigError(f"{p}.jit must be false with {p}.objective='iwae' (TraceIWAE is not compiled), got true")
        if self.jit and self.kl_warmup_epochs > 0:
            raise ConfigError(
                f"{p}.jit must be false with {p}.kl_warmup_epochs > 0 (a compiled ELBO keeps the "
                f"warm-up weight it was traced with), got true"
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
        """KL warm-up weight β of an epoch, W = ``kl_warmup_epochs``: ``linear`` from 1/W to 1 over W epochs;
        ``exp`` 1 − exp(−(epoch + 1)/W), the VLAE code's 1 − exp(−t/τ) at epoch granularity (τ = W epochs)."""
        if self.kl_warmup_epochs <= 0:
            return 1.0
        if self.kl_warmup_shape == "exp":
            return 1.0 - math.exp(-(epoch + 1) / self.kl_warmup_epochs)
        return min(1.0, (epoch + 1) / self.kl_warmup_epochs)


@dataclass
class EvalConfig(Section):
    _prefix = "eval"

    num_samples: int = option(1000, gt=0)
    batch_size: int = option(100, gt=0)
    max_test: int | None = option(None, gt=0)


@dataclass
class Config(Section):
    name: str = option("vae_digits")
    seed: int = option(0, ge=0)
    device: str = option("auto", check=_device_name, what="'auto', 'cpu' or 'cuda[:N]'")
    output_dir: str = option("runs")
    imports: list[str] = option(
        [], check=_module_list, what="a list of Python modules or .py files that register methods"
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
    """Defaults ← YAML file ← dotted overrides, then validation. ``path`` is a YAML file or, when no such file
    exists, the name of a shipped config (``vae_fashion`` or ``vae_fashion.yaml``: :func:`shipped_configs`)."""
    values: dict = {}
    if path is not None:
        where, text = _read_config(path)
        try:
            values = load_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {where!r} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {where!r} must hold a mapping of sections, got {type(values).__name__}")
    return config_from_dict(apply_overrides(values, overrides or []))


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
        f"no shipped config is called {name!r}; shipped configs: {', '.join(shipped)} "
        "(`ppl-vae configs` lists them with their method and data)"
    )


def _is_bare_name(path: str | Path) -> bool:
    """``vae_fashion`` or ``vae_fashion.yaml``: no folder part, so it may name a shipped config."""
    text = os.fspath(path)
    return bool(text) and "/" not in text and os.sep not in text and not (os.altsep and os.altsep in text)


def _read_config(path: str | Path) -> tuple[str, str]:
    """(what to call it in a message, its text): a file wins over a shipped config of the same name."""
    p = _renamed(Path(path))
    if p.is_file():
        return str(p), p.read_text()
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
