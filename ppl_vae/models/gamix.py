"""GAMIX: the standard VAE with a Gaussian-mixture posterior and the variance-collapse regulariser
(Rivera, "How to train your VAE", 2023; see :mod:`ppl_vae.guides.mixture` for the exact loss and deviations).

q(z|x) = Σ_k π_k(x) N(μ_k(x), diag σ_k²(x)) from one MLP trunk with K heads, a pathwise-reparameterised
mixture site. Two training losses (option ``kl``):

* ``"elbo"`` (default): −ELBO + γ·(1/K) Σ_k Σ_j (σ_kj² − log σ_kj² − 1) with the ELBO of ``train.objective``
  (``elbo``, ``iwae``; ``meanfield`` is refused: the mixture KL has no closed form) — a bound plus a penalty
  (:class:`~ppl_vae.infer.penalised.PenalisedELBO`).
* ``"aggregate"``: the author's objective, −log p(x|z) + γ·penalty + the KL of the minibatch's moment-matched codes
  N(mean μ, var μ) to N(0, I) instead of the per-datapoint KL (:class:`~ppl_vae.infer.aggregate_kl.AggregateKLObjective`;
  not a bound). With ``num_components=1`` this is Rivera's VAE without the PatchGAN.

Registered as ``gamix`` (formerly ``vae_gamix``) with options ``num_components`` (K, default 3), ``var_reg``
(γ, default 0.1) and ``kl``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.nn import pyro_method

from ..errors import ConfigError
from ..guides.mixture import (
    DiagNormalMixture,
    MixtureEncoder,
    MixtureGuideMixin,
    mixture_moments,
    variance_collapse_penalty,
)
from ..infer.aggregate_kl import AggregateKLObjective, batch_moment_kl
from ..infer.penalised import PenalisedELBO
from ..infer.plan import TrainingPlan, build_objective, training_plan
from ..nets import build_encoder_decoder
from ..options import Options, option
from ._common import config_likelihood, require_arch
from .registry import register_model
from .vae import VAE

__all__ = ["GAMIX", "GAMIXOptions", "GAMIXPlan", "KL_MODES"]

KL_MODES = ("elbo", "aggregate")


class GAMIX(MixtureGuideMixin, VAE):
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
        log_px = self.likelihood(self.decoder(z, c), event_dim=x.dim() - 1, x=x).log_prob(x)
        elbo = scale * (log_px + self.prior(B).log_prob(z) - q.log_prob(z)).sum()
        if not objective:
            return None, elbo
        means = mixture_moments(q.log_weights, q.locs, q.scales)[0]
        penalty = variance_collapse_penalty(q.scales)
        codes = scale * B * batch_moment_kl(means) if B > 1 else scale * 0.5 * means.pow(2).sum()
        loss = scale * (-log_px + self.var_reg * penalty).sum() + codes
        return loss, elbo


@training_plan(GAMIX)
class GAMIXPlan(TrainingPlan):
    """``kl: elbo``: the configured ELBO plus γ·penalty; ``kl: aggregate``: Rivera's objective."""

    def objective(self, train):
        m = self.model
        if m.kl == "aggregate":
            for field, value, ok in (("objective", train.objective, ("auto", "elbo")),
                                     ("num_particles", train.num_particles, (1,)),
                                     ("kl_warmup_epochs", train.kl_warmup_epochs, (0,)), ("jit", train.jit, (False,))):
                if value not in ok:
                    raise ConfigError(f"train.{field} must be {' or '.join(map(repr, ok))} for model.name='gamix' "
                                      f"with options.kl='aggregate' (Rivera's objective, one draw per image), "
                                      f"got {value!r}")
            return AggregateKLObjective(m)
        if train.objective == "meanfield":
            raise ConfigError("train.objective must be 'elbo' or 'iwae' for model.name='gamix' (a mixture "
                              "posterior has no closed-form KL), got 'meanfield'")
        return PenalisedELBO(build_objective(train), m.variance_penalty, m.var_reg, lambda: m.num_data)


@dataclass
class GAMIXOptions(Options):
    num_components: int = option(3, gt=0, doc="K, mixture components")
    var_reg: float = option(0.1, ge=0.0, doc="γ, weight of the variance-collapse penalty")
    kl: str = option("elbo", choices=KL_MODES, doc="'elbo' (a bound plus the penalty) or Rivera's 'aggregate'")


@register_model("gamix", options=GAMIXOptions, aliases=("vae_gamix",))
def build_gamix(cfg, options: GAMIXOptions, data_shape, num_data, num_classes) -> GAMIX:
    require_arch(cfg, "mlp")
    lik = config_likelihood(cfg, data_shape)
    _, dec = build_encoder_decoder("mlp", data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation)
    enc = MixtureEncoder(data_shape, cfg.latent_dim, options.num_components, tuple(cfg.hidden), cfg.activation)
    return GAMIX(enc, dec, lik, cfg.latent_dim, var_reg=options.var_reg, kl=options.kl, num_data=num_data)
