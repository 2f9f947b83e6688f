"""GAMIX-VAE: the standard VAE with a Gaussian-mixture posterior and the variance-collapse regulariser
(Rivera, "How to train your VAE", 2023; see :mod:`ppl_vae.guides.mixture` for the exact loss and deviations).

q(z|x) = Σ_k π_k(x) N(μ_k(x), diag σ_k²(x)) from one MLP trunk with K heads, a pathwise-reparameterised
mixture site; training loss −ELBO + γ·(1/K) Σ_k Σ_j (σ_kj² − log σ_kj² − 1) with the ELBO of
``train.objective`` (``elbo``, ``meanfield`` is refused: the mixture KL has no closed form; ``iwae`` works).
Registered as ``vae_gamix`` with options ``num_components`` (K, default 3) and ``var_reg`` (γ, default 0.1).
"""

from __future__ import annotations

import torch
from pyro.nn import pyro_method

from ..errors import ConfigError
from ..guides.mixture import DiagNormalMixture, MixtureEncoder, PenalisedELBO, variance_collapse_penalty
from ..likelihoods import build_likelihood
from ..nets import build_encoder_decoder
from .registry import check_options, register_model
from .rme import MixtureGuideMixin, _number, _positive_int
from .vae import VAE


class GamixVAE(MixtureGuideMixin, VAE):
    """A VAE whose guide is a K-component diagonal-Gaussian mixture from a :class:`MixtureEncoder`."""

    def __init__(self, encoder: MixtureEncoder, decoder, likelihood, latent_dim: int, *, var_reg: float = 0.1,
                 num_data: int | None = None, num_classes: int | None = None):
        super().__init__(encoder, decoder, likelihood, latent_dim, num_data=num_data, num_classes=num_classes)
        self.num_components = encoder.num_components
        self.var_reg = float(var_reg)

    def guide_dist(self, x, c=None) -> DiagNormalMixture:
        logits, locs, scales = self.encoder(x, c)
        return DiagNormalMixture(logits, locs, scales)


    @pyro_method
    def variance_penalty(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(1/K) Σ_k Σ_j (σ_kj² − log σ_kj² − 1) per datapoint, shape (B,)."""
        _, _, scales = self.encoder(x, self._c(y))
        return variance_collapse_penalty(scales)

    def make_objective(self, train_cfg):
        from ..experiment import build_objective   # (experiment imports the models)

        if train_cfg.objective == "meanfield":
            raise ConfigError("train.objective must be 'elbo' or 'iwae' for model.name='vae_gamix' (a mixture "
                              "posterior has no closed-form KL), got 'meanfield'")
        return PenalisedELBO(build_objective(train_cfg), self.variance_penalty, self.var_reg, lambda: self.num_data)


@register_model("vae_gamix")
def _build_vae_gamix(cfg, data_shape, num_data, num_classes):
    opts = check_options(cfg, {"num_components": 3, "var_reg": 0.1})
    _positive_int("num_components", opts["num_components"])
    _number("var_reg", opts["var_reg"], 0.0)
    if cfg.arch != "mlp":
        raise ConfigError(f"model.arch must be 'mlp' for model.name='vae_gamix', got {cfg.arch!r}")
    lik = build_likelihood(cfg.likelihood, sigma2=cfg.sigma2, laplace_scale=cfg.laplace_scale, link=cfg.link)
    _, dec = build_encoder_decoder("mlp", data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation)
    enc = MixtureEncoder(data_shape, cfg.latent_dim, opts["num_components"], tuple(cfg.hidden), cfg.activation)
    return GamixVAE(enc, dec, lik, cfg.latent_dim, var_reg=float(opts["var_reg"]), num_data=num_data)
