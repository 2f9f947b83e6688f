"""The training loop: :func:`fit` trains one stage of a training plan, for any Pyro model/guide pair.

The loop never looks inside a model. What differs between methods (objective, work after a step or an epoch,
state besides the model) comes from the :class:`~ppl_vae.training.plan.TrainingPlan`; a bare model/guide pair
gets the default plan. Its contract: ``model(x, y)`` and ``guide(x, y)`` take a minibatch. The data plate may
follow either convention a Pyro user writes: subsampled to the training-set size N
(``pyro.plate("data", N, subsample=...)``, so one step's loss estimates the full-data negative ELBO) or over the
minibatch only (``pyro.plate("data", len(x))``, the loss is the minibatch's). The loop reads the plate's size from
the trace of every step (:class:`~ppl_vae.training.probe.PlateProbe`, no extra call) and reports ``−loss / size``
— the ELBO per datapoint in nats — either way; the convention it found is in ``FitResult.data_plate`` and in
every checkpoint.

Per epoch: learning rate ``config.lr_at(epoch)``, KL warm-up β = ``config.beta_at(epoch)``, one pass over the
shuffled training batches (order a function of (seed, epoch)): each step ``objective.loss_and_grads`` and one Adam
over all parameters (:class:`~ppl_vae.training.optim.ParamOptimizer`: the updates of ``pyro.infer.SVI`` with
``pyro.optim.Adam``, without one optimiser per tensor), then ``plan.on_step_end``; the validation ELBO (measured with
``plan.validation_objective``, default the objective), ``plan.on_epoch_end``, a JSON line in ``metrics.jsonl`` and an
atomic checkpoint (param store, optimiser, RNG states, history, ``plan.state_dict()``, the state of ``plan.module``).
``best.pt`` keeps the epoch with the best validation ELBO; ``config.patience`` stops after that many epochs without
improvement, ``config.stop_delta`` once an epoch improves by less than that after ``config.min_epochs`` (the
δELBO < ε rule of Lin et al.'s Algorithm 1). Only epochs with β = 1 and a number ≥ the first scored epoch count for
both. A resumed run reproduces the uninterrupted one. A NaN/inf loss raises :class:`TrainingDiverged` naming epoch
and step; the last good checkpoint stays. Pyro's validation (argument and shape checks, when enabled) runs on the
first step and is switched off after it, unless ``config.validate_every_step``: the checks cost as much as a tenth
of a step and find nothing new once the first step has passed them.

With a launched Fabric (several ranks) each rank takes its share of every global batch, DDP averages the
gradients, the epoch's ELBOs are reduced over ranks, and rank 0 alone writes checkpoints (with every rank's RNG
state), ``metrics.jsonl``, the progress bar and the ``config.logger`` loggers.

One epoch is four named steps of :class:`_Loop`: :meth:`~_Loop.train_epoch` (one pass over the shuffled batches),
:meth:`~_Loop.validate`, :meth:`~_Loop.score` (best epoch, patience, the δELBO rule) and :meth:`~_Loop.write`
(loggers, checkpoint, ``metrics.jsonl``); :meth:`~_Loop.restore` continues a killed run before the first.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer.elbo import ELBO
from tqdm.auto import tqdm

from ..config.sections import TrainConfig
from ..data.user import as_data
from ..distributions.likelihoods import sigmoid_links
from ..errors import CheckpointError, DataError, TrainingDiverged
from ..infer.signature import adapt
from ..nn.device import device_of, eval_mode, flush_denormals
from ._legacy import legacy_plan
from .checkpoint import (
    SCHEMA,
    atomic_save,
    load_checkpoint,
    load_module_state,
    restore_params,
    rng_state,
    set_rng_state,
)
from .compiled import compiled_fit
from .distributed import RANK_SEED, Sharded, grad_scaler, on_lead, refuse_coupled
from .loggers import close_loggers, log_history, make_loggers
from .optim import ParamOptimizer
from .plan import TrainingPlan, plan_for
from .probe import ScaleLatents, _Divisor, data_plate_summary, evaluate_elbo

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"


@dataclass
class FitResult:
    """What one :func:`fit` returns: every epoch's record, the best (scored) epoch and its validation ELBO."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_elbo: float | None = None
    stopped_early: bool = False
    run_dir: str | None = None
    data_plate: dict | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict, run_dir: str | Path | None) -> FitResult:
        """The result as far as a checkpoint records it (a finished stage, or a run being resumed)."""
        return cls(
            history=ckpt["history"],
            best_epoch=ckpt["best_epoch"],
            best_val_elbo=ckpt["best_val_elbo"],
            stopped_early=ckpt.get("stopped_early", False),
            run_dir=str(run_dir) if run_dir is not None else None,
            data_plate=ckpt.get("data_plate"),
        )


