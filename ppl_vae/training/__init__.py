"""Training: the plan protocol and :func:`train` (:mod:`.plan`), the loop :func:`fit` (:mod:`.loop`) and what it
reads from a model (:mod:`.probe`), checkpoints (:mod:`.checkpoint`), the optimiser (:mod:`.optim`), several
processes through Lightning Fabric (:mod:`.distributed`), experiment loggers (:mod:`.loggers`), the run
folder's lock (:mod:`.runlock`) and ``train.compile``'s networks under ``torch.compile`` (:mod:`.compiled`)."""

from .checkpoint import load_checkpoint, restore_params
from .compiled import CompileFallbackWarning, compile_networks
from .loop import FitResult, evaluate_elbo, fit
from .plan import Stage, TrainingPlan, build_objective, plan_for, training_plan
from .probe import PlateProbe, ScaleLatents
from .stages import TrainResult, train

__all__ = [
    "train",
    "fit",
    "TrainingPlan",
    "Stage",
    "TrainResult",
    "training_plan",
    "plan_for",
    "build_objective",
    "FitResult",
    "evaluate_elbo",
    "PlateProbe",
    "ScaleLatents",
    "load_checkpoint",
    "restore_params",
    "compile_networks",
    "CompileFallbackWarning",
]
