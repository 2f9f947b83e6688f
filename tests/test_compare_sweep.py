"""`ppl-vae compare` with a `sweep:` section (issue 38): the best trial is the study's, a second call tops the same
study up without retraining a finished trial, an interrupted trial resumes, the best's paired comparison to the
baseline is the hand computation, a bad sweep is one line, and so is a missing optuna."""

import json
import math
import multiprocessing
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import yaml
from test_compare import TINY, Calls

import ppl_vae.compare as cmp
import ppl_vae.compare._core as core
from ppl_vae.cli import main
from ppl_vae.errors import ConfigError, TrainingDiverged
from ppl_vae.experiment import run_experiment

try:
    import optuna
except ImportError:  # the sweeps' tests are skipped; the refusals (before optuna is imported) still run
    optuna = None
needs_optuna = pytest.mark.skipif(optuna is None, reason="optuna is not installed (pip install 'ppl-vae[sweep]')")

SPACE = {
    "model.latent_dim": {"low": 2, "high": 4},
    "train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
    "model.hidden": {"choices": [[16], [8, 8]]},
}
SPEC = {
    "runs": {"small": {"config": "vae_digits", "overrides": [*TINY, "model.latent_dim=2"]}},
    "seeds": [0, 1],
    "metrics": ["test_elbo"],
    "sweep": {"space": SPACE, "trials": 3, "seeds": [0], "sampler_seed": 0},
}


def _study(out):
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'optuna.db'}")


def _stamps(out):
    return {p: p.stat().st_mtime_ns for p in out.glob("*/*/metrics.json")}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        calls = Calls(mp)
        result = cmp.compare(SPEC, out)
    return out, result, calls.calls


@needs_optuna
def test_the_best_trial_is_the_best_of_the_study_and_its_values_are_the_runs(swept):
    out, result, _ = swept
    study = _study(out)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 3 == result["sweep"]["finished"]
    best = max(done, key=lambda t: t.value)
    report = result["sweep"]["best"]
    assert (report["number"], report["value"]) == (best.number, best.value)
    for t in done:  # a trial's value: the test ELBO of its run (one sweep seed)
        folder = out / "trials" / f"trial{t.number}-seed0"
        assert t.value == json.loads((folder / "metrics.json").read_text())["test_elbo"]
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["model"]["latent_dim"] == t.params["model.latent_dim"]
        assert saved["model"]["hidden"] == json.loads(t.params["model.hidden"])  # a list choice: its JSON text
        assert saved["train"]["lr"] == pytest.approx(t.params["train.lr"], rel=1e-12)
    assert report["params"]["model.hidden"] == json.loads(best.params["model.hidden"])
    assert f"model.latent_dim={best.params['model.latent_dim']}" in report["overrides"]
    assert f"Best: trial {best.number}, {best.value:.4g}" in (out / "compare.md").read_text()


