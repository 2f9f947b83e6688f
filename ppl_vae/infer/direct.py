"""A base for objectives that a model computes with its own methods instead of from a model/guide trace."""

from __future__ import annotations

import torch

from .base import Objective

__all__ = ["DirectObjective"]


class DirectObjective(Objective):
    """A Pyro ELBO whose loss comes from ``owner`` (the model) rather than from tracing ``model``/``guide``.

    Subclasses implement ``terms(x, y, grad) -> (loss, value)``: ``loss`` is the tensor whose gradient is the update
    (it may be None when ``grad`` is False) and ``value`` the number reported (−ELBO or an estimate of it). The
    owner's methods that read parameters must be ``@pyro_method``s so that ``SVI`` sees them. ``model``/``guide``
    arguments are not called.
    """

    def __init__(self, owner):
        super().__init__(num_particles=1, max_plate_nesting=1)
        self.owner = owner

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} computes its loss directly; it has no single trace")

    def terms(self, x: torch.Tensor, y, grad: bool):
        raise NotImplementedError

    def _terms(self, args, kwargs, grad: bool):
        return self.terms(args[0], args[1] if len(args) > 1 else kwargs.get("y"), grad)

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        return self._terms(args, kwargs, grad=False)[1].item()

    def loss_and_surrogate(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        loss, value = self._terms(args, kwargs, grad=True)
        return loss, value.detach()
