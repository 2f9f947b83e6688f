"""Changing course on --resume, and run folders that carry their own code (issue 33, items 2 and 3).

After a run diverges, its last good checkpoint resumes with a lower learning rate; every change of a field that
only says how the remaining epochs train is recorded (config.yaml ``resumes:``, the epoch records' lr), and fields
that would train another model stay refused. A config's ``imports:`` are found beside the config file, copied into
the run folder with their SHA-256, and a copy edited since the run was trained is refused."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ppl_vae.cli import main
from ppl_vae.config import load_config
from ppl_vae.errors import CheckpointError, ConfigError
from ppl_vae.experiment import load_run, run_experiment

FAST = ["model.hidden=[16]", "data.limit=300", "--no-progress", "--no-figures"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_a_resume_may_lower_the_learning_rate_and_the_run_records_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "train.epochs=2", *FAST]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.epochs=4", "train.lr=3e-4", *FAST]) == 0
    err = capsys.readouterr().err
    assert "resuming after epoch 2 with train.epochs 2 → 4, train.lr 0.001 → 0.0003" in err, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == pytest.approx(3e-4) and saved["train"]["epochs"] == 4
    assert saved["resumes"] == [{"after_epoch": 2, "changed": {"train.epochs": [2, 4], "train.lr": [0.001, 0.0003]}}]
    lrs = [r["lr"] for r in _records(run) if "lr" in r]
    assert lrs == pytest.approx([1e-3, 1e-3, 3e-4, 3e-4])  # each epoch's record says the rate it trained with
    # a second change is a second entry, relative to the settings the first one left
    assert main(["train", "--resume", str(run), "train.epochs=5", *FAST]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["resumes"][1] == {"after_epoch": 4, "changed": {"train.epochs": [4, 5]}}


def test_a_resume_that_would_train_another_model_is_still_refused_through_the_api(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, ["train.epochs=2", "model.hidden=[16]", "data.limit=300"])
    run_experiment(cfg, run, progress=False, figures=False)
    before = (run / "checkpoint.pt").read_bytes()
    cfg = load_config(run / "config.yaml", ["train.batch_size=50", "train.epochs=3"])
    with pytest.raises(ConfigError, match=r"train\.batch_size cannot change in a resumed run \(100 in the checkpoint"):
        run_experiment(cfg, run, resume=True, progress=False, figures=False)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_the_cli_allows_the_schedule_fields_and_names_the_rest(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "train.epochs=1", *FAST]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.objective=iwae", *FAST]) == 2
    err = capsys.readouterr().err
    assert "train.objective cannot change in a resumed run" in err and "train.lr" in err
    args = ["train.epochs=2", "train.lr_schedule=cosine", "train.kl_warmup_epochs=2", "train.patience=3"]
    assert main(["train", "--resume", str(run), *args, *FAST]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert set(saved["resumes"][0]["changed"]) == {
        "train.epochs",
        "train.lr_schedule",
        "train.kl_warmup_epochs",
        "train.patience",
    }
    assert [r["beta"] for r in _records(run) if "beta" in r][-1] == pytest.approx(1.0)  # warm-up of epoch 2 of 2


# ------------------------------------------------------------------------------------------- self-contained runs
METHOD = textwrap.dedent(
    """
    import dataclasses
    import ppl_vae

    @ppl_vae.register_model("kept_vae")
    def build(cfg, options, data_shape, num_data, num_classes):
        return ppl_vae.build_model(dataclasses.replace(cfg, name="vae"), data_shape, num_data)
    """
)


def _method_run(tmp_path) -> Path:
    """A config in its own folder importing a method file beside it (relative path), trained from elsewhere."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_method.py").write_text(METHOD)
    (project / "cfg.yaml").write_text(
        "imports: [my_method.py]\nmodel: {name: kept_vae, hidden: [16]}\ntrain: {epochs: 1}\ndata: {limit: 300}\n"
    )
    run = tmp_path / "runs" / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "ppl_vae", "train", str(project / "cfg.yaml"), "--run-dir", str(run), "--no-progress"]
        + ["--no-figures"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return run


def test_imports_are_found_beside_the_config_and_kept_in_the_run(tmp_path):
    run = _method_run(tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["imports"] == ["imports/my_method.py"]
    assert (run / "imports" / "my_method.py").read_text() == METHOD
    digest, name = (run / "imports" / "SHA256SUMS").read_text().split()
    assert name == "imports/my_method.py" and len(digest) == 64
    # the original can go: the run evaluates from any folder with its own copy
    (tmp_path / "project" / "my_method.py").unlink()
    out = subprocess.run(
        [sys.executable, "-m", "ppl_vae", "evaluate", str(run), "--num-samples", "0"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert f"the file {(run / 'imports' / 'my_method.py').resolve()}" in out.stderr


def test_an_import_edited_since_training_is_refused_on_resume_and_load(tmp_path, capsys):
    run = _method_run(tmp_path)
    kept = run / "imports" / "my_method.py"
    kept.write_text(METHOD + "\nprint('changed')\n")
    with pytest.raises(CheckpointError, match="changed since the run .* was trained.*sha256sum"):
        load_run(run)
    assert main(["train", "--resume", str(run), "train.epochs=2", "--no-progress", "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "changed since the run" in err and "changed" not in capsys.readouterr().out
    kept.write_text(METHOD)  # restored: the run loads again
    assert load_run(run).cfg.model.name == "kept_vae"