@needs_optuna
def test_the_best_against_the_baseline_is_the_paired_hand_computation(swept):
    out, result, calls = swept
    runs = result["metrics"]["test_elbo"]["runs"]
    assert list(runs) == ["small", "best"]
    n = result["sweep"]["best"]["number"]
    assert runs["best"]["values"]["0"] == result["sweep"]["best"]["value"]  # seed 0: the trial's own run
    assert sorted(c[0] for c in calls) == sorted(
        [f"trial{k}-seed0" for k in range(3)] + [f"trial{n}-seed1", "small-seed0", "small-seed1"]
    )  # each run trained once: the best's seed-0 run was not trained again
    seed1 = json.loads((out / "trials" / f"trial{n}-seed1" / "metrics.json").read_text())["test_elbo"]
    base = np.array(
        [json.loads((out / "runs" / f"small-seed{s}" / "metrics.json").read_text())["test_elbo"] for s in (0, 1)]
    )
    d = np.array([result["sweep"]["best"]["value"], seed1]) - base
    paired = runs["best"]["paired"]
    assert paired["mean"] == pytest.approx(d.mean(), rel=1e-12)
    assert paired["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(2), rel=1e-12)
    assert (paired["ahead"], paired["baseline_ahead"]) == (int((d > 0).sum()), int((d < 0).sum()))
    assert "| test_elbo | best | " in (out / "compare.md").read_text()
    assert (
        json.loads((out / "compare.json").read_text())["runs"]["best"]["overrides"]
        == result["sweep"]["best"]["overrides"]
    )


@needs_optuna
def test_a_second_call_tops_the_same_study_up_and_retrains_nothing_finished(swept, tmp_path, monkeypatch):
    out, result, _ = swept
    out = shutil.copytree(out, tmp_path / out.name)  # its own copy of the study (optuna.db) and of the runs
    stamps = _stamps(out)
    calls = Calls(monkeypatch)
    more = cmp.compare({**SPEC, "sweep": {**SPEC["sweep"], "trials": 5}}, out)
    study = _study(out)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4] and more["sweep"]["finished"] == 5
    assert {t.number: t.value for t in study.trials[:3]} == {t["number"]: t["value"] for t in result["sweep"]["trials"]}
    assert {p: _stamps(out)[p] for p in stamps} == stamps  # the first call's runs were left alone
    new = {c[0] for c in calls.calls}
    assert {"trial3-seed0", "trial4-seed0"} <= new and not new & {p.parent.name for p in stamps}
    assert more["sweep"]["best"]["value"] == max(t.value for t in study.trials)
    calls.calls.clear()
    again = cmp.compare({**SPEC, "sweep": {**SPEC["sweep"], "trials": 5}}, out)
    assert calls.calls == [] and len(_study(out).trials) == 5 and again["metrics"] == more["metrics"]


@needs_optuna
def test_a_study_made_by_another_sweep_is_refused_in_one_line(swept, tmp_path):
    out = shutil.copytree(swept[0], tmp_path / swept[0].name)
    other = {**SPEC, "sweep": {**SPEC["sweep"], "space": {"train.lr": SPACE["train.lr"]}}}
    with pytest.raises(
        ConfigError, match=r"the study 'study\d*' in sqlite:///.* was made by another sweep \(space differ"
    ):
        cmp.compare(other, out)
    with pytest.raises(ConfigError, match=r"sweep.direction 'minimize' differs from the study"):
        cmp.compare({**SPEC, "sweep": {**SPEC["sweep"], "direction": "minimize"}}, out)


@needs_optuna
def test_an_interrupted_trial_is_resumed_with_its_parameters_by_the_next_call(tmp_path, monkeypatch):
    spec = {
        **SPEC,
        "seeds": [0],
        "sweep": {**SPEC["sweep"], "trials": 1, "study": "s", "storage": "sqlite:///" + str(tmp_path / "shared.db")},
    }
    folder = tmp_path / "out" / "trials" / "trial0-seed0"

    def killed(cfg, run_dir, **kwargs):  # trains one epoch of two, then the process is interrupted
        cfg.train.epochs = 1
        run_experiment(cfg, run_dir, **kwargs)
        (folder / "metrics.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(core, "run_experiment", killed)
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(spec, tmp_path / "out")
    calls = Calls(monkeypatch)
    result = cmp.compare(spec, tmp_path / "out")
    assert calls.calls[0] == ("trial0-seed0", True)
    study = optuna.load_study(study_name="s", storage=spec["sweep"]["storage"])
    first, second = study.trials
    assert (first.state.name, second.state.name, second.user_attrs["resumes"]) == ("FAIL", "COMPLETE", 0)
    assert second.params == first.params and result["sweep"]["best"]["number"] == 1
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2  # epoch 1 kept, epoch 2 resumed
    assert not (tmp_path / "out" / "trials" / "trial1-seed0").exists()


@needs_optuna
def test_two_processes_with_one_storage_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    spec = {**SPEC, "seeds": [0], "sweep": {**SPEC["sweep"], "trials": 4, "study": "s", "storage": storage}}
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(cmp.compare, [spec, spec], [tmp_path / "a", tmp_path / "b"]))
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert all(t.state.name == "COMPLETE" for t in trials) and 4 <= len(trials) <= 5  # one more at most in flight
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == len(points)  # the processes did not propose each other's points
    where = {
        t.number: [d for d in "ab" if (tmp_path / d / "trials" / f"trial{t.number}-seed0").is_dir()] for t in trials
    }
    best = {r["sweep"]["best"]["number"] for r in done}  # run on the spec's seeds by each process where it is not
    assert all(len(w) == 1 or (n in best and len(w) == 2) for n, w in where.items()), where  # trained by one of them
    assert max(r["sweep"]["finished"] for r in done) == len(trials)


