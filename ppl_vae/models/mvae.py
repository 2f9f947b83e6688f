r"""Multimodal VAE with a product-of-experts posterior (Wu & Goodman, "Multimodal Generative Models for Scalable
Weakly-Supervised Learning", NeurIPS 2018).

Generative story (:class:`~ppl_vae.distributions.experts.MultimodalVAE`): z ~ N(0, I), x_m ~ p_m(x_m | z) for each
observed m.
Guide, for the observed set S:  q(z | X_S) ∝ p(z) Π_{m∈S} q̃_m(z | x_m), in closed form for Gaussian experts
(precision-weighted, the prior expert included):  T = 1 + Σ_{m∈S} σ_m^{−2},  μ = Σ_{m∈S} σ_m^{−2} μ_m / T.
Training objective (sec. 3, sub-sampling): ELBO(X) + Σ_m ELBO(x_m) + Σ_{j≤k} ELBO(X_{S_j}) over k random
subsets, averaged (:class:`~ppl_vae.infer.subsets.SubsetELBO`), each ELBO by ``train.objective``. A missing
modality drops out of the product and of the likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch

from ..config.options import Options, option
from ..distributions.experts import product_of_experts, random_subsets
from ..training.plan import training_plan
from .multimodal_base import MultimodalVAE, SubsetPlan, modality_networks, require_layout
from .registry import register_model

__all__ = ["MVAE", "MVAEOptions"]


class MVAE(MultimodalVAE):
    """Product of experts q(z | X_S) (module docstring); ``random_subsets`` = k of the training objective."""

    def __init__(self, *args, random_subsets: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_random_subsets = int(random_subsets)

    def posterior(self, xs, mask, stratum=None):
        loc, scale = product_of_experts(*self.experts(xs), mask, prior=True)
        return dist.Normal(loc, scale).to_event(1)

    def subsets(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """{all observed, each single modality, k random subsets} of a minibatch's mask."""
        singles = [self.layout.only(m, len(mask), mask.device) for m in range(mask.shape[1])]
        return [mask, *singles, *(random_subsets(mask) for _ in range(self.num_random_subsets))]


training_plan(MVAE)(SubsetPlan)  # the average ELBO over its subsets, scored on all modalities


@dataclass
class MVAEOptions(Options):
    random_subsets: int = option(1, ge=0, doc="k random subsets in the sub-sampled objective")


@register_model("mvae", options=MVAEOptions, multimodal=True)
def build_mvae(cfg, options: MVAEOptions, data_shape, num_data, num_classes) -> MVAE:
    layout = require_layout(cfg.name, data_shape)
    enc, dec, lik = modality_networks(cfg, layout, cfg.latent_dim)
    return MVAE(layout, enc, dec, lik, cfg.latent_dim, num_data=num_data, random_subsets=options.random_subsets)
