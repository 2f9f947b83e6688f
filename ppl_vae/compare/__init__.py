"""Methods side by side over seeds: ``ppl-vae compare SPEC.yaml`` and :func:`compare`.

A spec (YAML, or the same mapping in Python)::

    runs:
      small: {config: vae_digits, overrides: [model.latent_dim=2]}
      large: {config: vae_digits, overrides: [model.latent_dim=4]}
    overrides: [train.epochs=10]        # optional: for every run, before its own
    seeds: [0, 1, 2]
    baseline: small                     # default: the first run
    metrics: [test_elbo, log_likelihood, seconds_per_epoch]   # or probe_accuracy, active_units, fid, ...
    num_samples: 20                     # importance samples per test image for log_likelihood
    max_test: 500                       # test images for log_likelihood
    sweep: {...}                        # optional: an Optuna search whose best configuration joins the runs

Training, evaluation and the table are :mod:`ppl_vae.compare._core`'s; the ``sweep:`` section is
:mod:`ppl_vae.compare._sweep`'s (``pip install 'ppl-vae[sweep]'``); this module joins them.
"""

from __future__ import annotations

from pathlib import Path

from . import _core
from ._core import Spec, check_workers, compare_runs
from ._core import load_spec as _load_spec
from ._sweep import import_optuna, load_sweep, run_sweep  # optuna itself is imported by import_optuna only

__all__ = ["compare", "load_spec", "Spec", "METRICS"]

METRICS = _core.METRICS
"""The metrics a spec may name: metric → (whether higher is better, what it is)."""


def load_spec(spec, folder: str | Path | None = None) -> Spec:
    """A :class:`Spec` from a YAML file's path or a mapping; every field is checked here, before anything trains
    (a run's config and overrides are loaded once with its first seed; a ``sweep:`` section is checked, then
    Optuna is imported). ``folder``: where relative config paths of a mapping are looked up first (a file's own
    folder for a path)."""
    if isinstance(spec, Spec):
        return spec
    out = _load_spec(spec, folder)
    if out.sweep is not None:  # optuna is needed only here, and asked for once the section is known to be right
        out.sweep = load_sweep(out.sweep, out)
        import_optuna()
    return out


def compare(spec, out_dir: str | Path, *, workers: int = 1, progress: bool = False) -> dict:
    """Train what is missing of every (run, seed) of ``spec`` (a YAML path, a mapping or a :class:`Spec`) under
    ``out_dir/runs/``, evaluate each once, and write compare.json, compare.md, compare.csv and compare.png into
    ``out_dir``. ``workers`` > 1: that many jobs at once, in spawned processes with one torch thread each.
    With a ``sweep:`` section, the sweep's trials come first (under ``out_dir/trials/``), then its best
    configuration joins the runs. Returns compare.json's content."""
    check_workers(workers)
    spec = load_spec(spec)
    out_dir = Path(out_dir)
    if spec.sweep is None:
        return compare_runs(spec, out_dir, workers=workers, progress=progress)
    threads = 1 if workers > 1 else None
    sweep, best = run_sweep(spec, out_dir, workers=workers, threads=threads, progress=progress)
    return compare_runs(spec, out_dir, workers=workers, progress=progress, extra={spec.sweep.name: best}, sweep=sweep)
