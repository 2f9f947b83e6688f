r"""An objective averaged over subsets of the observed modalities: the sub-sampled training objectives of
multimodal VAEs,

    L(X) = (1/J) Σ_{j=1..J} L_base(X; subset = S_j),

where ``subsets(mask)`` returns the J subsets (bool (B, M) tensors) of one minibatch and the model and guide take
the keyword ``subset``. MVAE (Wu & Goodman 2018, sec. 3) uses S = {all, each single modality, k random subsets}
with the ELBO of X_S as the base; the masked bound of Hirt et al. (2024) one random subset, which the program
itself turns into its two-part bound. Any Pyro ELBO is a base (``Trace_ELBO``, ``TraceIWAE``, …); its gradients
are those of the average.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer.elbo import ELBO

from .base import Objective

__all__ = ["SubsetELBO"]


class SubsetELBO(Objective):
    """``loss = (1/J) Σ_j base.loss(model, guide, x, mask, subset=S_j)`` with ``S_1..S_J = subsets(mask)``.

    :param base: the ELBO of one subset (needs ``differentiable_loss``).
    :param subsets: ``subsets(mask) -> list of (B, M) bool tensors`` (``mask`` (B, M) bool, never None here:
        an all-observed mask is made from ``num_modalities``).
    :param int num_modalities: M, for a call without a mask.
    """

    base: Any

    def __init__(self, base: ELBO, subsets: Callable, num_modalities: int):
        super().__init__(num_particles=base.num_particles)
        self.base, self.subsets, self.num_modalities = base, subsets, int(num_modalities)

    def _get_trace(self, model, guide, args, kwargs):
        """Pyro's ELBO interface (not used by the loss): the base ELBO's trace pair."""
        return self.base._get_trace(model, guide, args, kwargs)

    def __repr__(self) -> str:
        return f"SubsetELBO({self.base!r})"

    def _masks(self, x, mask):
        if mask is None:
            mask = torch.ones(len(x), self.num_modalities, dtype=torch.bool, device=x.device)
        subsets = list(self.subsets(mask))
        if not subsets:
            raise ValueError("SubsetELBO: subsets(mask) returned no subset")
        return mask, subsets

    @torch.no_grad()
    def loss(self, model, guide, x, mask=None, *args, **kwargs) -> float:
        mask, subsets = self._masks(x, mask)
        total = 0.0
        for s in subsets:
            total += float(self.base.loss(model, guide, x, mask, *args, subset=s, **kwargs))
        return total / len(subsets)

    def loss_and_surrogate(self, model, guide, x, mask=None, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        mask, subsets = self._masks(x, mask)
        losses = [self.base.differentiable_loss(model, guide, x, mask, *args, subset=s, **kwargs) for s in subsets]
        loss = typing.cast(torch.Tensor, sum(losses)) / len(subsets)
        return loss, loss.detach()
