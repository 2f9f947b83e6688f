r"""Mixture of products of experts, MoPoE-VAE (Sutter, Daunhawer & Vogt, "Generalized Multimodal ELBO", ICLR 2021).

Generative story (:class:`~ppl_vae.distributions.experts.MultimodalVAE`): z ~ N(0, I), x_m ~ p_m(x_m | z).
Guide: q(z | X) = (1/|P(S)|) Σ_{A ∈ P(S)} PoE({q_m}_{m∈A}), the uniform mixture over the non-empty subsets A of
the observed modalities S of the (normalised) products of their experts, q̃(z | X_A) ∝ Π_{m∈A} q_m, without the
prior expert (singletons are the MoE experts; the official code, thomassutter/MoPoE, adds the prior expert to the
product of all M modalities only — we do not).
Objective: the ELBO of that mixture guide, estimated stratified over the subsets with the exact mixture density
(:class:`~ppl_vae.infer.stratified.StratifiedIWAE`, K = ``train.num_particles``, ``train.estimator``). Where we
differ: the paper bounds the mixture's KL by the mean of the subsets' KLs and samples one subset per datapoint;
the stratified estimate of the exact ELBO is tighter and has lower variance.
"""

from __future__ import annotations

import torch

from ..config.options import NoOptions
from ..distributions.experts import nonempty_subsets, product_of_experts, uniform_weights
from .multimodal_base import ExpertMixtureVAE, modality_networks, require_layout
from .registry import register_model

__all__ = ["MoPoE"]


class MoPoE(ExpertMixtureVAE):
    """Mixture over the non-empty subsets of the observed modalities of their products of experts (plan: the
    stratified bound)."""

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


@register_model("mopoe", options=NoOptions, multimodal=True)
def build_mopoe(cfg, options, data_shape, num_data, num_classes) -> MoPoE:
    layout = require_layout(cfg.name, data_shape)
    enc, dec, lik = modality_networks(cfg, layout, cfg.latent_dim)
    return MoPoE(layout, enc, dec, lik, cfg.latent_dim, num_data=num_data)
