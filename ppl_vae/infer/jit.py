"""Compiled ELBOs that trace once: ``train.jit: true``.

Pyro's ``JitTrace_ELBO`` compiles ``loss_and_surrogate_loss`` with ``torch.jit.trace`` the first time it is called
and reuses it afterwards; a traced graph bakes in the shapes it saw, so the last, smaller minibatch of an epoch
needs a graph of its own. ``JitTraceMeanField_ELBO`` (Pyro 1.9.2) never reuses its graph: it looks for
``_loss_and_surrogate_loss`` but stores ``_differentiable_loss``, so it retraces on every call (6–7× slower than
not compiling at all). :class:`JitELBO` keeps one compiled Pyro ELBO per input shape (batch size and data shape)
and, for the mean-field ELBO, a subclass that stores and reuses its compiled function. Pyro's compiled ELBOs also
recompile when handed a *new* bound method (``vae.model`` is a new object at every attribute access, and they key
their graph by ``id(model)``); :class:`JitELBO` hands them the first bound method it saw for each (object,
function).

Limits (Pyro's): models of static structure whose tensor inputs are ``*args``; nothing that changes between steps
may be read as a Python value inside the model (a KL warm-up's β, a plan that switches a prior on), since the
compiled graph keeps the value it was traced with — :class:`~ppl_vae.config.TrainConfig` refuses ``jit`` with
``kl_warmup_epochs``.
"""

from __future__ import annotations

import inspect
import weakref

import pyro
import torch
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO
from pyro.infer.elbo import ELBO

__all__ = ["JitELBO", "MeanFieldJitELBO"]


class MeanFieldJitELBO(JitTraceMeanField_ELBO):
    """``JitTraceMeanField_ELBO`` that compiles once (see the module docstring)."""

    _differentiable_loss = None

    def differentiable_loss(self, model, guide, *args, **kwargs):
        kwargs["_pyro_model_id"] = id(model)
        kwargs["_pyro_guide_id"] = id(guide)
        if self._differentiable_loss is None:
            weakself = weakref.ref(self)

            @pyro.ops.jit.trace(ignore_warnings=self.ignore_jit_warnings, jit_options=self.jit_options)
            def differentiable_loss(*args, **kwargs):
                kwargs.pop("_pyro_model_id")
                kwargs.pop("_pyro_guide_id")
                self = weakself()
                loss = 0.0
                for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                    _, loss_particle = self._differentiable_loss_particle(model_trace, guide_trace)
                    loss = loss + loss_particle / self.num_particles
                return loss

            self._differentiable_loss = differentiable_loss
        return self._differentiable_loss(*args, **kwargs)


class JitELBO(ELBO):
    """A compiled ``Trace_ELBO`` (``mean_field=False``) or ``TraceMeanField_ELBO`` (``True``) with one compiled
    graph per shape of the arguments; ``traces`` counts how many graphs were compiled."""

    def __init__(
        self,
        num_particles: int = 1,
        mean_field: bool = False,
        max_plate_nesting: int = 1,
        vectorize_particles: bool = False,
        ignore_jit_warnings: bool = True,
    ):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            ignore_jit_warnings=ignore_jit_warnings,
        )
        self.mean_field = bool(mean_field)
        self._compiled: dict = {}
        self._methods: dict = {}

    def _stable(self, fn):
        """The first bound method seen for (its object, its function): the same object on every call."""
        if inspect.ismethod(fn):
            return self._methods.setdefault((id(fn.__self__), fn.__func__), fn)
        return fn

    @property
    def traces(self) -> int:
        return len(self._compiled)

    def _for(self, args) -> ELBO:
        key = tuple((tuple(a.shape), a.dtype, str(a.device)) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in self._compiled:
            cls = MeanFieldJitELBO if self.mean_field else JitTrace_ELBO
            self._compiled[key] = cls(
                num_particles=self.num_particles,
                max_plate_nesting=self.max_plate_nesting,
                vectorize_particles=self.vectorize_particles,
                ignore_jit_warnings=self.ignore_jit_warnings,
            )
        return self._compiled[key]

    def _get_trace(self, model, guide, args, kwargs):
        args = _strip(args)
        return self._for(args)._get_trace(self._stable(model), self._stable(guide), args, kwargs)

    def loss(self, model, guide, *args, **kwargs):
        args = _strip(args)
        return self._for(args).loss(self._stable(model), self._stable(guide), *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        args = _strip(args)
        return self._for(args).differentiable_loss(self._stable(model), self._stable(guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        args = _strip(args)
        return self._for(args).loss_and_grads(self._stable(model), self._stable(guide), *args, **kwargs)


def _strip(args: tuple) -> tuple:
    """Trailing ``None`` arguments (``y`` of an unlabelled batch) dropped: a traced graph takes tensors only, and
    ``model(x)`` is ``model(x, None)``."""
    args = tuple(args)
    while args and args[-1] is None:
        args = args[:-1]
    return args
