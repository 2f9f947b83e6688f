"""Models: one file per method, each a ``PyroModule`` with ``model(x, y=None)`` and ``guide(x, y=None)``.

Every module of this package is imported here, so a method's file registers its builder (and its training plan)
by itself — ``@register_model("name", options=...)`` — and becomes available as ``model.name`` in a
configuration. A method's file, class and registry key share one name (``vlae.py``, ``VLAE``, ``"vlae"``).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil

from ..config.sections import ModelConfig
from ..data.multimodal import Layout
from ..errors import ConfigError
from .gamix import GAMIX
from .hvae import HVAE, VAE2
from .ladder import LaDDer
from .linear_gaussian import LinearGaussianVAE
from .mae import MAE
from .mmvae import MMVAE
from .mmvm import MMVM
from .mopoe import MoPoE
from .mvae import MVAE
from .registry import (
    RECIPE_ATTR,
    BuildRecipe,
    get_method,
    import_methods,
    model_names,
    recipe_of,
    register_model,
    resolve_name,
)
from .rme import RME
from .sigma_vae import SigmaVAE
from .sumpool import SumPool
from .vae import VAE
from .vae_epanechnikov import VAEEpanechnikov
from .vae_poisson import VAEPoisson
from .vlac import VLAC
from .vladder import VLadder
from .vlae import VLAE
from .vlossy import VLossy
from .wise_ale import WiseALE

__all__ = [
    "build_model",
    "register_model",
    "model_names",
    "get_method",
    "resolve_name",
    "import_methods",
    "BuildRecipe",
    "recipe_of",
    "VAE",
    "VAE2",
    "LinearGaussianVAE",
    "VLAE",
    "RME",
    "GAMIX",
    "LaDDer",
    "WiseALE",
    "SigmaVAE",
    "VAEEpanechnikov",
    "VAEPoisson",
    "HVAE",
    "VLadder",
    "VLAC",
    "MAE",
    "VLossy",
    "MVAE",
    "MMVAE",
    "MoPoE",
    "SumPool",
    "MMVM",
]


def build_model(cfg: ModelConfig, data_shape, num_data: int | None = None, num_classes: int | None = None):
    """Assemble the model named ``cfg.name`` from its configuration (networks, likelihood, prior, guide); the
    method's ``model.options`` are validated by its options dataclass first. The model keeps what it was built
    from as ``model.ppl_vae_recipe`` (a :class:`~ppl_vae.models.registry.BuildRecipe`, read by
    :func:`ppl_vae.save`)."""
    cfg.validate()
    method = get_method(cfg.name)
    options = method.options.parse(cfg.options, method=cfg.name)
    shape = data_shape if isinstance(data_shape, Layout) else tuple(data_shape)  # multimodal data: its Layout
    if isinstance(shape, Layout) and not method.multimodal:
        multimodal = [n for n in model_names() if get_method(n).multimodal]
        raise ConfigError(
            f"model.name={cfg.name!r} models one image per datapoint, but the data are multimodal "
            f"({shape.num_modalities} modalities: {', '.join(shape.names)}): choose a multimodal method "
            f"({', '.join(multimodal)}) or set data.multimodal: null"
        )
    try:
        model = method.build(cfg, options, shape, num_data, num_classes)
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        raise ConfigError(
            f"model.name={cfg.name!r} with model.latent_dim={cfg.latent_dim}, model.hidden={list(cfg.hidden)}, "
            f"model.channels={cfg.channels} needs more memory than there is ({_first_line(e)}): choose smaller sizes"
        ) from None
    recipe = BuildRecipe(
        method.name, dataclasses.replace(copy.deepcopy(cfg), name=method.name), shape, num_data, num_classes
    )
    try:
        setattr(model, RECIPE_ATTR, recipe)
    except AttributeError:  # a builder's object that takes no attributes: it cannot be saved by recipe
        pass
    return model


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says memory ran out (CPU allocator, CUDA, Python), whatever torch's wording."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _first_line(e: BaseException) -> str:
    text = str(e)
    at = text.find("you tried to allocate")
    return (text[at:].split(".")[0] if at >= 0 else text.splitlines()[0] if text else type(e).__name__).strip()


# a method file added to this folder registers itself when the package is imported
for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
