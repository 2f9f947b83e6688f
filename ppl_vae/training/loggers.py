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

A logger that talks to a server (``mlflow`` with an ``http(s)://`` tracking URI, ``wandb`` online) is checked before
the first epoch: a server that does not accept a connection within :data:`CONNECT_TIMEOUT` seconds stops the run
with a :class:`~ppl_vae.errors.ConfigError` naming ``train.logger`` and the URI (nothing is trained, nothing is
logged elsewhere instead). MLflow's HTTP retries are shortened unless set (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``,
``MLFLOW_HTTP_REQUEST_TIMEOUT=20``), so a server that goes away later fails in seconds, not minutes. A logger that
fails during training raises :class:`~ppl_vae.errors.LoggerError`; the last epoch's checkpoint is kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import urllib.parse
from pathlib import Path

from ..errors import ConfigError, LoggerError, PplVaeError

__all__ = ["make_loggers", "log_history", "log_figures", "close_loggers"]

MLFLOW_RUN = "mlflow_run_id"
WANDB_RUN = "wandb_run_id"
CONNECT_TIMEOUT = 5.0  # seconds a logger's server has to accept a connection before the first epoch
_MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_BEFORE = "the run stopped before its first epoch"  # what an unreachable server means when the run starts
_FIGURES = "the figures were not logged (the run is complete; they are in its folder)"  # ... and after it
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)


def _check_reachable(kind: str, uri: str, variable: str, fix: str, outcome: str) -> None:
    """A :class:`ConfigError` unless the server of an ``http(s)://`` ``uri`` accepts a TCP connection within
    :data:`CONNECT_TIMEOUT` seconds (other schemes, a file store or a database, are not checked)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT):
            pass
    except (OSError, ValueError) as e:
        reason = f"no answer within {CONNECT_TIMEOUT:g} s" if isinstance(e, TimeoutError) else str(e)
        raise ConfigError(
            f"train.logger={kind!r}: its server {variable}={uri} cannot be reached ({type(e).__name__}: {reason}); "
            f"{outcome}. {fix}, or choose train.logger=csv"
        ) from None


def _tensorboard(root: Path):
    from lightning.fabric.loggers import TensorBoardLogger

    try:
        return TensorBoardLogger(root, name="", version="tensorboard")
    except (ModuleNotFoundError, ImportError) as e:
        raise ConfigError(
            f"train.logger='tensorboard' needs the tensorboard package (pip install tensorboard): {e}"
        ) from e


def _mlflow(root: Path, name: str, run_id: str | None = None, outcome: str = _BEFORE):
    try:
        import mlflow  # noqa: F401  (the logger's own import error is less clear)
        from lightning.pytorch.loggers import MLFlowLogger
    except (ModuleNotFoundError, ImportError) as e:
        raise ConfigError(f"train.logger='mlflow' needs the mlflow package (pip install mlflow): {e}") from e
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:  # a local store in the run folder (MLflow 3 asks for this opt-in to its file store)
        uri = f"file:{(root / 'mlruns').resolve()}"
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    elif urllib.parse.urlsplit(uri).scheme in ("http", "https"):
        for key, value in _MLFLOW_HTTP_DEFAULTS.items():  # seconds, not MLflow's minutes of retries
            os.environ.setdefault(key, value)
        _check_reachable(
            "mlflow",
            uri,
            "MLFLOW_TRACKING_URI",
            "Start the tracking server, set MLFLOW_TRACKING_URI to one that answers",
            outcome,
        )
    return MLFlowLogger(experiment_name=name, run_id=run_id, tracking_uri=uri)


_KINDS = {"CSVLogger": "csv", "TensorBoardLogger": "tensorboard", "MLFlowLogger": "mlflow", "WandbLogger": "wandb"}
_AFTER = {
    "training": "the run stopped, the checkpoint of its last complete epoch (if any) kept: continue with "
    "`ppl-vae train --resume RUN_DIR`",
    "figures": "the run is complete and its figures are in its folder",
}


@contextlib.contextmanager
def _failures(kind: str, doing: str, after: str = "training"):
    """A logger's failure (a server gone, a refused request, a library error) as one :class:`LoggerError` line; the
    library's own errors, and a full or unwritable disk (an ``OSError`` the CLI reports as such), pass as they are."""
    try:
        yield
    except PplVaeError:
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            raise
        lines = str(e).strip().splitlines()
        text = (lines[0][:300] + (" ..." if len(lines) > 1 or len(lines[0]) > 300 else "")) if lines else ""
        raise LoggerError(
            f"train.logger={kind!r} failed while {doing} ({type(e).__name__}: {text}); {_AFTER[after]} "
            "(with train.logger=csv to go on without this logger)"
        ) from e


