"""Sweeps on a compare spec: its ``sweep:`` section, searched with Optuna (``pip install 'ppl-vae[sweep]'``; the
user's page: docs/api/compare.rst, Sweeps)::

    runs:
      base: {config: vae_digits}
    seeds: [0, 1, 2]
    metrics: [log_likelihood, test_elbo]
    sweep:
      space:
        train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}     # a float range (log: sampled on a log scale)
        model.latent_dim: {low: 2, high: 16}                  # integers at both ends: an integer range
        model.hidden: {choices: [[64], [128, 64]]}            # categorical
      from: base                # the run each trial starts from (default: the baseline)
      objective: log_likelihood # default: the spec's first metric; direction: its better one
      trials: 20                # finished trials the study should hold: a second call tops it up
      seeds: [0]                # each trial's value: the objective's mean over these (default: the first seed)
      sampler_seed: 0
      storage: sqlite:////abs/path/optuna.db  # default: OUT/optuna.db; processes sharing it share the study
      study: lr-latent          # default: the compare folder's name
      name: best                # the best configuration's run in the table

Each trial trains, through compare's own machinery, into ``OUT/trials/trial<N>-seed<k>/`` (resumable; a finished
run is never retrained). A trial killed or interrupted while training is taken up again with the same parameters by
the next call (its folders resume); one whose training diverged stays failed. The best trial's configuration is then
run on the spec's seeds (reusing the trial's own runs) as the run ``name`` beside the others, so that compare.json and
the table carry its paired comparison to the baseline.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, PplVaeError, TrainingDiverged, did_you_mean
from ._core import _NAME, METRICS, _job_tuple, _run_jobs, _spec_error, run_config

SWEEP_KEYS = ("space", "from", "objective", "direction", "trials", "seeds", "sampler_seed", "storage", "study", "name")
INSTALL = "pip install 'ppl-vae[sweep]'"
HEARTBEAT_S = 60
"""Seconds between a running trial's heartbeats: one silent for twice as long (a killed process) is failed and
taken up again by the next call."""
_DIRECTIONS = {"maximize": "maximize", "maximise": "maximize", "minimize": "minimize", "minimise": "minimize"}
_SCALAR = (type(None), bool, int, float, str)


@dataclass
class Sweep:
    """A validated ``sweep:`` section. ``space``: field → ``{"choices": [...]}`` or ``{"low", "high", "log",
    "step", "int"}``."""

    space: dict[str, dict]
    base: str
    objective: str
    direction: str
    trials: int
    seeds: list[int]
    sampler_seed: int
    storage: str | None
    study: str | None
    name: str


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range(field: str, entry) -> dict:
    where = f"sweep.space.{field}"
    form = "{low: A, high: B} (log: true, step: S optional) or {choices: [...]}"
    if not isinstance(entry, dict) or not entry:
        raise _spec_error(where, f"must be {form}; got {entry!r}")
    for key in entry:
        if key not in ("low", "high", "log", "step", "choices"):
            raise _spec_error(f"{where}.{key}", f"is unknown{did_you_mean(key, ('low', 'high', 'log', 'step'))}")
    if "choices" in entry:
        if set(entry) != {"choices"}:
            raise _spec_error(where, f"takes choices alone or low and high, not both; got {entry!r}")
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise _spec_error(f"{where}.choices", f"must be a non-empty list, got {choices!r}")
        return {"choices": list(choices)}
    if "low" not in entry or "high" not in entry:
        raise _spec_error(where, f"must give both low and high, got {entry!r}")
    low, high, log, step = entry["low"], entry["high"], entry.get("log", False), entry.get("step")
    for key, value in (("low", low), ("high", high)):
        if not _number(value):
            raise _spec_error(f"{where}.{key}", f"must be a finite number, got {value!r}")
    if low > high:
        raise _spec_error(where, f"low {low!r} is above high {high!r}")
    if low == high:
        raise _spec_error(where, f"the range [{low!r}, {high!r}] is empty: low must be below high")
    if not isinstance(log, bool):
        raise _spec_error(f"{where}.log", f"must be true or false, got {log!r}")
    if log and low <= 0:
        raise _spec_error(where, f"log: true needs low > 0, got low {low!r}")
    if step is not None and (not _number(step) or step <= 0):
        raise _spec_error(f"{where}.step", f"must be a positive number, got {step!r}")
    if step is not None and log:
        raise _spec_error(f"{where}.step", "cannot go with log: true")
    is_int = all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int))
    return {"low": low, "high": high, "log": log, "step": step, "int": is_int}


def override(field: str, value) -> str:
    """The dotted override that sets ``field`` to ``value`` (the value written as JSON, which YAML reads back)."""
    return f"{field}={json.dumps(value)}"


def load_sweep(raw, spec) -> Sweep:
    """A :class:`Sweep` from a spec's ``sweep:`` mapping, every field checked (``spec``: the rest of the validated
    :class:`~ppl_vae.compare.Spec`); each range's ends and each choice are loaded into the base run's config."""
    if not isinstance(raw, dict):
        raise _spec_error("sweep", f"must be a mapping with space, trials, objective, ...; got {raw!r}")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise _spec_error(
                f"sweep.{key}", f"is unknown{did_you_mean(key, SWEEP_KEYS)}; the fields: {', '.join(SWEEP_KEYS)}"
            )
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise _spec_error(
            "sweep.space",
            "must map dotted config fields to ranges, e.g. {train.lr: {low: 1.0e-4, "
            f"high: 1.0e-2, log: true}}; got {space!r}",
        )
    base = raw.get("from", spec.baseline)
    if base not in spec.runs:
        raise _spec_error(
            "sweep.from", f"{base!r} is not a run{did_you_mean(base, spec.runs)}; the runs: {', '.join(spec.runs)}"
        )
    config, overrides = spec.runs[base]
    ranges = {}
    for field, entry in space.items():
        if not isinstance(field, str) or field.split(".")[0] == "seed":
            raise _spec_error(f"sweep.space: {field!r}", "must be a dotted config field other than seed")
        ranges[field] = _range(field, entry)
        r = ranges[field]
        for value in r["choices"] if "choices" in r else (r["low"], r["high"]):
            try:
                run_config(config, [*overrides, override(field, value)], spec.seeds[0])
            except ConfigError as e:
                raise _spec_error(f"sweep.space.{field}:", str(e)) from None
    objective = raw.get("objective", spec.metrics[0])
    if objective not in METRICS:
        raise _spec_error(
            "sweep.objective",
            f"{objective!r} is not a metric{did_you_mean(objective, METRICS)}; the metrics: {', '.join(METRICS)}",
        )
    direction = raw.get("direction", "maximize" if METRICS[objective][0] else "minimize")
    if direction not in _DIRECTIONS:
        raise _spec_error("sweep.direction", f"must be maximize or minimize, got {direction!r}")
    trials = raw.get("trials", 20)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise _spec_error("sweep.trials", f"must be a positive integer, got {trials!r}")
    seeds = raw.get("seeds", spec.seeds[:1])
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 or s > 2**32 - 1 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise _spec_error("sweep.seeds", f"must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    sampler_seed = raw.get("sampler_seed", 0)
    if isinstance(sampler_seed, bool) or not isinstance(sampler_seed, int) or sampler_seed < 0:
        raise _spec_error("sweep.sampler_seed", f"must be an integer >= 0, got {sampler_seed!r}")
    storage = raw.get("storage")
    if storage is not None and (not isinstance(storage, str) or "://" not in storage):
        raise _spec_error("sweep.storage", f"must be a database URL such as sqlite:///optuna.db, got {storage!r}")
    study = raw.get("study")
    if study is not None and (not isinstance(study, str) or not study):
        raise _spec_error("sweep.study", f"must be a non-empty string, got {study!r}")
    name = raw.get("name", "best")
    if not isinstance(name, str) or not _NAME.match(name) or name in spec.runs:
        raise _spec_error("sweep.name", f"must be a folder-safe name that is not one of the runs, got {name!r}")
    return Sweep(
        ranges, base, objective, _DIRECTIONS[direction], trials, list(seeds), sampler_seed, storage, study, name
    )


def import_optuna():
    """optuna, or the one line that says how to install it."""
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"compare spec: sweep needs the optuna package ({INSTALL})") from None
    return optuna


def _suggest(trial, space: dict[str, dict]) -> dict:
    """The trial's value of each field (a non-scalar choice, a list say, is given to Optuna as its JSON text)."""
    params = {}
    for field, r in space.items():
        if "choices" in r:
            coded = [c if isinstance(c, _SCALAR) else json.dumps(c) for c in r["choices"]]
            pick = trial.suggest_categorical(field, coded)
            params[field] = r["choices"][coded.index(pick)]
        elif r["int"]:
            params[field] = trial.suggest_int(field, r["low"], r["high"], step=r["step"] or 1, log=r["log"])
        else:
            params[field] = trial.suggest_float(field, r["low"], r["high"], step=r["step"], log=r["log"])
    return params


