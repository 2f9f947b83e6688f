"""The runs of a compare spec (its form: :mod:`ppl_vae.compare`), their evaluation and the table.

Each (run, seed) trains into ``OUT/runs/<run>-seed<k>/`` through :func:`~ppl_vae.experiment.run_experiment` with
``seed=k``: a folder with ``metrics.json`` is never retrained, one with a checkpoint but no ``metrics.json`` (a killed
compare) is resumed. Each finished run is evaluated once (``compare_metrics.json`` in its folder). The comparison —
per metric the mean ± s.e. over seeds and the paired differences to the baseline (mean, s.e. of the per-seed
differences, seeds where each run is ahead) — goes to ``OUT/compare.json``, ``compare.md``, ``compare.csv`` and
``compare.png``.

A ``sweep:`` section first searches a space of config fields with Optuna (``pip install 'ppl-vae[sweep]'``) and adds
the best configuration found as one more run, ``best``, beside the others (:mod:`ppl_vae.compare._sweep`; the
package's :func:`~ppl_vae.compare.compare` joins the two).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..config.sections import _YAML_FAULTS, Config, _yaml_problem, load_config, load_yaml
from ..data.multimodal import MultimodalData
from ..errors import ConfigError, PplVaeError, RunFolderError, did_you_mean
from ..evaluate import FrechetDistance, get_feature_extractor, log_likelihood_summary, multimodal_summary
from ..experiment import CONFIG_FILE, SUMMARY_FILE, latent_metrics, load_run, run_experiment, sample_run
from ..training.loop import CHECKPOINT

# metric → (higher is better, what it is)
METRICS = {
    "test_elbo": (True, "test ELBO (nats per image, the run's metrics.json)"),
    "log_likelihood": (True, "importance-sampled test log p(x) (nats per image), with its Monte Carlo s.e."),
    "seconds_per_epoch": (False, "mean seconds per training epoch (metrics.jsonl)"),
    "probe_accuracy": (
        True,
        "test accuracy of a logistic probe of the class from E_q[z | x] (fitted on 2,000 training codes; "
        "multimodal: from the joint code)",
    ),
    "active_units": (True, "latent units with Cov_x E_q[z_u | x] > 0.01, all sites (unimodal runs)"),
    "mutual_information": (True, "I_q(x; z) of the one latent site, nats (unimodal runs)"),
    "kl": (False, "KL(q(z|x) ‖ p(z)) per test image, all sites, nats (unimodal runs)"),
    "coherence": (True, "the class of a modality generated from one other, mean over pairs (multimodal runs)"),
    "fid": (
        False,
        "Fréchet distance of max_test prior samples (seed 0) to the first max_test test images, in the features of "
        "a small classifier trained on the run's training images (unimodal runs; comparable within one compare only)",
    ),
}
REPRESENTATION = ("probe_accuracy", "active_units", "mutual_information", "kl", "coherence")
ONLY_FOR = {
    "active_units": "unimodal",
    "mutual_information": "unimodal",
    "kl": "unimodal",
    "coherence": "multimodal",
    "fid": "unimodal",
}
"""The metrics read from the run's code (:func:`~ppl_vae.experiment.latent_metrics`, or
:func:`~ppl_vae.evaluate.multimodal_summary` for a multimodal run), on the first ``max_test`` test images."""
"""The metrics a spec may name: metric → (whether higher is better, what it is)."""
SPEC_KEYS = ("runs", "overrides", "seeds", "baseline", "metrics", "num_samples", "max_test", "sweep")
RESULT_FILE = "compare_metrics.json"
FID_CACHE = ".fid_features"  # the classifier of the fid metric, in the compare's folder
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")

__all__ = ["load_spec", "Spec", "METRICS", "compare_runs", "summarise", "run_config"]


@dataclass
class Spec:
    """A validated compare spec: ``runs`` maps a name to (config, overrides)."""

    runs: dict[str, tuple[str | None, list[str]]]
    seeds: list[int]
    baseline: str
    metrics: list[str] = field(default_factory=lambda: ["test_elbo"])
    num_samples: int = 20
    max_test: int = 500
    sweep: object = None
    """The ``sweep:`` section, when the spec has one (validated into a ``ppl_vae.compare._sweep.Sweep`` by the
    package's :func:`~ppl_vae.compare.load_spec`)."""


def _spec_error(where: str, text: str) -> ConfigError:
    return ConfigError(f"compare spec: {where} {text}")


def load_spec(spec, folder: str | Path | None = None) -> Spec:
    """A :class:`Spec` from a YAML file's path or a mapping; every field is checked here, before anything trains
    (a run's config and overrides are loaded once with its first seed). ``folder``: where relative config paths of
    a mapping are looked up first (a file's own folder for a path)."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"compare spec {str(path)!r} cannot be read: {e.strerror or e}") from None
        try:
            spec = load_yaml(text)
        except _YAML_FAULTS as e:
            raise ConfigError(f"compare spec {str(path)!r} is not valid YAML: {_yaml_problem(e)}") from None
        folder = path.parent if folder is None else folder
    if not isinstance(spec, dict):
        raise ConfigError(
            f"compare spec must be a mapping with runs, seeds, baseline, metrics; got {type(spec).__name__}"
        )
    for key in spec:
        if key not in SPEC_KEYS:
            raise _spec_error(
                f"field {key!r}", f"is unknown{did_you_mean(key, SPEC_KEYS)}; the fields: {', '.join(SPEC_KEYS)}"
            )
    common = spec.get("overrides", [])
    if not isinstance(common, list) or not all(isinstance(o, str) for o in common):
        raise _spec_error("overrides", f"must be a list of dotted overrides (a=b) for every run, got {common!r}")
    if any(o.split("=", 1)[0].strip() == "seed" for o in common):
        raise _spec_error("overrides", "must not set seed: the spec's seeds: field sets it")
    runs = _runs(spec.get("runs"), Path(folder) if folder is not None else None, list(common))
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise _spec_error("seeds", f"must be a non-empty list of integers >= 0, e.g. [0, 1, 2]; got {seeds!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 or s > 2**32 - 1 for s in seeds):
        raise _spec_error("seeds", f"must be integers in [0, 2**32 - 1], got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _spec_error("seeds", f"must be distinct, got {seeds!r}")
    baseline = spec.get("baseline", next(iter(runs)))
    if baseline not in runs:
        raise _spec_error(
            "baseline", f"{baseline!r} is not a run{did_you_mean(baseline, runs)}; the runs: {', '.join(runs)}"
        )
    metrics = spec.get("metrics", ["test_elbo"])
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not metrics:
        raise _spec_error("metrics", f"must be a non-empty list of {', '.join(METRICS)}; got {metrics!r}")
    for m in metrics:
        if m not in METRICS:
            raise _spec_error(
                "metrics", f"{m!r} is not a metric{did_you_mean(m, METRICS)}; the metrics: {', '.join(METRICS)}"
            )
    out = Spec(runs, list(seeds), baseline, list(dict.fromkeys(metrics)))
    for key in ("num_samples", "max_test"):
        value = spec.get(key, getattr(out, key))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _spec_error(key, f"must be a positive integer, got {value!r}")
        setattr(out, key, value)
    for name, (config, overrides) in runs.items():  # a bad override or config is refused before anything trains
        try:  # the spec's overrides alone first, so that their fault is named as theirs
            run_config(config, list(common), out.seeds[0])
        except ConfigError as e:
            raise _spec_error(f"overrides (with run {name}'s config):", str(e)) from None
        try:
            cfg = run_config(config, overrides, out.seeds[0])
        except ConfigError as e:
            raise _spec_error(f"runs.{name}:", str(e)) from None
        kind = "multimodal" if cfg.data.multimodal else "unimodal"
        for m in out.metrics:
            if ONLY_FOR.get(m, kind) != kind:
                raise _spec_error("metrics", f"{m!r} is not defined for run {name!r}, a {kind} run ({_UNDEFINED[m]})")
    out.sweep = spec.get("sweep")  # checked by the package's load_spec (ppl_vae.compare._sweep.load_sweep)
    return out


def _runs(runs, folder: Path | None, common: list[str]) -> dict[str, tuple[str | None, list[str]]]:
    """name → (config, overrides): the spec's ``overrides:`` for every run first, then the run's own."""
    if not isinstance(runs, dict) or not runs:
        raise _spec_error("runs", "must be a mapping of run names to {config: NAME_OR_PATH, overrides: [...]}")
    out = {}
    for name, entry in runs.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise _spec_error(f"runs: name {name!r}", "must be letters, digits, '_', '-', '.' or '+' (a folder name)")
        entry = {} if entry is None else entry
        if not isinstance(entry, dict):
            raise _spec_error(f"runs.{name}", f"must be a mapping with config and overrides, got {entry!r}")
        for key in entry:
            if key not in ("config", "overrides"):
                raise _spec_error(f"runs.{name}.{key}", f"is unknown{did_you_mean(key, ('config', 'overrides'))}")
        config = entry.get("config")
        if config is not None and not isinstance(config, str):
            raise _spec_error(f"runs.{name}.config", f"must be a shipped config's name or a YAML path, got {config!r}")
        if config is not None and folder is not None and (folder / config).is_file():
            config = str(folder / config)  # a path relative to the spec file
        overrides = entry.get("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise _spec_error(f"runs.{name}.overrides", f"must be a list of dotted overrides (a=b), got {overrides!r}")
        if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
            raise _spec_error(f"runs.{name}.overrides", "must not set seed: the spec's seeds: field sets it")
        out[name] = (config, [*common, *overrides])
    return out


def run_config(config: str | None, overrides: list[str], seed: int, threads: int | None = None) -> Config:
    """The configuration of one (run, seed): the config with its overrides and ``seed=<seed>``."""
    extra = [f"seed={seed}"] + ([f"train.threads={threads}"] if threads is not None else [])
    return load_config(config, [*overrides, *extra])


def _same_run(saved: dict, wanted: dict) -> list[str]:
    """The fields in which a finished run's config differs from the one the spec asks for."""
    skip = {"resumes", "imports"}
    diffs = []
    for section in sorted(set(saved) | set(wanted)):
        a, b = saved.get(section), wanted.get(section)
        if section in skip:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "threads"]
        elif a != b:
            diffs.append(section)
    return diffs


