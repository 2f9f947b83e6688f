"""`ppl-vae compare` (issue 38): runs over seeds give the numbers of runs trained by hand, a second compare trains
nothing, a killed compare resumes, the paired statistics are the hand computation, a bad spec is one line."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

import ppl_vae.compare as cmp
import ppl_vae.compare._core as core
from ppl_vae.cli import main
from ppl_vae.config.sections import load_config
from ppl_vae.errors import ConfigError, RunFolderError
from ppl_vae.experiment import run_experiment

TINY = ["model.hidden=[16]", "train.epochs=2", "data.limit=300"]
SPEC = {
    "runs": {
        "small": {"config": "vae_digits", "overrides": [*TINY, "model.latent_dim=2"]},
        "large": {"config": "vae_digits", "overrides": [*TINY, "model.latent_dim=4"]},
    },
    "seeds": [0, 1, 2],
    "baseline": "small",
    "metrics": ["test_elbo", "log_likelihood", "seconds_per_epoch"],
    "num_samples": 5,
    "max_test": 50,
}


class Calls:
    """``run_experiment`` of ppl_vae.compare, recording (folder name, resume) of every call."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, bool]] = []
        monkeypatch.setattr(core, "run_experiment", self)

    def __call__(self, cfg, run_dir, **kwargs):
        self.calls.append((Path(run_dir).name, kwargs.get("resume", False)))
        return run_experiment(cfg, run_dir, **kwargs)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        calls = Calls(mp)
        result = cmp.compare(SPEC, out)
    return out, result, calls.calls


