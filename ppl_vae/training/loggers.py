"""Experiment loggers through Lightning's logger classes (``train.logger``): the scalars of every epoch's record
(the same as ``metrics.jsonl``) and the run's figures.

``csv`` (the default; Lightning's own ``CSVLogger``, no other dependency) writes ``<run>/logs/csv/metrics.csv``;
``tensorboard`` writes that and a TensorBoard event file under ``<run>/logs/tensorboard`` (needs ``tensorboard``);
``mlflow`` writes the CSV and an MLflow run (needs ``mlflow`` or ``mlflow-skinny``; ``MLFLOW_TRACKING_URI`` names
a server or database, else a local file store ``<run>/logs/mlruns``; the figures become the run's artefacts);
``wandb`` writes the CSV and a Weights & Biases run under ``<run>/logs/wandb`` (needs ``wandb``: ``pip install
"ppl-vae[wandb]"``), offline unless ``WANDB_MODE`` says otherwise (``wandb sync <run>/logs/wandb/offline-run-*``
uploads it later; ``WANDB_MODE=online`` logs live), the figures as images. On
``--resume`` the CSV and TensorBoard folders are written again from the
restored history, so they hold each epoch once. Only rank 0 of a multi-process job logs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import ConfigError

__all__ = ["make_loggers", "log_history", "log_figures", "close_loggers"]

MLFLOW_RUN = "mlflow_run_id"
WANDB_RUN = "wandb_run_id"


def _tensorboard(root: Path):
    from lightning.fabric.loggers import TensorBoardLogger

    try:
        return TensorBoardLogger(root, name="", version="tensorboard")
    except (ModuleNotFoundError, ImportError) as e:
        raise ConfigError(
            f"train.logger='tensorboard' needs the tensorboard package (pip install tensorboard): {e}"
        ) from e


def _mlflow(root: Path, name: str, run_id: str | None = None):
    try:
        from lightning.pytorch.loggers import MLFlowLogger

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # a local store in the run folder (MLflow 3 asks for this opt-in to its file store)
            uri = f"file:{(root / 'mlruns').resolve()}"
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MLFlowLogger(experiment_name=name, run_id=run_id, tracking_uri=uri)
    except (ModuleNotFoundError, ImportError) as e:
        raise ConfigError(f"train.logger='mlflow' needs the mlflow package (pip install mlflow): {e}") from e


def make_loggers(kind: str, run_dir: Path | None, name: str = "ppl_vae", resuming: bool = False) -> list:
    """The Lightning loggers of ``kind`` for a run folder (none without one, or for ``kind='none'``); any earlier
    CSV/TensorBoard log of the folder is removed (the caller replays the history it continues from). A resumed run
    continues its MLflow run; a new one starts another."""
    if run_dir is None or kind == "none":
        return []
    from lightning.fabric.loggers import CSVLogger

    root = Path(run_dir) / "logs"
    for sub in ("csv", "tensorboard"):
        shutil.rmtree(root / sub, ignore_errors=True)
    out = [CSVLogger(root, name="", version="csv", flush_logs_every_n_steps=1)]
    if kind == "tensorboard":
        out.append(_tensorboard(root))
    elif kind == "mlflow":
        lg = _mlflow(root, name, _read(root / MLFLOW_RUN) if resuming else None)
        out.append(lg)
        root.mkdir(parents=True, exist_ok=True)
        (root / MLFLOW_RUN).write_text(lg.run_id)
    elif kind == "wandb":
        lg = _wandb(root, name, _read(root / WANDB_RUN) if resuming else None)
        out.append(lg)
        (root / WANDB_RUN).write_text(lg.experiment.id)
    return out


def _wandb(root: Path, name: str, run_id: str | None = None):
    try:
        import wandb  # noqa: F401  (the logger's own import error is less clear)
        from lightning.pytorch.loggers import WandbLogger
    except (ModuleNotFoundError, ImportError) as e:
        raise ConfigError(f"train.logger='wandb' needs the wandb package (pip install 'ppl-vae[wandb]'): {e}") from e
    root.mkdir(parents=True, exist_ok=True)
    offline = os.environ.get("WANDB_MODE", "offline") in ("offline", "dryrun", "disabled")
    return WandbLogger(project=name, save_dir=str(root), offline=offline, id=run_id, resume="allow" if run_id else None)


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def _scalars(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"
    }


def log_history(loggers: list, history: list[dict]) -> None:
    """Each record's numeric fields at step = its epoch."""
    for record in history:
        for lg in loggers:
            lg.log_metrics(_scalars(record), step=int(record["epoch"]))
    for lg in loggers:
        lg.save()


def log_figures(kind: str, run_dir: Path, paths, step: int = 0, name: str = "ppl_vae") -> None:
    """The run's PNG figures: as images in TensorBoard, as artefacts of the training's MLflow run (the CSV logger
    keeps scalars only)."""
    root = Path(run_dir) / "logs"
    if kind == "tensorboard":
        import matplotlib.image

        lg = _tensorboard(root)
        for path in paths:
            img = matplotlib.image.imread(str(path))[..., :3]
            lg.experiment.add_image(Path(path).stem, img, global_step=step, dataformats="HWC")
        lg.finalize("success")
    elif kind == "mlflow":
        lg = _mlflow(root, name, _read(root / MLFLOW_RUN))
        for path in paths:
            lg.experiment.log_artifact(lg.run_id, str(path))
    elif kind == "wandb" and paths:
        lg = _wandb(root, name, _read(root / WANDB_RUN))
        lg.log_image("figures", images=[str(p) for p in paths], step=step, caption=[Path(p).stem for p in paths])
        lg.finalize("success")
        import wandb

        wandb.finish()


def close_loggers(loggers: list, status: str = "success") -> None:
    for lg in loggers:
        lg.finalize(status)
        if type(lg).__name__ == "WandbLogger":  # end the W&B run (its files complete); log_figures resumes it
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)