def _job(job: tuple) -> dict:
    """Train (or resume) one (run, seed) when it has no metrics.json, then evaluate it once: its numbers."""
    config, overrides, seed, run_dir, metrics, num_samples, max_test, threads, progress = job
    run_dir = Path(run_dir)
    cfg = run_config(config, overrides, seed, threads)
    if not (run_dir / SUMMARY_FILE).is_file():
        resume = (run_dir / CHECKPOINT).is_file() or any(run_dir.glob(f"*/{CHECKPOINT}"))
        run_experiment(cfg, run_dir, resume=resume, progress=progress, figures=False)
    else:
        diffs = _same_run(load_config(run_dir / CONFIG_FILE).to_dict(), cfg.to_dict())
        if diffs:
            raise RunFolderError(
                f"{str(run_dir)!r} holds a finished run of another configuration ({', '.join(diffs)} differ from "
                "the spec): remove that folder to retrain it, or give compare another --out"
            )
    return _evaluate(run_dir, metrics, num_samples, max_test, threads)


def _job_tuple(config, overrides, seed, run_dir, metrics, spec: Spec, threads, progress) -> tuple:
    """The argument of :func:`_job` for one (configuration, seed) trained into ``run_dir``."""
    return (config, overrides, seed, str(run_dir), metrics, spec.num_samples, spec.max_test, threads, progress)


