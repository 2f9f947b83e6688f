"""Runs that cannot be lost or corrupted: run-folder ownership, safe resume, one clear line for every expected fault,
data checked before training, scientific notation in configs. Every case here failed before these changes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ppl_vae
from ppl_vae import ModelConfig, TrainConfig, build_model
from ppl_vae.cli import main
from ppl_vae.config import load_config, save_config
from ppl_vae.data import DataBundle
from ppl_vae.errors import CheckpointError, DataError, TrainingDiverged
from ppl_vae.training import checkpoint as ckpt_mod

REPO = Path(__file__).resolve().parents[2]
FAST = ["train.epochs=2", "model.hidden=[16]", "data.limit=300", "--no-progress", "--no-figures"]


def _train(tmp_path, *extra, name="run"):
    run = tmp_path / name
    assert main(["train", "--run-dir", str(run), *FAST, *extra]) == 0
    return run


def _one_line(capsys, *needles):
    """The error is one line; notes the run printed before it (``ppl-vae: resuming after epoch ...``) aside."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("ppl-vae: error") or not line.startswith("ppl-vae:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in err, err
    return err


# --------------------------------------------------------------------------------------------- run folders
def test_a_second_writer_of_a_run_folder_is_refused(tmp_path):
    run = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "ppl_vae",
        "train",
        "--run-dir",
        str(run),
        "train.epochs=200",
        "model.hidden=[16]",
        "--no-progress",
        "--no-figures",
    ]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):  # until the first process holds the lock
            if (run / ".lock").exists() and (run / ".lock").read_text().strip():
                break
            time.sleep(0.05)
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == first.pid
        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is being written by PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
        first.stderr.close()


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday"}))
    assert main(["train", "--run-dir", str(run), *FAST]) == 0


def test_an_existing_run_is_not_overwritten_without_overwrite(tmp_path, capsys):
    run = _train(tmp_path)
    before = (run / "checkpoint.pt").read_bytes()
    assert main(["train", "--run-dir", str(run), *FAST]) == 2
    _one_line(capsys, "holds a run already", "--resume", "--overwrite")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert main(["train", "--run-dir", str(run), *FAST, "--overwrite"]) == 0


def test_a_resume_with_a_conflicting_override_is_refused_before_anything_is_written(tmp_path, capsys):
    run = _train(tmp_path)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "model.latent_dim=4", "--no-progress"]) == 2
    _one_line(capsys, "model.latent_dim cannot change in a resumed run", "train.epochs")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    assert main(["evaluate", str(run), "--num-samples", "0"]) == 0  # the run is intact
    assert main(["train", "--resume", str(run), "train.epochs=3", "--no-progress", "--no-figures"]) == 0
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 3


def test_a_config_edited_to_another_shape_names_the_fields(tmp_path, capsys):
    run = _train(tmp_path)
    cfg = load_config(run / "config.yaml", ["model.latent_dim=4"])
    save_config(cfg, run / "config.yaml")
    assert main(["evaluate", str(run)]) == 2
    _one_line(capsys, "CheckpointError", "model.latent_dim: 2 in the checkpoint, 4 now")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    _one_line(capsys, "model.latent_dim: 2 in the checkpoint, 4 now")


@pytest.mark.parametrize("which,flag", [("best.pt", []), ("checkpoint.pt", ["--checkpoint", "last"])])
def test_a_truncated_checkpoint_is_one_line_naming_it(tmp_path, capsys, which, flag):
    run = _train(tmp_path)
    data = (run / which).read_bytes()
    (run / which).write_bytes(data[: len(data) // 3])
    assert main(["evaluate", str(run), *flag]) == 2
    other = "checkpoint.pt" if which == "best.pt" else "best.pt"
    _one_line(capsys, which, "damaged or truncated", other)


def test_a_read_only_folder_is_one_line(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits: /sys refuses everyone
        target = Path("/sys/ppl_vae_run")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "run"
    assert main(["train", "--run-dir", str(target), *FAST]) == 2
    _one_line(capsys, "PermissionError", "another --run-dir")


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    run = _train(tmp_path)
    before = (run / "checkpoint.pt").read_bytes()
    real = torch.save

    def full(obj, f, *a, **k):  # what torch's zip writer raises when the disk fills up
        real(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4096; file write failed")

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    assert main(["train", "--resume", str(run), "train.epochs=3", "--no-progress", "--no-figures"]) == 1
    _one_line(capsys, "CheckpointError", "checkpoint.pt", "the disk is full")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob("*.tmp"))


def test_a_config_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["train.epochs=7"]), path)
    before = path.read_text()

    def fail(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        save_config(load_config(None, ["train.epochs=9"]), path)
    assert path.read_text() == before and not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------------------------- flags and values
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--device", "banana"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'banana'"),
        (["evaluate", "RUN", "--num-samples", "-5"], "must be an integer >= 0, got -5"),
        (["evaluate", "RUN", "--max-test", "0"], "must be an integer >= 1, got 0"),
        (["sample", "RUN", "--n", "0"], "must be an integer >= 1, got 0"),
        (["diagnose", "RUN", "--num-samples", "1"], "must be an integer >= 2, got 1"),
    ],
)
def test_bad_flags_are_named(argv, needle, tmp_path, capsys):
    argv = [str(tmp_path / "r") if a == "RUN" else a for a in argv]
    if argv[0] == "train":
        argv += ["--run-dir", str(tmp_path / "r"), *FAST]
    with pytest.raises(SystemExit) if argv[0] != "train" else _nothing():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sample_into_an_existing_folder_is_one_line(tmp_path, capsys):
    run = _train(tmp_path)
    assert main(["sample", str(run), "--out", str(tmp_path)]) == 2
    _one_line(capsys, "is a folder", ".png")


