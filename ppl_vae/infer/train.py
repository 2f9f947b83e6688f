"""The training loop: ``fit(model, guide, data, elbo, config)`` for any Pyro model/guide pair.

The loop never looks inside a model. Its contract: ``model(x, y)`` and ``guide(x, y)`` take a minibatch. The data
plate may follow either convention a Pyro user writes: subsampled to the training-set size N
(``pyro.plate("data", N, subsample=...)``, so one step's loss estimates the full-data negative ELBO) or over the
minibatch only (``pyro.plate("data", len(x))``, the loss is the minibatch's). The loop reads the plate's size from
the trace of every step (:class:`PlateProbe`, no extra call) and reports ``−loss / size`` — the ELBO per datapoint
in nats — either way; the convention it found is in ``FitResult.data_plate`` and in every checkpoint.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import contextlib

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import CheckpointError, DataError, TrainingDiverged
from ..images import Images
from ..plate import DATA_PLATE
from .checkpoint import SCHEMA, atomic_save, load_checkpoint, load_module_state, restore_params, rng_state, \
    set_rng_state
from .distributed import RANK_SEED, Sharded, on_lead
from .importance import fork_rng
from .loggers import close_loggers, log_history, make_loggers
from .optim import ParamOptimizer

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"


class ScaleLatents(Messenger):
    """Multiplies the log-density of every *latent* (unobserved) site by β, in model and guide alike:
    ELBO_β = E_q[log p(x|z)] + β·E_q[log p(z) − log q(z|x)]  (KL warm-up; Bowman et al. 2016, Sønderby et al. 2016).
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and self.beta != 1.0:
            msg["scale"] = self.beta * msg["scale"]


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_elbo: float | None = None
    stopped_early: bool = False
    run_dir: str | None = None
    data_plate: dict | None = None


class PlateProbe(Messenger):
    """Reads, during each model/guide call it wraps, the full size of the data plate — so a loss can be turned into
    a per-datapoint ELBO whatever convention the plate follows, without an extra call of the model.

    The data plate is the plate named ``name`` if given, else the one called ``"data"``, else the first plate of
    an observed site whose size is the batch size. After a call: ``full_size`` (None when no plate was seen) and
    ``sites`` (0 when the objective did not run the model or guide at all, e.g. a :class:`DirectObjective`).
    """

    def __init__(self, name: str | None = None):
        super().__init__()
        self.name = name
        self.unit_interval_sites: set[str] = set()   # observed sites whose likelihood needs data in [0, 1]
        self.reset(0)

    def reset(self, batch: int) -> None:
        self.batch, self.full_size, self.plate_name, self.sites = int(batch), None, None, 0

    def _pyro_sample(self, msg):
        self.sites += 1
        if msg["is_observed"] and isinstance(_base(msg["fn"]), (dist.Bernoulli, dist.ContinuousBernoulli)):
            self.unit_interval_sites.add(msg["name"])
        if self.full_size is not None:
            return
        frames = [f for f in msg["cond_indep_stack"] if f.vectorized]
        want = self.name or DATA_PLATE
        frame = next((f for f in frames if f.name == want), None)
        if frame is None and self.name is None and msg["is_observed"]:
            frame = next((f for f in frames if f.size == self.batch), None)
        if frame is not None:
            self.full_size = int(frame.full_size if frame.full_size is not None else frame.size)
            self.plate_name = frame.name


def _base(fn):
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def check_finite(data) -> None:
    """Every value of every split is finite: a NaN or inf in the data is reported as data, before training
    (8-bit :class:`~ppl_vae.images.Images` are by construction)."""
    for split in ("train", "val", "test"):
        x = data.split(split)[0]
        if isinstance(x, Images) or len(x) == 0 or bool(torch.isfinite(x).all()):
            continue
        bad = ~torch.isfinite(x.reshape(len(x), -1))
        rows = bad.any(1).nonzero().flatten()
        raise DataError(f"data.{split}_x holds {int(bad.sum())} non-finite value(s) (NaN or inf) in {len(rows)} "
                        f"datapoint(s), the first at index {int(rows[0])}: the data are broken, not the optimiser — "
                        "clean or drop those images")


