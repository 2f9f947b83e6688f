r"""The training plan: everything a method declares about *how* it trains, and :func:`train`, the one way to train.

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
``stages(train)``            the list of :class:`Stage` (their settings, the       one stage, ``train``
                             first epoch that counts for best/early stopping)
``begin_stage(stage)``       work when a stage starts afresh (freeze a σ²)         nothing
``on_epoch_end(epoch, ...)`` work after every epoch (refit a prior, anneal, grow   nothing
                             a mixture); may add keys to the epoch's record
``figures(x, y, ...)``       extra PNG figures of a trained model                  none
``on_step_end(x, y)``        work after every optimiser step (a discriminator's    nothing
                             own step with its own optimiser)
``state_dict()`` /           what the plan trains besides the model (a second      nothing
``load_state_dict(state)``   optimiser's state), saved in every checkpoint
===========================  ====================================================  ============================

A method's file subclasses :class:`TrainingPlan` and registers it for its model class with
``@training_plan(ModelClass)``; :func:`plan_for` finds it (by the model's class and its bases), and every other
model — a user's own Pyro program included — gets the default plan. Nothing inspects a model for optional
methods: a plan is declared, not guessed.

:func:`train` runs a plan: each stage is one call of :func:`ppl_vae.infer.fit` (checkpoints, metrics, resume);
stage ``k < last`` writes into ``run_dir/<stage.name>`` and the last into ``run_dir`` itself (so
``run_dir/best.pt`` is the final model). ``resume=True`` continues whichever stage a killed run was in. With more
than one stage the combined history numbers epochs on and adds ``stage`` (1-based) and ``stage_epoch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBO

from ..config import Config, TrainConfig
from . import distributed
from .analytic_kl import AnalyticKLELBO
from .checkpoint import load_checkpoint
from .iwae import TraceIWAE
from .jit import JitELBO
from .train import CHECKPOINT, FitResult, fit

__all__ = ["TrainingPlan", "Stage", "TrainResult", "training_plan", "plan_for", "train", "build_objective"]


def build_objective(train: TrainConfig) -> ELBO:
    """The Pyro ELBO named by ``train.objective`` with ``num_particles``: ``auto`` (the default: the KL in closed
    form where the guide and the prior have one and the guide's order allows it, :class:`AnalyticKLELBO`),
    ``elbo`` (``Trace_ELBO``, every term sampled), ``meanfield`` (``TraceMeanField_ELBO``) or ``iwae``
    (:class:`TraceIWAE`); ``train.jit`` compiles ``elbo`` and ``meanfield`` (:class:`~ppl_vae.infer.jit.JitELBO`;
    ``auto`` is compiled as ``elbo``: a compiled graph cannot check the guide's order per trace)."""
    k = train.num_particles
    if train.jit:
        return JitELBO(num_particles=k, mean_field=train.objective == "meanfield", max_plate_nesting=1,
                       vectorize_particles=k > 1)
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
    epoch whose validation ELBO is of the final objective (earlier ones never become ``best.pt``)."""

    name: str
    train: TrainConfig
    first_scored_epoch: int = 1


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
        """The ``nn.Module`` whose state (buffers such as a fitted prior) goes into every checkpoint."""
        return self.model if isinstance(self.model, torch.nn.Module) else None

    # -- the protocol ---------------------------------------------------------------------------------------
    def objective(self, train: TrainConfig) -> ELBO:
        return build_objective(train)

    def validation_objective(self, train: TrainConfig) -> ELBO | None:
        """The ELBO that scores validation epochs (``None``: the stage's :meth:`objective`)."""
        return None

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
            raise TypeError(f"@training_plan({model_cls.__name__}) decorates a TrainingPlan subclass, got "
                            f"{plan_cls!r}")
        _PLANS[model_cls] = plan_cls
        return plan_cls

    return deco


def plan_for(model) -> TrainingPlan:
    """The plan registered for ``model``'s class (or the nearest base class), else the default plan."""
    for cls in type(model).__mro__:
        if cls in _PLANS:
            return _PLANS[cls](model)
    return TrainingPlan(model)


@dataclass
class TrainResult(FitResult):
    """A :class:`FitResult` for the whole plan (``history`` over all stages) plus each stage's own result."""

    stages: dict[str, FitResult] = field(default_factory=dict)
    data_plate: dict | None = None
    rank: int = 0
    world_size: int = 1


def _settings(config) -> tuple[TrainConfig, int | None]:
    if isinstance(config, Config):
        return config.train, config.seed
    if isinstance(config, TrainConfig) or config is None:
        return config or TrainConfig(), None
    raise TypeError(f"config must be a ppl_vae Config or TrainConfig, got {type(config).__name__}")


def train(model, data, config: Config | TrainConfig | None = None, *, plan: TrainingPlan | None = None,
          seed: int | None = None, run_dir: str | Path | None = None, resume: bool = False, device=None,
          progress: bool = True, extra_state: dict | None = None, fabric=None) -> TrainResult:
    """Train ``model`` on ``data`` (a :class:`~ppl_vae.data.DataBundle`) by its training plan.

    ``config`` is a :class:`~ppl_vae.config.Config` (its ``train`` section and ``seed``) or a
    :class:`~ppl_vae.config.TrainConfig`; ``seed`` overrides the config's (default 0). ``plan`` defaults to
    :func:`plan_for(model) <plan_for>`. ``run_dir`` receives checkpoints and ``metrics.jsonl``; ``resume=True``
    continues a killed run there and reproduces the uninterrupted one. The CLI, the benchmarks and the notebooks
    all train through this function.

    With ``train.devices`` > 1 (or ``train.strategy`` / ``train.precision`` other than the defaults) it runs on
    Lightning Fabric (:mod:`ppl_vae.infer.distributed`): ``strategy: ddp`` starts one process per device, each
    re-running the calling script from its start, as Lightning does; ``fabric`` passes one already launched. The
    result's ``rank`` tells a script which process it is in. ``train.logger`` loggers write under ``run_dir``.
    """
    train_cfg, cfg_seed = _settings(config)
    train_cfg.validate()
    if fabric is None:
        where = torch.device(device) if device is not None else next(
            (p.device for p in (model.parameters() if isinstance(model, torch.nn.Module) else ())),
            torch.device("cpu"))
        fabric = distributed.launch(train_cfg, where)
    seed = seed if seed is not None else (cfg_seed if cfg_seed is not None else 0)
    plan = plan if plan is not None else plan_for(model)
    stages = plan.stages(train_cfg)
    if not stages:
        raise ValueError(f"{type(plan).__name__}.stages returned no stage")
    run_dir = Path(run_dir) if run_dir is not None else None
    dirs = [None if run_dir is None else (run_dir if i == len(stages) - 1 else run_dir / s.name)
            for i, s in enumerate(stages)]
    # on resume: the last stage that has a checkpoint is the one the run was in
    current = 0
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs run_dir")
        started = [i for i, d in enumerate(dirs) if (d / CHECKPOINT).exists()]
        current = started[-1] if started else 0

    def hook(epoch, record):
        plan.on_epoch_end(epoch, record, data)

    results: list[FitResult] = []
    for i, stage in enumerate(stages):
        if i < current:   # finished before the run was killed: its result comes from its checkpoint
            ck = load_checkpoint(dirs[i] / CHECKPOINT, map_location="cpu")
            results.append(FitResult(history=ck["history"], best_epoch=ck["best_epoch"],
                                     best_val_elbo=ck["best_val_elbo"], stopped_early=ck.get("stopped_early", False),
                                     run_dir=str(dirs[i]), data_plate=ck.get("data_plate")))
            continue
        resuming = resume and i == current and dirs[i] is not None and (dirs[i] / CHECKPOINT).exists()
        if not resuming:
            plan.begin_stage(stage)
        results.append(fit(plan.model_fn, plan.guide_fn, data, plan.objective(stage.train), stage.train,
                           run_dir=dirs[i], resume=resuming, seed=seed, device=device, progress=progress,
                           extra_state=extra_state, on_epoch_end=hook, module=plan.module,
                           on_step_end=plan.on_step_end, plan_state=(plan.state_dict, plan.load_state_dict),
                           val_elbo=plan.validation_objective(stage.train),
                           first_scored_epoch=stage.first_scored_epoch, fabric=fabric))
    out = _combine(stages, results)
    if fabric is not None:
        out.rank, out.world_size = fabric.global_rank, fabric.world_size
    return out


def _combine(stages: list[Stage], results: list[FitResult]) -> TrainResult:
    last = results[-1]
    if len(results) == 1:
        return TrainResult(history=last.history, best_epoch=last.best_epoch, best_val_elbo=last.best_val_elbo,
                           stopped_early=last.stopped_early, run_dir=last.run_dir, data_plate=last.data_plate,
                           stages={stages[0].name: last})
    history, offset = [], 0
    for k, res in enumerate(results, start=1):
        for rec in res.history:
            history.append({**rec, "stage": k, "stage_epoch": rec["epoch"], "epoch": rec["epoch"] + offset}
                           if k > 1 else {**rec, "stage": k})
        before = offset
        offset += len(res.history)
    best = None if last.best_epoch is None else last.best_epoch + before
    return TrainResult(history=history, best_epoch=best, best_val_elbo=last.best_val_elbo,
                       stopped_early=last.stopped_early, run_dir=last.run_dir, data_plate=last.data_plate,
                       stages={s.name: r for s, r in zip(stages, results)})
