"""GAMIX: the standard VAE with a Gaussian-mixture posterior and the variance-collapse regulariser
(Rivera, "How to train your VAE", 2023; see :mod:`ppl_vae.guides.mixture` for the exact loss and deviations).

q(z|x) = Σ_k π_k(x) N(μ_k(x), diag σ_k²(x)) from one MLP trunk with K heads, a pathwise-reparameterised
mixture site. Two training losses (option ``kl``):

* ``"elbo"`` (default): −ELBO + γ·(1/K) Σ_k Σ_j (σ_kj² − log σ_kj² − 1) with the ELBO of ``train.objective``
  (``elbo``, ``iwae``; ``meanfield`` is refused: the mixture KL has no closed form) — a bound plus a penalty
  (:class:`~ppl_vae.infer.penalised.PenalisedELBO`).
* ``"aggregate"``: the author's objective, −log p(x|z) + γ·penalty + the KL of the minibatch's moment-matched codes
  N(mean μ, var μ) to N(0, I) instead of the per-datapoint KL
  (:class:`~ppl_vae.infer.aggregate_kl.AggregateKLObjective`; not a bound). With ``num_components=1`` this is
  Rivera's VAE; ``adversarial`` adds his PatchGAN.

With ``adversarial`` = λ_G > 0, a PatchGAN discriminator D (:class:`~ppl_vae.nn.networks.PatchGAN`) judges the decoded
reconstructions: the loss gains λ_G·BCE(1, D(x̂)) per image (:class:`~ppl_vae.infer.adversarial.AdversarialELBO`)
and, after every model step, D takes its own Adam step (``disc_lr``, β₁ = 0.5) on
``disc_weight``·[BCE(1, D(x)) + BCE(0, D(x̂))] (the author's λ_G = λ_D = 100); D's weights live in the model
(checkpointed with it), its optimiser in the plan's state (resumed exactly); the epoch's record gets ``g_adv``,
``d_loss``, ``d_real``, ``d_fake``. ``model.arch`` ``mlp``, ``conv`` or ``resnet`` (the encoder's trunk under the
mixture heads, and the decoder).

Registered as ``gamix`` with options ``num_components`` (K, default 3), ``var_reg``
(γ, default 0.1), ``kl``, ``adversarial``, ``disc_weight``, ``disc_lr`` and ``disc_width``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.nn import pyro_method

from ..config.options import Options, option
from ..errors import ConfigError
from ..guides.mixture import (
    DiagNormalMixture,
    MixtureEncoder,
    MixtureGuideMixin,
    mixture_moments,
    variance_collapse_penalty,
)
from ..infer.adversarial import AdversarialELBO, DiscriminatorStep
from ..infer.aggregate_kl import AggregateKLObjective, batch_moment_kl
from ..infer.penalised import PenalisedELBO
from ..nn.networks import build_encoder_decoder, image_trunk
from ..nn.patchgan import PatchGAN
from ..training.plan import TrainingPlan, build_objective, training_plan
from ._common import config_likelihood, require_arch
from .registry import register_model
from .vae import VAE

__all__ = ["GAMIX", "GAMIXOptions", "GAMIXPlan", "KL_MODES"]

KL_MODES = ("elbo", "aggregate")


class GAMIX(MixtureGuideMixin, VAE):
    """A VAE whose guide is a K-component diagonal-Gaussian mixture from a :class:`MixtureEncoder`."""

    def __init__(
        self,
        encoder: MixtureEncoder,
        decoder,
        likelihood,
        latent_dim: int,
        *,
        var_reg: float = 0.1,
        kl: str = "elbo",
        num_data: int | None = None,
        num_classes: int | None = None,
        discriminator: torch.nn.Module | None = None,
        adversarial: float = 0.0,
        disc_weight: float = 100.0,
        disc_lr: float = 1e-4,
    ):
        super().__init__(encoder, decoder, likelihood, latent_dim, num_data=num_data, num_classes=num_classes)
        self.discriminator = discriminator
        self.adversarial, self.disc_weight, self.disc_lr = float(adversarial), float(disc_weight), float(disc_lr)
        if kl not in KL_MODES:
            raise ConfigError(f"model.options.kl must be one of {list(KL_MODES)}, got {kl!r}")
        self.num_components = encoder.num_components
        self.var_reg = float(var_reg)
        self.kl = kl

    def guide_dist(self, x, c=None) -> DiagNormalMixture:
        logits, locs, scales = self.encoder(x, c)
        return DiagNormalMixture(logits, locs, scales)

    def reconstruct_draw(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | z] at one reparameterised draw z ~ q(z|x): what the discriminator judges."""
        c = self._c(y)
        return self.likelihood.mean(self.decoder(self.guide_dist(x, c).rsample(), c))

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
    """``kl: elbo``: the configured ELBO plus γ·penalty; ``kl: aggregate``: Rivera's objective; either with the
    PatchGAN term and the discriminator's own step when ``adversarial`` > 0."""

    def __init__(self, model):
        super().__init__(model)
        self.disc_step = None
        if model.discriminator is not None:
            self.disc_step = DiscriminatorStep(
                model.discriminator, model.reconstruct_draw, model.disc_weight, model.disc_lr
            )
        self._objective = None

    def objective(self, train):
        base = self._base_objective(train)
        m = self.model
        if m.discriminator is None:
            return base
        if train.uses_fabric:
            raise ConfigError(
                "model.options.adversarial must be 0 with train.devices > 1 (or another train.strategy "
                "or train.precision): the discriminator's own optimiser steps outside DDP, so the "
                f"ranks' critics would drift apart; got adversarial={m.adversarial}"
            )
        self._objective = AdversarialELBO(base, m.reconstruct_draw, m.discriminator, m.adversarial, lambda: m.num_data)
        return self._objective

    def validation_objective(self, train):
        """Without the adversarial term: a score against a moving critic would choose checkpoints by the critic."""
        return self._base_objective(train) if self.model.discriminator is not None else None

    def on_step_end(self, x, y):
        if self.disc_step is not None:
            self.disc_step(x, y)

    def on_epoch_end(self, epoch, record, data):
        if self.disc_step is None:
            return
        record.update(self.disc_step.epoch_means())
        record["g_adv"] = self._objective.epoch_mean() if self._objective is not None else 0.0

    def state_dict(self):
        return self.disc_step.state_dict() if self.disc_step is not None else {}

    def load_state_dict(self, state):
        if self.disc_step is not None:
            self.disc_step.load_state_dict(state)

    def _base_objective(self, train):
        m = self.model
        if m.kl == "aggregate":
            for field, value, ok in (
                ("objective", train.objective, ("auto", "elbo")),
                ("num_particles", train.num_particles, (1,)),
                ("kl_warmup_epochs", train.kl_warmup_epochs, (0,)),
                ("jit", train.jit, (False,)),
            ):
                if value not in ok:
                    raise ConfigError(
                        f"train.{field} must be {' or '.join(map(repr, ok))} for model.name='gamix' "
                        f"with options.kl='aggregate' (Rivera's objective, one draw per image), "
                        f"got {value!r}"
                    )
            return AggregateKLObjective(m)
        if train.objective == "meanfield":
            raise ConfigError(
                "train.objective must be 'elbo' or 'iwae' for model.name='gamix' (a mixture "
                "posterior has no closed-form KL), got 'meanfield'"
            )
        return PenalisedELBO(build_objective(train), m.variance_penalty, m.var_reg, lambda: m.num_data)


