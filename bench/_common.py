"""The benchmark harness shared by every script in ``bench/``: one command line, one metadata record, one result file
per study, and the small statistics the studies share.

Every script::

    python bench/<study>.py            # full mode: writes bench/results/<study>.json (commit it)
    python bench/<study>.py --quick    # < 5 min on 2 CPU cores; the last line of stdout is the same JSON

with the same flags: ``--quick``, ``--seeds 0,1,2`` (training seeds), ``--out PATH`` (another result file),
``--threads N`` (torch threads) and ``--device cpu|cuda``; a script adds its own study options. A full run with
study options other than the defaults (another epoch count, other runs, other seeds) is a *variant*: it is stored
inside the study's file under ``variants["<option>=<value>,..."]`` and leaves the default result in place, so a
study has one file however many variants and seeds were run. Training goes through ``ppl_vae.train``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SPECS = ROOT / "bench" / "specs"  # the studies' compare specs (run_spec)
_HARNESS_FLAGS = ("quick", "out", "threads", "device", "workers")  # execution details, not study options


def parser(
    description: str, *, seeds: str | None = "0", threads: int = 2, workers: int | None = None
) -> argparse.ArgumentParser:
    """The shared command line; ``seeds`` is the default of ``--seeds`` (comma-separated; None: the script's
    own default in both modes), ``threads`` that of ``--threads``; ``workers`` adds ``--workers`` with that default
    (jobs in parallel for :func:`run_jobs`)."""
    p = argparse.ArgumentParser(description=description.strip().split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small run (< 5 min on 2 CPU cores); prints the JSON only")
    p.add_argument(
        "--seeds",
        type=_seeds,
        default=None if seeds is None else _seeds(seeds),
        help=f"comma-separated training seeds (default {seeds or 'the study`s own'})",
    )
    p.add_argument("--out", default=None, help="result file (default bench/results/<study>.json)")
    p.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if workers is not None:
        p.add_argument(
            "--workers",
            type=int,
            default=workers,
            help=f"jobs in parallel (processes, one torch thread each; default {workers})",
        )
    return p


def _seeds(text) -> tuple[int, ...]:
    if isinstance(text, tuple):
        return text
    try:
        out = tuple(int(s) for s in str(text).split(",") if s != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not out or any(s < 0 for s in out):
        raise argparse.ArgumentTypeError(f"--seeds must be non-negative integers, got {text!r}")
    return out


def subset_arg(ap: argparse.ArgumentParser, flag: str, value: str, allowed, allow_empty: bool = True) -> list[str]:
    """The comma-separated names in ``value`` (the option ``flag``, e.g. "--runs"), each one of ``allowed``;
    ``ap.error`` naming the flag, the choices and the value otherwise (an empty list too, unless ``allow_empty``)."""
    names = [n for n in value.split(",") if n]
    if (not names and not allow_empty) or any(n not in allowed for n in names):
        ap.error(f"{flag} must name some of {list(allowed)}, got {value!r}")
    return names


def start(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse the command line, set the torch threads and remember the parser (for the variant name)."""
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be a positive integer, got {args.threads}")
    torch.set_num_threads(args.threads)
    args._parser, args._t0 = ap, time.perf_counter()
    return args


def one_seed(args) -> int:
    """The training seed of a study that trains one seed per run (each other seed is a variant of its file)."""
    if len(args.seeds) != 1:
        args._parser.error(
            f"this study trains one seed per run (--seeds N; each seed is stored as its own "
            f"variant), got --seeds {','.join(map(str, args.seeds))}"
        )
    return args.seeds[0]


def variant(args) -> str | None:
    """``"option=value,..."`` of the study options that differ from their defaults (None: the default run)."""
    parts = []
    for action in args._parser._actions:
        name = action.dest
        if name in ("help", *_HARNESS_FLAGS) or not hasattr(args, name):
            continue
        value = getattr(args, name)
        if value != action.default:
            shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            parts.append(f"{name}={shown}")
    return ";".join(parts) or None