@needs_optuna
def test_a_diverged_trial_fails_and_the_search_goes_on(tmp_path, monkeypatch):
    spec = {**SPEC, "seeds": [0], "sweep": {**SPEC["sweep"], "trials": 2}}
    calls = Calls(monkeypatch)
    train = core.run_experiment

    def diverging(cfg, run_dir, **kwargs):
        if run_dir.name == "trial0-seed0":
            raise TrainingDiverged("the loss is nan at epoch 1, step 3")
        return train(cfg, run_dir, **kwargs)

    monkeypatch.setattr(core, "run_experiment", diverging)
    result = cmp.compare(spec, tmp_path / "out")
    states = [(t["number"], t["state"]) for t in result["sweep"]["trials"]]
    assert states == [(0, "FAIL"), (1, "COMPLETE"), (2, "COMPLETE")] and result["sweep"]["finished"] == 2
    assert "nan at epoch 1" in result["sweep"]["trials"][0]["diverged"] and result["sweep"]["best"]["number"] != 0
    calls.calls.clear()
    cmp.compare({**spec, "sweep": {**spec["sweep"], "trials": 3}}, tmp_path / "out")
    assert [c[0] for c in calls.calls] == ["trial3-seed0"]  # the diverged trial is not taken up again


BAD = [
    ({"space": {"train.lrr": {"low": 0.001, "high": 0.01}}}, "sweep.space.train.lrr: unknown field 'train.lrr' (did"),
    ({"space": {"train.lr": {"low": 0.01, "high": 0.01}}}, "sweep.space.train.lr the range [0.01, 0.01] is empty"),
    ({"space": {"train.lr": {"low": 0.1, "high": 0.01}}}, "sweep.space.train.lr low 0.1 is above high 0.01"),
    ({"space": {"train.lr": {"low": 0.0, "high": 0.01, "log": True}}}, "sweep.space.train.lr log: true needs low > 0"),
    ({"space": {"model.hidden": {"choices": []}}}, "sweep.space.model.hidden.choices must be a non-empty list"),
    ({"space": {"model.latent_dim": {"low": 0, "high": 3}}}, "sweep.space.model.latent_dim: model.latent_dim must"),
    ({"direction": "up"}, "sweep.direction must be maximize or minimize, got 'up'"),
    ({"trials": 0}, "sweep.trials must be a positive integer, got 0"),
    ({"trails": 4}, "sweep.trails is unknown (did you mean 'trials'?)"),
    ({"objective": "test_elb"}, "sweep.objective 'test_elb' is not a metric (did you mean 'test_elbo'?)"),
    ({"name": "small"}, "sweep.name must be a folder-safe name that is not one of the runs"),
]


def _cli(tmp_path, capsys, sweep) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "sweep": sweep}))
    assert main(["compare", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ppl-vae: error: ConfigError: compare spec: ")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    return err


@pytest.mark.parametrize(("change", "said"), BAD, ids=[b[1].split()[0] + str(i) for i, b in enumerate(BAD)])
def test_a_bad_sweep_is_one_line_naming_the_field(tmp_path, capsys, change, said):
    err = _cli(tmp_path, capsys, {**SPEC["sweep"], **change})
    assert said in err and "unexpected" not in err


def test_without_optuna_a_sweep_says_which_extra_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    err = _cli(tmp_path, capsys, SPEC["sweep"])
    assert "sweep needs the optuna package (pip install 'ppl-vae[sweep]')" in err
