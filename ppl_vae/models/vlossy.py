"""Variational Lossy Autoencoder (Chen, Kingma, Salimans, Duan, Dhariwal, Schulman, Sutskever & Abbeel,
ICLR 2017):

    p(x, z) = p_AF(z) Π_i p(x_i | z, x_{W(i)}),        q(z | x) = N(μ(x), diag σ²(x)),    the standard ELBO,

with a PixelCNN decoder whose receptive field is a small local window W(i) of preceding pixels
(``model.likelihood: pixelcnn``, ``model.pixelcnn_window`` k ≥ 3; :class:`ppl_vae.nn.pixelcnn.LocalPixelCNN`,
conditioned on z through bias maps) and an autoregressive-flow prior
(:class:`ppl_vae.distributions.priors.AutoregressiveFlowPrior`, scored in one parallel pass). "Information
preference": the
local decoder models texture but not global shape, so z carries the global, lossy part — decode one z several
times and the shape stays while the strokes vary (:meth:`VLossy.lossy_reconstructions`).

Options: ``prior`` ("af", or "normal" for the N(0, I) ablation), ``num_flows`` and ``flow_hidden``.

Checked against the paper: only its abstract and first page could be read (the full text of arXiv 1611.02731 /
ICLR 2017 could not be reached; no official code was found). Verified: a VAE with autoregressive models as both the
decoder p(x|z) (PixelRNN/CNN type) and the prior p(z), the architecture chosen so that z keeps the global
structure and discards local texture. Not verified: the size and shape of the window W(i), how z conditions the
decoder, and the MNIST setup as earlier project notes record it (6 masked 3×3 layers with tied weights in ResNet
blocks, 64 latents, 4 mean-only MADE flows of 640 units, free bits, Polyak averaging).

Our choices: W(i) = one masked k×k convolution of mask type A (the (k−1)/2 rows above and the pixels to the left,
k = ``model.pixelcnn_window``) then 1×1 layers, so the receptive field is exactly that window; or, with
``pixelcnn_window: 0``, L stacked gated masked 3×3 layers (``pixelcnn_layers``) whose reach grows one row and one
column per layer — the kind of local decoder the project notes attribute to Chen et al. — allowed while L is
below the image height minus one (beyond it the decoder sees every preceding pixel); z enters through
bias maps (a learned 1×1 projection of the decoder's image-shaped h(z) added at every layer); affine (not
mean-only) flows; no free bits; no averaging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.options import Options, option
from ..distributions.priors import AutoregressiveFlowPrior, StandardNormalPrior
from ..errors import ConfigError
from ..nn.networks import build_encoder_decoder
from ._common import config_likelihood, require_arch
from .registry import register_model
from .vae import VAE

__all__ = ["VLossy", "VLossyOptions", "PRIORS"]

PRIORS = ("af", "normal")


class VLossy(VAE):
    """The VAE's program with a local-window PixelCNN likelihood and an autoregressive-flow prior."""

    @torch.no_grad()
    def lossy_reconstructions(self, x: torch.Tensor, repeats: int = 4) -> torch.Tensor:
        """For each image, ``repeats`` raster-order samples from p(x | z = E_q[z]), shape (B, repeats, C, H, W)."""
        loc, _ = self.encode(x)
        d = self.likelihood(self.decoder(loc.repeat_interleave(repeats, 0), None))
        return d.sample().reshape(x.shape[0], repeats, *x.shape[1:])


@dataclass
class VLossyOptions(Options):
    prior: str = option("af", choices=PRIORS, doc="'af': the autoregressive-flow prior; 'normal': N(0, I)")
    num_flows: int = option(2, gt=0, doc="affine autoregressive flows (MADE) in the prior")
    flow_hidden: list[int] = option([64, 64], item_gt=0, doc="hidden widths of each MADE")


@register_model("vlossy", options=VLossyOptions)
def build_vlossy(cfg, options: VLossyOptions, data_shape, num_data, num_classes) -> VLossy:
    require_arch(cfg, "mlp", "conv")
    rows = data_shape[-2] if len(data_shape) >= 2 else 0
    if cfg.likelihood != "pixelcnn" or (cfg.pixelcnn_window == 0 and cfg.pixelcnn_layers >= rows - 1):
        raise ConfigError(
            f"model.name='vlossy' needs a local PixelCNN decoder: model.likelihood='pixelcnn' with "
            f"model.pixelcnn_window an odd integer >= 3, or pixelcnn_window 0 (gated) with fewer than "
            f"{rows - 1} pixelcnn_layers (each layer reaches one row further up: {rows - 1} or more see every "
            f"preceding pixel of these {rows}-row images), got likelihood={cfg.likelihood!r}, "
            f"pixelcnn_window={cfg.pixelcnn_window!r}, pixelcnn_layers={cfg.pixelcnn_layers!r}"
        )
    if not options.flow_hidden:
        raise ConfigError("model.options.flow_hidden must name at least one hidden width, got []")
    enc, dec = build_encoder_decoder(
        cfg.arch, data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation, channels=cfg.channels
    )
    prior = (
        AutoregressiveFlowPrior(cfg.latent_dim, options.num_flows, tuple(options.flow_hidden))
        if options.prior == "af"
        else StandardNormalPrior(cfg.latent_dim)
    )
    return VLossy(enc, dec, config_likelihood(cfg, data_shape), cfg.latent_dim, prior=prior, num_data=num_data)
