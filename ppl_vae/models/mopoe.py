r"""Mixture of products of experts, MoPoE-VAE (Sutter, Daunhawer & Vogt, "Generalized Multimodal ELBO", ICLR 2021).

Generative story (:class:`~ppl_vae.distributions.experts.MultimodalVAE`): z ~ N(0, I), x_m ~ p_m(x_m | z).
Guide: q(z | X) = (1/|P(S)|) Σ_{A ∈ P(S)} PoE({q_m}_{m∈A}), the uniform mixture over the non-empty subsets A of
the observed modalities S of the (normalised) products of their experts, q̃(z | X_A) ∝ Π_{m∈A} q_m, without the
prior expert (singletons are the MoE experts; the official code, thomassutter/MoPoE, adds the prior expert to the
product of all M modalities only — we do not).
Objective (``objective``): ``stratified`` (default) — the ELBO of that mixture guide, estimated stratified over the
subsets with the exact mixture density (:class:`~ppl_vae.infer.stratified.StratifiedIWAE`, K =
``train.num_particles``, ``train.estimator``), one pass of the decoders per subset; ``sampled_subset`` — the paper's
(its eq. for the MoPoE bound and its code): the mean over subsets of their ELBOs, (1/|P(S)|) Σ_A ELBO(q̃_A), the
mixture's KL bounded by the mean of the subsets' closed-form KLs and the reconstruction from one subset drawn per
datapoint (:class:`~ppl_vae.infer.component_average.ComponentAverageELBO`): unbiased for that looser bound, one
decoder pass. Run beside the official ``joint_elbo`` (``bench/parity/mopoe.py``), ``sampled_subset`` takes the
official objective's value at the same weights and trains to the same coherence, log p̂(X) and probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.options import Options, option
from ..distributions.experts import nonempty_subsets, product_of_experts, uniform_weights
from .multimodal_base import ExpertMixtureVAE, modality_networks, require_layout
from .registry import register_model

__all__ = ["MoPoE", "MoPoEOptions"]


class MoPoE(ExpertMixtureVAE):
    """Mixture over the non-empty subsets of the observed modalities of their products of experts (plan: the
    stratified bound, or the mean of the subsets' ELBOs with ``objective="sampled_subset"``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("subset_table", nonempty_subsets(self.layout.num_modalities), persistent=False)

    def components(self, xs, mask):
        locs, scales = self.experts(xs)  # (B, M, D)
        members = self.subset_table  # (C, M)
        return product_of_experts(
            locs.unsqueeze(-3), scales.unsqueeze(-3), members & mask.unsqueeze(-2), prior=False
        )  # (B, C, D)

    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, C): uniform over the subsets made only of observed modalities."""
        return uniform_weights(~(self.subset_table.unsqueeze(0) & ~mask.unsqueeze(-2)).any(-1))  # A ⊆ S


@dataclass
class MoPoEOptions(Options):
    objective: str = option(
        "stratified",
        choices=("stratified", "sampled_subset"),
        doc="stratified: the mixture's ELBO, one decoder pass per subset; sampled_subset: the paper's mean of the "
        "subsets' ELBOs, one subset drawn per datapoint (looser, one decoder pass)",
    )


@register_model("mopoe", options=MoPoEOptions, multimodal=True)
def build_mopoe(cfg, options: MoPoEOptions, data_shape, num_data, num_classes) -> MoPoE:
    layout = require_layout(cfg.name, data_shape)
    enc, dec, lik = modality_networks(cfg, layout, cfg.latent_dim)
    return MoPoE(layout, enc, dec, lik, cfg.latent_dim, num_data=num_data, objective=options.objective)
