r"""A Pyro ELBO plus a per-datapoint penalty on the guide, for regularised objectives:

    loss = −ELBO_base + γ · (N/B) Σ_{i in minibatch} penalty(x_i)

whose *value* (``loss``, what training curves, validation and early stopping see) is the base ELBO's alone and
whose gradient includes the penalty. Used for GAMIX's variance-collapse regulariser (Rivera, "How to train your
VAE", 2023; ``ppl_vae.models.gamix``), with any base ELBO (``Trace_ELBO``, ``TraceIWAE``).
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.infer.elbo import ELBO

from .base import Objective, surrogate_and_value

__all__ = ["PenalisedELBO"]


class PenalisedELBO(Objective):
    """A Pyro ELBO plus a penalty: gradient of ``base`` loss + (N/B) Σ_i penalty(x_i); value of ``base`` alone.

    ``penalty(x, y) -> (B,)`` must read its parameters inside a Pyro context (e.g. a ``@pyro_method``) so that
    ``SVI`` sees them; ``num_data`` (N) scales the minibatch sum like the data plate does.
    """

    base: Any

    def __init__(self, base: ELBO, penalty, weight: float, num_data_fn):
        super().__init__(
            num_particles=base.num_particles,
            max_plate_nesting=base.max_plate_nesting,
            vectorize_particles=base.vectorize_particles,
        )
        self.base, self.penalty, self.weight, self.num_data_fn = base, penalty, float(weight), num_data_fn

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} computes its loss directly; it has no single trace")

    def _scaled_penalty(self, args, kwargs):
        x = args[0]
        y = args[1] if len(args) > 1 else kwargs.get("y")
        n = self.num_data_fn() or x.shape[0]
        return self.weight * n / x.shape[0] * self.penalty(x, y).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        return self.base.loss(model, guide, *args, **kwargs)

    def loss_and_surrogate(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        surrogate, value = surrogate_and_value(self.base, model, guide, *args, **kwargs)
        return surrogate + self._scaled_penalty(args, kwargs), value

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Two passes: the base's own ``loss_and_grads`` (its cheaper path, e.g. TraceIWAE's), then the penalty."""
        value = self.base.loss_and_grads(model, guide, *args, **kwargs)
        if self.weight != 0.0:
            self._scaled_penalty(args, kwargs).backward()
        return value
