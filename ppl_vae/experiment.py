"""One run, from configuration to artefacts: config → data → model → :func:`ppl_vae.train` → evaluation → files.

Each step is a plain function; the command line (``ppl_vae.cli``) only strings them together, and the same
functions are the Python API (``ppl_vae.run_experiment``, ``ppl_vae.load_run``, ``ppl_vae.evaluate_run``,
``ppl_vae.diagnose_run``).

Why this module is long: it is the one orchestrator, and the flow of a run (and of its folder: lock, resume checks,
the files it writes) reads best in one place; each function in it is one step with plain arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch

from . import evaluate
from .config.sections import GIVEN_DATA, Config, config_from_dict, load_config, resume_changes, save_config
from .data.atomic import write_text
from .data.bundle import DataBundle, load_data
from .data.multimodal import MultimodalData, make_multimodal
from .data.sources import DATASETS
from .data.user import as_data, load_bundle, same_bundle, save_bundle
from .errors import CheckpointError, ConfigError, DataError, PplVaeError, RunFolderError, spell
from .evaluate import bits_per_dim, log_likelihood
from .evaluate.sampling import sample_run
from .models import build_model, import_methods
from .models.registry import data_function, describe_imports
from .nn.device import flush_denormals, use_threads
from .training import distributed
from .training.checkpoint import load_checkpoint, load_module_state, restore_params
from .training.loggers import log_figures
from .training.loop import BEST, CHECKPOINT, evaluate_elbo
from .training.plan import plan_for
from .training.run_imports import check_imports, keep_imports
from .training.runlock import RunLock
from .training.stages import train
from .viz.grids import figure_context

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "metrics.json"
GIVEN_DATA_FILE = "data.safetensors"  # a run's copy of the data passed to run_experiment

__all__ = [
    "run_experiment",
    "load_run",
    "evaluate_run",
    "diagnose_run",
    "gaps_run",
    "sample_run",
    "Run",
    "build",
    "build_data",
    "resolve_device",
    "test_elbo",
    "write_figures",
    "CONFIG_FILE",
    "SUMMARY_FILE",
]


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's ``device`` (``auto``: CUDA when available, else the CPU);
    :class:`~ppl_vae.errors.ConfigError` for a malformed name or a CUDA device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name == "cpu" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device must be available on this machine: got {name!r}, but CUDA is not available")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device(name)


def build_data(cfg: Config, run_dir: str | Path | None = None) -> DataBundle:
    """The data a configuration names: a dataset by name, your function's (``module:function``, run from a module
    listed under ``imports:``) or, for a run trained on data passed to :func:`run_experiment`, the copy in
    ``run_dir``."""
    d = cfg.data
    if d.name == GIVEN_DATA:
        if run_dir is None or not (Path(run_dir) / GIVEN_DATA_FILE).is_file():
            raise ConfigError(
                f"data.name = {GIVEN_DATA!r} means the data passed to run_experiment, kept in the run folder as "
                f"{GIVEN_DATA_FILE}, but {str(run_dir)!r} has no such file"
            )
        return load_bundle(Path(run_dir) / GIVEN_DATA_FILE)
    if d.name not in DATASETS:
        return _function_data(cfg)
    data = load_data(
        d.name,
        root=d.root,
        download=d.download,
        pixels=d.pixels,
        val_fraction=d.val_fraction,
        seed=cfg.seed,
        limit=d.limit,
        image_size=d.image_size,
        storage=d.storage,
        workers=d.workers,
    )
    if d.multimodal is not None:
        data = make_multimodal(
            data, d.multimodal, num_modalities=d.num_modalities, missing_rate=d.missing_rate, seed=cfg.seed
        )
    return data


def _function_data(cfg: Config):
    d = cfg.data
    announce_imports(cfg)
    make = data_function(d.name, cfg.imports)
    try:
        raw = make()
    except PplVaeError:
        raise
    except Exception as e:  # the user's function failed: say whose, with its message (the traceback is chained)
        raise DataError(f"data.name = {d.name!r}: the function raised {type(e).__name__}: {e}") from e
    data = as_data(raw, val_fraction=d.val_fraction, seed=cfg.seed, name=d.name, pixels=d.pixels)
    if d.multimodal is not None:
        data = make_multimodal(
            data, d.multimodal, num_modalities=d.num_modalities, missing_rate=d.missing_rate, seed=cfg.seed
        )
    return data


_announced: set[tuple[str, ...]] = set()


def announce_imports(cfg: Config) -> None:
    """Say which code a configuration's ``imports:`` will run (once per process and list), before it runs."""
    if cfg.imports and tuple(cfg.imports) not in _announced:
        _announced.add(tuple(cfg.imports))
        print(f"ppl-vae: this configuration imports code: {', '.join(describe_imports(cfg.imports))}", file=sys.stderr)


