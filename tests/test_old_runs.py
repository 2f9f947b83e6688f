"""A run folder written by ppl-vae 0.1 (before the package was grouped by role; tests/fixtures/run_0_1, made with
`ppl-vae train train.epochs=2 model.hidden=[16]` at commit acd0fea) still loads, evaluates to the test ELBO it
recorded, and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ppl_vae import load_run
from ppl_vae.cli import main
from ppl_vae.experiment import test_elbo as run_test_elbo

OLD = Path(__file__).resolve().parent / "fixtures" / "run_0_1"


@pytest.fixture
def old_run(tmp_path):
    return Path(shutil.copytree(OLD, tmp_path / "run"))


def test_an_old_run_loads_and_reproduces_its_test_elbo(old_run):
    recorded = json.loads((old_run / "metrics.json").read_text())
    run = load_run(old_run)
    assert run_test_elbo(run) == pytest.approx(recorded["test_elbo"], abs=1e-6)


def test_an_old_run_resumes(old_run):
    assert main(["train", "--resume", str(old_run), "train.epochs=3", "--no-figures"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
