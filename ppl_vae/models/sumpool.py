r"""Permutation-invariant aggregation by sum pooling, trained with the masked multimodal bound (Hirt, Campolo,
Leong & Ortega, "Learning multi-modal generative models with permutation-invariant encoders and tighter
variational bounds", 2024).

Generative story (:class:`~ppl_vae.distributions.experts.MultimodalVAE`): z ~ N(0, I), x_m ~ p_m(x_m | z).
Guide: q(z | x_S) = N(μ, diag σ²) with [μ, log σ] = ρ(Σ_{m∈S} φ_m(x_m)) — one embedding network φ_m per modality,
one head ρ; a missing modality's summand is left out of the sum.
Objective, for a random subset S of the observed modalities M (each kept with probability ½, one at least):

    [E_{q(z|x_S)} log p(x_S | z) − KL(q(z|x_S) ‖ p(z))] + [E_{q(z|x_M)} log p(x_{M∖S} | z) − KL(q(z|x_M) ‖ q(z|x_S))],

whose first part bounds log p(x_S) and whose second bounds log ∫ p(x_{M∖S} | z) q(z | x_S) dz — so the sum bounds
log p(x_M) = log p(x_S) + log p(x_{M∖S} | x_S) only where q(z | x_S) is the exact posterior p(z | x_S); in general
it is not a lower bound on log p(x_M) (what we report as the model's likelihood is the importance-sampled
log p̂(X)). With ``subset`` given, the Pyro program holds
both parts: ``z_subset`` ~ p(z) explains x_S, and ``z`` ~ q(z | x_S) — the conditional prior, computed by the
encoder inside the model — explains x_{M∖S}; the guide draws ``z_subset`` ~ q(z|x_S) and ``z`` ~ q(z|x_M). So any
Pyro ELBO of the pair is the bound (:class:`~ppl_vae.infer.subsets.SubsetELBO` draws S). Without ``subset`` it
is the plain multimodal VAE (evaluation, ``Predictive``). Where we differ: the paper trains importance-weighted
with sticking-the-landing gradients and also offers set attention; we use the ELBO form and sum pooling.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import pyro_method

from ..config.options import NoOptions
from ..distributions.experts import random_subsets
from ..distributions.plate import data_plate
from ..nn.modality import GaussianFromSum
from ..training.plan import training_plan
from .multimodal_base import MultimodalVAE, SubsetPlan, modality_networks, require_layout
from .registry import register_model

__all__ = ["SumPool"]


class SumPool(MultimodalVAE):
    """Sum pooling of per-modality embeddings (``encoders`` are the φ_m, ``head`` is ρ)."""

    def __init__(self, layout, encoders, decoders, likelihoods, latent_dim, head, num_data=None):
        super().__init__(layout, encoders, decoders, likelihoods, latent_dim, num_data=num_data)
        self.head = head

    def posterior(self, xs, mask, stratum=None):
        h = torch.stack([phi(x) for phi, x in zip(self.encoders, xs, strict=False)], -2)
        loc, scale = self.head((h * mask.unsqueeze(-1).to(h.dtype)).sum(-2))
        return dist.Normal(loc, scale).to_event(1)

    @pyro_method
    def model(self, x, mask=None, subset=None, stratum=None):
        xs, packed, mask = self.inputs(x, mask)
        with data_plate(packed, self.num_data):
            if subset is None:
                self.observe(pyro.sample("z", self.prior(len(packed))), xs, mask)
                return
            sub = mask & torch.as_tensor(subset, device=mask.device)
            self.observe(pyro.sample("z_subset", self.prior(len(packed))), xs, sub, suffix="_subset")
            self.observe(pyro.sample("z", self.posterior(xs, sub)), xs, mask & ~sub)

    @pyro_method
    def guide(self, x, mask=None, subset=None, stratum=None):
        xs, packed, mask = self.inputs(x, mask)
        with data_plate(packed, self.num_data):
            if subset is not None:
                pyro.sample("z_subset", self.posterior(xs, mask & torch.as_tensor(subset, device=mask.device)))
            pyro.sample("z", self.posterior(xs, mask))

    @staticmethod
    def subsets(mask: torch.Tensor) -> list[torch.Tensor]:
        return [random_subsets(mask)]


training_plan(SumPool)(SubsetPlan)  # the average ELBO over its subsets, scored on all modalities


@register_model("sumpool", options=NoOptions, multimodal=True)
def build_sumpool(cfg, options, data_shape, num_data, num_classes) -> SumPool:
    layout = require_layout(cfg.name, data_shape)
    width = cfg.hidden[-1] if cfg.hidden else 256
    enc, dec, lik = modality_networks(cfg, layout, width, expert="embedding")
    head = GaussianFromSum(width, tuple(cfg.hidden[-1:]), cfg.latent_dim, cfg.activation)
    return SumPool(layout, enc, dec, lik, cfg.latent_dim, head, num_data=num_data)