def test_compare_trains_each_run_and_seed_once_and_writes_the_table_and_figure(compared):
    out, result, calls = compared
    assert sorted(calls) == sorted((f"{r}-seed{s}", False) for r in ("small", "large") for s in (0, 1, 2))
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(result))
    for name in ("compare.md", "compare.csv", "compare.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "compare.csv").read_text().splitlines()))
    assert [(r["metric"], r["run"]) for r in rows] == [(m, r) for m in SPEC["metrics"] for r in ("small", "large")]
    ll = result["metrics"]["log_likelihood"]["runs"]["large"]
    assert all(0 <= se < 5 for se in ll["mc_se"].values())  # the Monte Carlo s.e. of each seed's estimate
    assert all(v > 0 for v in result["metrics"]["seconds_per_epoch"]["runs"]["small"]["values"].values())


def test_compare_gives_the_numbers_of_runs_trained_by_hand(compared, tmp_path):
    _, result, _ = compared
    for name, entry in SPEC["runs"].items():
        for seed in SPEC["seeds"]:
            cfg = load_config(entry["config"], [*entry["overrides"], f"seed={seed}"])
            run = run_experiment(cfg, tmp_path / f"{name}-{seed}", progress=False, figures=False)
            by_hand = json.loads((run.run_dir / "metrics.json").read_text())["test_elbo"]
            assert result["metrics"]["test_elbo"]["runs"][name]["values"][str(seed)] == by_hand, (name, seed)


def test_the_paired_statistics_are_the_hand_computation(compared):
    out, result, _ = compared
    for metric, higher in (("test_elbo", True), ("log_likelihood", True), ("seconds_per_epoch", False)):
        runs = result["metrics"][metric]["runs"]
        base = np.array([runs["small"]["values"][str(s)] for s in SPEC["seeds"]])
        other = np.array([runs["large"]["values"][str(s)] for s in SPEC["seeds"]])
        d = other - base
        paired = runs["large"]["paired"]
        assert paired["mean"] == pytest.approx(d.mean(), rel=1e-12)
        assert paired["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(3), rel=1e-12)
        assert paired["ahead"] == int(((d > 0) if higher else (d < 0)).sum())
        assert paired["ahead"] + paired["baseline_ahead"] == 3
        assert runs["small"]["se"] == pytest.approx(base.std(ddof=1) / math.sqrt(3), rel=1e-12)
        assert "paired" not in runs["small"]
    md = (out / "compare.md").read_text()
    p = result["metrics"]["test_elbo"]["runs"]["large"]["paired"]
    assert "| test_elbo | large | " in md and f"{p['mean']:.4g} ± {p['se']:.2g} | {p['ahead']}/3 |" in md


def test_a_second_compare_trains_and_evaluates_nothing(compared, monkeypatch):
    out, result, _ = compared
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/*.json")}
    calls = Calls(monkeypatch)
    monkeypatch.setattr(core, "load_run", lambda *a, **k: pytest.fail("a run was evaluated again"))
    again = cmp.compare(SPEC, out)
    assert calls.calls == []
    assert again["metrics"] == result["metrics"]
    assert {p: p.stat().st_mtime_ns for p in stamps if p.name != core.RESULT_FILE} == {
        p: t for p, t in stamps.items() if p.name != core.RESULT_FILE
    }


def test_a_killed_compare_resumes_its_unfinished_run(compared, tmp_path, monkeypatch):
    _, result, _ = compared
    spec = {**SPEC, "runs": {"small": SPEC["runs"]["small"]}, "seeds": [0], "metrics": ["test_elbo"]}
    folder = tmp_path / "runs" / "small-seed0"
    cfg = load_config("vae_digits", [*SPEC["runs"]["small"]["overrides"], "seed=0", "train.epochs=1"])
    run_experiment(cfg, folder, progress=False, figures=False)
    (folder / "metrics.json").unlink()  # killed after its first epoch's checkpoint, before the run finished
    first_epoch = (folder / "metrics.jsonl").read_text().splitlines()
    calls = Calls(monkeypatch)
    resumed = cmp.compare(spec, tmp_path)
    assert calls.calls == [("small-seed0", True)]
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[:1] == first_epoch  # the first epoch was kept, not trained again
    assert json.loads((folder / "metrics.json").read_text())["epochs_run"] == 2
    value = resumed["metrics"]["test_elbo"]["runs"]["small"]["values"]["0"]
    assert value == result["metrics"]["test_elbo"]["runs"]["small"]["values"]["0"]  # as if never killed


def test_a_finished_run_of_another_configuration_is_refused(compared):
    out, _, _ = compared
    spec = {**SPEC, "runs": {"small": {"config": "vae_digits", "overrides": [*TINY, "train.lr=0.01"]}}}
    with pytest.raises(RunFolderError, match=r"small-seed0.*another configuration \(train.lr differ"):
        cmp.compare(spec, out)


def test_workers_run_jobs_in_spawned_processes_with_the_same_numbers(compared, tmp_path):
    _, result, _ = compared
    spec = {**SPEC, "seeds": [1], "metrics": ["test_elbo"]}
    parallel = cmp.compare(spec, tmp_path, workers=2)
    for name in ("small", "large"):
        got = parallel["metrics"]["test_elbo"]["runs"][name]["values"]["1"]
        assert got == pytest.approx(result["metrics"]["test_elbo"]["runs"][name]["values"]["1"], rel=1e-5)
        assert "threads: 1" in (tmp_path / "runs" / f"{name}-seed1" / "config.yaml").read_text()


BAD = [
    ({"baseline": "smal"}, "baseline 'smal' is not a run (did you mean 'small'?)"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"metrics": ["test_elb"]}, "metrics 'test_elb' is not a metric (did you mean 'test_elbo'?)"),
    (
        {"runs": {"small": {"config": "vae_digits", "overrides": ["model.latent_dim=-3"]}}},
        "runs.small: model.latent_dim",
    ),
    ({"runs": {"small": {"overrides": ["seed=4"]}}}, "runs.small.overrides must not set seed"),
    ({"seed": [0]}, "field 'seed' is unknown (did you mean 'seeds'"),
    ({"num_samples": 0}, "num_samples must be a positive integer"),
    ({"metrics": ["coherence"]}, "metrics 'coherence' is not defined for run 'large', a unimodal run"),
    ({"overrides": "train.epochs=1"}, "overrides must be a list of dotted overrides"),
    ({"overrides": ["seed=3"]}, "overrides must not set seed"),
    ({"overrides": ["train.epochz=1"]}, "overrides (with run large's config): unknown field 'train.epochz'"),
]


@pytest.mark.parametrize(("change", "said"), BAD, ids=[b[1].split()[0] for b in BAD])
def test_a_bad_spec_is_one_line_naming_the_field(tmp_path, capsys, change, said):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **change}))
    assert main(["compare", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ppl-vae: error: ConfigError: compare spec: ")
    assert said in err and "unexpected" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_cli_writes_the_table_beside_the_spec(compared, tmp_path, capsys):
    out, result, _ = compared
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "runs": {"small": SPEC["runs"]["small"]}, "seeds": [0]}))
    (tmp_path / "study").mkdir()
    os.symlink(out / "runs", tmp_path / "study" / "runs")  # the runs are finished: nothing trains
    assert main(["compare", str(spec)]) == 0
    shown = capsys.readouterr()
    assert shown.out == (tmp_path / "study" / "compare.md").read_text()
    assert "| test_elbo | small |" in shown.out and "wrote " in shown.err


def test_the_code_metrics_are_those_of_the_run_evaluated_by_hand(compared, monkeypatch):
    """probe accuracy, active units, I(x; z) and KL: a second compare asking for them trains nothing and gives
    latent_metrics of each finished run on its first max_test test images."""
    from ppl_vae.experiment import latent_metrics, load_run

    out, result, _ = compared
    monkeypatch.setattr(core, "run_experiment", lambda *a, **k: pytest.fail("a finished run was trained again"))
    code = ["probe_accuracy", "active_units", "mutual_information", "kl"]
    again = cmp.compare({**SPEC, "metrics": code}, out)
    run = load_run(out / "runs" / "large-seed1")
    x, y = run.data.test_x[: SPEC["max_test"]], run.data.test_y[: SPEC["max_test"]]
    by_hand = latent_metrics(run, x, y)
    got = {m: again["metrics"][m]["runs"]["large"]["values"]["1"] for m in code}
    assert got == {
        "probe_accuracy": by_hand["probe_accuracy"],
        "active_units": sum(by_hand["active_units"].values()),
        "mutual_information": by_hand["mutual_information"],
        "kl": by_hand["kl_total"],
    }
    assert again["metrics"]["kl"]["higher_is_better"] is False and 0 < got["probe_accuracy"] <= 1


def test_the_spec_overrides_reach_every_run_before_its_own(tmp_path):
    spec = cmp.load_spec({**SPEC, "overrides": ["train.epochs=1", "model.latent_dim=3"]})
    assert spec.runs["small"] == ("vae_digits", ["train.epochs=1", "model.latent_dim=3", *TINY, "model.latent_dim=2"])
    cfg = core.run_config(*spec.runs["large"], seed=1)
    assert (cfg.train.epochs, cfg.model.latent_dim, cfg.seed) == (2, 4, 1)  # the run's own override wins


def test_fid_is_the_distance_of_the_runs_prior_samples_computed_by_hand(compared, monkeypatch):
    """A second compare asking for fid trains nothing; its value is FrechetDistance of sample_run(run, max_test,
    seed 0) against the first max_test test images, in the classifier features cached in the compare's folder."""
    from ppl_vae.evaluate import FrechetDistance, get_feature_extractor
    from ppl_vae.experiment import load_run, sample_run

    out, result, _ = compared
    monkeypatch.setattr(core, "run_experiment", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = cmp.compare({**SPEC, "metrics": ["fid"]}, out)
    run = load_run(out / "runs" / "small-seed2")
    extractor = get_feature_extractor("classifier", run.data, cache_dir=out / core.FID_CACHE)
    real = run.data.test_x[: SPEC["max_test"]]
    by_hand = FrechetDistance(extractor, real).score(sample_run(run, len(real), seed=0).reshape(real.shape))
    assert again["metrics"]["fid"]["runs"]["small"]["values"]["2"] == pytest.approx(by_hand.value, rel=1e-6)
    assert again["metrics"]["fid"]["higher_is_better"] is False and by_hand.value > 0
    assert len(list((out / core.FID_CACHE).iterdir())) >= 1  # one classifier, trained once and shared


def test_a_multimodal_compare_reports_coherence_and_the_joint_probe(tmp_path):
    from ppl_vae.evaluate import multimodal_summary
    from ppl_vae.experiment import load_run

    tiny = ["data.name=digits", "train.epochs=1", "model.hidden=[16]", "model.latent_dim=4", "data.limit=200"]
    spec = {
        "runs": {"mopoe": {"config": "mopoe_polyfashion", "overrides": tiny}},
        "seeds": [0],
        "metrics": ["coherence", "probe_accuracy"],
        "max_test": 40,
    }
    result = cmp.compare(spec, tmp_path)
    run = load_run(tmp_path / "runs" / "mopoe-seed0")
    s = multimodal_summary(run.model, run.data, num_samples=0, max_test=40)
    assert result["metrics"]["coherence"]["runs"]["mopoe"]["values"]["0"] == s["coherence"]["cross_mean"]
    assert result["metrics"]["probe_accuracy"]["runs"]["mopoe"]["values"]["0"] == s["probe_acc"]["joint"]
    with pytest.raises(ConfigError, match="'kl' is not defined for run 'mopoe', a multimodal run"):
        cmp.load_spec({**spec, "metrics": ["kl"]})
    with pytest.raises(ConfigError, match="'fid' is not defined for run 'mopoe', a multimodal run"):
        cmp.load_spec({**spec, "metrics": ["fid"]})


@pytest.mark.parametrize(
    "names", [["small", "large"], [f"{a}layer_{o}" for a in (1, 2) for o in ("vae", "iwae5", "iwae50", "dreg50")]]
)
def test_the_figure_s_run_names_do_not_overlap(tmp_path, names):
    """Eight runs with long names (bench/iwae_fashion's spec) once printed on top of each other: labels side by side
    must not overlap; slanted ones must lie at least a line height apart across their slant."""
    runs = {n: {"values": {"0": float(i)}, "mean": float(i), "se": None} for i, n in enumerate(names)}
    result = {"seeds": [0], "metrics": {m: {"runs": runs, "higher_is_better": True} for m in ("a", "b")}}
    fig = core._figure(result, tmp_path / "compare.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    for ax in fig.axes:
        labels = ax.get_xticklabels()
        assert [t.get_text() for t in labels] == names
        angle = math.radians(labels[0].get_rotation())
        if angle == 0:
            boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
            assert all(a.x1 <= b.x0 + 1 for a, b in zip(boxes, boxes[1:], strict=False)), [b.x0 for b in boxes]
        else:
            xs = ax.transData.transform([(i, 0) for i in range(len(names))])[:, 0]
            line = labels[0].get_fontsize() * fig.dpi / 72
            assert min(np.diff(xs)) * math.sin(angle) >= line, (min(np.diff(xs)), line)