def build(cfg: Config, data: DataBundle, device: torch.device):
    """The model for a configuration and its data, seeded by ``cfg.seed``, on ``device``."""
    announce_imports(cfg)  # code named by the configuration runs here: say which, before it runs
    import_methods(cfg.imports)  # methods defined outside the package register themselves
    pyro.set_rng_seed(cfg.seed)
    model = build_model(cfg.model, data.shape, num_data=len(data.train_x), num_classes=data.num_classes)
    return model.to(device)


def default_run_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class Run:
    """A run: its configuration, data, model, run folder and device (what :func:`run_experiment` returns and
    :func:`load_run` gives back from a folder)."""

    cfg: Config
    data: DataBundle
    model: torch.nn.Module
    run_dir: Path
    device: torch.device
    rank: int = 0  # this process's rank in a multi-process job (rank 0 writes the folder)
    checkpoint: str = "best"  # the parameters it holds: "best" (best.pt) or "last" (checkpoint.pt)


# what makes a folder a run: a finished epoch or a finished run
RUN_MARKERS = (CHECKPOINT, SUMMARY_FILE)
# files a run writes (removed by overwrite=True before the new run starts)
RUN_FILES = (
    CHECKPOINT,
    BEST,
    SUMMARY_FILE,
    "metrics.jsonl",
    "evaluation.json",
    "diagnostics.json",
    "diagnostics.nc",
    "gaps.json",
    GIVEN_DATA_FILE,
)


def run_experiment(
    cfg: Config,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    figures: bool = True,
    data=None,
) -> Run:
    """Train from a configuration: writes config.yaml, checkpoints, metrics.jsonl, metrics.json and figures.

    ``data`` (your tensors, arrays, ``Dataset`` or :class:`~ppl_vae.data.DataBundle`; :func:`~ppl_vae.data.as_data`)
    replaces the configuration's dataset: the run folder keeps a copy (``data.safetensors``, ``data.name: given``)
    so that ``ppl-vae evaluate``, ``diagnose`` and :func:`load_run` work on it as on any run.

    Everything that can be checked is checked before anything is written: the device, the data (finite values),
    the model's options, the run folder (another process writing it is refused —
    :class:`~ppl_vae.training.runlock.RunLock`
    is held for the whole run —, and so is a folder that holds a run unless ``resume`` or ``overwrite``) and, on
    ``resume``, that the checkpoint was made by this configuration.

    With ``train.devices`` > 1 (:mod:`ppl_vae.training.distributed`) the processes start here (``strategy: ddp``
    re-runs the command in each); rank 0 holds the lock, checks and writes the folder, the others train beside it
    and return after training."""
    dev = resolve_device(device or cfg.device)
    cfg.train.validate()
    use_threads(cfg.train.threads)  # torch's one thread per core collapses on a shared machine
    if resume and run_dir is not None:
        check_imports(Path(run_dir))  # before the run's imports run: a kept file edited since is refused
    # set before any tensor work starts torch's worker threads, so that they inherit it (fit sets it again, scoped)
    flush = cfg.train.flush_denormal and dev.type == "cpu"
    with flush_denormals() if flush else contextlib.nullcontext():
        return _run_experiment(cfg, run_dir, resume, overwrite, dev, progress, figures, data)