def _kind(lg) -> str:
    return _KINDS.get(type(lg).__name__, type(lg).__name__)


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
        with _failures(kind, "starting its run"):
            run_id = lg.run_id
        (root / MLFLOW_RUN).write_text(run_id)
    elif kind == "wandb":
        lg = _wandb(root, name, _read(root / WANDB_RUN) if resuming else None)
        out.append(lg)
        with _failures(kind, "starting its run"):
            run_id = lg.experiment.id
        (root / WANDB_RUN).write_text(run_id)
    return out


def _wandb(root: Path, name: str, run_id: str | None = None, outcome: str = _BEFORE):
    try:
        import wandb  # noqa: F401  (the logger's own import error is less clear)
        from lightning.pytorch.loggers import WandbLogger
    except (ModuleNotFoundError, ImportError) as e:
        raise ConfigError(f"train.logger='wandb' needs the wandb package (pip install 'ppl-vae[wandb]'): {e}") from e
    root.mkdir(parents=True, exist_ok=True)
    offline = os.environ.get("WANDB_MODE", "offline") in ("offline", "dryrun", "disabled")
    if not offline:
        uri = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        _check_reachable(
            "wandb",
            uri,
            "WANDB_BASE_URL",
            "Check the network (or WANDB_BASE_URL), or log offline (WANDB_MODE=offline)",
            outcome,
        )
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
            with _failures(_kind(lg), f"logging epoch {int(record['epoch'])}"):
                lg.log_metrics(_scalars(record), step=int(record["epoch"]))
    for lg in loggers:
        with _failures(_kind(lg), "saving its log"):
            lg.save()


def log_figures(kind: str, run_dir: Path, paths, step: int = 0, name: str = "ppl_vae") -> None:
    """The run's PNG figures: as images in TensorBoard, as artefacts of the training's MLflow run (the CSV logger
    keeps scalars only)."""
    with _failures(kind, "logging the figures", after="figures"):
        _log_figures(kind, Path(run_dir) / "logs", paths, step, name)


def _log_figures(kind: str, root: Path, paths, step: int, name: str) -> None:
    if kind == "tensorboard":
        import matplotlib.image

        lg = _tensorboard(root)
        for path in paths:
            img = matplotlib.image.imread(str(path))[..., :3]
            lg.experiment.add_image(Path(path).stem, img, global_step=step, dataformats="HWC")
        lg.finalize("success")
    elif kind == "mlflow":
        lg = _mlflow(root, name, _read(root / MLFLOW_RUN), _FIGURES)
        for path in paths:
            lg.experiment.log_artifact(lg.run_id, str(path))
    elif kind == "wandb" and paths:
        lg = _wandb(root, name, _read(root / WANDB_RUN), _FIGURES)
        lg.log_image("figures", images=[str(p) for p in paths], step=step, caption=[Path(p).stem for p in paths])
        lg.finalize("success")
        import wandb

        wandb.finish()


def close_loggers(loggers: list, status: str = "success") -> None:
    """Finalize each logger. After a failed run (``status != "success"``) a logger that fails to close is passed
    over: the error that ended the run is the one to report."""
    for lg in loggers:
        try:
            with _failures(_kind(lg), "closing its run"):
                _close(lg, status)
        except Exception:
            if status == "success":
                raise


def _close(lg, status: str) -> None:
    lg.finalize(status)
    if type(lg).__name__ == "WandbLogger":  # end the W&B run (its files complete); log_figures resumes it
        import wandb

        wandb.finish(exit_code=0 if status == "success" else 1)
