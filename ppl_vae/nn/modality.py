"""Per-modality network pieces of multimodal VAEs: a label embedding and the Gaussian head of sum pooling."""

from __future__ import annotations

import math

from torch import nn

from .networks import MIN_SCALE, mlp


class Embedding(nn.Module):
    """φ_m(x_m): the flattened modality through an MLP to a vector (the summands of sum pooling)."""

    def __init__(self, shape, hidden, out_dim: int, act: str = "relu"):
        super().__init__()
        self.net = mlp(math.prod(shape), hidden, out_dim, act)

    def forward(self, x):
        return self.net(x.reshape(x.shape[0], -1))


class GaussianFromSum(nn.Module):
    """ρ(h) → (μ, σ) of a diagonal Gaussian (σ = softplus + floor), the head of sum pooling."""

    def __init__(self, in_dim: int, hidden, latent_dim: int, act: str = "relu"):
        super().__init__()
        self.net = mlp(in_dim, hidden, 2 * latent_dim, act)

    def forward(self, h):
        loc, raw = self.net(h).chunk(2, dim=-1)
        return loc, nn.functional.softplus(raw) + MIN_SCALE