def _run_experiment(cfg: Config, run_dir, resume: bool, overwrite: bool, dev, progress: bool, figures: bool, data):
    fabric = distributed.launch(cfg.train, dev)
    dev = fabric.device if fabric is not None else dev
    if data is not None:
        cfg, data = _given(cfg, data)
    else:
        data = build_data(cfg)
    data.check_finite()
    model = build(cfg, data, dev)
    run_dir = Path(distributed.on_lead(fabric, lambda: str(run_dir if run_dir is not None else default_run_dir(cfg))))
    with contextlib.ExitStack() as held:
        distributed.on_lead(fabric, lambda: _prepare_folder(held, cfg, run_dir, resume, overwrite, data))
        result = train(
            model,
            data,
            cfg,
            run_dir=run_dir,
            resume=resume,
            device=dev,
            progress=progress,
            extra_state={"config": cfg.to_dict()},
            fabric=fabric,
        )
        run = Run(cfg, data, model, run_dir, dev, rank=result.rank)
        if result.rank > 0:
            return run
        run.checkpoint = "best" if (run_dir / BEST).exists() else "last"
        load_params(run, BEST if run.checkpoint == "best" else CHECKPOINT)
        summary = {
            "best_epoch": result.best_epoch,
            "best_val_elbo": result.best_val_elbo,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "test_elbo": test_elbo(run),
            "data_plate": result.data_plate,
        }
        write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        if figures:
            log_figures(cfg.train.logger, run_dir, write_figures(run, result.history), step=len(result.history))
    return run


def _given(cfg: Config, data) -> tuple[Config, DataBundle]:
    """The configuration of a run on data passed in (``data.name: given``) and the data as a bundle."""
    if isinstance(data, MultimodalData):
        raise DataError(
            "run_experiment(data=...) takes unimodal data (tensors, arrays, a Dataset or a DataBundle); for "
            "multimodal data name a function in data.name (module:function) and set data.multimodal"
        )
    cfg = config_from_dict(cfg.to_dict())  # a copy: the caller's configuration stays as it was
    bundle = as_data(data, val_fraction=cfg.data.val_fraction, seed=cfg.seed, pixels=cfg.data.pixels)
    cfg.data.name = GIVEN_DATA
    return cfg, bundle


def _prepare_folder(
    held: contextlib.ExitStack, cfg: Config, run_dir: Path, resume: bool, overwrite: bool, data: DataBundle
) -> None:
    """Lock the run folder (``held`` keeps the lock until the run ends), refuse one that holds another run, check
    a resumed checkpoint against ``cfg`` and write config.yaml (and a copy of data passed in)."""
    held.enter_context(RunLock(run_dir))  # first: a folder another process is writing is refused as such
    if resume and not (run_dir / CHECKPOINT).is_file() and not _stage_checkpoints(run_dir):
        raise RunFolderError(
            f"--resume: {str(run_dir)!r} has no checkpoint yet: there is nothing to resume; "
            "start the run again without --resume"
        )
    if not resume and any((run_dir / f).exists() for f in RUN_MARKERS) and not overwrite:
        raise RunFolderError(
            f"{str(run_dir)!r} holds a run already: continue it with --resume {run_dir}, choose "
            "another --run-dir, or pass --overwrite to replace it"
        )
    if resume:
        ck = load_checkpoint(
            run_dir / CHECKPOINT if (run_dir / CHECKPOINT).is_file() else _stage_checkpoints(run_dir)[-1],
            map_location="cpu",
        )
        check_same_config(ck, cfg, run_dir)
        _record_resume(ck, cfg)
    elif overwrite:
        _remove_run_files(run_dir)
    if cfg.data.name == GIVEN_DATA:
        kept = run_dir / GIVEN_DATA_FILE
        if resume and kept.is_file() and not same_bundle(load_bundle(kept), data):
            raise CheckpointError(
                f"--resume: the data passed in differ from those the run in {str(run_dir)!r} was trained on "
                f"({GIVEN_DATA_FILE}): pass the same data, or start a new run"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        save_bundle(data, kept.with_name(kept.name + ".tmp"))
        kept.with_name(kept.name + ".tmp").replace(kept)
    run_dir.mkdir(parents=True, exist_ok=True)
    imports = keep_imports(cfg.imports, run_dir)  # the run folder keeps the code it imports (and its hash)
    save_config(cfg if imports == cfg.imports else dataclasses.replace(cfg, imports=imports), run_dir / CONFIG_FILE)


def _record_resume(ckpt: dict, cfg: Config) -> None:
    """Add to ``cfg.resumes`` what this resume changes (the fields of RESUMABLE that differ from the
    checkpoint's configuration), and say it: the run folder explains every epoch's settings."""
    saved = ckpt.get("config")
    changes = resume_changes(saved, cfg) if isinstance(saved, dict) else {}
    if not changes:
        return
    epoch = int(ckpt.get("epoch", 0))
    cfg.resumes.append({"after_epoch": epoch, "changed": changes})
    said = ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in changes.items())
    print(
        f"ppl-vae: resuming after epoch {epoch} with {said} (recorded under resumes: in config.yaml)",
        file=sys.stderr,
    )


