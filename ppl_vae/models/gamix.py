"""GAMIX-VAE: the standard VAE with a Gaussian-mixture posterior and the variance-collapse regulariser
(Rivera, "How to train your VAE", 2023; see :mod:`ppl_vae.guides.mixture` for the exact loss and deviations).

q(z|x) = Σ_k π_k(x) N(μ_k(x), diag σ_k²(x)) from one MLP trunk with K heads, a pathwise-reparameterised
mixture site. Two training losses (option ``kl``):

* ``"elbo"`` (default): −ELBO + γ·(1/K) Σ_k Σ_j (σ_kj² − log σ_kj² − 1) with the ELBO of ``train.objective``
  (``elbo``, ``iwae``; ``meanfield`` is refused: the mixture KL has no closed form) — a bound plus a penalty.
* ``"aggregate"``: the author's objective, −log p(x|z) + γ·penalty + the KL of the minibatch's moment-matched codes
  N(mean μ, var μ) to N(0, I) instead of the per-datapoint KL (:class:`~ppl_vae.guides.mixture.AggregateKLObjective`;
  not a bound). With ``num_components=1`` this is Rivera's VAE without the PatchGAN.

Registered as ``vae_gamix`` with options ``num_components`` (K, default 3), ``var_reg`` (γ, default 0.1) and ``kl``.
Measured (``bench/gamix_samples.py``, Fashion-MNIST, 16 latents, 5 seeds): trained with the ELBO the K = 3 weights
concentrate on one component (exp H(π) = 1.000), i.e. the trained guide is a diagonal Gaussian; neither loss gave
better prior samples than the plain VAE there.
"""

from __future__ import annotations

import torch
from pyro.nn import pyro_method

from ..errors import ConfigError
from ..guides.mixture import (AggregateKLObjective, DiagNormalMixture, MixtureEncoder, PenalisedELBO, aggregate_kl,
                              mixture_moments, variance_collapse_penalty)
from ..likelihoods import build_likelihood
from ..nets import build_encoder_decoder
from .registry import check_options, register_model
from .rme import MixtureGuideMixin, _number, _positive_int
from .vae import VAE


class GamixVAE(MixtureGuideMixin, VAE):
    """A VAE whose guide is a K-component diagonal-Gaussian mixture from a :class:`MixtureEncoder`."""

    def __init__(self, encoder: MixtureEncoder, decoder, likelihood, latent_dim: int, *, var_reg: float = 0.1,
                 kl: str = "elbo", num_data: int | None = None, num_classes: int | None = None):
        super().__init__(encoder, decoder, likelihood, latent_dim, num_data=num_data, num_classes=num_classes)
        if kl not in KL_MODES:
            raise ConfigError(f"model.options.kl must be one of {list(KL_MODES)}, got {kl!r}")
        self.num_components = encoder.num_components
        self.var_reg = float(var_reg)
        self.kl = kl

    def guide_dist(self, x, c=None) -> DiagNormalMixture:
        logits, locs, scales = self.encoder(x, c)
        return DiagNormalMixture(logits, locs, scales)


    @pyro_method
    def variance_penalty(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(1/K) Σ_k Σ_j (σ_kj² − log σ_kj² − 1) per datapoint, shape (B,)."""
        _, _, scales = self.encoder(x, self._c(y))
        return variance_collapse_penalty(scales)

    @pyro_method
    def aggregate_terms(self, x: torch.Tensor, y: torch.Tensor | None = None, objective: bool = True):
        """(Rivera's loss RIV, ELBO estimate), each summed over the minibatch and scaled by N/B, from one draw
        z_i ~ q(z|x_i) per image; ``objective=False`` skips RIV (returns None). A minibatch of one image (e.g. a
        dataset's last partial batch) has no spread: it takes the ELBO's per-datapoint mean term ½‖μ‖² instead."""
        c = self._c(y)
        q = self.guide_dist(x, c)
        z = q.rsample()
        B = x.shape[0]
        scale = (self.num_data or B) / B
        log_px = self.likelihood(self.decoder(z, c), event_dim=x.dim() - 1).log_prob(x)
        elbo = scale * (log_px + self.prior(B).log_prob(z) - q.log_prob(z)).sum()
        if not objective:
            return None, elbo
        means = mixture_moments(q.log_weights, q.locs, q.scales)[0]
        penalty = variance_collapse_penalty(q.scales)
        codes = scale * B * aggregate_kl(means) if B > 1 else scale * 0.5 * means.pow(2).sum()
        loss = scale * (-log_px + self.var_reg * penalty).sum() + codes
        return loss, elbo

    def make_objective(self, train_cfg):
        from ..experiment import build_objective   # (experiment imports the models)

        if self.kl == "aggregate":
            for field, value, ok in (("objective", train_cfg.objective, "elbo"),
                                     ("num_particles", train_cfg.num_particles, 1),
                                     ("kl_warmup_epochs", train_cfg.kl_warmup_epochs, 0)):
                if value != ok:
                    raise ConfigError(f"train.{field} must be {ok!r} for model.name='vae_gamix' with "
                                      f"options.kl='aggregate' (Rivera's objective, one draw per image), got {value!r}")
            return AggregateKLObjective(self)
        if train_cfg.objective == "meanfield":
            raise ConfigError("train.objective must be 'elbo' or 'iwae' for model.name='vae_gamix' (a mixture "
                              "posterior has no closed-form KL), got 'meanfield'")
        return PenalisedELBO(build_objective(train_cfg), self.variance_penalty, self.var_reg, lambda: self.num_data)


KL_MODES = ("elbo", "aggregate")


@register_model("vae_gamix")
def _build_vae_gamix(cfg, data_shape, num_data, num_classes):
    opts = check_options(cfg, {"num_components": 3, "var_reg": 0.1, "kl": "elbo"})
    _positive_int("num_components", opts["num_components"])
    _number("var_reg", opts["var_reg"], 0.0)
    if cfg.arch != "mlp":
        raise ConfigError(f"model.arch must be 'mlp' for model.name='vae_gamix', got {cfg.arch!r}")
    lik = build_likelihood(cfg.likelihood, sigma2=cfg.sigma2, laplace_scale=cfg.laplace_scale, link=cfg.link)
    _, dec = build_encoder_decoder("mlp", data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation)
    enc = MixtureEncoder(data_shape, cfg.latent_dim, opts["num_components"], tuple(cfg.hidden), cfg.activation)
    return GamixVAE(enc, dec, lik, cfg.latent_dim, var_reg=float(opts["var_reg"]), kl=opts["kl"], num_data=num_data)
