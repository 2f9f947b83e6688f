"""VAE with two stochastic layers (Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", 2016, §5).

Generative story:  z2 ~ N(0, I),  z1 ~ N(μ_θ(z2), diag σ_θ²(z2)),  x ~ p_θ(x | z1).
Guide:             z1 ~ N(μ_φ(x), diag σ_φ²(x)),   z2 ~ N(μ_φ(z1), diag σ_φ²(z1)).
log w = log p(z2) + log p(z1|z2) + log p(x|z1) − log q(z1|x) − log q(z2|z1).
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
from ..nn.device import device_of
from ..nn.networks import BURDA, GaussianHead, MLPDecoder, MLPEncoder
from ._common import config_likelihood, require_arch
from .registry import register_model

__all__ = ["VAE2"]


class VAE2(PyroModule):
    """Two stochastic layers; ``latent_dim`` is the top layer's size (z2), ``latent_dim1`` the lower one's (z1)."""

    conditional = False
    num_classes = None

    def __init__(
        self,
        data_shape,
        likelihood: nn.Module,
        latent_dim1: int = 100,
        latent_dim: int = 50,
        hidden1=(100, 100),
        hidden2=(50, 50),
        act: str = "tanh",
        num_data: int | None = None,
    ):
        super().__init__()
        self.encoder1 = MLPEncoder(data_shape, latent_dim1, hidden1, act)  # q(z1|x)
        self.encoder2 = GaussianHead(latent_dim1, hidden2, latent_dim, act)  # q(z2|z1)
        self.decoder2 = GaussianHead(latent_dim, hidden2, latent_dim1, act)  # p(z1|z2)
        self.decoder1 = MLPDecoder(data_shape, latent_dim1, hidden1, act)  # p(x|z1)
        self.likelihood = likelihood
        self.prior = StandardNormalPrior(latent_dim)
        self.latent_dim = latent_dim
        self.latent_dim1 = latent_dim1
        self.num_data = num_data

    @pyro_method
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            z2 = pyro.sample("z2", self.prior(x.shape[0]))
            loc1, scale1 = self.decoder2(z2)
            z1 = pyro.sample("z1", dist.Normal(loc1, scale1).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder1(z1), event_dim=x.dim() - 1, x=x), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            loc1, scale1 = self.encoder1(x)
            z1 = pyro.sample("z1", dist.Normal(loc1, scale1).to_event(1))
            loc2, scale2 = self.encoder2(z1)
            pyro.sample("z2", dist.Normal(loc2, scale2).to_event(1))

    def encode(self, x, y=None):
        """(loc, scale) of q(z2 | z1 = E[z1|x]): the top latent, for figures."""
        return self.encoder2(self.encoder1(x)[0])

    def decode(self, z, y=None):
        """E[x | z1 = E[z1|z2]]."""
        return self.likelihood.mean(self.decoder1(self.decoder2(z)[0]))

    def reconstruct(self, x, y=None):
        return self.likelihood.mean(self.decoder1(self.encoder1(x)[0]))

    def sample(self, n: int, y=None):
        """Ancestral sampling z2 → z1 → E[x|z1]."""
        z2 = self.prior(n).sample().to(device_of(self))
        loc1, scale1 = self.decoder2(z2)
        z1 = dist.Normal(loc1, scale1).sample()
        return self.likelihood.mean(self.decoder1(z1))


@register_model("vae2", options=NoOptions)
def build_vae2(cfg: ModelConfig, options, data_shape, num_data, num_classes) -> VAE2:
    """``arch: burda2`` is Burda et al.'s 784-100-100-100(z1)-50-50-50(z2) tanh network; ``arch: mlp`` uses
    ``hidden`` for x↔z1 (z1 of 2·latent_dim) and half of it for z1↔z2."""
    require_arch(cfg, "burda2", "mlp")
    lik = config_likelihood(cfg, data_shape)
    if cfg.arch == "burda2":
        b = BURDA["burda2"]
        return VAE2(
            data_shape, lik, b["latent_dim"], b["latent_dim2"], b["hidden"], b["hidden2"], b["act"], num_data=num_data
        )
    h = tuple(cfg.hidden)
    return VAE2(
        data_shape,
        lik,
        2 * cfg.latent_dim,
        cfg.latent_dim,
        h,
        tuple(max(x // 2, 1) for x in h),
        cfg.activation,
        num_data=num_data,
    )