def _run_jobs(jobs: list[tuple], workers: int, pool: ProcessPoolExecutor | None = None) -> list[dict]:
    """:func:`_job` of each, ``workers`` at once in spawned processes when above 1 (``pool``'s, when given)."""
    if pool is not None:
        return list(pool.map(_job, jobs))
    if workers > 1:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(_job, jobs))
    return [_job(job) for job in jobs]


def _evaluate(run_dir: Path, metrics: list[str], num_samples: int, max_test: int, threads: int | None) -> dict:
    @functools.cache
    def run():  # the finished run, loaded once for all the metrics not cached yet
        return load_run(run_dir, threads=threads)

    cache = run_dir / RESULT_FILE
    out = json.loads(cache.read_text()) if cache.is_file() else {}
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    out["test_elbo"] = summary["test_elbo"]
    if "seconds_per_epoch" in metrics and "seconds_per_epoch" not in out:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        seconds = [r["seconds"] for r in map(json.loads, filter(None, lines)) if "seconds" in r]
        out["seconds_per_epoch"] = sum(seconds) / len(seconds) if seconds else float("nan")
    ll_key = f"log_likelihood[num_samples={num_samples},max_test={max_test}]"
    if "log_likelihood" in metrics and ll_key not in out:
        r = run()
        x = r.data.test_x[:max_test].to(r.device)
        y = None if r.data.test_y is None else r.data.test_y[:max_test].to(r.device)
        s = log_likelihood_summary(
            r.model.model, r.model.guide, x, num_samples, y=y, batch_size=r.cfg.eval.batch_size, seed=0
        )
        out[ll_key] = {"value": s["log_likelihood"], "mc_se": s["mc_std_error"], "data_se": s["std_error"]}
    if "log_likelihood" in metrics:
        out["log_likelihood"] = out[ll_key]["value"]
        out["log_likelihood_mc_se"] = out[ll_key]["mc_se"]
    fid_key = f"fid[max_test={max_test}]"
    if "fid" in metrics and fid_key not in out:
        out[fid_key] = _fid(run(), max_test, run_dir.parent.parent / FID_CACHE)
    if "fid" in metrics:
        out["fid"] = out[fid_key]["value"]
    wanted = [m for m in metrics if m in REPRESENTATION]
    code_key = f"code[max_test={max_test}]"
    if wanted and code_key not in out:
        out[code_key] = _code_metrics(run(), max_test)
    for m in wanted:
        value = out[code_key].get(m)
        if value is None:
            raise PplVaeError(f"{str(run_dir)!r}: metric {m!r} is not defined for this run ({_UNDEFINED[m]})")
        out[m] = value
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(cache)
    return out