@dataclass
class GAMIXOptions(Options):
    num_components: int = option(3, gt=0, doc="K, mixture components")
    var_reg: float = option(0.1, ge=0.0, doc="γ, weight of the variance-collapse penalty")
    kl: str = option("elbo", choices=KL_MODES, doc="'elbo' (a bound plus the penalty) or Rivera's 'aggregate'")
    adversarial: float = option(0.0, ge=0.0, doc="λ_G, weight of the PatchGAN term (0: no discriminator)")
    disc_weight: float = option(100.0, gt=0.0, doc="λ_D, weight of the discriminator's loss")
    disc_lr: float = option(1e-4, gt=0.0, doc="the discriminator's Adam learning rate (β₁ = 0.5)")
    disc_width: float = option(1.0, gt=0.0, doc="PatchGAN channel multiplier (1 = the author's 128-128-128-64-64)")


@register_model("gamix", options=GAMIXOptions, aliases=("vae_gamix",))
def build_gamix(cfg, options: GAMIXOptions, data_shape, num_data, num_classes) -> GAMIX:
    require_arch(cfg, "mlp", "conv", "resnet")
    lik = config_likelihood(cfg, data_shape)
    hidden = tuple(cfg.hidden) if cfg.arch == "mlp" else tuple(cfg.hidden[:1])
    _, dec = build_encoder_decoder(cfg.arch, data_shape, cfg.latent_dim, hidden, cfg.activation, channels=cfg.channels)
    trunk, dim = image_trunk(cfg.arch, data_shape, cfg.channels, cfg.activation) if cfg.arch != "mlp" else (None, None)
    enc = MixtureEncoder(
        data_shape, cfg.latent_dim, options.num_components, hidden, cfg.activation, trunk=trunk, trunk_dim=dim
    )
    disc = None
    if options.adversarial > 0:
        if len(data_shape) != 3:
            raise ConfigError(
                f"model.options.adversarial > 0 needs image data (C, H, W) for the PatchGAN, got "
                f"data of shape {tuple(data_shape)}"
            )
        disc = PatchGAN(data_shape, options.disc_width)
    return GAMIX(
        enc,
        dec,
        lik,
        cfg.latent_dim,
        var_reg=options.var_reg,
        kl=options.kl,
        num_data=num_data,
        discriminator=disc,
        adversarial=options.adversarial,
        disc_weight=options.disc_weight,
        disc_lr=options.disc_lr,
    )
