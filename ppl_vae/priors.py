"""Priors p(z) as modules that return a Pyro distribution with batch shape ``(B,)``."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I_d)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("_zero", torch.zeros(()))

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        loc = self._zero.new_zeros(batch_size, self.latent_dim)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)
