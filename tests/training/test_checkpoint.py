"""Checkpoints load without running code from the file: only tensors, numbers, containers, Pyro's constraints and
NumPy's RNG state are unpickled unless the caller says it trusts the file."""

from __future__ import annotations

import fractions
import pathlib

import pytest

from ppl_vae.errors import CheckpointError
from ppl_vae.training.checkpoint import atomic_save, load_checkpoint


class _TouchesAFile:
    """Unpickling this object creates a file: what a malicious checkpoint would do (with a worse call)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_a_checkpoint_with_code_in_it_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    atomic_save({"param_store": {}, "payload": _TouchesAFile(marker)}, path)
    with pytest.raises(CheckpointError, match=r"holds Python objects .*could run code.*trusted=True"):
        load_checkpoint(path)
    assert not marker.exists()


def test_other_objects_load_only_when_trusted(tmp_path):
    path = tmp_path / "fraction.pt"
    atomic_save({"param_store": {}, "share": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match=r"fractions.Fraction"):
        load_checkpoint(path)
    assert load_checkpoint(path, trusted=True)["share"] == fractions.Fraction(1, 3)


def test_a_run_checkpoint_of_release_0_1_loads_safely():
    ck = load_checkpoint(pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "run_0_1" / "checkpoint.pt")
    assert ck["epoch"] == 2 and ck["param_store"]["params"] and ck["rng"]["numpy"][0] == "MT19937"


def test_the_cli_reads_an_older_pickled_checkpoint_only_when_told_to(tmp_path, capsys):
    import torch

    from ppl_vae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "train.epochs=1", "model.hidden=[16]", "--no-progress"]) == 0
    ck = torch.load(run / "best.pt", weights_only=False)
    ck["share"] = fractions.Fraction(1, 3)  # an object only unpickling can rebuild, as older releases wrote
    atomic_save(ck, run / "best.pt")
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "4"]) == 2  # a refused input: exit 2, one line
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["sample", str(run), "--n", "4", "--trust-pickle"]) == 0
