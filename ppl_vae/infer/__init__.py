"""Objectives (Pyro ELBOs, one class per file), the training plan and the training loop.

* :mod:`.iwae` — :class:`TraceIWAE` (IWAE and DReG gradients) on :mod:`.importance` (per-datapoint weights);
* :mod:`.wise_ale`, :mod:`.aggregate_kl`, :mod:`.recursive_mixture`, :mod:`.penalised`, :mod:`.stratified`,
  :mod:`.subsets` — the objectives of the methods that need their own (:mod:`.direct` is the base of those computed by a model's own method);
* :mod:`.plan` — :class:`TrainingPlan` and :func:`train`, the one way to train;
* :mod:`.train` — :func:`fit`, the SVI loop for any model/guide pair; :mod:`.checkpoint` — saving and resuming.
"""

from .aggregate_kl import AggregateKLObjective
from .checkpoint import load_checkpoint, restore_params
from .direct import DirectObjective
from .iwae import TraceIWAE
from .penalised import PenalisedELBO
from .plan import Stage, TrainingPlan, TrainResult, build_objective, plan_for, train, training_plan
from .recursive_mixture import RecursiveMixtureELBO
from .stratified import StratifiedIWAE
from .subsets import SubsetELBO
from .train import FitResult, PlateProbe, ScaleLatents, evaluate_elbo, fit
from .wise_ale import WiseAleELBO

__all__ = ["fit", "FitResult", "ScaleLatents", "evaluate_elbo", "PlateProbe", "load_checkpoint",
           "restore_params", "train", "TrainingPlan", "Stage", "TrainResult", "training_plan", "plan_for",
           "build_objective", "TraceIWAE", "WiseAleELBO", "AggregateKLObjective", "RecursiveMixtureELBO",
           "PenalisedELBO", "DirectObjective", "StratifiedIWAE", "SubsetELBO"]
