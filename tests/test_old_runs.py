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


VAE2_RUN = Path(__file__).resolve().parent / "fixtures" / "run_vae2_0_1"  # made by commit 812ac61, before vae2
# became the two-layer hvae: `ppl-vae train model.name=vae2 model.arch=mlp model.hidden=[16] model.latent_dim=2
# train.epochs=2 data.pixels=binary_static eval.num_samples=10` (three_epochs.jsonl: the same with train.epochs=3)


def test_a_vae2_run_of_the_earlier_class_loads_with_its_parameter_names_mapped(tmp_path):
    run_dir = Path(shutil.copytree(VAE2_RUN, tmp_path / "run"))
    recorded = json.loads((run_dir / "metrics.json").read_text())
    run = load_run(run_dir)
    assert type(run.model).__name__ == "VAE2" and run.model.layers == 2
    assert run_test_elbo(run) == pytest.approx(recorded["test_elbo"], abs=1e-6)
    # resumed by today's code, the run goes on as the earlier code's three-epoch run did
    assert main(["train", "--resume", str(run_dir), "train.epochs=3", "--no-figures", "--no-progress"]) == 0
    got = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (run_dir / "three_epochs.jsonl").read_text().splitlines()]
    # float32 training: another CPU's kernels sum in another order (seen: 1.9e-7 of 42 nats, 4.5e-9 relative, on
    # the resumed epoch); a wrongly mapped parameter or optimiser state moves these by whole nats
    assert [r["train_elbo"] for r in got] == pytest.approx([r["train_elbo"] for r in want], rel=1e-6)
    assert [r["val_elbo"] for r in got] == pytest.approx([r["val_elbo"] for r in want], rel=1e-6)
