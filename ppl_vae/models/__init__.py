"""Models: one file per method, each a ``PyroModule`` with ``model(x, y=None)`` and ``guide(x, y=None)``.

Every module of this package is imported here, so a method's file registers its builder by itself
(``@register_model("name")``) and becomes available as ``model.name`` in a configuration.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..config import ModelConfig
from ..errors import ConfigError
from ..likelihoods import build_likelihood
from ..nets import BURDA, build_encoder_decoder
from ._common import DATA_PLATE, data_plate
from .linear_gaussian import LinearGaussianVAE
from .registry import check_options, get_builder, model_names, register_model
from .vae import VAE
from .vae2 import TwoLayerVAE

__all__ = ["VAE", "TwoLayerVAE", "LinearGaussianVAE", "build_model", "data_plate", "DATA_PLATE", "register_model",
           "model_names", "check_options"]


def build_model(cfg: ModelConfig, data_shape, num_data: int | None = None, num_classes: int | None = None):
    """Assemble the model named ``cfg.name`` from its configuration (networks, likelihood, prior, guide)."""
    cfg.validate()
    return get_builder(cfg.name)(cfg, tuple(data_shape), num_data, num_classes)


@register_model("vae")
@register_model("cvae")
def _build_vae(cfg: ModelConfig, data_shape, num_data, num_classes):
    check_options(cfg, {})
    lik = build_likelihood(cfg.likelihood, sigma2=cfg.sigma2, laplace_scale=cfg.laplace_scale, link=cfg.link)
    cond = cfg.name == "cvae"
    if cond and not num_classes:
        raise ConfigError("model.name='cvae' needs a dataset with class labels (num_classes), got none")
    latent_dim = BURDA["burda1"]["latent_dim"] if cfg.arch == "burda1" else cfg.latent_dim
    enc, dec = build_encoder_decoder(cfg.arch, data_shape, latent_dim, tuple(cfg.hidden), cfg.activation,
                                     cond_dim=num_classes if cond else 0, channels=cfg.channels)
    return VAE(enc, dec, lik, latent_dim, num_data=num_data, num_classes=num_classes if cond else None)


@register_model("vae2")
def _build_vae2(cfg: ModelConfig, data_shape, num_data, num_classes):
    check_options(cfg, {})
    lik = build_likelihood(cfg.likelihood, sigma2=cfg.sigma2, laplace_scale=cfg.laplace_scale, link=cfg.link)
    if cfg.arch == "burda2":
        b = BURDA["burda2"]
        return TwoLayerVAE(data_shape, lik, b["latent_dim"], b["latent_dim2"], b["hidden"], b["hidden2"], b["act"],
                           num_data=num_data)
    h = tuple(cfg.hidden)
    return TwoLayerVAE(data_shape, lik, 2 * cfg.latent_dim, cfg.latent_dim, h, tuple(max(x // 2, 1) for x in h),
                       cfg.activation, num_data=num_data)


for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
