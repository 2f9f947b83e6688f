"""Objectives: Pyro ELBOs, one class per file, each usable with ``pyro.infer.SVI`` directly (as ``pyro.infer``).

* :mod:`.analytic_kl` — :class:`AnalyticKLELBO`, the default (the KL in closed form where it exists);
* :mod:`.iwae` — :class:`TraceIWAE` (IWAE and DReG gradients) on :mod:`.importance` (per-datapoint weights, with
  :mod:`.trace_checks` and :mod:`.dreg`); :mod:`.stratified` — :class:`StratifiedIWAE` for mixtures of experts
  (:mod:`.component_average` — :class:`ComponentAverageELBO`, the mean of their components' ELBOs);
* :mod:`.wise_ale_elbo`, :mod:`.aggregate_kl`, :mod:`.recursive_mixture`, :mod:`.penalised`, :mod:`.mae_elbo`,
  :mod:`.adversarial`, :mod:`.subsets` — the objectives of the methods that need their own (:mod:`.direct` is the
  base of those computed by a model's own method); :mod:`.jit` — a compiled ``Trace_ELBO``.

The training loop and plan live in :mod:`ppl_vae.training`.
"""

import importlib
import warnings

from .adversarial import AdversarialELBO
from .aggregate_kl import AggregateKLObjective
from .analytic_kl import AnalyticKLELBO
from .component_average import ComponentAverageELBO
from .direct import DirectObjective
from .iwae import TraceIWAE
from .jit import JitELBO
from .mae_elbo import MAERegularisedELBO
from .penalised import PenalisedELBO
from .recursive_mixture import RecursiveMixtureELBO
from .stratified import StratifiedIWAE
from .subsets import SubsetELBO
from .wise_ale_elbo import WiseAleELBO

__all__ = [
    "AnalyticKLELBO",
    "TraceIWAE",
    "StratifiedIWAE",
    "ComponentAverageELBO",
    "WiseAleELBO",
    "AggregateKLObjective",
    "RecursiveMixtureELBO",
    "PenalisedELBO",
    "MAERegularisedELBO",
    "AdversarialELBO",
    "SubsetELBO",
    "DirectObjective",
    "JitELBO",
]

# the training names this package exported before ppl_vae.training existed (kept for one release)
_MOVED = (
    "fit",
    "FitResult",
    "ScaleLatents",
    "evaluate_elbo",
    "PlateProbe",
    "load_checkpoint",
    "restore_params",
    "train",
    "TrainingPlan",
    "Stage",
    "TrainResult",
    "training_plan",
    "plan_for",
    "build_objective",
)


def __getattr__(name):
    if name in _MOVED:
        warnings.warn(
            f"ppl_vae.infer.{name} moved to ppl_vae.training.{name}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return vars(importlib.import_module("ppl_vae.training"))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
