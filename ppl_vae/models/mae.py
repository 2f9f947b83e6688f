"""MAE: a VAE trained with the mutual posterior-divergence regulariser (Ma, Zhou & Hovy, ICLR 2019).

    loss = −ELBO − η Σ_d log σ(D̄_d / η) + γ · SD,

D̄_d the mean over minibatch pairs i ≠ j of KL(q_d(z|x_i) ‖ q_d(z|x_j)), SD the standard deviation of the pairs'
total KL (:mod:`ppl_vae.infer.mae_elbo`, which also states the N-scaling under the data plate). The regulariser keeps
the code informative when the decoder is strong enough to ignore it (a PixelCNN: ``model.likelihood: pixelcnn``).
The model and guide are the VAE's; only the training objective changes. Options: ``eta`` (η), ``gamma`` (γ),
``form`` ("paper": log σ(D̄/η); "code": the official code's log σ(D̄)). The defaults η = 1, γ = 0.5 lie in the
grid the official repository's plotting script labels (η ∈ {0.5, 1, 2}, γ ∈ {0.1, 0.5, 1}); the paper's own
values were not available to us.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.nn import pyro_method

from ..config.options import Options, option
from ..infer.mae_elbo import FORMS, MAERegularisedELBO
from ..nn.networks import build_encoder_decoder
from ..training.plan import TrainingPlan, build_objective, training_plan
from ._common import config_likelihood, require_arch
from .registry import register_model
from .vae import VAE

__all__ = ["MAE", "MAEOptions", "MAEPlan"]


class MAE(VAE):
    """The VAE with the MAE regulariser's hyperparameters (``eta``, ``gamma``, ``form``) for its plan."""

    def __init__(
        self,
        encoder,
        decoder,
        likelihood,
        latent_dim: int,
        *,
        eta: float = 1.0,
        gamma: float = 0.5,
        form: str = "paper",
        prior=None,
        num_data: int | None = None,
    ):
        super().__init__(encoder, decoder, likelihood, latent_dim, prior=prior, num_data=num_data)
        self.eta, self.gamma, self.form = float(eta), float(gamma), form

    @pyro_method
    def posterior_params(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """(μ, σ) of q(z|x) for the minibatch, shape (B, D) each."""
        return self.encoder(x, self._c(y))


@training_plan(MAE)
class MAEPlan(TrainingPlan):
    """The configured ELBO (``elbo`` or ``iwae``) plus N · R."""

    def objective(self, train):
        m = self.model
        return MAERegularisedELBO(
            build_objective(train), m.posterior_params, m.eta, m.gamma, lambda: m.num_data, form=m.form
        )


@dataclass
class MAEOptions(Options):
    eta: float = option(1.0, ge=0.0, doc="η, weight (and temperature) of the log-sigmoid mean-divergence term")
    gamma: float = option(0.5, ge=0.0, doc="γ, weight of the standard deviation of the pairwise divergences")
    form: str = option("paper", choices=FORMS, doc="'paper': log σ(D̄/η); 'code': log σ(D̄) as the official code")


@register_model("mae", options=MAEOptions)
def build_mae(cfg, options: MAEOptions, data_shape, num_data, num_classes) -> MAE:
    require_arch(cfg, "mlp", "conv")
    enc, dec = build_encoder_decoder(
        cfg.arch, data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation, channels=cfg.channels
    )
    return MAE(
        enc,
        dec,
        config_likelihood(cfg, data_shape),
        cfg.latent_dim,
        eta=options.eta,
        gamma=options.gamma,
        form=options.form,
        num_data=num_data,
    )
