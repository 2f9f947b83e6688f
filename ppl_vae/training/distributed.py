"""Several processes or devices through Lightning Fabric, inside the library's own training loop.

:func:`~ppl_vae.training.loop.fit` stays the one loop of every method (plan hooks, schedules, checkpoints, exact
resume). With ``train.devices`` > 1, ``train.strategy`` ≠ ``auto`` or ``train.precision`` ≠ ``32-true`` it runs
under a :class:`lightning.fabric.Fabric`, which brings what a home-made loop should not: the launch of one process
per device (``strategy: ddp`` re-runs the command or script in each, Lightning's subprocess launcher), the process
group (gloo on CPU, NCCL on CUDA), DDP (the gradients averaged over ranks during ``backward``), device placement,
precision and the collectives used here. ``strategy: single_device`` runs the Fabric path in one process.

Each rank reads only its contiguous share of every global minibatch (``DataBundle.batches(..., part=(rank,
world))``: the order and the binarisation stay pure functions of (seed, epoch, batch), and with ``data.storage`` ≠
``memory`` only the share's rows are read, by that rank's own DataLoader workers). A rank's loss is scaled so that
DDP's average of the ranks' gradients
is the single-process estimator of the global batch whichever data-plate convention the objective uses
(:meth:`Sharded.loss_and_grads`); the epoch's ELBOs are summed over ranks. Each rank draws its own noise
(seed ``seed + RANK_SEED * rank``; rank 0 draws what a single process draws) and every rank's RNG state goes into
the checkpoint, so ``--resume`` with the same layout continues exactly.
"""

from __future__ import annotations

import atexit
import math
import sys

import pyro
import torch

from ..errors import ConfigError, PplVaeError
from ..infer.base import surrogate_and_value

__all__ = ["RankLost", "wanted", "launch", "on_lead", "Sharded", "RANK_SEED", "refuse_coupled", "release_process_group"]

RANK_SEED = 1_000_003  # rank r starts its RNG from seed + RANK_SEED·r

_LAUNCHED: dict[tuple, object] = {}  # one process group per job: the Fabric of each layout already launched


class RankLost(PplVaeError):
    """A process of a multi-process job stopped (killed, out of memory, crashed): the others cannot go on."""


def wanted(train) -> bool:
    """Whether ``train`` (a TrainConfig) asks for the Fabric path."""
    return train.uses_fabric


def launch(train, device: torch.device):
    """The launched :class:`~lightning.fabric.Fabric` for ``train``'s layout, or None for the plain one-process
    loop. With ``strategy: ddp`` the first call starts the other processes, each re-running this command."""
    if not wanted(train):
        return None
    accelerator = train.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if device.type == "cuda" else "cpu"
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.accelerator must be available on this machine: got {train.accelerator!r} (device "
            f"{device}), but CUDA is not available"
        )
    if train.precision == "16-mixed" and accelerator == "cpu":
        raise ConfigError(
            "train.precision = '16-mixed' is float16 autocast with a gradient scaler, for CUDA GPUs; on the CPU "
            "Lightning would silently train in bfloat16 instead: use train.precision: bf16-mixed (or 32-true)"
        )
    if train.world_size > 1 and _in_notebook():
        raise ConfigError(
            f"train.strategy = 'ddp' with {train.world_size} processes starts each process by re-running the "
            "command, which a notebook kernel cannot be: put the training in a script (python train.py, or ppl-vae "
            "train config.yaml) and run it from a terminal; in the notebook, train on one device (train.devices: 1)"
        )
    key = (accelerator, train.devices, train.num_nodes, train.strategy, train.precision)
    if key in _LAUNCHED:
        return _LAUNCHED[key]
    if _LAUNCHED and train.world_size > 1:
        raise ConfigError(
            f"a job runs one multi-process layout: this process already launched "
            f"{next(iter(_LAUNCHED))}, now asked for {key}"
        )
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    if train.strategy == "single_device" and train.devices != 1:
        raise ConfigError(f"train.devices must be 1 with train.strategy='single_device', got {train.devices}")
    if train.strategy == "single_device" or (train.strategy == "auto" and train.devices == 1):
        strategy = "auto"
    else:  # DDP; unused parameters allowed (frozen stages, detached critics)
        strategy = DDPStrategy(
            find_unused_parameters=True, process_group_backend="gloo" if accelerator == "cpu" else None
        )
    fabric = Fabric(
        accelerator=accelerator,
        devices=train.devices,
        num_nodes=train.num_nodes,
        strategy=strategy,
        precision=train.precision,
    )
    _say_why_before_lightning_stops_the_job()
    fabric.launch()
    if train.world_size > 1:  # one process group per job; one-process Fabrics are made afresh
        _LAUNCHED[key] = fabric
        atexit.register(release_process_group)
    return fabric


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its ``__main__`` is no file a launcher could run again)."""
    return "ipykernel" in sys.modules and not hasattr(sys.modules.get("__main__"), "__file__")


def grad_scaler(fabric):
    """The gradient scaler of ``fabric``'s precision (``16-mixed`` on a GPU), or ``None``."""
    return getattr(getattr(fabric, "_precision", None), "scaler", None) if fabric is not None else None


