r"""Two-stage training of Lin, Roberts, Trigoni & Clark's Algorithm 1 ("VAE learning with variance prediction").

    stage 1: update φ, θ and the global σ² with Adam on the ELBO (eq. 8) until δELBO = ELBO_e − ELBO_{e−1} < ε₁,
             after at least n₁ epochs                  (``stage1.stop_delta`` = ε₁, ``stage1.min_epochs`` = n₁)
    stage 2: freeze σ²_dataset, add σ²_k(z) = v_k(z) + σ²_dataset/2 and update φ, θ (and v) on the ELBO with
             eq. 10, until δELBO < ε₂ after at least n₂ epochs    (``stage2.stop_delta``, ``stage2.min_epochs``)

Each stage is one call of :func:`ppl_vae.infer.fit` (so each has its checkpoints, metrics and resume); stage 1
writes into ``run_dir/stage1`` and stage 2 into ``run_dir`` itself, so ``run_dir/best.pt`` is the final model.
Stage 2 continues from the parameters where stage 1 stopped, with a fresh Adam optimiser.

The model needs ``model(x, y)``, ``guide(x, y)`` and ``begin_stage2()`` (which freezes σ²_dataset and switches
the likelihood); an ``on_epoch_end(epoch, record, data)`` method is called after every epoch of both stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig
from .checkpoint import load_checkpoint
from .train import CHECKPOINT, FitResult, fit

STAGE1_DIR = "stage1"


@dataclass
class StagedResult(FitResult):
    """A :class:`FitResult` for the whole run (``history`` = both stages, epochs numbered on), plus each stage's
    own result and σ²_dataset."""

    stage1: FitResult | None = None
    stage2: FitResult | None = None
    sigma2_dataset: float | None = None
    stage1_epochs: int = 0


def _hook(model, data, on_epoch_end):
    own = getattr(model, "on_epoch_end", None)

    def hook(epoch, record):
        if own is not None:
            own(epoch, record, data)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    return hook


def train_staged(model, data, stage1: TrainConfig, stage2: TrainConfig, elbo=None, *,
                 run_dir: str | Path | None = None, resume: bool = False, seed: int = 0, device=None,
                 progress: bool = False, extra_state: dict | None = None, on_epoch_end=None) -> StagedResult:
    """Algorithm 1 with ``fit``: stage 1 under ``stage1`` (its stop_delta/min_epochs are ε₁/n₁), then
    ``model.begin_stage2()``, then stage 2 under ``stage2``. ``elbo`` (default ``Trace_ELBO``) serves both stages.
    ``resume=True`` continues whichever stage a killed run was in (stage 2 once ``run_dir/checkpoint.pt`` exists).
    """
    if not hasattr(model, "begin_stage2"):
        raise ValueError(f"train_staged needs a model with begin_stage2() (e.g. sigma_vae with "
                         f"sigma2_mode='per_pixel'), got {type(model).__name__}")
    run_dir = Path(run_dir) if run_dir is not None else None
    dir1 = run_dir / STAGE1_DIR if run_dir is not None else None
    hook = _hook(model, data, on_epoch_end)
    kw = dict(seed=seed, device=device, progress=progress, extra_state=extra_state, on_epoch_end=hook, module=model)
    in_stage2 = resume and run_dir is not None and (run_dir / CHECKPOINT).exists()

    if in_stage2:   # stage 1 finished earlier: its history comes from its checkpoint
        ck = load_checkpoint(dir1 / CHECKPOINT, map_location="cpu")
        r1 = FitResult(history=ck["history"], best_epoch=ck["best_epoch"], best_val_elbo=ck["best_val_elbo"],
                       stopped_early=ck.get("stopped_early", False), run_dir=str(dir1))
        s2 = None
    else:
        r1 = fit(model.model, model.guide, data, elbo, stage1, run_dir=dir1,
                 resume=resume and dir1 is not None and (dir1 / CHECKPOINT).exists(), **kw)
        s2 = model.begin_stage2()
    r2 = fit(model.model, model.guide, data, elbo, stage2, run_dir=run_dir, resume=in_stage2, **kw)
    if s2 is None:
        s2 = float(getattr(model, "sigma2")()) if callable(getattr(model, "sigma2", None)) else None

    n1 = len(r1.history)
    history = [{**rec, "stage": 1} for rec in r1.history]
    history += [{**rec, "stage": 2, "stage_epoch": rec["epoch"], "epoch": rec["epoch"] + n1} for rec in r2.history]
    best_epoch = None if r2.best_epoch is None else r2.best_epoch + n1
    return StagedResult(history=history, best_epoch=best_epoch, best_val_elbo=r2.best_val_elbo,
                        stopped_early=r2.stopped_early, run_dir=r2.run_dir, stage1=r1, stage2=r2,
                        sigma2_dataset=s2, stage1_epochs=n1)


__all__ = ["train_staged", "StagedResult", "STAGE1_DIR"]
