""":func:`train` runs a plan: each stage is one call of :func:`~ppl_vae.training.loop.fit` (checkpoints, metrics,
resume); stage ``k < last`` writes into ``run_dir/<stage.name>`` and the last into ``run_dir`` itself (so
``run_dir/best.pt`` is the final model). ``resume=True`` continues whichever stage a killed run was in. With more
than one stage the combined history numbers epochs on and adds ``stage`` (1-based) and ``stage_epoch``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.sections import Config, TrainConfig
from ..data.user import as_data
from ..nn.device import device_of
from . import distributed
from .checkpoint import load_checkpoint
from .loop import CHECKPOINT, FitResult, fit
from .plan import Stage, TrainingPlan, plan_for

__all__ = ["train", "TrainResult"]


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


def train(
    model,
    data,
    config: Config | TrainConfig | None = None,
    *,
    plan: TrainingPlan | None = None,
    seed: int | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    device=None,
    progress: bool = True,
    extra_state: dict | None = None,
    fabric=None,
) -> TrainResult:
    """Train ``model`` on ``data`` by its training plan.

    ``data`` is a :class:`~ppl_vae.data.DataBundle`, or your own data — a tensor or NumPy array ``x``, a pair
    ``(x, y)``, a map-style :class:`torch.utils.data.Dataset` — split into train/val/test from the seed by
    :func:`~ppl_vae.data.as_data` (call it yourself to choose the fractions).

    ``config`` is a :class:`~ppl_vae.config.Config` (its ``train`` section and ``seed``) or a
    :class:`~ppl_vae.config.TrainConfig`; ``seed`` overrides the config's (default 0). ``plan`` defaults to
    :func:`plan_for(model) <plan_for>`. ``run_dir`` receives checkpoints and ``metrics.jsonl``; ``resume=True``
    continues a killed run there and reproduces the uninterrupted one. The CLI, the benchmarks and the notebooks
    all train through this function.

    With ``train.devices`` > 1 (or ``train.strategy`` / ``train.precision`` other than the defaults) it runs on
    Lightning Fabric (:mod:`ppl_vae.training.distributed`): ``strategy: ddp`` starts one process per device, each
    re-running the calling script from its start, as Lightning does; ``fabric`` passes one already launched. The
    result's ``rank`` tells a script which process it is in. ``train.logger`` loggers write under ``run_dir``.
    """
    train_cfg, cfg_seed = _settings(config)
    train_cfg.validate()
    if fabric is None:
        fabric = distributed.launch(train_cfg, torch.device(device) if device is not None else device_of(model))
    seed = seed if seed is not None else (cfg_seed if cfg_seed is not None else 0)
    plan = plan if plan is not None else plan_for(model)
    data = as_data(data, seed=seed)  # your tensors, arrays or Dataset: split once, from the seed
    stages = plan.stages(train_cfg)
    if not stages:
        raise ValueError(f"{type(plan).__name__}.stages returned no stage")
    if fabric is None or fabric.global_rank == 0:
        for line in plan_notes(stages, train_cfg):
            print(f"ppl-vae: {line}", file=sys.stderr)
    dirs = _stage_dirs(stages, run_dir)
    current = _current_stage(dirs) if resume else 0
    results: list[FitResult] = []
    for i, stage in enumerate(stages):
        folder = dirs[i]
        if folder is not None and i < current:  # finished before the run was killed: its checkpoint has its result
            results.append(_finished(folder))
            continue
        resuming = resume and i == current and folder is not None and (folder / CHECKPOINT).exists()
        if not resuming:
            plan.begin_stage(stage)
        results.append(
            fit(
                plan,
                data,
                stage.train,
                first_scored_epoch=stage.first_scored_epoch,
                run_dir=folder,
                resume=resuming,
                seed=seed,
                device=device,
                progress=progress,
                extra_state=extra_state,
                fabric=fabric,
            )
        )
    out = _combine(stages, results)
    if fabric is not None:
        out.rank, out.world_size = fabric.global_rank, fabric.world_size
    return out


def plan_notes(stages: list[Stage], train_cfg: TrainConfig) -> list[str]:
    """What a plan does that ``train.epochs`` does not say: stages of their own length, no epoch scored for
    ``best.pt`` (printed as the run's first lines)."""
    notes = []
    total = sum(s.train.epochs for s in stages)
    if len(stages) > 1 and total != train_cfg.epochs:
        parts = ", ".join(f"{s.name} {s.train.epochs} ({s.epochs_from})" for s in stages)
        notes.append(f"this plan trains {total} epochs in {len(stages)} stages: {parts}")
    last = stages[-1]
    if last.first_scored_epoch > last.train.epochs:
        why = f" ({last.scored_from})" if last.scored_from else ""
        notes.append(
            f"no epoch can become best.pt: epochs are scored from epoch {last.first_scored_epoch}{why}, after "
            f"the last of {last.train.epochs}; the run is evaluated at its last epoch (checkpoint.pt)"
        )
    return notes


def _stage_dirs(stages: list[Stage], run_dir: str | Path | None) -> list[Path | None]:
    """Each stage's folder: ``run_dir/<stage.name>`` for all but the last, which writes into ``run_dir`` itself."""
    if run_dir is None:
        return [None] * len(stages)
    root = Path(run_dir)
    return [root if i == len(stages) - 1 else root / s.name for i, s in enumerate(stages)]


def _current_stage(dirs: list[Path | None]) -> int:
    """On resume: the last stage that has a checkpoint is the one the killed run was in."""
    if dirs[0] is None:
        raise ValueError("resume=True needs run_dir")
    started = [i for i, d in enumerate(dirs) if d is not None and (d / CHECKPOINT).exists()]
    return started[-1] if started else 0


def _finished(folder: Path) -> FitResult:
    """The result of a stage that finished before the run was killed, from its checkpoint."""
    return FitResult.from_checkpoint(load_checkpoint(folder / CHECKPOINT, map_location="cpu"), folder)


def _combine(stages: list[Stage], results: list[FitResult]) -> TrainResult:
    last = results[-1]
    if len(results) == 1:
        return TrainResult(
            history=last.history,
            best_epoch=last.best_epoch,
            best_val_elbo=last.best_val_elbo,
            stopped_early=last.stopped_early,
            run_dir=last.run_dir,
            data_plate=last.data_plate,
            stages={stages[0].name: last},
        )
    history, offset = [], 0
    for k, res in enumerate(results, start=1):
        for rec in res.history:
            history.append(
                {**rec, "stage": k, "stage_epoch": rec["epoch"], "epoch": rec["epoch"] + offset}
                if k > 1
                else {**rec, "stage": k}
            )
        before = offset
        offset += len(res.history)
    best = None if last.best_epoch is None else last.best_epoch + before
    return TrainResult(
        history=history,
        best_epoch=best,
        best_val_elbo=last.best_val_elbo,
        stopped_early=last.stopped_early,
        run_dir=last.run_dir,
        data_plate=last.data_plate,
        stages={s.name: r for s, r in zip(stages, results, strict=False)},
    )
