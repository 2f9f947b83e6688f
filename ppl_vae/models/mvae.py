r"""Multimodal VAE with a product-of-experts posterior (Wu & Goodman, "Multimodal Generative Models for Scalable
Weakly-Supervised Learning", NeurIPS 2018).

Generative story (:class:`~ppl_vae.distributions.experts.MultimodalVAE`): z ~ N(0, I), x_m ~ p_m(x_m | z) for each
observed m.
Guide, for the observed set S:  q(z | X_S) ∝ p(z) Π_{m∈S} q̃_m(z | x_m), in closed form for Gaussian experts
(precision-weighted, the prior expert included):  T = 1 + Σ_{m∈S} σ_m^{−2},  μ = Σ_{m∈S} σ_m^{−2} μ_m / T.
Training objective (sec. 3, sub-sampling): ELBO(X) + Σ_m ELBO(x_m) + Σ_{j≤k} ELBO(X_{S_j}) over k random
subsets, averaged (:class:`~ppl_vae.infer.subsets.SubsetELBO`), each ELBO by ``train.objective``. A missing
modality drops out of the product and of the likelihood.
The joint baselines of Sutter et al. (2024; thomassutter/mmvmvae ``mv_joint_vae.py``) are options:
``subsets: joint`` trains the ELBO of all observed modalities only; ``aggregation: product_no_prior`` drops the
prior expert from the product, ``average`` replaces the product by the mean of the experts' means and variances.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch

from ..config.options import Options, option
from ..distributions.experts import product_of_experts, random_subsets, uniform_weights
from ..training.plan import training_plan
from .multimodal_base import MultimodalVAE, SubsetPlan, modality_networks, require_layout
from .registry import register_model

__all__ = ["MVAE", "MVAEOptions"]


class MVAE(MultimodalVAE):
    """Product of experts q(z | X_S) (module docstring); ``random_subsets`` = k of the training objective."""

    def __init__(self, *args, random_subsets: int = 1, subsets: str = "mvae", aggregation: str = "product", **kwargs):
        super().__init__(*args, **kwargs)
        self.num_random_subsets, self.subset_rule, self.aggregation = int(random_subsets), subsets, aggregation

    def posterior(self, xs, mask, stratum=None):
        locs, scales = self.experts(xs)
        if self.aggregation == "average":  # (1/|S|) Σ μ_m and (1/|S|) Σ σ_m² over the observed experts
            w = uniform_weights(mask).unsqueeze(-1)
            loc, scale = (w * locs).sum(-2), (w * scales.pow(2)).sum(-2).sqrt()
        else:
            loc, scale = product_of_experts(locs, scales, mask, prior=self.aggregation == "product")
        return dist.Normal(loc, scale).to_event(1)

    def subsets(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """{all observed, each single modality, k random subsets} of a minibatch's mask (``joint``: all observed)."""
        if self.subset_rule == "joint":
            return [mask]
        singles = [self.layout.only(m, len(mask), mask.device) for m in range(mask.shape[1])]
        return [mask, *singles, *(random_subsets(mask) for _ in range(self.num_random_subsets))]


training_plan(MVAE)(SubsetPlan)  # the average ELBO over its subsets, scored on all modalities


@dataclass
class MVAEOptions(Options):
    random_subsets: int = option(1, ge=0, doc="k random subsets in the sub-sampled objective")
    subsets: str = option(
        "mvae",
        choices=("mvae", "joint"),
        doc="mvae: the paper's sub-sampled objective (all, each single modality, k random subsets); joint: the ELBO "
        "of all observed modalities only",
    )
    aggregation: str = option(
        "product",
        choices=("product", "product_no_prior", "average"),
        doc="product: the experts times the prior expert (the paper); product_no_prior: the experts only; average: "
        "the mean of the experts' means and variances",
    )


@register_model("mvae", options=MVAEOptions, multimodal=True)
def build_mvae(cfg, options: MVAEOptions, data_shape, num_data, num_classes) -> MVAE:
    layout = require_layout(cfg.name, data_shape)
    enc, dec, lik = modality_networks(cfg, layout, cfg.latent_dim)
    return MVAE(
        layout,
        enc,
        dec,
        lik,
        cfg.latent_dim,
        num_data=num_data,
        random_subsets=options.random_subsets,
        subsets=options.subsets,
        aggregation=options.aggregation,
    )