def _stage_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a multi-stage plan's earlier stages (``run_dir/<stage>/checkpoint.pt``)."""
    return sorted(p for p in run_dir.glob(f"*/{CHECKPOINT}")) if run_dir.is_dir() else []


def _remove_run_files(run_dir: Path) -> None:
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "logs", ignore_errors=True)  # the loggers' files (csv, tensorboard, mlflow)
    for ck in _stage_checkpoints(run_dir):
        for name in (CHECKPOINT, BEST, "metrics.jsonl"):
            (ck.parent / name).unlink(missing_ok=True)


_SAME = {
    "model": None,
    "data": (
        "name",
        "pixels",
        "limit",
        "image_size",
        "val_fraction",
        "root",
        "multimodal",
        "num_modalities",
        "missing_rate",
    ),
    "seed": None,
}


def check_same_config(ckpt: dict, cfg: Config, where) -> None:
    """The checkpoint's configuration (saved in it) and ``cfg`` agree on the model, the data and the seed; a
    difference is a :class:`CheckpointError` that names every field that differs."""
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        return  # written by fit() without a configuration: nothing to compare
    now = cfg.to_dict()
    defaults = Config().to_dict()  # a field newer than the checkpoint was at its default when it was written
    diffs = []
    for section, keys in _SAME.items():
        a, b = saved.get(section), now.get(section)
        if keys is None and not isinstance(a, dict):
            if a != b:
                diffs.append(f"{section}: {a!r} in the checkpoint, {b!r} now")
            continue
        for k in keys or sorted(set(a or {}) | set(b or {})):
            then = (a or {}).get(k, defaults[section].get(k)) if keys is not None else (a or {}).get(k)
            if then != (b or {}).get(k):
                diffs.append(f"{section}.{k}: {then!r} in the checkpoint, {(b or {}).get(k)!r} now")
    if diffs:
        raise CheckpointError(
            f"the checkpoint in {str(where)!r} was made with another configuration — "
            f"{'; '.join(diffs)}. Restore those fields in config.yaml, or start a new run"
        )


def load_params(run: Run, which: str = BEST, *, trusted: bool = False) -> dict:
    """Restore a run's parameters (``best.pt`` or ``checkpoint.pt``) into ``run.model`` in place (``trusted``:
    :func:`~ppl_vae.training.checkpoint.load_checkpoint`)."""
    ckpt = load_checkpoint(run.run_dir / which, map_location=run.device, trusted=trusted)
    check_same_config(ckpt, run.cfg, run.run_dir / which)
    if ckpt.get("module") is not None:
        load_module_state(run.model, ckpt["module"], run.run_dir / which)
    x0, y0 = next(iter(run.data.batches("train", min(8, len(run.data.train_x)), shuffle=False, device=run.device)))
    pyro.clear_param_store()
    restore_params(run.model.model, run.model.guide, ckpt["param_store"], x0, y0)
    return ckpt


