r"""Markov hierarchical VAE with L stochastic layers (the two-layer VAE of Burda et al. 2016, generalised): the
baseline of Zhao, Song & Ermon (2017), who prove that at the ELBO optimum its upper layers can be ignored.

Generative story (sites ``z1`` … ``zL``):
    z_L ~ N(0, I),   z_l ~ N(μ_θ(z_{l+1}), diag σ_θ²(z_{l+1})),  l = L−1..1,   x ~ p_θ(x | z_1)
Guide (bottom-up Markov chain):
    z_1 ~ N(μ_φ(x), diag σ_φ²(x)),   z_{l+1} ~ N(μ_φ(z_l), diag σ_φ²(z_l))
log w = log p(z_L) + Σ_l log p(z_l | z_{l+1}) + log p(x | z_1) − log q(z_1 | x) − Σ_l log q(z_{l+1} | z_l).

Registered as ``hvae``; ``latent_dim`` is each layer's size, ``options.layers`` is L, every conditional is an MLP
through ``hidden`` (``options.batch_norm``: BatchNorm after every hidden Linear). The figure API's z is
[z_1, …, z_L] (posterior means chained through the guide's means); only z_1 reaches x. ``decode_layers`` takes the
per-layer list, a missing (``None``) layer being its prior mean given the layer above.

Registered also as ``vae2``: the two-layer case of Burda, Grosse & Salakhutdinov ("Importance Weighted
Autoencoders", 2016, §5) — ``arch: burda2`` is their 784-100-100-100(z1)-50-50-50(z2) tanh network, ``arch: mlp``
z1 of 2·``latent_dim`` through ``hidden`` and z2 of ``latent_dim`` through half of it; its figures show the top
latent z2 (``latent_dim`` is z2's size).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..config.options import NoOptions, Options, option
from ..distributions.plate import data_plate
from ..distributions.priors import StandardNormalPrior
from ..nn.device import device_of
from ..nn.networks import BURDA, GaussianHead, MLPDecoder, MLPEncoder
from ._common import config_likelihood, require_arch
from .registry import register_model

__all__ = ["HVAE", "HVAEOptions", "VAE2"]


class HVAE(PyroModule):
    """L Markov stochastic layers (see the module docstring)."""

    conditional = False
    num_classes = None

    # the parameter names of the two-layer model of earlier releases (vae2: encoder1, encoder2, decoder2, decoder1)
    legacy_names = {"encoder1.": "encoder.", "encoder2.": "up.0.", "decoder2.": "down.0.", "decoder1.": "decoder."}

    def __init__(
        self,
        data_shape,
        likelihood: nn.Module,
        latent_dims,
        hidden=(256, 256),
        act: str = "relu",
        num_data: int | None = None,
        *,
        gap_hidden=None,
        figure_latent: str = "all",
        batch_norm: bool = False,
    ):
        """``hidden``: the widths between x and z_1; ``gap_hidden``: those between z_l and z_{l+1}, one tuple per
        gap (default ``hidden``). ``figure_latent``: ``all`` (the figure API's z is [z_1, …, z_L]) or ``top``
        (z_L alone, decoded through the generative chain's means). ``batch_norm``: BatchNorm after every hidden
        Linear of every network."""
        super().__init__()
        if figure_latent not in ("all", "top"):
            raise ValueError(f"figure_latent must be 'all' or 'top', got {figure_latent!r}")
        self.latent_dims = [int(d) for d in latent_dims]
        self.layers, self.figure_latent = len(self.latent_dims), figure_latent
        self.latent_dim = self.latent_dims[-1] if figure_latent == "top" else sum(self.latent_dims)
        self.likelihood, self.num_data = likelihood, num_data
        d = self.latent_dims
        gaps = [tuple(h) for h in gap_hidden] if gap_hidden is not None else [tuple(hidden)] * (self.layers - 1)
        if len(gaps) != self.layers - 1:
            raise ValueError(f"gap_hidden needs {self.layers - 1} entries (one per gap), got {len(gaps)}")
        bn = bool(batch_norm)
        self.encoder = MLPEncoder(data_shape, d[0], hidden, act, batch_norm=bn)  # q(z_1 | x)
        self.up = nn.ModuleList([GaussianHead(d[i], gaps[i], d[i + 1], act, bn) for i in range(self.layers - 1)])
        self.down = nn.ModuleList([GaussianHead(d[i + 1], gaps[i], d[i], act, bn) for i in range(self.layers - 1)])
        self.decoder = MLPDecoder(data_shape, d[0], hidden, act, batch_norm=bn)  # p(x | z_1)
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

    # ----- the figure API (z = [z_1, …, z_L], or z_L alone with figure_latent="top")
    def encode(self, x, y=None):
        loc, scale = self.encoder(x)
        locs, scales = [loc], [scale]
        for up in self.up:
            loc, scale = up(loc)
            locs.append(loc), scales.append(scale)
        if self.figure_latent == "top":
            return locs[-1], scales[-1]
        return torch.cat(locs, -1), torch.cat(scales, -1)

    def decode(self, z, y=None):
        if self.figure_latent == "top":  # z_L → the means of z_{L−1}, …, z_1
            for down in reversed(self.down):
                z = down(z)[0]
            return self.likelihood.mean(self.decoder(z))
        return self.likelihood.mean(self.decoder(z[..., : self.latent_dims[0]]))

    def reconstruct(self, x, y=None):
        return self.likelihood.mean(self.decoder(self.encoder(x)[0]))

    def decode_layers(self, zs):
        """E[x | z_1] from a list of per-layer codes [z_1, …, z_L]: a ``None`` layer is its prior mean given the
        layer above (z_L: 0; z_l: the mean of p(z_l | z_{l+1})), filled in from the top, so with z_1 = ``None`` a
        given upper layer reaches x through the generative chain's means (one given layer at least)."""
        if len(zs) != self.layers:
            raise ValueError(f"decode_layers needs {self.layers} entries (one per layer), got {len(zs)}")
        shape = next(z for z in zs if z is not None).shape[:-1]
        z = zs[-1] if zs[-1] is not None else torch.zeros(*shape, self.latent_dims[-1], device=device_of(self))
        for l in range(self.layers - 2, -1, -1):
            z = zs[l] if zs[l] is not None else self.down[l](z)[0]
        return self.likelihood.mean(self.decoder(z))

    def sample(self, n: int, y=None):
        """Ancestral sampling z_L → … → z_1 → E[x | z_1]."""
        z = self.prior(n).sample().to(device_of(self))
        for l in range(self.layers - 2, -1, -1):
            z = dist.Normal(*self.down[l](z)).sample()
        return self.likelihood.mean(self.decoder(z))


@dataclass
class HVAEOptions(Options):
    layers: int = option(3, ge=1, doc="L, the number of stochastic layers (each of size model.latent_dim)")
    batch_norm: bool = option(False, doc="BatchNorm after every hidden Linear of every network (the VLAE code's nets)")


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
        batch_norm=o.batch_norm,
    )


class VAE2(HVAE):
    """The two-layer :class:`HVAE` with the constructor of earlier releases (``latent_dim1`` = z1's size,
    ``latent_dim`` = z2's, ``hidden1`` between x and z1, ``hidden2`` between z1 and z2); its figures show z2."""

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
        super().__init__(
            data_shape,
            likelihood,
            [latent_dim1, latent_dim],
            hidden1,
            act,
            num_data,
            gap_hidden=[hidden2],
            figure_latent="top",
        )
        self.latent_dim1 = latent_dim1


@register_model("vae2", options=NoOptions)
def build_vae2(cfg, options, data_shape, num_data, num_classes) -> VAE2:
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