def check_unit_interval(data, sites) -> None:
    """Targets of a Bernoulli likelihood must lie in [0, 1]: the log-density of a grey level outside it is not a
    probability, and training on 0–255 pixels gives meaningless ELBOs."""
    for split in ("train", "val", "test"):
        x = data.split(split)[0]
        if isinstance(x, Images) or len(x) == 0:   # 8-bit images are read into [0, 1]
            continue
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise DataError(f"the likelihood of site(s) {sorted(sites)} is Bernoulli, which needs data in [0, 1], but "
                            f"data.{split}_x lies in [{lo:g}, {hi:g}]: scale the images to [0, 1] (e.g. divide 8-bit "
                            "pixels by 255) or choose data.pixels (continuous, binary_static, binary_dynamic) and a "
                            "likelihood that fits the values")


def data_plate_summary(probe: PlateProbe, num_train: int) -> dict:
    """Which data-plate convention a probe saw on a training batch: subsampled to N or over the minibatch."""
    if probe.full_size is None:
        convention = "no data plate found: the loss is taken as the minibatch's"
    elif probe.full_size != probe.batch:
        convention = f"subsampled to N = {probe.full_size}"
    elif probe.batch < num_train:
        convention = "over the minibatch only"
    else:
        convention = f"over the minibatch, which is the whole training set (N = {num_train})"
    return {"name": probe.plate_name, "size": probe.full_size, "batch": probe.batch, "convention": convention}


class _Divisor:
    """loss → per-datapoint ELBO for one call: ELBO per datapoint = −loss / divisor. The divisor is the data
    plate's full size read by the probe during the call; objectives that do not run the model (a
    :class:`DirectObjective`) scale by the model's own plate, read once from a trace of model and guide."""

    def __init__(self, model, guide, name: str | None):
        self.model, self.guide = model, guide
        self.probe = PlateProbe(name)
        self._traced: int | None = None

    def wrap(self, fn):
        return self.probe(fn)

    def start(self, batch: int) -> None:
        self.probe.reset(batch)

    def __call__(self, x, y) -> int:
        p = self.probe
        if p.sites == 0:   # the objective computed its loss without the model: trace the model's plate once
            if self._traced is None:
                with torch.no_grad(), fork_rng(), poutine.block():
                    p.reset(x.shape[0])
                    gt = poutine.trace(p(self.guide)).get_trace(x, y)
                    poutine.replay(p(self.model), trace=gt)(x, y)
                self._traced = p.full_size if p.full_size is not None and p.full_size != x.shape[0] else 0
            return self._traced or int(x.shape[0])
        return p.full_size if p.full_size is not None else int(x.shape[0])


def _owner(fn) -> torch.nn.Module | None:
    """The ``nn.Module`` that ``fn`` is a bound method of, if any."""
    owner = fn.__self__ if inspect.ismethod(fn) else None
    return owner if isinstance(owner, torch.nn.Module) else None


def _device_of(fn) -> torch.device:
    owner = _owner(fn)
    if owner is not None:
        for p in owner.parameters():
            return p.device
    return torch.device("cpu")


def evaluate_elbo(model, guide, data, elbo, split: str, batch_size: int, device, num_data: int | None = None,
                  *, data_plate: str | None = None, sharded: Sharded | None = None) -> float:
    """Mean ELBO per datapoint over a split, whichever data-plate convention the pair uses (the plate's size is
    read during every call, see :class:`PlateProbe`). Batches are at most ``num_data`` (default: the training-set
    size) long, so a plate subsampled to N never sees a minibatch larger than N. With ``sharded`` (several ranks)
    each rank scores its share of every batch and the sums are reduced over ranks."""
    cap = min(batch_size, int(num_data) if num_data is not None else len(data.train_x))
    divisor = _Divisor(model, guide, data_plate)
    m, g = divisor.wrap(model), divisor.wrap(guide)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in data.batches(split, cap, shuffle=False, device=device,
                                 part=None if sharded is None else (sharded.rank, sharded.world)):
            if x.shape[0] == 0:
                continue
            divisor.start(x.shape[0])
            loss = elbo.loss(m, g, x, y)
            total += -loss / divisor(x, y) * x.shape[0]
            count += x.shape[0]
    if sharded is not None:
        total, count = sharded.total(total, count)
    return total / max(count, 1)