def load_run(
    run_dir: str | Path,
    which: str = "best",
    device: str | None = None,
    overrides: list[str] | None = None,
    *,
    trusted: bool = False,
    threads: int | None = None,
) -> Run:
    """Rebuild a trained run from its folder (config.yaml + best.pt or checkpoint.pt), in eval mode.

    Checkpoints are read without unpickling; ``trusted=True`` reads a checkpoint of an older release that holds
    other Python objects (it can run code from the file: only for a run whose origin you trust)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder: it has no {CONFIG_FILE}")
    check_imports(run_dir)  # a kept import file edited since training would build another model
    cfg = load_config(run_dir / CONFIG_FILE, overrides)
    use_threads(threads if threads is not None else cfg.train.threads)
    dev = resolve_device(device or cfg.device)
    data = build_data(cfg, run_dir)
    name = BEST if which == "best" and (run_dir / BEST).exists() else CHECKPOINT
    run = Run(cfg, data, build(cfg, data, dev), run_dir, dev, checkpoint="best" if name == BEST else "last")
    load_params(run, name, trusted=trusted)
    run.model.eval()
    return run


def test_elbo(run: Run, seed: int | None = None, split: str = "test") -> float:
    """Mean one-sample ELBO per test image (nats), reproducible: the draws come from ``seed`` (default cfg.seed)."""
    m = run.model
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        pyro.set_rng_seed(run.cfg.seed if seed is None else seed)
        return evaluate_elbo(
            m.model,
            m.guide,
            run.data,
            plan_for(m).test_objective(),
            split,
            run.cfg.train.eval_batch_size,
            run.device,
        )


def _test_split(run: Run, max_test: int | None):
    x, y = run.data.test_x, run.data.test_y
    if max_test is not None:
        x, y = x[:max_test], (y[:max_test] if y is not None else None)
    return x.to(run.device), (y.to(run.device) if y is not None else None)


def _positive(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise PplVaeError(f"{name} must be {what}, got {value!r}")


def latent_metrics(
    run: Run, x: torch.Tensor, y=None, *, max_images: int = 1000, probe_train: int = 2000, seed: int = 0
) -> dict:
    """:func:`ppl_vae.evaluate.latent_summary` (KL per site, active units, I_q(x; z), probe accuracy) on the first
    ``max_images`` of ``x``, the probe fitted on the run's first ``probe_train`` training images."""
    x, y = x[:max_images], None if y is None else y[:max_images]
    train_y = None if run.data.train_y is None else run.data.train_y[:probe_train].to(run.device)
    return evaluate.latent_summary(
        run.model.model, run.model.guide, x, y, run.data.train_x[:probe_train].to(run.device), train_y, seed=seed
    )


def evaluate_run(
    run: Run,
    num_samples: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    write: bool = True,
    latents: bool = True,
) -> dict:
    """Test ELBO and, with ``num_samples`` > 0 (default ``eval.num_samples``), the importance-sampled test
    log-likelihood with its standard errors; the first ``max_test`` test images (default ``eval.max_test``);
    with ``latents``, :func:`latent_metrics` (KL, active units, I(x; z), probe accuracy) under ``latents``.
    Writes ``evaluation.json`` into the run folder (``write=False``: only returns the numbers)."""
    num_samples = run.cfg.eval.num_samples if num_samples is None else num_samples
    max_test = run.cfg.eval.max_test if max_test is None else max_test
    _positive("num_samples", num_samples, minimum=0)
    if max_test is not None:
        _positive("max_test", max_test)
    x, y = _test_split(run, max_test)
    data = dataclasses.replace(
        run.data,
        test_x=run.data.test_x[: len(x)],
        test_y=None if run.data.test_y is None else run.data.test_y[: len(x)],
    )
    out = {"num_test": len(x), "test_elbo": test_elbo(dataclasses.replace(run, data=data))}
    if isinstance(
        run.data, MultimodalData
    ):  # the multimodal evaluation (coherence, probes, joint log p): evaluate/ sits above the plans
        out.update(
            evaluate.multimodal_summary(run.model, run.data, num_samples=num_samples, max_test=len(x), seed=seed)
        )
        if write:
            (run.run_dir / "evaluation.json").write_text(json.dumps(out, indent=2))
        return out
    if num_samples > 0:
        announce_work(run, x, y, num_samples, "the importance-sampled log p(x)", "--max-test / --num-samples")
        ll = log_likelihood(
            run.model.model,
            run.model.guide,
            x,
            y=y,
            num_samples=num_samples,
            batch_size=run.cfg.eval.batch_size,
            seed=seed,
            progress=True,
        )
        out.update(
            {
                "num_samples": num_samples,
                "test_log_likelihood": float(ll.mean()),
                "test_log_likelihood_sem": float(ll.std() / len(ll) ** 0.5) if len(ll) > 1 else 0.0,
                "bits_per_dim": float(bits_per_dim(ll, run.data.data_dim).mean()),
            }
        )
    if latents:
        out["latents"] = latent_metrics(run, x, y, seed=seed)
    if write:
        (run.run_dir / "evaluation.json").write_text(json.dumps(out, indent=2))
    return out


