"""The parity harness shared by ``bench/parity/<method>.py``: our implementation beside the authors' own on the same
data, networks, optimiser, epochs, batch size and seeds (issue 36).

A method script runs in two roles:

* the **driver** (``python bench/parity/<method>.py --official PATH``): exports our data arrays in the files the
  official code reads, writes each seed's initial weights, runs the official training in a subprocess
  (:func:`run_official`), trains ours in process, evaluates both with the same probe and writes
  ``bench/results/parity_<method>.json`` through ``bench/_common.finish`` (``--quick``: the same keys, printed);
* the **worker** (``<method>.py --worker SPEC.json``, started by :func:`run_official` with the checkout as its
  working directory and first on ``sys.path``): imports the official modules, applies the method's shims (each
  with a comment in the method file) and writes its result to the JSON file named in the spec.

The official code is never copied into this repository: the checkout is a folder outside it (``--official``),
made as ``bench/parity/README.md`` says, and the worker's interpreter is this venv.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/ (for _common)

from _common import ROOT, finish, multimodal_summary_and_ll, parser  # noqa: E402
from _common import start as _start  # noqa: E402

__all__ = [
    "ROOT",
    "checkout_commit",
    "finish",
    "parity_parser",
    "require_checkout",
    "run_official",
    "spread",
    "start",
    "verdict",
]


def parity_parser(description: str, *, seeds: str = "0,1,2"):
    """``bench/_common.parser`` (one torch thread by default) plus ``--official PATH`` and the hidden ``--worker``."""
    p = parser(description, seeds=seeds, threads=1)
    p.add_argument(
        "--official",
        default=None,
        help="folder of the official checkout at the commit of bench/parity/README.md (required)",
    )
    p.add_argument("--worker", default=None, help="(internal) run the official side from this spec file")
    return p


def start(ap, argv=None):
    """``bench/_common.start``; the checkout path (``--official``) is where the code came from, not a study option,
    so it does not make a run a variant of the result file (its commit is recorded instead)."""
    args = _start(ap, argv)
    for action in ap._actions:
        if action.dest in ("official", "worker"):
            action.default = getattr(args, action.dest)
    return args


def require_checkout(
    args, repo: str, commit: str, probe_file: str, *, how: str | None = None, subdirs: tuple[str, ...] = ()
) -> Path:
    """The ``--official`` folder, checked: it exists and holds ``probe_file`` (a file of the official layout; or one
    of ``subdirs`` holds it, and that folder is returned); otherwise the parser's error (exit status 2) says what to
    pass and how to get it (``how``: that text, when the default clone instructions do not fit)."""
    how = how or (
        f"the checkout of github.com/{repo} at {commit[:12]} (git clone https://github.com/{repo} DIR && "
        f"git -C DIR checkout {commit}; see bench/parity/README.md)"
    )
    if args.official is None:
        args._parser.error(f"--official PATH is required: {how}")
    path = Path(args.official).expanduser().resolve()
    if not path.is_dir():
        args._parser.error(f"--official {args.official}: no such folder; expected {how}")
    path = next((path / sub for sub in subdirs if (path / sub / probe_file).is_file()), path)
    if not (path / probe_file).is_file():
        args._parser.error(f"--official {args.official}: {probe_file} is missing, so this is not {how}")
    if path == ROOT or ROOT in path.parents:
        args._parser.error(f"--official {args.official}: the checkout must live outside this repository ({ROOT})")
    return path


def checkout_commit(path: Path) -> str | None:
    """The commit of the checkout: ``git rev-parse HEAD`` of a clone, else the first line of ``.parity_commit``
    (written next to an archive export, README), else None."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and Path(path, ".git").exists():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    marker = path / ".parity_commit"
    return marker.read_text().split()[0] if marker.is_file() else None


