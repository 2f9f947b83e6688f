"""One run, from configuration to artefacts: config → data → model → objective → fit → evaluation → files.

Each step is a plain function; the command line (``ppl_vae.cli``) only strings them together.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from .config import Config, TrainConfig, config_from_dict, load_config, save_config
from .data import DataBundle, load_data
from .errors import ConfigError
from .infer import evaluate_elbo, fit, load_checkpoint, restore_params
from .infer.train import BEST, CHECKPOINT
from .models import build_model

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "metrics.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device must be available on this machine: got {name!r}, but CUDA is not available")
    return torch.device(name)


def build_data(cfg: Config) -> DataBundle:
    d = cfg.data
    return load_data(d.name, root=d.root, download=d.download, pixels=d.pixels, val_fraction=d.val_fraction,
                     seed=cfg.seed, limit=d.limit, image_size=d.image_size)


def build_objective(train: TrainConfig):
    """The Pyro ELBO named by ``train.objective``."""
    k = train.num_particles
    if train.objective == "elbo":
        return Trace_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
    if train.objective == "meanfield":
        return TraceMeanField_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
    from .infer.iwae import TraceIWAE

    return TraceIWAE(num_particles=k, vectorize_particles=True, estimator=train.estimator)


def build(cfg: Config, data: DataBundle, device: torch.device):
    """The model for a configuration and its data, seeded by ``cfg.seed``, on ``device``."""
    pyro.set_rng_seed(cfg.seed)
    model = build_model(cfg.model, data.shape, num_data=len(data.train_x), num_classes=data.num_classes)
    if cfg.model.name == "cvae" and data.train_y is None:
        raise ConfigError(f"model.name='cvae' needs labels, but data.name={cfg.data.name!r} has none")
    return model.to(device)


def default_run_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class Run:
    cfg: Config
    data: DataBundle
    model: torch.nn.Module
    run_dir: Path
    device: torch.device


def train(cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False, device: str | None = None,
          progress: bool = True, figures: bool = True) -> Run:
    """Train from a configuration: writes config.yaml, checkpoints, metrics.jsonl, metrics.json and figures."""
    dev = resolve_device(device or cfg.device)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    data = build_data(cfg)
    model = build(cfg, data, dev)
    # a method may bring its own objective or per-epoch work (e.g. refitting a mixture prior)
    objective = model.make_objective(cfg.train) if hasattr(model, "make_objective") else build_objective(cfg.train)
    hook = getattr(model, "on_epoch_end", None)
    on_epoch_end = (lambda epoch, record: hook(epoch, record, data)) if hook is not None else None
    first = int(getattr(model, "first_scored_epoch", 1))   # e.g. LaDDer: the first epoch with the ladder prior
    if first > cfg.train.best_from_epoch:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, best_from_epoch=first))
        save_config(cfg, run_dir / CONFIG_FILE)
    if getattr(model, "staged", False):   # sigma_vae per_pixel: Lin et al.'s Algorithm 1 (two fits)
        from .infer.staged import train_staged

        result = train_staged(model, data, cfg.train, model.stage2_config(cfg.train), objective, run_dir=run_dir,
                              resume=resume, seed=cfg.seed, device=dev, progress=progress,
                              extra_state={"config": cfg.to_dict()})   # calls model.on_epoch_end itself
    else:
        result = fit(model.model, model.guide, data, objective, cfg.train, run_dir=run_dir, resume=resume,
                     seed=cfg.seed, device=dev, progress=progress, extra_state={"config": cfg.to_dict()},
                     on_epoch_end=on_epoch_end, module=model)
    run = Run(cfg, data, model, run_dir, dev)
    load_params(run, BEST if (run_dir / BEST).exists() else CHECKPOINT)
    summary = {"best_epoch": result.best_epoch, "best_val_elbo": result.best_val_elbo,
               "epochs_run": len(result.history), "stopped_early": result.stopped_early,
               "test_elbo": test_elbo(run)}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if figures:
        write_figures(run, result.history)
    return run


def load_params(run: Run, which: str = BEST) -> dict:
    """Restore a run's parameters (``best.pt`` or ``checkpoint.pt``) into ``run.model`` in place."""
    ckpt = load_checkpoint(run.run_dir / which, map_location=run.device)
    if ckpt.get("module") is not None:
        run.model.load_state_dict(ckpt["module"])
    x0, y0 = next(iter(run.data.batches("train", min(8, len(run.data.train_x)), shuffle=False, device=run.device)))
    pyro.clear_param_store()
    restore_params(run.model.model, run.model.guide, ckpt["param_store"], x0, y0)
    return ckpt


def load_run(run_dir: str | Path, which: str = "best", device: str | None = None,
             overrides: list[str] | None = None) -> Run:
    """Rebuild a trained run from its folder (config.yaml + best.pt or checkpoint.pt)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder: it has no {CONFIG_FILE}")
    cfg = load_config(run_dir / CONFIG_FILE, overrides)
    dev = resolve_device(device or cfg.device)
    data = build_data(cfg)
    run = Run(cfg, data, build(cfg, data, dev), run_dir, dev)
    name = BEST if which == "best" and (run_dir / BEST).exists() else CHECKPOINT
    load_params(run, name)
    run.model.eval()
    return run


def test_elbo(run: Run, seed: int | None = None) -> float:
    """Mean one-sample ELBO per test image (nats), reproducible: the draws come from ``seed`` (default cfg.seed)."""
    m = run.model
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        pyro.set_rng_seed(run.cfg.seed if seed is None else seed)
        return evaluate_elbo(m.model, m.guide, run.data, Trace_ELBO(max_plate_nesting=1), "test",
                             run.cfg.train.eval_batch_size, run.device, len(run.data.train_x))


def write_figures(run: Run, history: list[dict]) -> list[str]:
    from .viz import make_figures

    n = min(2000, len(run.data.test_x))
    x = run.data.test_x[:n].to(run.device)
    y = run.data.test_y[:n].to(run.device) if run.data.test_y is not None else None
    with torch.no_grad():
        paths = make_figures(run.model, x, y, history, run.run_dir, seed=run.cfg.seed)
        if hasattr(run.model, "decode_variance"):   # σ²(z) uncertainty maps (Lin et al., Figs. 3 and 4)
            from .viz_variance import variance_figures

            paths += variance_figures(run.model, x, run.run_dir, seed=run.cfg.seed)
        return paths


__all__ = ["train", "load_run", "Run", "build", "build_data", "build_objective", "resolve_device", "test_elbo",
           "config_from_dict", "load_config"]