def announce_work(run: Run, x, y, num_samples: int, what: str, shorter: str, draws: str | None = None) -> float:
    """Say on stderr how much work an evaluation plans (images × draws) and, from a timed pilot of a few images and
    draws, about how long it will take — before a long run starts. Returns the estimate in seconds."""
    n = len(x)
    pilot_n, pilot_s = min(n, 8), min(num_samples, 64)
    t0 = time.perf_counter()
    log_likelihood(
        run.model.model, run.model.guide, x[:pilot_n], y=None if y is None else y[:pilot_n], num_samples=pilot_s, seed=0
    )
    seconds = (time.perf_counter() - t0) * (n * num_samples) / (pilot_n * pilot_s)
    when = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
    hint = f" (fewer with {shorter})" if seconds > 600 else ""
    print(
        f"ppl-vae: {what}: {n:,} images × {draws or f'{num_samples:,}'} draws = {n * num_samples:,} datapoint-draws, "
        f"about {when} here{hint}",
        file=sys.stderr,
    )
    return seconds


def diagnose_run(
    run: Run,
    num_images: int = 100,
    num_samples: int | None = None,
    seed: int = 0,
    write: bool = True,
    num_worst: int = 8,
) -> dict:
    """PSIS k̂ and ESS of the guide on the first ``num_images`` test images (``num_samples`` guide draws each,
    default ``eval.num_samples``). Writes ``diagnostics.json`` (k̂ median, the fractions above 0.5 and 0.7, the
    worst images), the ArviZ file ``diagnostics.nc`` (guide draws, log-weights, log-likelihoods), ``khat.png``
    (ArviZ's own k̂ plot) and ``worst_khat.png`` (the ``num_worst`` worst images above their reconstructions)."""
    num_samples = run.cfg.eval.num_samples if num_samples is None else num_samples
    _positive("num_images", num_images)
    _positive("num_samples", num_samples, minimum=2)
    _positive("num_worst", num_worst)
    x, y = _test_split(run, num_images)
    if not isinstance(run.data, MultimodalData):
        announce_work(run, x, y, num_samples, "PSIS diagnostics", "--num-images / --num-samples")
    # ArviZ loads on first use (ppl_vae.evaluate imports it lazily)
    idata = evaluate.posterior_diagnostics(run.model.model, run.model.guide, x, num_samples=num_samples, seed=seed, y=y)
    diag = evaluate.psis_diagnostics(idata)
    khat = diag["khat"]
    worst = [int(i) for i in np.argsort(-khat, kind="stable")[: min(num_worst, len(x))]]
    out = {
        "num_images": len(x),
        "num_samples": num_samples,
        "khat_median": float(np.median(khat)),
        "fraction_khat_above_0.5": float(np.mean(khat > evaluate.KHAT_GOOD)),
        "fraction_khat_above_0.7": float(np.mean(khat > evaluate.KHAT_BAD)),
        "ess_median": float(np.median(diag["ess"])),
        "worst_images": worst,
        "worst_khat": [float(khat[i]) for i in worst],
        "arviz": evaluate.azcompat.ARVIZ_VERSION,
    }
    if write:
        evaluate.azcompat.to_netcdf(idata, run.run_dir / "diagnostics.nc")
        evaluate.azcompat.plot_khat(
            khat,
            run.run_dir / "khat.png",
            title=f"PSIS k-hat of the guide, {len(x)} test images",
            xlabel="test image",
        )
        title = _worst_khat_title(worst, khat)
        plan_for(run.model).image_figure(
            x[worst], None if y is None else y[worst], run.run_dir / "worst_khat.png", title, seed=seed
        )
        out["files"] = ["diagnostics.nc", "khat.png", "worst_khat.png"]
        (run.run_dir / "diagnostics.json").write_text(json.dumps(out, indent=2))
    return out


def _worst_khat_title(worst: list[int], khat: np.ndarray, per_line: int = 4) -> str:
    """The title of worst_khat.png: what it shows, then each image's test index and k̂, left to right."""
    cells = [f"#{i}: $\\hat{{k}}$ = {khat[i]:.2f}" for i in worst]
    lines = ["   ".join(cells[k : k + per_line]) for k in range(0, len(cells), per_line)]
    return "\n".join(["Test images with the largest PSIS $\\hat{k}$ of the guide, left to right", *lines])


