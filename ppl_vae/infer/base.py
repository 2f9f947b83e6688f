"""The base of this library's objectives that are not the ELBO of one model/guide trace.

A Pyro ELBO offers three calls: ``loss`` (the value, no gradients), ``differentiable_loss`` (a tensor to
``backward``) and ``loss_and_grads`` (backward into the parameters, return the value). An :class:`Objective`
writes one method, :meth:`~Objective.loss_and_surrogate`, returning the pair (surrogate, value): the tensor whose
gradient is the update and the loss it reports (−ELBO or an estimate of it; the two differ for DReG, a penalty
that only shapes the gradient, or a bound computed by the model's own methods). The three calls follow from it, so
every objective works with ``pyro.infer.SVI`` and with the training loop alike.

An objective whose value for one datapoint depends on the other datapoints of its minibatch (a KL of the batch's
aggregate posterior, a bound using the batch size) says so in ``couples_datapoints``: ``False``, or a short text
naming what couples them. The loop refuses to split such a minibatch over processes (one place:
:func:`ppl_vae.training.distributed.refuse_coupled`).
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.infer.elbo import ELBO

__all__ = ["Objective", "coupled", "surrogate_and_value"]


class Objective(ELBO):
    """A Pyro ELBO defined by :meth:`loss_and_surrogate`; subclasses may override :meth:`loss` where the value has
    a cheaper path without gradients."""

    couples_datapoints: bool | str = False
    retain_graph: bool | None = None

    def loss_and_surrogate(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(the differentiable surrogate, the loss's value as a detached tensor)."""
        raise NotImplementedError

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        return float(self.loss_and_surrogate(model, guide, *args, **kwargs)[1])

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self.loss_and_surrogate(model, guide, *args, **kwargs)[0]

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        surrogate, value = self.loss_and_surrogate(model, guide, *args, **kwargs)
        if torch.is_tensor(surrogate) and surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        return float(value)


def coupled(elbo: ELBO, why: str) -> ELBO:
    """``elbo`` marked as coupling the datapoints of a minibatch, for the reason ``why`` (used by a plan whose
    model makes an otherwise per-datapoint objective depend on the whole batch)."""
    elbo.couples_datapoints = why  # type: ignore[attr-defined]
    return elbo


def surrogate_and_value(elbo: Any, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(the differentiable loss, the value ``loss_and_grads`` reports) of any ELBO, for a caller that runs
    ``backward`` itself (DDP): an :class:`Objective`'s own pair, else ``differentiable_loss`` and its value."""
    if isinstance(elbo, Objective):
        return elbo.loss_and_surrogate(model, guide, *args, **kwargs)
    loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
    return loss, loss.detach()
