"""Networks of ladder VAEs: the bottom-up and top-down steps of LVAE/VLAE-style hierarchies and their merge
blocks (gated addition, concatenation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .networks import ConvDecoder, FlatBatchNorm1d, GaussianHead, activation, conv_trunk, mlp


# ------------------------------------------------------------------------------------------------ ladders
class GatedAdd(nn.Module):
    """state + g ⊙ W z, the gate g per unit, initialised at ``gate_init`` (the VLAE code's combination)."""

    def __init__(self, state_dim: int, z_dim: int, gate_init: float = 0.1):
        super().__init__()
        self.fc = nn.Linear(z_dim, state_dim)
        self.gate = nn.Parameter(torch.full((state_dim,), float(gate_init)))
        self.out_dim = state_dim

    def forward(self, state: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return state + self.gate * self.fc(z)


class Concat(nn.Module):
    """[state, z]."""

    def __init__(self, state_dim: int, z_dim: int):
        super().__init__()
        self.out_dim = state_dim + z_dim

    def forward(self, state: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([state, z.expand(*state.shape[:-1], z.shape[-1])], dim=-1)


def ladder_step(in_dim: int, hidden: Sequence[int], act: str = "relu", batch_norm: bool = False) -> nn.Sequential:
    """One ladder step: an MLP through ``hidden`` whose last layer is activated too (width hidden[-1]);
    ``batch_norm``: BatchNorm after every Linear of the step, before its activation (the official VLAE code's
    ``fc_bn_lrelu``)."""
    norm = [FlatBatchNorm1d(hidden[-1])] if batch_norm else []
    return nn.Sequential(mlp(in_dim, hidden[:-1], hidden[-1], act, batch_norm), *norm, activation(act)())


class LadderEncoder(nn.Module):
    """h_0 = x, h_l = g_l(h_{l−1}), (μ_l, σ_l) = head_l(h_l) for l = 1..L: ``forward(x)`` returns the list.
    ``arch``: ``mlp`` (every g_l an MLP through ``hidden``) or ``conv`` (g_1 starts with :func:`conv_trunk`);
    ``batch_norm``: BatchNorm in every hidden layer of the steps g_l (not in the Gaussian heads)."""

    def __init__(
        self,
        data_shape,
        latent_dims: Sequence[int],
        hidden: Sequence[int] = (256, 256),
        act="relu",
        arch: str = "mlp",
        channels: int = 32,
        batch_norm: bool = False,
    ):
        super().__init__()
        if arch not in ("mlp", "conv"):
            raise ConfigError(f"model.arch must be 'mlp' or 'conv' for a ladder, got {arch!r}")
        self.data_shape, self.arch = tuple(data_shape), arch
        D, H = math.prod(self.data_shape), hidden[-1]
        steps = [ladder_step(D if i == 0 else H, hidden, act, batch_norm) for i in range(len(latent_dims))]
        if arch == "conv":
            trunk, feat = conv_trunk(self.data_shape, channels, act)
            steps[0] = nn.Sequential(trunk, nn.Flatten(), ladder_step(feat, hidden, act, batch_norm))
        self.up = nn.ModuleList(steps)
        self.heads = nn.ModuleList([GaussianHead(H, (), d, act) for d in latent_dims])

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        h = x if self.arch == "conv" else x.flatten(x.dim() - len(self.data_shape))
        out = []
        for g, head in zip(self.up, self.heads, strict=True):
            h = g(h)
            out.append(head(h))
        return out


class LadderDecoder(nn.Module):
    """z̃_L = f_L(z_L), z̃_l = f_l(z̃_{l+1} ⊕ z_l), raw output f_0(z̃_1) of the data's shape: ``forward([z_1..z_L])``.
    ``combination``: ``gated`` (:class:`GatedAdd`) or ``concat`` (:class:`Concat`); ``arch``: f_0 an MLP or a
    :class:`ConvDecoder`; ``batch_norm``: BatchNorm in every hidden layer of the steps f_l and of an MLP f_0."""

    def __init__(
        self,
        data_shape,
        latent_dims: Sequence[int],
        hidden: Sequence[int] = (256, 256),
        act="relu",
        combination: str = "gated",
        arch: str = "mlp",
        channels: int = 32,
        batch_norm: bool = False,
    ):
        super().__init__()
        if combination not in ("gated", "concat"):
            raise ConfigError(f"model.options.combination must be 'gated' or 'concat', got {combination!r}")
        if arch not in ("mlp", "conv"):
            raise ConfigError(f"model.arch must be 'mlp' or 'conv' for a ladder, got {arch!r}")
        self.data_shape, self.arch = tuple(data_shape), arch
        H = hidden[-1]
        comb = GatedAdd if combination == "gated" else Concat
        self.combine = nn.ModuleList([comb(H, d) for d in latent_dims[:-1]])
        self.down = nn.ModuleList(
            [ladder_step(c.out_dim, hidden, act, batch_norm) for c in self.combine]
            + [ladder_step(latent_dims[-1], hidden, act, batch_norm)]
        )
        self.out = (
            ConvDecoder(self.data_shape, H, channels, hidden[:-1], act)
            if arch == "conv"
            else mlp(H, hidden[:-1], math.prod(self.data_shape), act, batch_norm)
        )

    def forward(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        state = self.down[-1](zs[-1])
        for l in range(len(zs) - 2, -1, -1):
            state = self.down[l](self.combine[l](state, zs[l]))
        out = self.out(state)
        return out if self.arch == "conv" else out.reshape(*out.shape[:-1], *self.data_shape)