def fit(
    plan,
    data,
    config: TrainConfig | None = None,
    *args,
    objective: ELBO | None = None,
    first_scored_epoch: int = 1,
    run_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    device=None,
    progress: bool = True,
    extra_state: dict | None = None,
    data_plate: str | None = None,
    fabric=None,
    **legacy,
) -> FitResult:
    """Train one stage of ``plan`` on ``data`` with ``config`` (a :class:`~ppl_vae.config.TrainConfig`); see the
    module docstring for what one epoch does.

    :param data: a :class:`~ppl_vae.data.DataBundle`, or your own tensors, arrays or map-style ``Dataset``
        (:func:`~ppl_vae.data.as_data`: split from ``seed``).
    :param plan: a :class:`~ppl_vae.training.plan.TrainingPlan`, or what one is made of (a model object with
        ``model``/``guide`` methods, or a ``(model_fn, guide_fn)`` pair: its registered or the default plan).
    :param objective: any ``pyro.infer.ELBO``, instead of ``plan.objective(config)``.
    :param first_scored_epoch: the first (1-based) epoch that may become ``best.pt`` (with
        ``config.best_from_epoch``, the later of the two).
    :param run_dir: where checkpoints and ``metrics.jsonl`` go; ``resume=True`` continues the run there.
    :param extra_state: stored in every checkpoint (e.g. the configuration).
    :param data_plate: the name of the data plate when it is not ``"data"``.
    :param fabric: a launched :class:`lightning.fabric.Fabric` (:mod:`ppl_vae.training.distributed`).

    The form of earlier releases, ``fit(model_fn, guide_fn, data, elbo, config, ...)``, still works (with a
    ``DeprecationWarning``) for one release.
    """
    options = dict(
        first_scored_epoch=first_scored_epoch,
        run_dir=run_dir,
        seed=seed,
        device=device,
        data_plate=data_plate,
        fabric=fabric,
        extra_state=extra_state,
    )
    if callable(data):  # fit(model_fn, guide_fn, data, elbo, config, ...): the earlier form (data is the guide)
        plan, data, config = legacy_plan(plan, data, (config, *args), **legacy)
    elif args or legacy:
        raise TypeError(f"fit() got unexpected arguments {list(legacy) or args}")
    plan = plan if isinstance(plan, TrainingPlan) else plan_for(plan)
    data = as_data(data, seed=seed)  # a DataBundle as it is; tensors, arrays, a Dataset split from the seed
    loop = _Loop(plan, data, config or TrainConfig(), objective=objective, **options)
    loop.restore() if resume else loop.start()
    flush = loop.cfg.flush_denormal and loop.device.type == "cpu"
    denormals = flush_denormals(flush) if flush else contextlib.nullcontext()
    with compiled_fit(loop), denormals, loop.session(progress) as bar:
        for epoch in range(loop.start_epoch, loop.cfg.epochs):
            if loop.out_of_patience():
                break
            t0 = time.perf_counter()
            record = loop.train_epoch(epoch, bar, progress)
            loop.validate(record)
            record["seconds"] = time.perf_counter() - t0
            improved = loop.score(epoch, record)
            bar.set_postfix(
                epoch=epoch + 1, elbo=f"{record['train_elbo']:.2f}", val=f"{record.get('val_elbo', float('nan')):.2f}"
            )
            loop.write(epoch, record, improved)
            if loop.result.stopped_early:
                break
    return loop.result