def release_process_group() -> None:
    """Destroy this process's process group (at exit): left to the interpreter's finalisation, gloo's worker threads
    can abort the process ("terminate called without an active exception", pytorch/pytorch#190489), and Lightning's
    launcher then stops the whole job as failed after it finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def refuse_coupled(elbo, world: int) -> None:
    """The one place that refuses to shard an objective coupling the datapoints of a minibatch (its
    ``couples_datapoints`` says what couples them, see :class:`~ppl_vae.infer.base.Objective`): a ConfigError when
    ``world`` processes would each see only a share of the minibatch."""
    what = getattr(elbo, "couples_datapoints", False)
    if world > 1 and what:
        raise ConfigError(
            f"train.devices must be 1 with {what}: it couples the datapoints of a minibatch, which one "
            f"shard per process would change; got train.devices={world}"
        )


def _say_why_before_lightning_stops_the_job() -> None:
    """Lightning's launcher kills every process (SIGKILL) a few seconds after a child process ends with an error;
    rank 0 may then have no chance to raise :class:`RankLost` (NCCL waits instead of failing): print its message
    first."""
    try:
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:  # another Lightning: its own message only
        return
    original = _ChildProcessObserver._terminate_all
    if original.__name__ == "terminate_all":
        return

    def terminate_all(self):
        sys.stderr.write(
            "ppl-vae: error: RankLost: a process of this job stopped (killed, out of memory or crashed), "
            "so Lightning stops the others. The last complete epoch is in the run folder's "
            "checkpoint.pt: continue exactly with the same command and --resume <run folder>\n"
        )
        sys.stderr.flush()
        original(self)

    _ChildProcessObserver._terminate_all = terminate_all


def on_lead(fabric, fn, share: bool = True):
    """``fn()`` on rank 0 only, its result given to every rank (``share=False``: the others get None); an error on
    rank 0 is raised on every rank (so no rank waits in a collective for a rank that has stopped)."""
    if fabric is None or fabric.world_size == 1:
        return fn()
    out, err = None, None
    if fabric.global_rank == 0:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
    sent = out if share else None
    sent, message = _collective(fabric, lambda: fabric.broadcast((sent, None if err is None else str(err)), src=0))
    if err is not None:
        raise err
    if message is not None:
        raise PplVaeError(f"rank 0 stopped the job: {message}")
    return out if fabric.global_rank == 0 else sent


_LOST = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "connection refused")


def _collective(fabric, fn, where: str = ""):
    try:
        return fn()
    except RuntimeError as e:  # a lost peer: a DistError, or a RuntimeError from the transport (gloo, NCCL)
        if not (isinstance(e, torch.distributed.DistError) or any(w in str(e) for w in _LOST)):
            raise
        raise RankLost(
            f"rank {fabric.global_rank} of {fabric.world_size} lost the other processes{where}: a process "
            f"of this job stopped (killed, out of memory or crashed), so the job stops too ({e}). The "
            "last complete epoch is in the run folder's checkpoint.pt: continue exactly with the same "
            "command and --resume <run folder>"
        ) from e


class _Objective(torch.nn.Module):
    """The objective as a module (what DDP wraps): ``forward(x, y)`` → (differentiable loss, loss value)."""

    def __init__(self, module: torch.nn.Module, elbo, model, guide):
        super().__init__()
        self.module = module
        self._elbo, self._model, self._guide = elbo, model, guide

    def forward(self, x, y):
        return surrogate_and_value(self._elbo, self._model, self._guide, x, y)


class Sharded:
    """What :func:`~ppl_vae.training.loop.fit` does differently on several ranks: shard, scale, backward through DDP,
    reduce, gather the RNG states."""

    def __init__(self, fabric, module: torch.nn.Module | None, elbo, model, guide, spare):
        if module is None:
            raise ConfigError(
                "train.devices > 1 (or another train.strategy / train.precision) needs the model to be "
                "a method of an nn.Module holding every trainable parameter (DDP averages the "
                "module's gradients); this model/guide pair has none"
            )
        self.fabric, self.module = fabric, module
        self.rank, self.world = fabric.global_rank, fabric.world_size
        self.wrapped = fabric.setup_module(_Objective(module, elbo, model, guide))
        self.spare = spare  # (x, y) of one datapoint: what a rank with an empty share runs (with weight 0)
        self._checked = False

    def device(self) -> torch.device:
        return self.fabric.device

    def loss_and_grads(self, xs, ys, batch: int, divisor) -> tuple[float, float, torch.Tensor, object, int]:
        """One rank's share ``xs, ys`` of a step on a global batch of ``batch`` rows
        (:meth:`~ppl_vae.data.DataBundle.batches` with ``part``): returns (its loss value, the sum over ranks, its
        rows x_r, y_r, their number); no backward when the sum is not finite (every rank then stops as diverged).
        A forward that fails on one rank stops every rank at this step. The rank's loss L_r = −(S_r/B_r) Σ_{i∈r}
        ELBO_i (S_r the data plate's size) is multiplied by
        c_r = W·(B_r/B)·(S/S_r), S = N for a plate subsampled to N and the batch size otherwise, so that DDP's mean
        over ranks (1/W) Σ_r c_r ∇L_r is ∇L of one process with the global batch B."""
        rows = xs.shape[0]
        if rows == 0:  # a last batch smaller than the ranks: this rank takes part with weight 0
            xs, ys = self.spare
        divisor.start(xs.shape[0])
        err, value = None, 0.0
        try:  # DDP's forward broadcasts the buffers
            surrogate, value = _collective(self.fabric, lambda: self.wrapped(xs, ys), " during a training step")
            value = float(value) * (rows > 0)
        except RankLost:
            raise
        except Exception as e:  # noqa: BLE001 - raised below, after every rank knows
            err = e
        failed, total = self.total(float(err is not None), value)
        if failed:
            if err is not None:
                raise err
            raise PplVaeError(
                f"rank {self.rank} of {self.world}: another process failed at this training step (its "
                "message says why), so the job stops"
            )
        if not math.isfinite(total):
            return value, total, xs, ys, rows
        size = divisor(xs, ys)
        full = batch if size == xs.shape[0] else size
        scaled = surrogate * (self.world * (rows / batch) * (full / size))
        _collective(self.fabric, lambda: self.fabric.backward(scaled), " during a training step")  # DDP's mean
        if not self._checked:
            self._checked = True
            self.check_parameters()
        return value, total, xs, ys, rows

    def check_parameters(self) -> None:
        """Every parameter of the param store is one of the module's: DDP averages only those."""
        own = {id(p) for p in self.module.parameters()}
        stray = sorted(n for n, p in pyro.get_param_store().named_parameters() if id(p) not in own)
        if stray:
            raise ConfigError(
                f"train.devices > 1 needs every trainable parameter inside the model's nn.Module (DDP "
                f"averages only those), but the param store also holds {stray}: make them "
                "nn.Parameters of the module (or PyroParams of a PyroModule)"
            )

    def total(self, *values: float) -> list[float]:
        """Sums over ranks of each value (float64)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.fabric.device)
        return [float(v) for v in _collective(self.fabric, lambda: self.fabric.all_reduce(t, reduce_op="sum"))]

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (e.g. RNG states for the checkpoint)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        _collective(self.fabric, lambda: torch.distributed.all_gather_object(out, obj), " saving a checkpoint")
        return out