def fit(model, guide, data, elbo=None, config: TrainConfig | None = None, *, run_dir: str | Path | None = None,
        resume: bool = False, seed: int = 0, device=None, progress: bool = True, extra_state: dict | None = None,
        on_epoch_end=None, module: torch.nn.Module | None = None, first_scored_epoch: int = 1,
        data_plate: str | None = None, on_step_end=None, plan_state=None, val_elbo=None,
        fabric=None) -> FitResult:
    """Train ``model``/``guide`` with ``elbo.loss_and_grads`` and one Adam over all their parameters
    (:class:`~ppl_vae.infer.optim.ParamOptimizer`: the updates of ``pyro.infer.SVI`` with ``pyro.optim.Adam``,
    without one optimiser per tensor).

    Per epoch: learning rate ``config.lr_at(epoch)``, KL warm-up β = ``config.beta_at(epoch)``, one pass over the
    shuffled training batches (order a function of (seed, epoch)), the validation ELBO, a JSON line in
    ``metrics.jsonl`` and an atomic checkpoint (param store, optimiser, RNG states, history). ``best.pt`` keeps
    the epoch with the best validation ELBO; ``config.patience`` stops after that many epochs without
    improvement. Only epochs with β = 1 and (1-based) number ≥ max(``config.best_from_epoch``,
    ``first_scored_epoch``) are scored for both (e.g. a plan that changes the objective after a warm-up: earlier
    ELBOs are of another model). ``resume=True`` continues from ``run_dir/checkpoint.pt`` and reproduces an
    uninterrupted run. The reported ELBOs are per datapoint whichever data-plate convention the pair uses
    (:class:`PlateProbe`; ``data_plate`` names the plate when it is not ``"data"``).
    A NaN/inf loss raises :class:`TrainingDiverged` naming epoch and step; the last good checkpoint stays.
    ``extra_state`` (e.g. the configuration) is stored in every checkpoint, and so is the ``state_dict`` of
    ``module`` (default: the ``nn.Module`` that ``model`` is a method of), which carries buffers such as a fitted
    mixture prior. ``on_epoch_end(epoch, record)`` runs after each epoch, before the checkpoint.
    ``val_elbo`` (default ``elbo``) is the objective of the validation ELBO.
    ``on_step_end(x, y)`` runs after every optimiser step (e.g. a discriminator's own step); ``plan_state`` is a
    pair ``(get, set)``: ``get()`` is stored in every checkpoint and ``set(state)`` restores it on resume (the
    state of what the plan trains besides the model, such as a second optimiser).
    ``fabric`` (a launched :class:`lightning.fabric.Fabric`, see :mod:`ppl_vae.infer.distributed`) runs the same
    loop on its ranks: each takes its share of every global batch, DDP averages the gradients, the epoch's ELBOs
    are reduced over ranks, rank 0 alone writes checkpoints (with every rank's RNG state), ``metrics.jsonl``, the
    progress bar and the ``config.logger`` loggers (:mod:`ppl_vae.infer.loggers`: every epoch's record, written
    under ``run_dir``; on resume the restored history first).
    ``config.stop_delta`` stops once an epoch improves the (validation) ELBO by less than that, after
    ``config.min_epochs`` epochs (the δELBO < ε rule of Lin et al.'s Algorithm 1).
    Pyro's validation (argument and shape checks, when enabled) runs on the first step of the run and is switched
    off after it, unless ``config.validate_every_step``: the checks cost as much as a tenth of a step and find
    nothing new once the first step has passed them.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    elbo = elbo if elbo is not None else Trace_ELBO()
    val_elbo = val_elbo if val_elbo is not None else elbo
    device = fabric.device if fabric is not None else (torch.device(device) if device is not None
                                                       else _device_of(model))
    module = module if module is not None else _owner(model)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    lead = rank == 0
    num_data = int(data.train_x.shape[0])
    first_scored = max(cfg.best_from_epoch, int(first_scored_epoch))
    has_val = data.val_x is not None and len(data.val_x) > 0
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)

    warmup = ScaleLatents(1.0)
    divisor = _Divisor(model, guide, data_plate)
    train_model, train_guide = divisor.wrap(warmup(model)), divisor.wrap(warmup(guide))
    lr_now = {"lr": cfg.lr_at(0)}

    result = FitResult(run_dir=str(run_dir) if run_dir else None)
    start_epoch, bad_epochs = 0, 0
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs run_dir")
        ckpt = load_checkpoint(run_dir / CHECKPOINT, map_location=device)
        if ckpt.get("world_size", 1) != world:
            raise CheckpointError(f"the checkpoint in {str(run_dir)!r} was written by {ckpt.get('world_size', 1)} "
                                  f"process(es), this job has {world}: resume with train.devices = "
                                  f"{ckpt.get('world_size', 1)} to continue exactly")
        x0, y0 = next(iter(data.batches("train", min(cfg.batch_size, num_data), shuffle=False, device=device)))
        pyro.clear_param_store()
        if module is not None and ckpt.get("module") is not None:
            load_module_state(module, ckpt["module"], run_dir / CHECKPOINT)
        restore_params(model, guide, ckpt["param_store"], x0, y0)
        start_epoch = ckpt["epoch"]
        lr_now["lr"] = cfg.lr_at(start_epoch)
        optim = ParamOptimizer(module, lr_now["lr"], cfg.clip_norm)
        optim.load_state(ckpt["optim"])
        result.history = ckpt["history"]
        result.best_epoch, result.best_val_elbo = ckpt["best_epoch"], ckpt["best_val_elbo"]
        bad_epochs = ckpt["bad_epochs"]
        result.stopped_early = ckpt.get("stopped_early", False)
        result.data_plate = ckpt.get("data_plate")
        if plan_state is not None:
            plan_state[1](ckpt.get("plan_state"))
        set_rng_state(ckpt["rng_ranks"][rank] if "rng_ranks" in ckpt else ckpt["rng"])
        if lead:
            _rewrite_metrics(run_dir, result.history)
    else:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed + RANK_SEED * rank)
        optim = ParamOptimizer(module, lr_now["lr"], cfg.clip_norm)
        if run_dir is not None and lead:
            (run_dir / METRICS).write_text("")
    sharded = None
    if fabric is not None:   # after any restore: DDP starts every rank from rank 0's parameters
        spare = next(iter(data.batches("train", 1, shuffle=False, device=device)))   # for a rank's empty share
        sharded = Sharded(fabric, module, elbo, train_model, train_guide, spare)
    # after the checks of a resume, so a refused one leaves the logs as they were; rank 0 only
    loggers = on_lead(fabric, lambda: make_loggers(cfg.logger, run_dir, resuming=resume), share=False) or []
    if loggers:
        log_history(loggers, result.history)
    data_checked = False
    skip_checks = False   # Pyro's checks run on the first step only, unless validate_every_step (see the docstring)

    check_finite(data)
    steps_per_epoch = data.num_batches("train", cfg.batch_size)
    bar = tqdm(total=(cfg.epochs - start_epoch) * steps_per_epoch, disable=not (progress and lead), desc="training",
               unit="step", dynamic_ncols=True, mininterval=0.5)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if result.stopped_early:
                break
            if bad_epochs and cfg.patience is not None and bad_epochs >= cfg.patience:
                result.stopped_early = True
                break
            t0 = time.perf_counter()
            lr_now["lr"] = cfg.lr_at(epoch)
            optim.set_lr(lr_now["lr"])
            warmup.beta = cfg.beta_at(epoch)
            total, seen = 0.0, 0
            for step, (x, y) in enumerate(data.batches("train", cfg.batch_size, shuffle=True, seed=seed, epoch=epoch,
                                                       device=device, part=None if sharded is None else (rank, world))):
                try:
                    with pyro.validation_enabled(False) if skip_checks else contextlib.nullcontext():
                        if sharded is None:
                            divisor.start(x.shape[0])
                            loss = elbo.loss_and_grads(train_model, train_guide, x, y)
                        else:   # x: this rank's share of the global batch
                            batch = min(cfg.batch_size, num_data - step * cfg.batch_size)
                            loss, loss_sum, x, y, rows = sharded.loss_and_grads(x, y, batch, divisor)
                except ValueError as e:   # Pyro's argument validation meets NaN parameters or NaN outputs
                    if "nan" not in str(e).lower():
                        raise
                    raise _diverged("NaN", epoch, step, run_dir) from e
                except RuntimeError as e:   # the first batch does not fit the model: say so in the data's terms
                    if data_checked or "shape" not in str(e):
                        raise
                    raise DataError(f"the model cannot read a training batch of shape {tuple(x.shape)} (data shape "
                                    f"{tuple(data.shape)}): was it built for other data? ({e})") from e
                if not data_checked:   # the first step, before any update: what the likelihood needs
                    data_checked = True
                    if divisor.probe.unit_interval_sites:
                        check_unit_interval(data, divisor.probe.unit_interval_sites)
                skip_checks = not cfg.validate_every_step
                loss = float(loss)
                if not math.isfinite(loss if sharded is None else loss_sum):   # every rank stops
                    raise _diverged(loss if sharded is None else loss_sum, epoch, step, run_dir)
                optim.step()
                if on_step_end is not None:
                    on_step_end(x, y)
                rows = x.shape[0] if sharded is None else rows
                total += -loss / divisor(x, y) * rows
                if result.data_plate is None:
                    result.data_plate = data_plate_summary(divisor.probe, num_data)
                seen += rows
                bar.update(1)
                if progress:
                    bar.set_postfix(epoch=epoch + 1, elbo=f"{total / seen:.2f}", refresh=False)
            if sharded is not None:
                total, seen = sharded.total(total, seen)
            record = {"epoch": epoch + 1, "train_elbo": total / seen, "beta": warmup.beta, "lr": lr_now["lr"],
                      "steps": step + 1}
            if cfg.min_elbo is not None and record["train_elbo"] < cfg.min_elbo:
                raise _diverged(f"{-record['train_elbo']:.4g} per datapoint, finite but absurd (an ELBO below "
                                f"train.min_elbo = {cfg.min_elbo:g})", epoch, step, run_dir, absurd=True)
            if has_val:
                with contextlib.nullcontext() if cfg.validate_every_step else pyro.validation_enabled(False):
                    record["val_elbo"] = evaluate_elbo(model, guide, data, val_elbo, "val", cfg.eval_batch_size, device,
                                                       num_data, data_plate=data_plate, sharded=sharded)
            record["seconds"] = time.perf_counter() - t0
            score = record.get("val_elbo", record["train_elbo"])
            scored = warmup.beta == 1.0 and epoch + 1 >= first_scored
            improved = scored and (result.best_val_elbo is None or score > result.best_val_elbo)
            if improved:
                result.best_epoch, result.best_val_elbo, bad_epochs = epoch + 1, score, 0
            elif scored:
                bad_epochs += 1
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
            previous = result.history[-1] if result.history else None
            result.history.append(record)
            bar.set_postfix(epoch=epoch + 1, elbo=f"{record['train_elbo']:.2f}",
                            val=f"{record.get('val_elbo', float('nan')):.2f}")
            result.stopped_early = (cfg.stop_delta is not None and previous is not None and epoch + 1 >= cfg.min_epochs
                                    and score - previous.get("val_elbo", previous["train_elbo"]) < cfg.stop_delta)
            rngs = None if run_dir is None else [rng_state()] if sharded is None else sharded.gather(rng_state())
            on_lead(fabric, lambda: _write_epoch(run_dir, loggers, record, improved, lambda: {
                "schema": SCHEMA, "epoch": epoch + 1, "param_store": pyro.get_param_store().get_state(),
                "optim": optim.state(), "rng": rngs[0], "rng_ranks": rngs, "world_size": world,
                "history": result.history, "best_epoch": result.best_epoch, "best_val_elbo": result.best_val_elbo,
                "bad_epochs": bad_epochs, "stopped_early": result.stopped_early, "train_config": cfg.__dict__,
                "module": module.state_dict() if module is not None else None, "data_plate": result.data_plate,
                "plan_state": plan_state[0]() if plan_state is not None else None, **(extra_state or {})}),
                    share=False)
            if result.stopped_early:
                break
    except BaseException:
        close_loggers(loggers, "failed")
        raise
    finally:
        bar.close()
    close_loggers(loggers)
    return result


def _write_epoch(run_dir: Path | None, loggers: list, record: dict, improved: bool, state) -> None:
    """Rank 0's files of an epoch: the loggers, ``checkpoint.pt`` (the dict ``state()``, also ``best.pt`` when
    ``improved``) and a line of ``metrics.jsonl``."""
    if loggers:
        log_history(loggers, [record])
    if run_dir is None:
        return
    state = state()
    atomic_save(state, run_dir / CHECKPOINT)
    if improved:
        atomic_save(state, run_dir / BEST)
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def _diverged(loss, epoch: int, step: int, run_dir: Path | None, absurd: bool = False) -> TrainingDiverged:
    where = f"; the last good checkpoint is {run_dir / CHECKPOINT}" if run_dir and epoch > 0 else ""
    when = f"after epoch {epoch + 1}" if absurd else f"at epoch {epoch + 1}, step {step + 1}"
    return TrainingDiverged(f"the loss became {loss} {when}{where} (training diverged; the data were checked and are "
                            "finite: try a lower train.lr or a train.clip_norm)")


def _rewrite_metrics(run_dir: Path, history: list[dict]) -> None:
    with open(run_dir / METRICS, "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
