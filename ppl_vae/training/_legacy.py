"""The form of ``fit`` before training plans: ``fit(model_fn, guide_fn, data, elbo, config, on_epoch_end=...,
on_step_end=..., plan_state=..., val_elbo=..., module=...)``, turned into a plan of those hooks (one release)."""

from __future__ import annotations

import warnings

from pyro.infer import Trace_ELBO

from .plan import TrainingPlan


def legacy_plan(
    model,
    guide,
    positional: tuple,
    *,
    module=None,
    on_epoch_end=None,
    on_step_end=None,
    plan_state=None,
    val_elbo=None,
):
    """(plan, data, config) for ``fit(model, guide, *positional, **hooks)`` of earlier releases."""
    warnings.warn(
        "fit(model_fn, guide_fn, data, elbo, config) is deprecated: call fit((model_fn, guide_fn), data, "
        "config, objective=elbo), or fit(plan, data, config)",
        DeprecationWarning,
        stacklevel=3,
    )
    data, elbo, config = (*positional, None, None)[:3]

    class _Hooks(TrainingPlan):
        def objective(self, train):
            return elbo if elbo is not None else Trace_ELBO()

        def validation_objective(self, train):
            return val_elbo

        @property
        def module(self):
            return module if module is not None else super().module

        def on_epoch_end(self, epoch, record, data):
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)

        def on_step_end(self, x, y):
            if on_step_end is not None:
                on_step_end(x, y)

        def state_dict(self):
            return plan_state[0]() if plan_state is not None else None

        def load_state_dict(self, state):
            if plan_state is not None:
                plan_state[1](state)

    return _Hooks((model, guide)), data, config
