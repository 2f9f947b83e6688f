"""bench/gpu.py, the one-command GPU check (issue 37), prepared on the CPU: its dry run runs every stage at tiny
sizes in real subprocesses (the nested pytest of the CUDA tests, the 2-process bf16-mixed run on gloo), writes the
same keys as the GPU run to its own file, never to bench/results/gpu.json, and ends its stdout with that JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.py"
RESULT = REPO / "bench" / "results" / "gpu.json"
STAGES = ["cuda_tests", "overhead", "fashion_epoch", "log_likelihood", "ddp_bf16"]
KEYS = {"mode", "device", "stages", "cuda_environment", *STAGES, "targets", "total_seconds", "environment"}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _state(path: Path):
    return path.stat().st_mtime_ns if path.is_file() else None


def test_the_dry_run_runs_every_stage_on_the_cpu_and_writes_the_gpu_keys_elsewhere(tmp_path):
    out = tmp_path / "dry.json"
    before = _state(RESULT)
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--device", "cpu", "--synthetic-data", "--out", str(out)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-4000:]
    assert seconds < 120, f"the dry run took {seconds:.0f} s"
    assert _state(RESULT) == before  # bench/results/gpu.json is the GPU run's alone
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    written = json.loads(out.read_text())
    assert set(printed) == set(written) == KEYS
    assert written["mode"] == "dry-run" and written["device"] == "cpu"
    assert {s: r["status"] for s, r in written["stages"].items()} == dict.fromkeys(STAGES, "ok")

    tests = written["cuda_tests"]
    assert tests["returncode"] == 0 and tests["failed"] == tests["errors"] == 0
    assert tests["tests"] == tests["passed"] + tests["skipped"] >= 20  # the CUDA tests, skipped on the CPU
    assert tests["passed"] >= 1 and "-k" in tests["command"]  # the device test that also runs on the CPU

    overhead = written["overhead"]["per_batch"]
    assert overhead  # one entry per batch size
    for row in overhead.values():
        for variant in ("default", "sampled_kl", "jit"):
            r = row[variant]
            assert r["library_ms"] > 0 and r["hand_eager_ms"] > 0 and r["hand_compiled_ms"] > 0
            assert r["over_hand_eager"] > 0 and r["over_hand_compiled"] > 0
        assert set(row["hand_compile_seconds"]) == {"analytic", "sampled"}

    epoch = written["fashion_epoch"]
    assert epoch["data"].startswith("synthetic") and epoch["num_train"] > 0
    for batch in ("b128", "b1024"):
        assert epoch[batch]["seconds"] > 0 and epoch[batch]["epochs"] == 2

    ll = written["log_likelihood"]
    for key in ("default_chunks", "max_bytes_1gib"):
        assert ll[key]["finite"] and ll[key]["seconds"] > 0 and ll[key]["num_images"] == ll["num_images"]
        assert "peak_gpu_memory_mib" in ll[key]

    ddp = written["ddp_bf16"]
    assert ddp["accelerator"] == "cpu" and ddp["two_process_bf16"]["world_size"] == 2
    assert ddp["two_process_bf16"]["precision"] == "bf16-mixed" and abs(ddp["val_elbo_difference"]) < 2.0

    assert written["environment"]["command"] and written["environment"]["torch"] == torch.__version__


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full run starts on a CUDA machine")
def test_the_full_run_needs_cuda_and_the_dry_run_never_writes_the_gpu_result():
    before = _state(RESULT)
    full = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 2 and "needs a CUDA device" in full.stderr and "--dry-run" in full.stderr
    dry = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(RESULT)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dry.returncode == 2 and "never writes bench/results/gpu.json" in dry.stderr
    assert _state(RESULT) == before