class _Loop:
    """The state of one :func:`fit` call and its steps; see the module docstring."""

    def __init__(
        self,
        plan,
        data,
        cfg: TrainConfig,
        *,
        objective,
        first_scored_epoch,
        run_dir,
        seed,
        device,
        data_plate,
        fabric,
        extra_state,
    ):
        cfg.validate()
        self.plan, self.data, self.cfg, self.seed, self.fabric = plan, data, cfg, seed, fabric
        # model(x) or model(x, y): called as (x, y) below whatever the signature (infer.signature)
        self.model, self.guide = adapt(plan.model_fn, "model"), adapt(plan.guide_fn, "guide")
        self.module = plan.module
        self.elbo = objective if objective is not None else plan.objective(cfg)
        val_elbo = plan.validation_objective(cfg)
        self.val_elbo = val_elbo if val_elbo is not None else self.elbo
        self.device = (
            fabric.device
            if fabric is not None
            else (torch.device(device) if device is not None else device_of(plan.model_fn))
        )
        self.rank: int = fabric.global_rank if fabric is not None else 0
        self.world: int = fabric.world_size if fabric is not None else 1
        refuse_coupled(self.elbo, self.world)
        self.num_data = int(data.train_x.shape[0])
        self.first_scored = max(cfg.best_from_epoch, int(first_scored_epoch))
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data_plate, self.extra_state = data_plate, extra_state or {}
        self.warmup = ScaleLatents(1.0)
        self.divisor = _Divisor(self.model, self.guide, data_plate)
        self.train_model = self.divisor.wrap(self.warmup(self.model))
        self.train_guide = self.divisor.wrap(self.warmup(self.guide))
        self.result = FitResult(run_dir=str(self.run_dir) if self.run_dir else None)
        self.start_epoch, self.bad_epochs, self.lr = 0, 0, cfg.lr_at(0)
        self.sharded: Sharded | None = None
        self.loggers: list = []
        self.resuming = False
        self.data_checked = False  # what the likelihood needs of the data: checked on the first step
        self.skip_checks = False  # Pyro's checks run on the first step only, unless validate_every_step

    def new_optimizer(self) -> ParamOptimizer:
        """One Adam over the module's and the store's parameters (its fused kernel with ``train.compile``)."""
        return ParamOptimizer(
            self.module, self.lr, self.cfg.clip_norm, grad_scaler(self.fabric), fused=self.cfg.compile
        )

    @property
    def lead(self) -> bool:
        return self.rank == 0

    # -- before the first epoch -------------------------------------------------------------------------------
    def start(self) -> None:
        """A fresh run: a clean param store, the seed (per rank), a new optimiser, an empty ``metrics.jsonl``."""
        pyro.clear_param_store()
        pyro.set_rng_seed(self.seed + RANK_SEED * self.rank)
        self.optim = self.new_optimizer()
        if self.run_dir is not None and self.lead:
            (self.run_dir / METRICS).write_text("")

    def restore(self) -> None:
        """Continue a killed run from ``run_dir/checkpoint.pt``: parameters, optimiser, history, scores, the
        plan's state and this rank's RNG state (so the run reproduces the uninterrupted one)."""
        if self.run_dir is None:
            raise ValueError("resume=True needs run_dir")
        self.resuming = True
        ckpt = load_checkpoint(self.run_dir / CHECKPOINT, map_location=self.device)
        if ckpt.get("world_size", 1) != self.world:
            raise CheckpointError(
                f"the checkpoint in {str(self.run_dir)!r} was written by "
                f"{ckpt.get('world_size', 1)} process(es), this job has {self.world}: resume with "
                f"train.devices = {ckpt.get('world_size', 1)} to continue exactly"
            )
        x0, y0 = next(
            iter(self.data.batches("train", min(self.cfg.batch_size, self.num_data), shuffle=False, device=self.device))
        )
        pyro.clear_param_store()
        if self.module is not None and ckpt.get("module") is not None:
            load_module_state(self.module, ckpt["module"], self.run_dir / CHECKPOINT)
        restore_params(self.model, self.guide, ckpt["param_store"], x0, y0)
        self.start_epoch = ckpt["epoch"]
        self.lr = self.cfg.lr_at(self.start_epoch)
        self.optim = self.new_optimizer()
        self.optim.load_state(ckpt["optim"])
        self.result = FitResult.from_checkpoint(ckpt, self.run_dir)
        self.bad_epochs = ckpt["bad_epochs"]
        self.plan.load_state_dict(ckpt.get("plan_state"))
        set_rng_state(ckpt["rng_ranks"][self.rank] if "rng_ranks" in ckpt else ckpt["rng"])
        if self.lead:
            _rewrite_metrics(self.run_dir, self.result.history)

    @contextlib.contextmanager
    def session(self, progress: bool) -> Iterator[tqdm]:
        """Around the epochs: the DDP wrapper (after any restore: every rank starts from rank 0's parameters),
        rank 0's loggers (after the checks of a resume, so a refused one leaves the logs as they were), the data
        check and the progress bar; the loggers are closed as failed when an epoch raises."""
        if self.fabric is not None:
            spare = next(iter(self.data.batches("train", 1, shuffle=False, device=self.device)))
            self.sharded = Sharded(self.fabric, self.module, self.elbo, self.train_model, self.train_guide, spare)
        self.loggers = (
            on_lead(
                self.fabric, lambda: make_loggers(self.cfg.logger, self.run_dir, resuming=self.resuming), share=False
            )
            or []
        )
        if self.loggers:
            log_history(self.loggers, self.result.history)
        self.data.check_finite()
        steps = self.data.num_batches("train", self.cfg.batch_size)
        bar = tqdm(
            total=(self.cfg.epochs - self.start_epoch) * steps,
            disable=not (progress and self.lead),
            desc="training",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
        )
        try:
            yield bar
        except BaseException:
            close_loggers(self.loggers, "failed")
            raise
        finally:
            bar.close()
        close_loggers(self.loggers)

    def out_of_patience(self) -> bool:
        """Whether the run stopped (early stopping seen after a resume, or ``config.patience`` reached)."""
        r = self.result
        if not r.stopped_early and self.bad_epochs and self.cfg.patience is not None:
            r.stopped_early = self.bad_epochs >= self.cfg.patience
        return r.stopped_early

    # -- one epoch ------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, bar: tqdm, progress: bool) -> dict:
        """One pass over this epoch's shuffled batches (this rank's shares of them): the epoch's record."""
        self.lr = self.cfg.lr_at(epoch)
        self.optim.set_lr(self.lr)
        self.warmup.beta = self.cfg.beta_at(epoch)
        part = None if self.sharded is None else (self.rank, self.world)
        total, seen, step = 0.0, 0.0, 0
        for step, (x, y) in enumerate(
            self.data.batches(
                "train", self.cfg.batch_size, shuffle=True, seed=self.seed, epoch=epoch, device=self.device, part=part
            )
        ):
            elbo_sum, rows = self.step(x, y, epoch, step)
            total, seen = total + elbo_sum, seen + rows
            bar.update(1)
            if progress:
                bar.set_postfix(epoch=epoch + 1, elbo=f"{total / seen:.2f}", refresh=False)
        if self.sharded is not None:
            total, seen = self.sharded.total(total, seen)
        record = {
            "epoch": epoch + 1,
            "train_elbo": total / seen,
            "beta": self.warmup.beta,
            "lr": self.lr,
            "steps": step + 1,
        }
        if self.cfg.min_elbo is not None and record["train_elbo"] < self.cfg.min_elbo:
            raise self.diverged(
                f"{-record['train_elbo']:.4g} per datapoint, finite but absurd (an ELBO below "
                f"train.min_elbo = {self.cfg.min_elbo:g})",
                epoch,
                step,
                absurd=True,
            )
        return record

    def step(self, x, y, epoch: int, step: int) -> tuple[float, int]:
        """One optimiser step on a minibatch (this rank's share of it), then the plan's ``on_step_end``: the
        step's ELBO summed over its rows, and the number of rows."""
        checks = pyro.validation_enabled(False) if self.skip_checks else contextlib.nullcontext()
        try:
            with checks:
                if self.sharded is None:
                    self.divisor.start(x.shape[0])
                    loss = value = self.elbo.loss_and_grads(self.train_model, self.train_guide, x, y)
                else:  # x: this rank's share of the global batch
                    batch = min(self.cfg.batch_size, self.num_data - step * self.cfg.batch_size)
                    loss, value, x, y, rows = self.sharded.loss_and_grads(x, y, batch, self.divisor)
        except ValueError as e:  # Pyro's argument validation meets NaN parameters or NaN outputs
            if "nan" not in str(e).lower():
                raise
            raise self.diverged("NaN", epoch, step) from e
        except RuntimeError as e:  # the first batch does not fit the model: say so in the data's terms
            if self.data_checked or "shape" not in str(e):
                raise
            raise DataError(
                f"the model cannot read a training batch of shape {tuple(x.shape)} (data shape "
                f"{tuple(self.data.shape)}): was it built for other data? ({e})"
            ) from e
        if not self.data_checked:  # the first step, before any update: what the likelihood needs
            self.data_checked = True
            if self.divisor.probe.unit_interval_sites:
                self.data.check_unit_interval(self.divisor.probe.unit_interval_sites)
            if self.plan.module is not None and sigmoid_links(self.plan.module):
                self.data.check_link_range(sigmoid_links(self.plan.module))
        self.skip_checks = not self.cfg.validate_every_step
        loss, value = float(loss), float(value)
        if not math.isfinite(value):  # every rank sees the reduced value, so every rank stops
            raise self.diverged(value, epoch, step)
        self.optim.step()
        self.plan.on_step_end(x, y)
        rows = x.shape[0] if self.sharded is None else rows
        if self.result.data_plate is None:
            self.result.data_plate = data_plate_summary(self.divisor.probe, self.num_data)
        return -loss / self.divisor(x, y) * rows, rows

    def validate(self, record: dict) -> None:
        """The validation ELBO of the epoch (``record["val_elbo"]``), when there is a validation split."""
        if self.data.val_x is None or len(self.data.val_x) == 0:
            return
        checks = contextlib.nullcontext() if self.cfg.validate_every_step else pyro.validation_enabled(False)
        with checks, eval_mode(self.module):  # no dropout, and batch norm's running statistics left as trained
            record["val_elbo"] = evaluate_elbo(
                self.model,
                self.guide,
                self.data,
                self.val_elbo,
                "val",
                self.cfg.eval_batch_size,
                self.device,
                self.num_data,
                data_plate=self.data_plate,
                sharded=self.sharded,
            )

    def score(self, epoch: int, record: dict) -> bool:
        """Best epoch and patience (scored epochs only), the plan's ``on_epoch_end``, the history and the δELBO
        stopping rule; whether this epoch is the new best."""
        r, cfg = self.result, self.cfg
        value = record.get("val_elbo", record["train_elbo"])
        scored = self.warmup.beta == cfg.kl_weight and epoch + 1 >= self.first_scored  # warmed up
        improved = scored and (r.best_val_elbo is None or value > r.best_val_elbo)
        if improved:
            r.best_epoch, r.best_val_elbo, self.bad_epochs = epoch + 1, value, 0
        elif scored:
            self.bad_epochs += 1
        self.plan.on_epoch_end(epoch, record, self.data)
        previous = r.history[-1] if r.history else None
        r.history.append(record)
        r.stopped_early = (
            cfg.stop_delta is not None
            and previous is not None
            and epoch + 1 >= cfg.min_epochs
            and value - previous.get("val_elbo", previous["train_elbo"]) < cfg.stop_delta
        )
        return improved

    def write(self, epoch: int, record: dict, improved: bool) -> None:
        """Rank 0's files of the epoch: the loggers, ``checkpoint.pt`` (also ``best.pt`` when ``improved``) and a
        line of ``metrics.jsonl``; every rank's RNG state goes into the checkpoint."""
        rngs = None
        if self.run_dir is not None:
            rngs = [rng_state()] if self.sharded is None else self.sharded.gather(rng_state())
        on_lead(
            self.fabric, lambda: self._write_files(record, improved, lambda: self.checkpoint(epoch, rngs)), share=False
        )

    def checkpoint(self, epoch: int, rngs: list | None) -> dict[str, Any]:
        r = self.result
        return {
            "schema": SCHEMA,
            "epoch": epoch + 1,
            "param_store": pyro.get_param_store().get_state(),
            "optim": self.optim.state(),
            "rng": rngs[0] if rngs else None,
            "rng_ranks": rngs,
            "world_size": self.world,
            "history": r.history,
            "best_epoch": r.best_epoch,
            "best_val_elbo": r.best_val_elbo,
            "bad_epochs": self.bad_epochs,
            "stopped_early": r.stopped_early,
            "train_config": self.cfg.__dict__,
            "module": self.module.state_dict() if self.module is not None else None,
            "data_plate": r.data_plate,
            "plan_state": self.plan.state_dict(),
            **self.extra_state,
        }

    def _write_files(self, record: dict, improved: bool, checkpoint) -> None:
        if self.loggers:
            log_history(self.loggers, [record])
        if self.run_dir is None:
            return
        state = checkpoint()
        atomic_save(state, self.run_dir / CHECKPOINT)
        if improved:
            atomic_save(state, self.run_dir / BEST)
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def diverged(self, loss, epoch: int, step: int, absurd: bool = False) -> TrainingDiverged:
        where = (
            f"; the last good checkpoint is {self.run_dir / CHECKPOINT}"
            if self.run_dir is not None and epoch > 0
            else ""
        )
        when = f"after epoch {epoch + 1}" if absurd else f"at epoch {epoch + 1}, step {step + 1}"
        return TrainingDiverged(
            f"the loss became {loss} {when}{where} (training diverged; the data were checked and "
            "are finite: try a lower train.lr or a train.clip_norm)"
        )


def _rewrite_metrics(run_dir: Path, history: list[dict]) -> None:
    with open(run_dir / METRICS, "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