def _fid(run, max_test: int, cache_dir: Path) -> dict:
    """FID of ``max_test`` prior samples (:func:`~ppl_vae.experiment.sample_run`, seed 0) against the first
    ``max_test`` test images, in the features of the classifier extractor trained on the run's training images
    (kept in ``cache_dir``, shared by the runs that see the same images)."""
    extractor = get_feature_extractor("classifier", run.data, device=run.device, cache_dir=cache_dir)
    real = run.data.test_x[:max_test].to(run.device)
    fake = sample_run(run, len(real), seed=0).to(run.device)
    result = FrechetDistance(extractor, real).score(fake.reshape(real.shape))
    return {"value": result.value, "extractor": result.extractor, "num_real": result.num_real}


_UNDEFINED = {
    "probe_accuracy": "its data have no class labels",
    "active_units": "a multimodal run: use probe_accuracy or coherence",
    "mutual_information": "it needs one latent site and a unimodal run",
    "kl": "a multimodal run: use probe_accuracy or coherence",
    "coherence": "it is defined for multimodal runs only",
    "fid": "a multimodal run: use coherence",
}


def _code_metrics(run, max_test: int) -> dict:
    """The representation metrics of a run on its first ``max_test`` test images (None where undefined)."""
    if isinstance(run.data, MultimodalData):
        s = multimodal_summary(run.model, run.data, num_samples=0, max_test=max_test)
        pairs = s["coherence"]["cross_mean"]  # one modality given, another generated: the mean over ordered pairs
        return {"probe_accuracy": s["probe_acc"].get("joint"), "coherence": pairs}
    x = run.data.test_x[:max_test].to(run.device)
    y = None if run.data.test_y is None else run.data.test_y[:max_test].to(run.device)
    s = latent_metrics(run, x, y)
    return {
        "probe_accuracy": s["probe_accuracy"],
        "active_units": int(sum(s["active_units"].values())),
        "mutual_information": s["mutual_information"],
        "kl": s["kl_total"],
    }


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var) / math.sqrt(n)


def summarise(spec: Spec, values: dict[str, dict[int, dict]]) -> dict:
    """compare.json's content from the per-(run, seed) numbers: per metric, per run the values by seed, mean and
    s.e. over seeds, and the paired difference to the baseline (run − baseline: mean, s.e. of the per-seed
    differences — std with ddof 1 over √n —, seeds where the run is ahead and where the baseline is)."""
    out: dict = {"baseline": spec.baseline, "seeds": spec.seeds, "metrics": {}}
    for metric in spec.metrics:
        higher = METRICS[metric][0]
        per_run = {}
        for name in values:
            by_seed = {s: values[name][s][metric] for s in spec.seeds}
            mean, se = _mean_se(list(by_seed.values()))
            entry: dict = {"values": {str(s): v for s, v in by_seed.items()}, "mean": mean, "se": se}
            if metric == "log_likelihood":
                entry["mc_se"] = {str(s): values[name][s]["log_likelihood_mc_se"] for s in spec.seeds}
            if name != spec.baseline:
                d = [by_seed[s] - values[spec.baseline][s][metric] for s in spec.seeds]
                dmean, dse = _mean_se(d)
                ahead = sum(1 for v in d if (v > 0 if higher else v < 0))
                behind = sum(1 for v in d if (v < 0 if higher else v > 0))
                entry["paired"] = {"mean": dmean, "se": dse, "ahead": ahead, "baseline_ahead": behind, "n": len(d)}
            per_run[name] = entry
        out["metrics"][metric] = {"higher_is_better": higher, "runs": per_run}
    return out


def _fmt(mean: float, se: float | None) -> str:
    return f"{mean:.4g}" if se is None else f"{mean:.4g} ± {se:.2g}"


def _rows(result: dict) -> list[dict]:
    rows = []
    for metric, m in result["metrics"].items():
        for name, r in m["runs"].items():
            p = r.get("paired")
            rows.append(
                {
                    "metric": metric,
                    "run": name,
                    "mean": r["mean"],
                    "se": r["se"],
                    "diff": None if p is None else p["mean"],
                    "diff_se": None if p is None else p["se"],
                    "ahead": None if p is None else f"{p['ahead']}/{p['n']}",
                }
            )
    return rows


