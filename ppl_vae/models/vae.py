"""Variational autoencoder (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014) and its
conditional version (Sohn, Lee & Yan 2015; Kingma et al. 2014 M2 with observed labels).

Generative story, for each datapoint i of N (a minibatch is scaled by N/B):
    z_i ~ p(z) = N(0, I)
    x_i ~ p_θ(x | z_i, y_i)          (Bernoulli, Gaussian or Laplace, given by ``likelihood``)
Guide: q_φ(z_i | x_i, y_i) = N(μ_φ(x_i, y_i), diag σ_φ²(x_i, y_i)), reparameterised.
ELBO(x) = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..config.options import NoOptions
from ..config.sections import ModelConfig
from ..distributions.plate import data_plate
from ..distributions.priors import StandardNormalPrior
from ..errors import ConfigError
from ..nn.device import device_of
from ..nn.networks import BURDA, build_encoder_decoder
from ._common import config_likelihood, one_hot
from .registry import register_model

__all__ = ["VAE"]


class VAE(PyroModule):
    """A VAE as a Pyro program: ``model(x, y=None)`` and ``guide(x, y=None)``.

    Parts: ``encoder(x, c) -> (loc, scale)``, ``decoder(z, c) -> raw output``, ``likelihood(raw) -> p(x|z)``,
    ``prior(B) -> p(z)``. ``num_classes`` makes it conditional (labels enter encoder and decoder as one-hot).
    ``num_data`` is the training-set size N that scales the data plate.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        latent_dim: int,
        prior: nn.Module | None = None,
        num_data: int | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.prior = prior if prior is not None else StandardNormalPrior(latent_dim)
        self.latent_dim = latent_dim
        self.num_data = num_data
        self.num_classes = num_classes

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def _c(self, y):
        return one_hot(y, self.num_classes, type(self).__name__)

    @pyro_method
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None):
        c = self._c(y)
        with data_plate(x, self.num_data):
            z = pyro.sample("z", self.prior(x.shape[0]))
            pyro.sample("x", self.likelihood(self.decoder(z, c), event_dim=x.dim() - 1, x=x), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            pyro.sample("z", self.guide_dist(x, self._c(y)))

    def guide_dist(self, x, c=None) -> dist.TorchDistribution:
        """q(z|x, c) with batch shape (B,): a diagonal Gaussian here; methods with richer guides override this."""
        loc, scale = self.encoder(x, c)
        return dist.Normal(loc, scale).to_event(1)

    # Deterministic helpers for figures and evaluation (no Pyro sample sites).
    def encode(self, x, y=None):
        """(loc, scale) of q(z|x, y)."""
        return self.encoder(x, self._c(y))

    def decode(self, z, y=None):
        """E[x | z, y] in data space."""
        return self.likelihood.mean(self.decoder(z, self._c(y)))

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x, y)[0], y)

    def sample(self, n: int, y=None):
        """Decoded means of n draws from the prior (global torch RNG)."""
        dev = device_of(self)
        if y is not None:
            y = torch.as_tensor(y, device=dev)
        z = self.prior(n).sample()
        return self.decode(z.to(dev), y)


@register_model("vae", options=NoOptions)
@register_model("cvae", options=NoOptions)
def build_vae(cfg: ModelConfig, options, data_shape, num_data, num_classes) -> VAE:
    """``vae``, and ``cvae`` (labels enter encoder and decoder as one-hot vectors)."""
    lik = config_likelihood(cfg, data_shape)
    cond = cfg.name == "cvae"
    if cond and not num_classes:
        raise ConfigError("model.name='cvae' needs a dataset with class labels (num_classes), got none")
    latent_dim = BURDA["burda1"]["latent_dim"] if cfg.arch == "burda1" else cfg.latent_dim
    enc, dec = build_encoder_decoder(
        cfg.arch,
        data_shape,
        latent_dim,
        tuple(cfg.hidden),
        cfg.activation,
        cond_dim=num_classes if cond else 0,
        channels=cfg.channels,
    )
    return VAE(enc, dec, lik, latent_dim, num_data=num_data, num_classes=num_classes if cond else None)
