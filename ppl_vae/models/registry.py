"""Model builders by name: a method's file registers ``@register_model("name")`` and the configuration's
``model.name`` picks it. A builder takes ``(cfg: ModelConfig, data_shape, num_data, num_classes)``."""

from __future__ import annotations

from typing import Callable

from ..errors import ConfigError

_BUILDERS: dict[str, Callable] = {}


def register_model(name: str):
    def deco(fn: Callable) -> Callable:
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"a model named {name!r} is registered already")
        _BUILDERS[name] = fn
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def get_builder(name: str) -> Callable:
    if name not in _BUILDERS:
        raise ConfigError(f"model.name must be one of {model_names()}, got {name!r}")
    return _BUILDERS[name]


def check_options(cfg, allowed: dict) -> dict:
    """``cfg.options`` merged over ``allowed`` (the defaults); unknown keys are a ConfigError."""
    unknown = sorted(set(cfg.options) - set(allowed))
    if unknown:
        raise ConfigError(f"model.options has unknown keys {unknown} for model.name={cfg.name!r}; "
                          f"known: {sorted(allowed)}")
    return {**allowed, **cfg.options}
