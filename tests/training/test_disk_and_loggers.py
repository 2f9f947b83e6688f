"""Faults of the machine a run writes on and talks to: a real file-size limit hit while ``checkpoint.pt`` is written
(torch says ``unexpected pos ...``), an MLflow or W&B server that does not answer (minutes of HTTP retries before),
and a server that fails the requests of a run. Each ends in one ``ppl-vae: error:`` line, never "unexpected", and
keeps what was written before. Every test here failed before these fixes."""

from __future__ import annotations

import http.server
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading

import pytest

from ppl_vae.training.checkpoint import load_checkpoint

FAST = ["model.hidden=[16]", "data.limit=300", "--no-progress", "--no-figures"]
TIMED = """
import sys, time
from ppl_vae.cli import main
from ppl_vae.training import loop

start = loop.make_loggers


def timed(*args, **kwargs):  # the seconds the loggers take to start (or to fail), printed; nothing else changes
    t = time.monotonic()
    try:
        return start(*args, **kwargs)
    finally:
        print(f"loggers {time.monotonic() - t:.2f}", flush=True)


loop.make_loggers = timed
sys.exit(main(sys.argv[1:]))
"""


def _cli(tmp_path, args, env=None, preexec_fn=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PPL_VAE_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", TIMED, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def _error_line(r) -> str:
    """The one error line of a finished CLI process (other lines: the resume notice, nothing else)."""
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("ppl-vae: error:")]
    assert len(errors) == 1, r.stderr
    others = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("ppl-vae: ")]
    assert not others, r.stderr
    return errors[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- a real full disk
def test_a_real_file_size_limit_while_writing_the_checkpoint_is_one_line_and_keeps_the_last(tmp_path):
    run = tmp_path / "run"
    first = _cli(tmp_path, ["train", "--run-dir", str(run), "train.epochs=1", *FAST])
    assert first.returncode == 0, first.stderr
    before = (run / "checkpoint.pt").read_bytes()
    limit = len(before) // 2  # the small files of a run still fit; a checkpoint does not

    def limited():  # in the child: the kernel refuses the write (EFBIG) instead of killing the process (SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = _cli(
        tmp_path, ["train", "--resume", str(run), "train.epochs=2", "--no-progress", "--no-figures"], None, limited
    )
    line = _error_line(r)
    assert r.returncode == 1, r.stderr  # a run that failed, not bad input
    assert line.startswith("ppl-vae: error: CheckpointError: could not write ") and "checkpoint.pt" in line, line
    assert "file-size limit" in line and f"{limit:,} bytes" in line, line
    needed = int(re.search(r"\(([\d,]+) bytes\)", line).group(1).replace(",", ""))
    assert needed > limit  # the bytes the checkpoint needed
    assert (run / "checkpoint.pt").read_bytes() == before and load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert not list(run.glob("*.tmp"))


# --------------------------------------------------------------------------------------------- loggers' servers
@pytest.mark.parametrize(
    ("logger", "env", "variable"),
    [
        ("mlflow", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}, "MLFLOW_TRACKING_URI"),
        ("wandb", {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:{port}"}, "WANDB_BASE_URL"),
    ],
)
def test_a_logger_server_that_does_not_answer_stops_the_run_before_its_first_epoch(tmp_path, logger, env, variable):
    port = _closed_port()
    env = {k: v.format(port=port) for k, v in env.items()}
    run = tmp_path / "run"
    r = _cli(
        tmp_path, ["train", "--run-dir", str(run), f"train.logger={logger}", "train.epochs=1", *FAST], env, None, 120
    )
    line = _error_line(r)
    assert r.returncode == 2, r.stderr
    took = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("loggers ")]
    assert len(took) == 1 and took[0] < 15.0, r.stdout  # seconds, not minutes of HTTP retries
    assert line.startswith(f"ppl-vae: error: ConfigError: train.logger='{logger}'"), line
    assert f"{variable}=http://127.0.0.1:{port}" in line and "train.logger=csv" in line, line
    assert "the run stopped before its first epoch" in line, line
    assert not (run / "checkpoint.pt").exists()  # nothing trained


class _FailingTracker(http.server.BaseHTTPRequestHandler):
    """An MLflow tracking server that finds the experiment and creates the run, then fails every other request
    (logging an epoch's metrics) with HTTP 500: a server that breaks during training."""

    answers = {
        "experiments/get-by-name": {
            "experiment": {"experiment_id": "1", "name": "ppl_vae", "lifecycle_stage": "active"}
        },
        "runs/create": {
            "run": {
                "info": {"run_id": "r1", "experiment_id": "1", "status": "RUNNING", "lifecycle_stage": "active"},
                "data": {},
            }
        },
    }

    def _answer(self):
        found = next((v for k, v in self.answers.items() if self.path.split("?")[0].endswith(k)), None)
        body = json.dumps(found or {"error_code": "INTERNAL_ERROR", "message": "the store is down"}).encode()
        self.send_response(200 if found else 500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_a_logger_that_fails_during_training_is_one_line_of_the_library(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingTracker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        args = ["train", "--run-dir", str(tmp_path / "run"), "train.logger=mlflow", "train.epochs=2", *FAST]
        r = _cli(tmp_path, args, env, None, 120)
    finally:
        server.shutdown()
        server.server_close()
    line = _error_line(r)
    assert line.startswith("ppl-vae: error: LoggerError: train.logger='mlflow' failed while logging epoch 1 ("), line
    assert "the store is down" in line and "--resume" in line and "train.logger=csv" in line, line
    assert r.returncode != 0


def test_figures_for_a_server_gone_after_training_are_one_clear_error(tmp_path, monkeypatch):
    from ppl_vae.errors import ConfigError
    from ppl_vae.training.loggers import log_figures

    port = _closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "mlflow_run_id").write_text("r1")
    with pytest.raises(ConfigError, match=r"the figures were not logged \(the run is complete; they are in its folder"):
        log_figures("mlflow", tmp_path, [tmp_path / "grid.png"])
