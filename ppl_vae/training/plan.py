r"""The training plan: everything a method declares about *how* it trains.

A method trains as "SVI on ``model.model`` / ``model.guide`` with the configured ELBO" unless its
:class:`TrainingPlan` says otherwise. The protocol has these parts, each with a default:

===========================  ====================================================  ============================
hook                         what it decides                                       default
===========================  ====================================================  ============================
``objective(train)``         the Pyro ELBO of a stage (``pyro.infer.ELBO``)        ``train.objective``
``validation_objective(      what the validation score (best checkpoint, early     the stage's objective
train)``                     stopping) is measured with, when training adds a
                             term that is not the model's (a critic, random
                             subsets)
``test_objective()``         the one-sample ELBO that ``test_elbo`` reports        ``Trace_ELBO``
                             (enumerating where the model sums a site out)
``stages(train)``            the list of :class:`Stage` (their settings, the       one stage, ``train``
                             first epoch that counts for best/early stopping)
``begin_stage(stage)``       work when a stage starts afresh (freeze a σ²)         nothing
``on_epoch_end(epoch, ...)`` work after every epoch (refit a prior, anneal, grow   nothing
                             a mixture); may add keys to the epoch's record
``figures(x, y, ...)``       extra PNG figures of a trained model                  none
``standard_figures(...)``    the figures every run gets                            ``make_figures``
``image_figure(x, y, ...)``  chosen datapoints through the model (worst k-hat)     reconstructions
``on_step_end(x, y)``        work after every optimiser step (a discriminator's    nothing
                             own step with its own optimiser)
``state_dict()`` /           what the plan trains besides the model (a second      nothing
``load_state_dict(state)``   optimiser's state), saved in every checkpoint
===========================  ====================================================  ============================

A method's file subclasses :class:`TrainingPlan` and registers it for its model class with
``@training_plan(ModelClass)``; :func:`plan_for` finds it (by the model's class and its bases), and every other
model — a user's own Pyro program included — gets the default plan. Nothing inspects a model for optional
methods: a plan is declared, not guessed.

:func:`~ppl_vae.training.stages.train` runs a plan's stages, each one call of the loop
(:func:`~ppl_vae.training.loop.fit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBO

from ..config.sections import TrainConfig
from ..infer.analytic_kl import AnalyticKLELBO
from ..infer.iwae import TraceIWAE
from ..infer.jit import JitELBO
from ..infer.signature import adapt
from ..nn.device import owner_module
from ..viz.curves import FigureModel, make_figures
from ..viz.grids import plot_reconstructions
from ..viz.program import program_figures, program_reconstructions

__all__ = ["TrainingPlan", "Stage", "training_plan", "plan_for", "build_objective"]


def build_objective(train: TrainConfig) -> ELBO:
    """The Pyro ELBO named by ``train.objective`` with ``num_particles``: ``auto`` (the default: the KL in closed
    form where the guide and the prior have one and the guide's order allows it, :class:`AnalyticKLELBO`),
    ``elbo`` (``Trace_ELBO``, every term sampled), ``meanfield`` (``TraceMeanField_ELBO``) or ``iwae``
    (:class:`TraceIWAE`); ``train.jit`` compiles ``elbo`` and ``meanfield`` (:class:`~ppl_vae.infer.jit.JitELBO`;
    ``auto`` is compiled as ``elbo``: a compiled graph cannot check the guide's order per trace)."""
    k = train.num_particles
    if train.jit:
        return JitELBO(
            num_particles=k, mean_field=train.objective == "meanfield", max_plate_nesting=1, vectorize_particles=k > 1
        )
    if train.objective == "auto":
        return AnalyticKLELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
    if train.objective == "elbo":
        return Trace_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
    if train.objective == "meanfield":
        return TraceMeanField_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
    return TraceIWAE(num_particles=k, vectorize_particles=True, estimator=train.estimator)


@dataclass
class Stage:
    """One stage of a plan: its name (its folder when it is not the last), its settings and the first (1-based)
    epoch whose validation ELBO is of the final objective (earlier ones never become ``best.pt``). ``epochs_from``
    names the setting its length comes from and ``scored_from`` the one that sets ``first_scored_epoch``: the run's
    first lines say them when the plan trains other than ``train.epochs`` or scores no epoch."""

    name: str
    train: TrainConfig
    first_scored_epoch: int = 1
    epochs_from: str = "train.epochs"
    scored_from: str = ""


class TrainingPlan:
    """The default plan (see the module docstring); methods subclass it and override what differs.

    ``model`` is the trained object: anything with ``model(x, y)`` and ``guide(x, y)`` methods (a ``PyroModule``
    of this library or a user's own), or a ``(model_fn, guide_fn)`` pair.
    """

    def __init__(self, model):
        self.model = model

    # -- what SVI runs --------------------------------------------------------------------------------------
    @property
    def model_fn(self):
        return self.model[0] if isinstance(self.model, tuple) else self.model.model

    @property
    def guide_fn(self):
        return self.model[1] if isinstance(self.model, tuple) else self.model.guide

    @property
    def module(self) -> torch.nn.Module | None:
        """The ``nn.Module`` whose parameters are trained and whose state (buffers such as a fitted prior) goes into
        every checkpoint: the model itself, or the module that ``model_fn`` is a method of."""
        return self.model if isinstance(self.model, torch.nn.Module) else owner_module(self.model_fn)

    # -- the protocol ---------------------------------------------------------------------------------------
    def objective(self, train: TrainConfig) -> ELBO:
        return build_objective(train)

    def validation_objective(self, train: TrainConfig) -> ELBO | None:
        """The ELBO that scores validation epochs (``None``: the stage's :meth:`objective`)."""
        return None

    def test_objective(self) -> ELBO:
        """The one-sample ELBO that :func:`~ppl_vae.experiment.test_elbo` reports on the test split (a model with a
        site marked for enumeration returns one that sums it out)."""
        return Trace_ELBO(max_plate_nesting=1)

    def stages(self, train: TrainConfig) -> list[Stage]:
        return [Stage("train", train)]

    def begin_stage(self, stage: Stage) -> None:
        """Called when ``stage`` starts afresh (not when a killed run resumes inside it)."""

    def on_epoch_end(self, epoch: int, record: dict, data) -> None:
        """Called after every epoch (0-based ``epoch`` of the current stage), before the checkpoint; keys added to
        ``record`` are written to ``metrics.jsonl``."""

    def figures(self, x: torch.Tensor, y, run_dir: Path, seed: int = 0) -> list[str]:
        """Extra PNG figures of the trained model in ``run_dir`` (paths written)."""
        return []

    def standard_figures(self, x: torch.Tensor, y, history: list[dict], run_dir: Path, seed: int = 0) -> list[str]:
        """The figures every run of the method gets (default: reconstructions, prior samples, latent plots and
        training curves, :func:`ppl_vae.viz.make_figures`; for a program without ``encode``/``decode``/``sample``
        and ``latent_dim``, the same figures read from its traces, :func:`ppl_vae.viz.program.program_figures`)."""
        if isinstance(self.model, FigureModel):
            return make_figures(self.model, x, y, history, run_dir, seed=seed)
        model, guide = adapt(self.model_fn, "model"), adapt(self.guide_fn, "guide")
        return program_figures(model, guide, x, y, history, run_dir, seed=seed)

    def image_figure(self, x: torch.Tensor, y, path: Path, title: str, seed: int = 0) -> str:
        """A figure of chosen datapoints through the model (e.g. the images with the worst PSIS k-hat; default:
        the images above their reconstructions)."""
        if isinstance(self.model, FigureModel):
            return plot_reconstructions(self.model, x, path, y=y, n=len(x), title=title)
        model, guide = adapt(self.model_fn, "model"), adapt(self.guide_fn, "guide")
        return program_reconstructions(model, guide, x, y, path, title=title)

    def on_step_end(self, x: torch.Tensor, y) -> None:
        """Called after every optimiser step of the model with that step's minibatch."""

    def state_dict(self) -> dict:
        """What the plan trains besides the model (e.g. a second optimiser), stored in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore :meth:`state_dict` when a killed run resumes (``None``: a checkpoint without plan state)."""


_PLANS: dict[type, type[TrainingPlan]] = {}


def training_plan(model_cls: type):
    """Class decorator: the decorated :class:`TrainingPlan` subclass is the plan of ``model_cls`` and its
    subclasses (unless a subclass registers its own)."""

    def deco(plan_cls: type[TrainingPlan]) -> type[TrainingPlan]:
        if not (isinstance(plan_cls, type) and issubclass(plan_cls, TrainingPlan)):
            raise TypeError(f"@training_plan({model_cls.__name__}) decorates a TrainingPlan subclass, got {plan_cls!r}")
        _PLANS[model_cls] = plan_cls
        return plan_cls

    return deco


def plan_for(model) -> TrainingPlan:
    """The plan registered for ``model``'s class (or the nearest base class), else the default plan."""
    for cls in type(model).__mro__:
        if cls in _PLANS:
            return _PLANS[cls](model)
    return TrainingPlan(model)
