r"""Variational Ladder Autoencoder (Zhao, Song & Ermon, "Learning Hierarchical Features from Generative Models",
ICML 2017): independent latents at L levels, the higher ones reaching x through deeper networks.

Generative story, for each datapoint (sites ``z1`` … ``zL``):
    z_l ~ N(0, I),  l = 1..L                               (independent priors)
    z̃_L = f_L(z_L),   z̃_l = f_l(z̃_{l+1} ⊕ z_l),  l = L−1..1    (⊕: the combination, below)
    x ~ p_θ(x | f_0(z̃_1))
Guide (bottom-up):  h_0 = x,  h_l = g_l(h_{l−1}),  q(z_l | x) = N(μ_l(h_l), diag σ_l²(h_l)).
Objective: the plain ELBO Σ_l E_q[log p(z_l) − log q(z_l|x)] + E_q log p(x | z) (Trace_ELBO,
TraceMeanField_ELBO with the closed-form KLs, TraceIWAE); the official code's KL warm-up 1 − exp(−t/τ) is
``train.kl_warmup_shape: exp`` with τ = ``train.kl_warmup_epochs``.

Combination ⊕ (``combination``): ``gated`` — the official code's gated add z̃_{l+1} + g_l ⊙ W_l z_l with a learned
per-unit gate g_l initialised at 0.1; ``concat`` — [z̃_{l+1}, z_l]. With ``activation: identity`` every network
is affine and the model is linear-Gaussian in z = (z_1..z_L) (the test oracle). Registered as ``vladder``;
``latent_dim`` is each layer's size, ``options.layers`` is L, each g_l and f_l is an MLP through ``hidden``
(``options.batch_norm``: BatchNorm after every hidden Linear, as the official code's nets).
The figure API's z is the concatenation [z_1, …, z_L]; ``decode_layers`` takes the per-layer list.
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
from ..nn.ladder_nets import LadderDecoder, LadderEncoder
from ._common import LadderFigures, config_likelihood, require_arch, require_hidden
from .registry import register_model

__all__ = ["VLadder", "VLadderOptions"]


class VLadder(LadderFigures, PyroModule):
    """The VLAE as a Pyro program (see the module docstring): ``encoder`` (:class:`~ppl_vae.nn.networks.LadderEncoder`)
    gives [(μ_l, σ_l)], ``decoder`` (:class:`~ppl_vae.nn.networks.LadderDecoder`) maps [z_1..z_L] to p(x|z)'s input."""

    conditional = False
    num_classes = None

    def __init__(
        self,
        data_shape,
        likelihood: nn.Module,
        latent_dims,
        hidden=(256, 256),
        act: str = "relu",
        combination: str = "gated",
        arch: str = "mlp",
        channels: int = 32,
        num_data: int | None = None,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.latent_dims = [int(d) for d in latent_dims]
        self.latent_dim, self.layers = sum(self.latent_dims), len(self.latent_dims)
        self.likelihood, self.num_data = likelihood, num_data
        self.encoder = LadderEncoder(data_shape, self.latent_dims, tuple(hidden), act, arch, channels, batch_norm)
        self.decoder = LadderDecoder(
            data_shape, self.latent_dims, tuple(hidden), act, combination, arch, channels, batch_norm
        )
        self.priors = nn.ModuleList([StandardNormalPrior(d) for d in self.latent_dims])

    # ----- the Pyro program
    @pyro_method
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            # independent priors: the order of the sites is free; z1..zL, the guide's, keeps mean-field valid
            zs = [pyro.sample(f"z{l + 1}", prior(x.shape[0])) for l, prior in enumerate(self.priors)]
            pyro.sample("x", self.likelihood(self.decoder(zs), event_dim=x.dim() - 1, x=x), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            for l, (loc, scale) in enumerate(self.encoder(x)):
                pyro.sample(f"z{l + 1}", dist.Normal(loc, scale).to_event(1))

    # ----- the figure API (z = [z_1, …, z_L]; split/encode/decode/reconstruct from LadderFigures)
    def sample(self, n: int, y=None):
        return self.decode(torch.randn(n, self.latent_dim, device=device_of(self)))

    def decode_layers(self, zs):
        """E[x | z_1..z_L] from a list of per-layer codes; ``None`` for a layer is its prior mean (0), broadcast to
        the batch of the given layers (one given layer at least)."""
        if len(zs) != self.layers:
            raise ValueError(f"decode_layers needs {self.layers} entries (one per layer), got {len(zs)}")
        shape = next(z for z in zs if z is not None).shape[:-1]
        device = device_of(self)
        full = [
            torch.zeros(*shape, d, device=device) if z is None else z for z, d in zip(zs, self.latent_dims, strict=True)
        ]
        return self.likelihood.mean(self.decoder(full))


@dataclass
class VLadderOptions(Options):
    layers: int = option(3, ge=1, doc="L, the number of latent layers (each of size model.latent_dim)")
    combination: str = option(
        "gated", choices=("gated", "concat"), doc="z̃_{l+1} + g ⊙ W z_l (official code) or [z̃_{l+1}, z_l]"
    )
    batch_norm: bool = option(
        False, doc="BatchNorm after every hidden Linear of the ladder steps and of an MLP f_0 (the official nets)"
    )


@register_model("vladder", options=VLadderOptions)
def build_vladder(cfg, o: VLadderOptions, data_shape, num_data, num_classes) -> VLadder:
    require_arch(cfg, "mlp", "conv")
    require_hidden(cfg)
    return VLadder(
        data_shape,
        config_likelihood(cfg, data_shape),
        [cfg.latent_dim] * o.layers,
        cfg.hidden,
        cfg.activation,
        o.combination,
        cfg.arch,
        cfg.channels,
        num_data=num_data,
        batch_norm=o.batch_norm,
    )