def _home(trial) -> int:
    """The trial whose folders this one trains in: itself, or the interrupted trial it takes up again."""
    return trial.user_attrs.get("resumes", trial.number)


def _open_study(optuna, sweep: Sweep, spec, out_dir: Path):
    url = sweep.storage or f"sqlite:///{(out_dir / 'optuna.db').resolve()}"
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if url.startswith("sqlite") else {}
    import sqlalchemy  # optuna's own dependency

    for attempt in range(5):  # processes opening a new database together race to create its tables: try again
        try:
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, **kwargs)
            break
        except Exception as e:  # SQLAlchemy: a bad URL, a driver not installed, a server that cannot be reached
            if attempt == 4 or not isinstance(e, sqlalchemy.exc.DBAPIError):  # a race is the database's error
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                raise ConfigError(f"compare spec: sweep.storage {url!r} cannot be opened: {why}") from None
            time.sleep(0.5 * (attempt + 1))
    name = sweep.study or out_dir.resolve().name
    sampler = optuna.samplers.TPESampler(seed=sweep.sampler_seed)  # reseeded at each trial (run_sweep)
    study = optuna.create_study(
        storage=storage, study_name=name, direction=sweep.direction, sampler=sampler, load_if_exists=True
    )
    if study.direction.name.lower() != sweep.direction:
        raise ConfigError(
            f"compare spec: sweep.direction {sweep.direction!r} differs from the study {name!r} in "
            f"{url} ({study.direction.name.lower()}): give sweep.study another name"
        )
    config, overrides = spec.runs[sweep.base]
    made = {
        "space": sweep.space,
        "config": None if config is None else Path(config).name,  # the same spec read on another machine matches
        "overrides": overrides,
        "objective": sweep.objective,
        "seeds": sweep.seeds,
        "num_samples": spec.num_samples,
        "max_test": spec.max_test,
    }
    made = json.loads(json.dumps(made))
    saved = study.user_attrs.get("sweep")
    if saved is None:
        study.set_user_attr("sweep", made)
    elif saved != made:
        diff = ", ".join(k for k in made if saved.get(k) != made[k])
        raise ConfigError(
            f"compare spec: the study {name!r} in {url} was made by another sweep ({diff} differ): "
            "give sweep.study another name"
        )
    return study, url


