"""Models: one file per method, each a ``PyroModule`` with ``model(x, y=None)`` and ``guide(x, y=None)``."""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import ConfigError
from ..likelihoods import build_likelihood
from ..nets import BURDA, build_encoder_decoder
from ._common import DATA_PLATE, data_plate
from .linear_gaussian import LinearGaussianVAE
from .vae import VAE
from .vae2 import TwoLayerVAE

__all__ = ["VAE", "TwoLayerVAE", "LinearGaussianVAE", "build_model", "data_plate", "DATA_PLATE"]


def build_model(cfg: ModelConfig, data_shape, num_data: int | None = None, num_classes: int | None = None):
    """Assemble a model from its configuration: networks + likelihood + prior (+ labels for ``cvae``)."""
    cfg.validate()
    lik = build_likelihood(cfg.likelihood, sigma2=cfg.sigma2, laplace_scale=cfg.laplace_scale, link=cfg.link)
    if cfg.name == "vae2":
        if cfg.arch == "burda2":
            b = BURDA["burda2"]
            return TwoLayerVAE(data_shape, lik, b["latent_dim"], b["latent_dim2"], b["hidden"], b["hidden2"], b["act"],
                               num_data=num_data)
        h = tuple(cfg.hidden)
        return TwoLayerVAE(data_shape, lik, 2 * cfg.latent_dim, cfg.latent_dim, h, tuple(x // 2 for x in h),
                           cfg.activation, num_data=num_data)
    cond = cfg.name == "cvae"
    if cond and not num_classes:
        raise ConfigError("model.name='cvae' needs a dataset with class labels (num_classes), got none")
    latent_dim = BURDA["burda1"]["latent_dim"] if cfg.arch == "burda1" else cfg.latent_dim
    enc, dec = build_encoder_decoder(cfg.arch, data_shape, latent_dim, tuple(cfg.hidden), cfg.activation,
                                     cond_dim=num_classes if cond else 0, channels=cfg.channels)
    return VAE(enc, dec, lik, latent_dim, num_data=num_data, num_classes=num_classes if cond else None)
