"""Threads of a run (``train.threads``): epoch time of ``ppl-vae train`` with 1 torch thread and with one per core,
on an idle machine and beside a concurrent CPU load (one busy process per core) — the numbers behind the default.

Rows (medians over interleaved rounds of the epoch time ``metrics.jsonl`` records, epochs after the first):

  idle_seconds / loaded_seconds    per thread count: the run alone, and beside ``os.cpu_count()`` busy processes
  idle_ratio / loaded_ratio        one thread per core ÷ 1 thread (> 1: more threads are slower)

Model and data: the shipped ``vae_fashion`` (MLP 784-512-256-… VAE, batch 100) on Fashion-MNIST (Debian's package),
``data.limit`` images, ``train.epochs`` epochs, no figures; each run a fresh ``python -m ppl_vae train`` process.

    python bench/threads.py            # full: 3 rounds, 6,000 images, 3 epochs
    python bench/threads.py --quick    # 2 rounds, 2,000 images, 2 epochs
The last line of stdout is the JSON summary (full mode also writes bench/results/threads.json).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, finish, parser, start

FULL = dict(rounds=3, limit=6000, epochs=3)
QUICK = dict(rounds=2, limit=2000, epochs=2)


def epoch_seconds(threads: int, limit: int, epochs: int, tmp: Path) -> float:
    """Median epoch time (epochs after the first) of one ``ppl-vae train`` process with ``threads`` threads."""
    run = Path(tempfile.mkdtemp(dir=tmp))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, "-m", "ppl_vae", "train", "vae_fashion", f"train.threads={threads}"]
    cmd += [f"train.epochs={epochs}", f"data.limit={limit}", "--run-dir", str(run / "r"), "--overwrite"]
    cmd += ["--no-progress", "--no-figures"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
    records = [json.loads(line) for line in (run / "r" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(r["seconds"] for r in records[1:] if "seconds" in r)


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None) -> dict:
    args = start(parser(__doc__, seeds=None, threads=1), argv)
    s = QUICK if args.quick else FULL
    cores = os.cpu_count() or 1
    counts = sorted({1, cores})
    times: dict[str, dict[int, list[float]]] = {"idle": {k: [] for k in counts}, "loaded": {k: [] for k in counts}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(s["rounds"]):
            for load in ("idle", "loaded"):
                order = counts if r % 2 == 0 else counts[::-1]  # interleaved: neither count always goes first
                for k in order:
                    burners = busy(cores) if load == "loaded" else []
                    try:
                        times[load][k].append(epoch_seconds(k, s["limit"], s["epochs"], Path(tmp)))
                    finally:
                        for b in burners:
                            b.kill()
                            b.wait()
    med = {load: {str(k): statistics.median(v) for k, v in per.items()} for load, per in times.items()}
    result = {
        "cores": cores,
        "thread_counts": counts,
        "settings": s,
        "idle_seconds": med["idle"],
        "loaded_seconds": med["loaded"],
        "idle_ratio": med["idle"][str(cores)] / med["idle"]["1"],
        "loaded_ratio": med["loaded"][str(cores)] / med["loaded"]["1"],
        "rounds_seconds": {load: {str(k): v for k, v in per.items()} for load, per in times.items()},
    }
    return finish("threads", result, args)


if __name__ == "__main__":
    main()