def _take_up_interrupted(optuna, study, out_dir: Path) -> None:
    """Enqueue, with the same parameters, each trial that failed while training (killed, interrupted; not diverged)
    and has folders here, unless one is already taking it up: its next try resumes those folders."""
    state = optuna.trial.TrialState
    optuna.storages.fail_stale_trials(study)  # a killed process's trial: failed once its heartbeat is stale
    groups: dict[int, list] = {}
    for t in study.get_trials(deepcopy=False):
        groups.setdefault(_home(t), []).append(t)
    for home, trials in groups.items():
        last = max(trials, key=lambda t: t.number)
        if any(t.state != state.FAIL for t in trials) or "diverged" in last.user_attrs:
            continue
        if any((out_dir / "trials").glob(f"trial{home}-seed*")):
            study.enqueue_trial(last.params, user_attrs={"resumes": home})


def run_sweep(spec, out_dir: Path, *, workers: int, threads: int | None, progress: bool) -> tuple[dict, tuple]:
    """Top the study up to ``sweep.trials`` finished trials, each trained and evaluated by compare's jobs; return
    the sweep's report for compare.json and the best trial's (config, overrides, folder prefix)."""
    optuna = import_optuna()
    sweep: Sweep = spec.sweep
    config, base_overrides = spec.runs[sweep.base]
    metrics = list(dict.fromkeys([*spec.metrics, sweep.objective]))

    def objective(trial) -> float:
        # the sampler's draws seeded by the trial's number, unique in the study: processes sharing it (or a second
        # call) propose other points than each other's, and one process alone proposes the same ones every time
        trial.study.sampler = optuna.samplers.TPESampler(seed=(sweep.sampler_seed * 1_000_003 + trial.number) % 2**32)
        params = _suggest(trial, sweep.space)
        overrides = [*base_overrides, *(override(k, v) for k, v in params.items())]
        folders = [out_dir / "trials" / f"trial{_home(trial)}-seed{s}" for s in sweep.seeds]
        trial.set_user_attr("folders", [str(f.relative_to(out_dir)) for f in folders])
        jobs = [
            _job_tuple(config, overrides, s, f, metrics, spec, threads, progress)
            for s, f in zip(sweep.seeds, folders, strict=True)
        ]
        try:
            results = _run_jobs(jobs, workers, pool)
        except TrainingDiverged as e:
            trial.set_user_attr("diverged", str(e))
            raise
        values = [r[sweep.objective] for r in results]
        return sum(values) / len(values)

    (out_dir / "trials").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.callback(optuna.logging.set_verbosity, optuna.logging.get_verbosity())
        optuna.logging.set_verbosity(optuna.logging.INFO if progress else optuna.logging.WARNING)
        pool = None  # with workers, one pool of spawned processes for every trial's seeds
        if workers > 1:
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(sweep.seeds)), mp_context=context))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study, url = _open_study(optuna, sweep, spec, out_dir)
        done = optuna.trial.TrialState.COMPLETE
        finished = len(study.get_trials(deepcopy=False, states=(done,)))
        if finished < sweep.trials:
            _take_up_interrupted(optuna, study, out_dir)
        failed = 0  # diverged trials replaced by further ones, up to sweep.trials of them in one call
        while finished < sweep.trials and failed < sweep.trials:
            left = sweep.trials - finished
            study.optimize(
                objective,
                n_trials=left,
                catch=(TrainingDiverged,),
                callbacks=[optuna.study.MaxTrialsCallback(sweep.trials, states=(done,))],
            )
            now = len(study.get_trials(deepcopy=False, states=(done,)))
            failed += max(0, left - (now - finished))
            finished = now
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not finished:
        raise PplVaeError(f"sweep: none of the {len(trials)} trials of the study {study.study_name!r} finished")
    best = study.best_trial
    params = {k: _decode(sweep.space[k], v) for k, v in best.params.items() if k in sweep.space}
    best_overrides = [*base_overrides, *(override(k, v) for k, v in params.items())]
    report = {
        "study": study.study_name,
        "storage": url,
        "objective": sweep.objective,
        "direction": sweep.direction,
        "seeds": sweep.seeds,
        "name": sweep.name,
        "finished": len(finished),
        "best": {"number": best.number, "value": best.value, "params": params, "overrides": best_overrides},
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
                "params": {k: _decode(sweep.space[k], v) for k, v in t.params.items() if k in sweep.space},
                **({"resumes": t.user_attrs["resumes"]} if "resumes" in t.user_attrs else {}),
                **({"diverged": t.user_attrs["diverged"]} if "diverged" in t.user_attrs else {}),
            }
            for t in trials
        ],
    }
    return report, (config, best_overrides, Path("trials") / f"trial{_home(best)}")


def _decode(r: dict, value):
    """A stored parameter's value as the config takes it (a non-scalar choice back from its JSON text)."""
    if "choices" in r and isinstance(value, str):
        for c in r["choices"]:
            if not isinstance(c, _SCALAR) and json.dumps(c) == value:
                return c
    return value