def test_overrides_may_stand_after_flags_and_scientific_notation_is_a_number(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 1e-3\n  epochs: 1\nmodel:\n  hidden: [16]\ndata:\n  limit: 200\n")
    assert load_config(cfg).train.lr == 1e-3
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(cfg),
                "--no-progress",
                "train.lr=5e-4",
                "--run-dir",
                str(run),
                "--no-figures",
                "train.eval_batch_size=100",
            ]
        )
        == 0
    )
    saved = load_config(run / "config.yaml")
    assert saved.train.lr == 5e-4 and saved.train.eval_batch_size == 100


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import ppl_vae.experiment as ex

    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(ex, "build_data", boom)
    assert main(["train", "--run-dir", str(tmp_path / "r"), *FAST]) == 1
    _one_line(capsys, "unexpected KeyError", "--debug")
    with pytest.raises(KeyError):
        main(["--debug", "train", "--run-dir", str(tmp_path / "r"), *FAST])


# --------------------------------------------------------------------------------------------- the data
def _vae_and(data):
    return build_model(ModelConfig(name="vae", latent_dim=2, hidden=[8]), data.shape, num_data=len(data.train_x))


def test_pixels_out_of_range_for_a_bernoulli_likelihood_are_refused_before_any_update():
    x = torch.randint(0, 256, (40, 1, 4, 4)).float()  # 8-bit pixels, not in [0, 1]
    data = DataBundle.from_tensors(x)
    model = _vae_and(data)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(DataError, match=r"Bernoulli, which needs data in \[0, 1\].*\[0, 255\].*data.pixels"):
        ppl_vae.train(model, data, TrainConfig(epochs=1, batch_size=20), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False))


def test_a_nan_pixel_is_reported_as_data_not_as_the_learning_rate():
    x = torch.rand(40, 1, 4, 4)
    x[17, 0, 1, 2] = float("nan")
    data = DataBundle.from_tensors(x)
    with pytest.raises(DataError, match=r"data.train_x holds 1 non-finite value.*index 17"):
        ppl_vae.train(_vae_and(data), data, TrainConfig(epochs=1, batch_size=20), progress=False)


def test_a_finite_but_absurd_loss_stops_like_a_nan(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "r"), "train.lr=1000", *FAST]) == 1
    _one_line(capsys, "TrainingDiverged", "training diverged")


def test_a_huge_learning_rate_never_ends_in_success():
    """The default VAE on the digits with lr = 1000 used to finish with exit 0 and a test ELBO of −5e28."""
    data = ppl_vae.load_data("digits", limit=300)
    model = build_model(ModelConfig(), data.shape, num_data=len(data.train_x))
    with pytest.raises(TrainingDiverged, match="finite but absurd|nan|NaN|inf"):
        ppl_vae.train(model, data, TrainConfig(epochs=3, lr=1000.0), progress=False)


def test_a_checkpoint_of_another_shape_loaded_by_fit_names_the_tensors(tmp_path):
    data = DataBundle.from_tensors(torch.rand(40, 1, 4, 4))
    ppl_vae.train(_vae_and(data), data, TrainConfig(epochs=1, batch_size=20), run_dir=tmp_path, progress=False)
    other = build_model(ModelConfig(name="vae", latent_dim=3, hidden=[8]), data.shape, num_data=40)
    with pytest.raises(CheckpointError, match=r"another configuration.*shapes differ"):
        ppl_vae.train(other, data, TrainConfig(epochs=2, batch_size=20), run_dir=tmp_path, resume=True, progress=False)


def test_trace_iwae_names_a_bad_num_particles():
    from ppl_vae.infer import TraceIWAE
    from ppl_vae.infer.trace_checks import IWAEError

    for bad in ("abc", 0, 2.5, True, None):
        with pytest.raises(IWAEError, match=f"TraceIWAE num_particles must be a positive integer, got {bad!r}"):
            TraceIWAE(num_particles=bad)


def test_data_of_another_shape_than_the_model_is_named():
    data = DataBundle.from_tensors(torch.rand(40, 1, 6, 6))
    model = build_model(ModelConfig(name="vae", latent_dim=2, hidden=[8]), (1, 4, 4), num_data=40)
    with pytest.raises(DataError, match=r"cannot read a training batch of shape \(20, 1, 6, 6\).*built for other data"):
        ppl_vae.train(model, data, TrainConfig(epochs=1, batch_size=20), progress=False)