def _markdown(result: dict) -> str:
    n = len(result["seeds"])
    lines = [
        f"Mean ± s.e. over {n} seeds; paired differences to the baseline `{result['baseline']}` (run − baseline, "
        "s.e. of the per-seed differences) and the seeds where the run is ahead.",
        "",
        "| metric | run | mean ± s.e. | − baseline ± s.e. | ahead |",
        "|---|---|---|---|---|",
    ]
    for row in _rows(result):
        diff = "baseline" if row["diff"] is None else _fmt(row["diff"], row["diff_se"])
        lines.append(
            f"| {row['metric']} | {row['run']} | {_fmt(row['mean'], row['se'])} | {diff} | {row['ahead'] or ''} |"
        )
    sweep = result.get("sweep")
    if sweep:
        best = sweep["best"]
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={json.dumps(v)}" for k, v in best["params"].items()
        )
        lines += [
            "",
            f"Sweep: study `{sweep['study']}`, {sweep['finished']} finished trials of {len(sweep['trials'])}, "
            f"{sweep['direction']} {sweep['objective']} (mean over seeds {sweep['seeds']}). Best: trial "
            f"{best['number']}, {best['value']:.4g}, with {params}: the run `{sweep['name']}` above.",
        ]
    return "\n".join(lines) + "\n"


def _csv(result: dict) -> str:
    buf = io.StringIO()
    rows = _rows(result)
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


def _figure(result: dict, path: Path):
    """Per metric one panel: one point per seed per run, a seed's runs joined by a line (paired); run names that
    would not fit side by side are slanted."""
    from matplotlib.figure import Figure

    metrics = list(result["metrics"])
    names_chars = sum(len(n) + 2 for n in next(iter(result["metrics"].values()))["runs"]) if metrics else 0
    slant = names_chars > 40  # about the characters a 3.6-inch panel holds side by side
    fig = Figure(figsize=(3.6 * len(metrics), 3.6 if slant else 3.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        runs = result["metrics"][metric]["runs"]
        names = list(runs)
        for seed in result["seeds"]:
            ys = [runs[n]["values"][str(seed)] for n in names]
            ax.plot(range(len(names)), ys, "-o", color="0.6", markersize=4, linewidth=0.8)
        for i, n in enumerate(names):
            ax.errorbar(i + 0.15, runs[n]["mean"], yerr=runs[n]["se"] or 0, fmt="s", color="C3", markersize=5)
        ax.set_xticks(range(len(names)), names, rotation=35 if slant else 0, ha="right" if slant else "center")
        better = "higher" if result["metrics"][metric]["higher_is_better"] else "lower"
        ax.set_title(f"{metric} ({better} is better)", fontsize=9)
    fig.savefig(path, dpi=110)
    return fig


def check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PplVaeError(f"workers must be a positive integer, got {workers!r}")
    return workers


def compare_runs(
    spec: Spec, out_dir: Path, *, workers: int = 1, progress: bool = False, extra=None, sweep: dict | None = None
) -> dict:
    """Train what is missing of every (run, seed) of ``spec`` (and of ``extra``: name → (config, overrides, folder
    prefix), a sweep's best configuration) under ``out_dir``, evaluate each once, and write compare.json (with the
    ``sweep`` report, when given), compare.md, compare.csv and compare.png into ``out_dir``."""
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    threads = 1 if workers > 1 else None
    runs = {name: (*entry, Path("runs") / name) for name, entry in spec.runs.items()}  # config, overrides, folder
    runs.update(extra or {})
    keys = [(name, seed) for seed in spec.seeds for name in runs]  # seed-major: a seed's runs train side by side
    jobs = [
        _job_tuple(*runs[n][:2], seed, out_dir / f"{runs[n][2]}-seed{seed}", spec.metrics, spec, threads, progress)
        for n, seed in keys
    ]
    results = _run_jobs(jobs, workers)
    values: dict[str, dict[int, dict]] = {name: {} for name in runs}
    for (name, seed), numbers in zip(keys, results, strict=True):
        values[name][seed] = numbers
    result = summarise(spec, values)
    result["runs"] = {name: {"config": c, "overrides": o} for name, (c, o, _) in runs.items()}
    if sweep is not None:
        result["sweep"] = sweep
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "compare.md").write_text(_markdown(result))
    (out_dir / "compare.csv").write_text(_csv(result))
    _figure(result, out_dir / "compare.png")
    return result