def _git(*cmd) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(args, device: str | None = None) -> dict:
    """Command, versions, hardware, date and git commit of this run (one record for every study)."""
    device = device or args.device
    env = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "mode": "quick" if args.quick else "full",
        "variant": variant(args),
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "ppl_vae")),
        "seconds": round(time.perf_counter() - args._t0, 1),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("pyro", "arviz"):
        try:
            env[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    return env


def finish(study: str, result: dict, args, device: str | None = None) -> dict:
    """Add the metadata (``environment``; ``device``: the device the study ran on when it is not ``--device``, e.g.
    "cpu" for a CPU-only study), write the study's result file in full mode and print the JSON object as the last
    line of stdout. A variant (:func:`variant`) is stored under ``variants`` of the study's file; the default run
    replaces the top level and keeps the variants. Returns what was written."""
    result = {**result, "environment": metadata(args, device)}
    if not args.quick:
        path = Path(args.out) if args.out else RESULTS / f"{study}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(path.read_text()) if path.is_file() else {}
        key = variant(args)
        if key is None:
            written = {**result, "variants": old.get("variants", {})} if old.get("variants") else result
        else:
            written = {**old, "variants": {**old.get("variants", {}), key: result}}
        path.write_text(json.dumps(written, indent=2) + "\n")
    print(json.dumps(result))
    return result


def run_spec(study: str, args, quick: dict, overrides: list[str] | tuple = ()) -> tuple[dict, Path]:
    """Run the compare spec ``bench/specs/<study>.yaml`` through ``ppl_vae.compare`` (``--workers`` jobs at once,
    the run's ``--device`` and ``overrides`` (a study option) added to the spec's overrides; ``--seeds``, when given,
    replaces the spec's seeds). Full mode: into ``bench/runs/<study>/`` (a variant: ``bench/runs/<study>/variant-
    <options>/``) — resumable, and a finished run is never trained again — with ``compare.md`` and ``compare.png``
    copied to ``bench/results/<study>_compare.{md,png}`` (a variant writes no copies). Quick mode: the fields of
    ``quick`` replace the spec's (its ``overrides`` are added after the spec's), into a fresh temporary folder
    removed at exit. Returns (compare.json's content, the compare folder: its ``runs/<run>-seed<k>/``)."""
    import yaml

    from ppl_vae.compare import compare

    spec = yaml.safe_load((SPECS / f"{study}.yaml").read_text())
    spec["overrides"] = [*spec.get("overrides", []), f"device={args.device}", *overrides]
    if args.quick:
        spec.update({k: v for k, v in quick.items() if k != "overrides"})
        spec["overrides"] += quick.get("overrides", [])
        out = Path(tempfile.mkdtemp(prefix=f"{study}_quick_"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
    else:  # a variant's runs (other sizes) in a folder of their own: compare refuses to mix configurations
        key = variant(args)
        out = ROOT / "bench" / "runs" / study
        out = out if key is None else out / ("variant-" + "".join(c if c.isalnum() or c in "=.-" else "_" for c in key))
    if args.seeds is not None:
        spec["seeds"] = list(args.seeds)
    result = compare(spec, out, workers=getattr(args, "workers", 1), progress=False)
    if not args.quick and variant(args) is None and args.out is None:
        for suffix in ("md", "png"):
            shutil.copyfile(out / f"compare.{suffix}", RESULTS / f"{study}_compare.{suffix}")
    return result, out


def run_history(folder: Path, run: str, seed: int) -> list[dict]:
    """The per-epoch records (``metrics.jsonl``) of the run ``run`` with seed ``seed`` of a :func:`run_spec`."""
    lines = (folder / "runs" / f"{run}-seed{seed}" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def layer_codes(model, xtr, xt, ytr, yte) -> dict:
    """Per latent site of a trained ``model`` (eval mode): KL(q ‖ p) on the first 1,000 images of ``xt``, the active
    units on ``xt`` (10 draws each), and the logistic and 5-NN probe accuracy of the class from the posterior means
    (fitted on ``xtr``/``ytr``, scored on ``xt``/``yte``). Draws from torch's global RNG in that order: call it
    inside the caller's seeded block."""
    from ppl_vae.evaluate import active_units, kl_per_site, posterior_means, probe_accuracy

    kl = kl_per_site(model.model, model.guide, xt[:1000], num_samples=10)
    au = active_units(model.guide, xt, num_samples=10)
    mtr, mte = posterior_means(model.guide, xtr, num_samples=10), posterior_means(model.guide, xt, num_samples=10)
    n = len(ytr)
    return {
        site: {
            "kl": round(kl[site], 3),
            "active_units": au[site]["active"],
            "dims": au[site]["dims"],
            "probe_logistic": round(probe_accuracy(mtr[site], ytr, mte[site], yte, (n,))[n], 4),
            "probe_knn": round(probe_accuracy(mtr[site], ytr, mte[site], yte, (n,), "knn")[n], 4),
        }
        for site in sorted(kl)
    }


def run_jobs(fn, jobs: list, workers: int) -> list:
    """``[fn(job) for job in jobs]``, in ``workers`` spawned processes when ``workers`` > 1 (``fn`` at a module's top
    level; each job should set its own torch threads). The order of the results is the order of the jobs."""
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            return pool.map(fn, jobs, chunksize=1)
    return [fn(job) for job in jobs]


# ------------------------------------------------------------------------------------------------ timing
def library_step(model, elbo, lr: float = 1e-3, fused: bool = False):
    """The step ``ppl_vae.train`` takes, without its bookkeeping: ``elbo.loss_and_grads`` with Pyro's checks off
    (the loop runs them on the first step only) and one ``torch.optim.Adam`` over the model's parameters (its fused
    kernel with ``fused``, as ``train.compile`` runs it)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True if fused else None)

    def step(x):
        with pyro.validation_enabled(False):
            loss = elbo.loss_and_grads(model.model, model.guide, x)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def time_calls(fn, items) -> float:
    """Seconds per call of ``fn`` over ``items`` (CUDA synchronised at the end)."""
    t0 = time.perf_counter()
    for item in items:
        fn(item)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(items)


def alternate(a, b, rounds: int) -> list[tuple[float, float]]:
    """``(a(), b())`` for each round, called A B, B A, ... (machine noise hits both sides); ``a`` and ``b`` return
    seconds."""
    pairs = []
    for r in range(rounds):
        if r % 2 == 0:
            x, y = a(), b()
        else:
            y, x = b(), a()
        pairs.append((x, y))
    return pairs


def ratio_rounds(a, b, rounds: int) -> dict:
    """Median over interleaved rounds (:func:`alternate`) of a()/b() (a and b return seconds), with every round's
    ratio and seconds."""
    pairs = alternate(a, b, rounds)
    ratios = [x / y for x, y in pairs]
    return {
        "ratio_median": round(statistics.median(ratios), 4),
        "ratios": [round(v, 4) for v in ratios],
        "seconds_a": [round(x, 4) for x, _ in pairs],
        "seconds_b": [round(y, 4) for _, y in pairs],
    }


def interleaved(a, b, items, rounds: int):
    """Median over rounds of time(a) / time(b), timed A B, B A, ... (:func:`alternate`); returns (median ratio,
    median seconds per call of a, of b, the per-round ratios)."""
    pairs = alternate(lambda: time_calls(a, items), lambda: time_calls(b, items), rounds)
    ratios = [x / y for x, y in pairs]
    return (
        statistics.median(ratios),
        statistics.median(x for x, _ in pairs),
        statistics.median(y for _, y in pairs),
        ratios,
    )


def measured_chunks(num_data: int, num_samples: int, batch_size: int | None = None) -> dict:
    """``log_likelihood``'s (batch_size, chunk_size) as the committed results were measured — its rule before the
    byte budget, 100,000 datapoint-samples per pass — so that a full rerun reproduces them draw for draw (another
    chunking draws other samples: an estimate of the same number, equal within Monte Carlo error)."""
    n, s, most = max(int(num_data), 1), int(num_samples), 100_000
    batch_size = min(n, max(1, most // min(s, most))) if batch_size is None else min(int(batch_size), n)
    return {"batch_size": batch_size, "chunk_size": min(s, max(1, most // batch_size))}


# ------------------------------------------------------------------------------------------------ statistics
def paired(a, b) -> tuple[float, float]:
    """Mean of a − b over the same items (test images) and its standard error (ddof = 1)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def ll_mc_std_error(ess, num_samples: int) -> float:
    """Monte Carlo s.e. of the mean importance-sampled log p̂(x) over images: per image the delta-method s.e.
    sqrt(1/ESS − 1/S) of log p̂ (S draws, effective sample size ESS), combined as sqrt(Σ se²)/n."""
    mc = (1.0 / ess - 1.0 / num_samples).clamp(min=0).sqrt()
    return float(mc.pow(2).sum().sqrt() / len(mc))


def over_seeds(per_seed: list[tuple[float, float]]) -> tuple[float, float]:
    """Combine paired differences (mean, s.e.) from several training seeds: the mean of the means, and a standard
    error sqrt(stdev(means)²/n + mean(s.e.)²/n) — spread over seeds plus the test-set s.e. (1 seed: that alone)."""
    means = [m for m, _ in per_seed]
    n = len(means)
    spread = statistics.stdev(means) / math.sqrt(n) if n > 1 else 0.0
    test_se = statistics.mean(se for _, se in per_seed)
    return statistics.mean(means), math.sqrt(spread**2 + test_se**2 / n)


def write_idx(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """The four Fashion-MNIST IDX files (plain) of random 8-bit images and labels, in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{stem}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + x.tobytes())
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + y.tobytes())
    return folder


def mean_present(values):
    """The mean of the values that are not None (None when there are none): a metric some runs lack."""
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def se_over(values) -> float | None:
    """Standard error of the mean over seeds, sd / sqrt(n) (None for a single value)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None


# ------------------------------------------------------------------------------------------- multimodal studies
def multimodal_data(kind_and_modalities: tuple[str, int], s: dict):
    """The multimodal data of ``bench/multimodal.py`` and ``bench/mmvm_joint.py``: ``s["limit"]`` Fashion-MNIST
    training images made into ``kind`` ("poly": PolyFashion, "image_label") with M modalities."""
    from ppl_vae.data import load_data
    from ppl_vae.data.multimodal import make_multimodal

    kind, m = kind_and_modalities
    base = load_data("fashion_mnist", limit=s["limit"], seed=0)
    return make_multimodal(base, kind, num_modalities=m, missing_rate=s.get("missing_rate", 0.0), seed=0)


def generated_sharpness(model, x) -> float:
    """Mean sharpness of images generated from one other modality (every ordered pair with an image target)."""
    from ppl_vae.evaluate import model_generator, sharpness

    layout, gen, vals = model.layout, model_generator(model), []
    torch.manual_seed(0)
    with torch.no_grad():
        for j, kind in enumerate(layout.kinds):
            if kind != "image":
                continue
            for i in range(layout.num_modalities):
                if i != j:
                    vals.append(sharpness(gen(x, layout.only(i, len(x)), j)))
    return statistics.mean(vals)


def multimodal_summary_and_ll(model, data, classifiers, s: dict, seed: int):
    """(``multimodal_summary`` on ``s["n_test"]`` test points with ``s["probe_train"]`` probe codes, the mean test
    log p̂(X) with ``s["S"]`` draws on the first ``s["n_ll"]`` or None for a model without one) of a trained model,
    in eval mode: the evaluation the multimodal studies and the multimodal parity scripts share."""
    from ppl_vae.evaluate import joint_log_likelihood, multimodal_summary

    model.eval()
    summary = multimodal_summary(
        model,
        data,
        num_samples=0,
        max_test=s["n_test"],
        probe_train=s["probe_train"],
        classifiers=classifiers,
        seed=seed,
    )
    ll = None
    if model.has_joint_likelihood:
        with torch.no_grad():
            ll = float(joint_log_likelihood(model, data.test_x[: s["n_ll"]], num_samples=s["S"], seed=seed).mean())
    return summary, ll


def multimodal_scores(model, data, s: dict, seed: int) -> dict:
    """A trained multimodal model's test scores (coherence, probes, log p̂(X), imputation, sharpness), with the
    settings ``s`` (``classifier_train``, ``n_test``, ``probe_train``, ``n_ll``, ``S``): what both multimodal
    studies report (their docstrings say what each key means)."""
    from ppl_vae.evaluate import fit_classifiers, sharpness

    full = data.train_y.all(1)  # complete training datapoints (all of them when nothing is missing)
    clf_x, clf_y = data.train_x[full][: s["classifier_train"]], data.train_labels[full][: s["classifier_train"]]
    classifiers = fit_classifiers(data.layout, clf_x, clf_y, max_train=s["classifier_train"])
    summary, ll = multimodal_summary_and_ll(model, data, classifiers, s, seed)
    x = data.test_x[:500]
    layout = data.layout
    real = statistics.mean(
        sharpness(layout.split(x)[n]) for n, k in zip(layout.names, layout.kinds, strict=False) if k == "image"
    )
    imp = summary["imputation"]
    return {
        "coherence": summary["coherence"]["cross_mean"],
        "coherence_rest": summary["coherence"]["rest_mean"],
        "coherence_matrix": summary["coherence"]["matrix"],
        "probe_acc": summary["probe_acc"]["unimodal_mean"],
        "probe_acc_joint": summary["probe_acc"]["joint"],
        "probe_acc_per_modality": summary["probe_acc"]["unimodal"],
        "test_ll": ll,
        "imputation": imp["image_mse_mean"],
        "label_error": imp["per_modality"].get("label"),
        "sharpness": generated_sharpness(model, x),
        "real_sharpness": real,
        "classifier_acc": [
            float((c(layout.split(x)[n]) == data.test_labels[:500].numpy()).mean())
            for c, n in zip(classifiers, layout.names, strict=False)
        ],
    }