def run_official(script: Path, spec: dict, checkout: Path, *, threads: int = 1, timeout: float = 3600) -> dict:
    """Run ``python script --worker SPEC`` with the checkout as working directory, ``HOME`` a scratch folder (the
    official code writes under ``$HOME``) and ``threads`` torch/OpenMP threads; returns the worker's JSON result
    (with ``wall_seconds``). A failed worker raises RuntimeError with the end of its output."""
    with tempfile.TemporaryDirectory(prefix="parity_home_") as home:
        spec_path, out_path = Path(home) / "spec.json", Path(home) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result": str(out_path), "threads": threads}))
        env = {
            **os.environ,
            "HOME": home,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "WANDB_MODE": "disabled",
            "PYTHONPATH": str(checkout),
        }
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(script), "--worker", str(spec_path)],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"the official worker failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out_path.read_text())
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        return result


MULTIMODAL_METRICS = ("coherence", "test_ll", "probe_acc", "coherence_rest", "seconds_per_epoch")
"""What a multimodal parity study reports per side; the first three get a verdict."""


def polyfashion_data(s: dict):
    """PolyFashion with ``s["limit"]`` Fashion-MNIST images in 3 modalities: the data of the multimodal parity
    studies (their drivers and their official-side workers build it alike)."""
    from ppl_vae.data import load_data
    from ppl_vae.data.multimodal import make_multimodal

    return make_multimodal(load_data("fashion_mnist", limit=s["limit"], seed=0), "poly", num_modalities=3, seed=0)


def polyfashion(s: dict):
    """(:func:`polyfashion_data`, the coherence classifiers fitted on its first ``s["classifier_train"]`` training
    points): the data and judges of a multimodal parity study's driver."""
    from ppl_vae.evaluate import fit_classifiers

    data = polyfashion_data(s)
    clf_x, clf_y = data.train_x[: s["classifier_train"]], data.train_labels[: s["classifier_train"]]
    return data, fit_classifiers(data.layout, clf_x, clf_y, max_train=s["classifier_train"])


def multimodal_results(runs: list[dict]) -> dict:
    """Per metric of :data:`MULTIMODAL_METRICS` the spread of each side over the runs, and the verdicts."""
    per = {m: {side: [r[side][m] for r in runs] for side in ("ours", "official")} for m in MULTIMODAL_METRICS}
    return {
        "metrics": {m: {side: spread(v) for side, v in per[m].items()} for m in MULTIMODAL_METRICS},
        "verdicts": {m: verdict(per[m]["ours"], per[m]["official"]) for m in MULTIMODAL_METRICS[:3]},
    }


def multimodal_metrics(model, data, classifiers, s: dict, seed: int) -> dict:
    """Coherence, probe and test log p̂(X) of a trained multimodal model (ours, or ours holding the official
    weights): ``multimodal_summary`` on ``s["n_test"]`` test points and ``joint_log_likelihood`` with ``s["S"]``
    draws on the first ``s["n_ll"]`` — the evaluation both sides of a multimodal parity study share."""
    summary, ll = multimodal_summary_and_ll(model, data, classifiers, s, seed)
    return {
        "coherence": float(summary["coherence"]["cross_mean"]),
        "coherence_rest": float(summary["coherence"]["rest_mean"]),
        "probe_acc": float(summary["probe_acc"]["unimodal_mean"]),
        "test_ll": ll,
    }


def spread(values: list[float], digits: int = 4) -> dict:
    """Mean, sd, min and max over seeds, with the per-seed values."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": round(statistics.mean(values), digits),
        "sd": round(sd, digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "per_seed": [round(v, digits) for v in values],
    }


def verdict(ours: list[float], official: list[float]) -> dict:
    """Issue 36's rule: our mean inside the official seed spread (official mean ± 2 sd over seeds, at least its
    min–max range) → "implementation agrees", else "disagrees"; with the difference of means and its s.e."""
    m_off = statistics.mean(official)
    sd_off = statistics.stdev(official) if len(official) > 1 else 0.0
    lo, hi = min(m_off - 2 * sd_off, min(official)), max(m_off + 2 * sd_off, max(official))
    m_ours = statistics.mean(ours)
    var = (statistics.variance(ours) / len(ours) if len(ours) > 1 else 0.0) + sd_off**2 / len(official)
    return {
        "ours_mean": round(m_ours, 4),
        "official_band": [round(lo, 4), round(hi, 4)],
        "difference": round(m_ours - m_off, 4),
        "difference_se": round(math.sqrt(var), 4),
        "verdict": "implementation agrees" if lo <= m_ours <= hi else "disagrees",
    }
