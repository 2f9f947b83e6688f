r"""The multimodal VAE with a mixture-of-experts prior, MMVM ("Unity by Diversity: Improved Representation
Learning in Multimodal VAEs", Sutter, Meng, Agostini, Chopard, Fortin, Vogt, Shahbaba & Mandt, NeurIPS 2024).

Each modality keeps its own latent: for each observed m,
    z_m ~ h(z | X) = (1/|S|) Σ_{m̃∈S} q_m̃(z | x_m̃)    (a data-dependent prior: the model runs the encoders)
    x_m ~ p_m(x_m | z_m)
Guide: z_m ~ q_m(z | x_m) = N(μ_m(x_m), diag σ_m²(x_m)), independently per modality.
Objective: Σ_m E_{q_m} log p(x_m | z_m) − β Σ_m KL(q_m ‖ h), by any Pyro ELBO of the pair
(:class:`~ppl_vae.distributions.experts.ExpertPrior`). ``kl: pairwise`` (default, the official code's): the convex bound
KL(q_m ‖ h) ≤ (1/|S|) Σ_m̃ KL(q_m ‖ q_m̃); ``kl: mixture``: the exact KL to the mixture, estimated by Monte Carlo.
``anneal_epochs`` > 0 mixes in the standard normal, α KL(q_m ‖ N(0, I)) + (1 − α) KL(q_m ‖ h), with α going
linearly from 1 (independent VAEs) to 0 over those epochs, as the official code does over steps. The prior is not
a normalised density of X (it depends on X), so MMVM has no joint log-likelihood to compare.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import pyro_method

from ..config.options import Options, option
from ..distributions.experts import ExpertMixture, ExpertPrior, uniform_weights
from ..distributions.plate import data_plate
from ..training.plan import Stage, training_plan
from .multimodal_base import MultimodalPlan, MultimodalVAE, modality_networks, require_layout
from .registry import register_model

__all__ = ["MMVM", "MMVMOptions", "MMVMPlan"]


class MMVM(MultimodalVAE):
    """One latent per modality with the mixture-of-experts prior; α is a buffer (checkpointed)."""

    has_joint_likelihood = False  # the prior depends on X

    def __init__(self, *args, kl: str = "pairwise", beta: float = 1.0, anneal_epochs: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl, self.beta, self.anneal_epochs = kl, float(beta), int(anneal_epochs)
        self.register_buffer("alpha", torch.tensor(self.alpha_at(0)))

    def alpha_at(self, epoch: int) -> float:
        return max(0.0, 1.0 - epoch / self.anneal_epochs) if self.anneal_epochs else 0.0

    @staticmethod
    def weights(mask):
        return uniform_weights(mask)

    def _beta(self):
        return poutine.scale(scale=self.beta) if self.beta != 1.0 else contextlib.nullcontext()

    @pyro_method
    def model(self, x, mask=None, subset=None, stratum=None):
        xs, packed, mask = self.inputs(x, mask, subset)
        locs, scales = self.experts(xs)
        h = ExpertPrior(locs, scales, self.weights(mask), alpha=float(self.alpha), kind=self.kl)
        with data_plate(packed, self.num_data):
            for m, name in enumerate(self.layout.names):
                with self._beta():
                    z = pyro.sample(f"z_{name}", h.mask(mask[:, m]))
                self.observe_modality(m, z, xs[m], mask[:, m])

    @pyro_method
    def guide(self, x, mask=None, subset=None, stratum=None):
        xs, packed, mask = self.inputs(x, mask, subset)
        locs, scales = self.experts(xs)
        with data_plate(packed, self.num_data):
            for m, name in enumerate(self.layout.names):
                with self._beta():
                    pyro.sample(f"z_{name}", dist.Normal(locs[:, m], scales[:, m]).to_event(1).mask(mask[:, m]))

    def posterior(self, xs, mask, stratum=None):
        """h restricted to the modalities in ``mask``: what conditional generation and probes read."""
        locs, scales = self.experts(xs)
        return ExpertMixture(locs, scales, self.weights(mask), component=stratum)


@training_plan(MMVM)
class MMVMPlan(MultimodalPlan):
    """α anneals from 1 to 0 over ``anneal_epochs``; only epochs with α = 0 are scored for the best checkpoint."""

    def stages(self, train):
        why = f"model.options.anneal_epochs = {self.model.anneal_epochs}: α reaches 0 then"
        return [Stage("train", train, first_scored_epoch=self.model.anneal_epochs + 1, scored_from=why)]

    def begin_stage(self, stage):
        self.model.alpha.fill_(self.model.alpha_at(0))

    def on_epoch_end(self, epoch, record, data):
        record["alpha"] = float(self.model.alpha)
        self.model.alpha.fill_(self.model.alpha_at(epoch + 1))


@dataclass
class MMVMOptions(Options):
    kl: str = option("pairwise", choices=("pairwise", "mixture"), doc="bound on KL(q_m ‖ h), or its exact value")
    beta: float = option(1.0, gt=0.0, doc="weight of the KL terms")
    anneal_epochs: int = option(0, ge=0, doc="epochs over which α goes from 1 to 0")


@register_model("mmvm", options=MMVMOptions, multimodal=True)
def build_mmvm(cfg, options: MMVMOptions, data_shape, num_data, num_classes) -> MMVM:
    layout = require_layout(cfg.name, data_shape)
    enc, dec, lik = modality_networks(cfg, layout, cfg.latent_dim)
    return MMVM(
        layout,
        enc,
        dec,
        lik,
        cfg.latent_dim,
        num_data=num_data,
        kl=options.kl,
        beta=options.beta,
        anneal_epochs=options.anneal_epochs,
    )
