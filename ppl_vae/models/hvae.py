r"""Markov hierarchical VAE with L stochastic layers (the two-layer VAE of Burda et al. 2016, generalised): the
baseline of Zhao, Song & Ermon (2017), who prove that at the ELBO optimum its upper layers can be ignored.

Generative story (sites ``z1`` … ``zL``):
    z_L ~ N(0, I),   z_l ~ N(μ_θ(z_{l+1}), diag σ_θ²(z_{l+1})),  l = L−1..1,   x ~ p_θ(x | z_1)
Guide (bottom-up Markov chain):
    z_1 ~ N(μ_φ(x), diag σ_φ²(x)),   z_{l+1} ~ N(μ_φ(z_l), diag σ_φ²(z_l))
log w = log p(z_L) + Σ_l log p(z_l | z_{l+1}) + log p(x | z_1) − log q(z_1 | x) − Σ_l log q(z_{l+1} | z_l).

Registered as ``hvae``; ``latent_dim`` is each layer's size, ``options.layers`` is L, every conditional is an MLP
through ``hidden``. The figure API's z is [z_1, …, z_L] (posterior means chained through the guide's means); only
z_1 reaches x.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..config.options import Options, option
from ..distributions.plate import data_plate
from ..distributions.priors import StandardNormalPrior
from ..nn.device import device_of
from ..nn.networks import GaussianHead, MLPDecoder, MLPEncoder
from ._common import config_likelihood, require_arch
from .registry import register_model

__all__ = ["HVAE", "HVAEOptions"]


class HVAE(PyroModule):
    """L Markov stochastic layers (see the module docstring)."""

    conditional = False
    num_classes = None

    def __init__(
        self,
        data_shape,
        likelihood: nn.Module,
        latent_dims,
        hidden=(256, 256),
        act: str = "relu",
        num_data: int | None = None,
    ):
        super().__init__()
        self.latent_dims = [int(d) for d in latent_dims]
        self.latent_dim, self.layers = sum(self.latent_dims), len(self.latent_dims)
        self.likelihood, self.num_data = likelihood, num_data
        d = self.latent_dims
        self.encoder = MLPEncoder(data_shape, d[0], hidden, act)  # q(z_1 | x)
        self.up = nn.ModuleList([GaussianHead(d[i], hidden, d[i + 1], act) for i in range(self.layers - 1)])
        self.down = nn.ModuleList([GaussianHead(d[i + 1], hidden, d[i], act) for i in range(self.layers - 1)])
        self.decoder = MLPDecoder(data_shape, d[0], hidden, act)  # p(x | z_1)
        self.prior = StandardNormalPrior(d[-1])

    @pyro_method
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            z = pyro.sample(f"z{self.layers}", self.prior(x.shape[0]))
            for l in range(self.layers - 2, -1, -1):
                loc, scale = self.down[l](z)
                z = pyro.sample(f"z{l + 1}", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z), event_dim=x.dim() - 1, x=x), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            loc, scale = self.encoder(x)
            z = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
            for l in range(self.layers - 1):
                loc, scale = self.up[l](z)
                z = pyro.sample(f"z{l + 2}", dist.Normal(loc, scale).to_event(1))

    # ----- the figure API (z = [z_1, …, z_L])
    def encode(self, x, y=None):
        loc, scale = self.encoder(x)
        locs, scales = [loc], [scale]
        for up in self.up:
            loc, scale = up(loc)
            locs.append(loc), scales.append(scale)
        return torch.cat(locs, -1), torch.cat(scales, -1)

    def decode(self, z, y=None):
        return self.likelihood.mean(self.decoder(z[..., : self.latent_dims[0]]))

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x)[0])

    def sample(self, n: int, y=None):
        z = self.prior(n).sample().to(device_of(self))
        zs = [z]
        for l in range(self.layers - 2, -1, -1):
            z = dist.Normal(*self.down[l](z)).sample()
            zs.insert(0, z)
        return self.decode(torch.cat(zs, -1))


@dataclass
class HVAEOptions(Options):
    layers: int = option(3, ge=1, doc="L, the number of stochastic layers (each of size model.latent_dim)")


@register_model("hvae", options=HVAEOptions)
def build_hvae(cfg, o: HVAEOptions, data_shape, num_data, num_classes) -> HVAE:
    require_arch(cfg, "mlp")
    return HVAE(
        data_shape,
        config_likelihood(cfg, data_shape),
        [cfg.latent_dim] * o.layers,
        tuple(cfg.hidden),
        cfg.activation,
        num_data=num_data,
    )