def gaps_run(
    run: Run,
    num_images: int = 200,
    *,
    num_samples: int | None = None,
    steps: int = 300,
    num_particles: int = 16,
    elbo_particles: int = 1000,
    family: str | None = None,
    nuts_images: int = 0,
    nuts: dict | None = None,
    seed: int = 0,
    write: bool = True,
    checkpoint: str = "best",
    log_px_from: str = "is",
    ais: dict | None = None,
) -> dict:
    """The inference-gap report (:func:`ppl_vae.evaluate.report.gap_report`) of a run's guide on its first
    ``num_images`` test images (``num_samples`` importance draws for log p̂, default ``eval.num_samples``), the
    decoder frozen; ``nuts_images`` of them also get a NUTS reference. Writes ``gaps.json`` and ``gaps.png``;
    ``checkpoint`` names the checkpoint the run was loaded from, for the record; ``log_px_from="best"``: log p̂ is
    the largest of IS from the guide, IS from q* and AIS (``ais``: its settings)."""
    num_samples = run.cfg.eval.num_samples if num_samples is None else num_samples
    _positive("num_images", num_images)
    _positive("num_samples", num_samples)
    for name, value in (("steps", steps), ("num_particles", num_particles), ("elbo_particles", elbo_particles)):
        _positive(name, value)
    _positive("nuts_images", nuts_images, minimum=0)
    x, y = _test_split(run, num_images)
    if nuts_images > len(x):
        raise PplVaeError(
            f"{spell('nuts_images', '--nuts')} must be at most {spell('num_images', '--num-images')} ({len(x)}), "
            f"got {nuts_images}"
        )
    # every refusal (a guide family, a latent NUTS cannot transform) before any work, the pilot included
    evaluate.report.check_gap_report(
        run.model.model, run.model.guide, x, y=y, family=family, nuts_images=nuts_images, log_px_from=log_px_from
    )
    if not isinstance(run.data, MultimodalData):  # log p̂, the per-image optimisation (≈ 3 passes a draw), 2 ELBOs
        per_image = num_samples + 3 * steps * num_particles + 2 * elbo_particles
        detail = f"({num_samples:,} + 3×{steps}×{num_particles} + 2×{elbo_particles:,})"
        what = "inference gaps" + (f" (plus NUTS on {nuts_images} images, not in the estimate)" if nuts_images else "")
        shorter = spell("num_images / steps / elbo_particles", "--num-images / --steps / --elbo-particles")
        announce_work(run, x, y, per_image, what, shorter, detail)
    out = evaluate.gap_report(
        run.model.model,
        run.model.guide,
        x,
        y=y,
        num_samples=num_samples,
        family=family,
        steps=steps,
        num_particles=num_particles,
        elbo_particles=elbo_particles,
        parameters=list(run.model.parameters()),
        seed=seed,
        nuts_images=nuts_images,
        nuts=nuts,
        log_px_from=log_px_from,
        ais=ais,
    )
    out = {"model": run.cfg.model.name, "checkpoint": checkpoint, **out}
    if write:
        (run.run_dir / "gaps.json").write_text(json.dumps(out, indent=2))
        evaluate.plot_gaps(out, run.run_dir / "gaps.png", title=f"Inference gaps of {run.cfg.model.name}")
        out["files"] = ["gaps.json", "gaps.png"]
    return out


def write_figures(run: Run, history: list[dict]) -> list[str]:
    """The plan's standard figures (default ``ppl_vae.viz.make_figures``) and its own (e.g. σ²(z) maps)."""
    n = min(2000, len(run.data.test_x))
    x = run.data.test_x[:n].to(run.device)
    y = run.data.test_y[:n].to(run.device) if run.data.test_y is not None else None
    plan = plan_for(run.model)
    # legends name the data set's classes; sample grids name the checkpoint, as `ppl-vae sample` does
    with torch.no_grad(), figure_context(class_names=run.data.class_names, checkpoint=run.checkpoint):
        paths = plan.standard_figures(x, y, history, run.run_dir, seed=run.cfg.seed)
        return paths + plan.figures(x, y, run.run_dir, seed=run.cfg.seed)
