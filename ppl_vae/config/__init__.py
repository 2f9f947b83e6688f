"""Configuration: the sections of a run's YAML (:mod:`.sections`) and the declarative options of a method
(:mod:`.options`, the ``option(...)`` mechanism every field is validated with)."""

from ..errors import ConfigError
from .options import NoOptions, Options, option
from .sections import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    check_resume_overrides,
    config_from_dict,
    load_config,
    load_yaml,
    parse_override,
    save_config,
)

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "load_config",
    "save_config",
    "load_yaml",
    "config_from_dict",
    "parse_override",
    "apply_overrides",
    "check_resume_overrides",
    "Options",
    "NoOptions",
    "option",
]
