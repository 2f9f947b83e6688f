"""Scale-out on Lightning Fabric (``train.devices``, ``train.strategy``): its cost in one process and its gain on two.

Rows (ratios of epoch times measured side by side in one run, interleaved rounds, one torch thread per process;
the epoch time is ``metrics`` ``seconds`` of the epochs after the first, whose first step runs Pyro's checks):

  plain_over_baseline     the default one-process loop now ÷ the same loop at ``--baseline`` (the commit before the
                          Fabric path: a git worktree of it, run in its own process beside this one) — the
                          single-process default must stay as fast
  fabric_over_plain       ``train.strategy: single_device`` (the Fabric path in one process: the objective as a
                          module, the collectives' code) ÷ the default plain loop, batch 100 — must be ≤ 1.05
  csv_logger_over_none    the default ``train.logger: csv`` ÷ ``train.logger: none``: wall-clock time of the whole
                          ``ppl_vae.train`` call per epoch, both writing checkpoints to a run folder
  two_over_one_process    a 2-process DDP job (gloo, each process one thread, each half of the global batch) ÷ the
                          1-process job with the same global batch, for batch 128, 256, 512 and 1024; samples/s
                          of both (CPU; two processes on a 2-core machine can at best halve the time)
  gpu                     1 GPU ÷ the single-process CPU path and samples/s at batch 128–1024, when CUDA is present

Model: the 784-200-200-16 ReLU MLP VAE with a Bernoulli likelihood (``ppl_vae.build_model``), the default
objective; data: random binary 28×28 images (timing does not depend on pixel values), no validation set.

    python bench/scaling.py            # full: 3 rounds; 4,096 images; 4 epochs per job (the baseline row: 8 rounds
                                       # of 16,384 images; Fabric ÷ plain: 8 rounds)
    python bench/scaling.py --quick    # 2 rounds, 2,048 images, batch 256 only
The last line of stdout is the JSON summary (full mode also writes bench/results/scaling.json).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from _common import ROOT, finish, parser, ratio_rounds, start

import ppl_vae
from ppl_vae import ModelConfig, build_model
from ppl_vae.config import TrainConfig
from ppl_vae.data import DataBundle

FULL = dict(
    rounds=3,
    n=4096,
    epochs=4,
    batches=(128, 256, 512, 1024),
    overhead_batch=100,
    baseline_n=16384,
    baseline_rounds=8,
    overhead_rounds=8,
)
QUICK = dict(
    rounds=2,
    n=2048,
    epochs=3,
    batches=(256,),
    overhead_batch=100,
    baseline_n=2048,
    baseline_rounds=2,
    overhead_rounds=2,
)


def make_data(n: int) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n, 1, 28, 28, generator=g) < 0.3).float()
    return DataBundle.from_tensors(x, name="random_binary")


def epoch_seconds(
    devices: int,
    batch: int,
    n: int,
    epochs: int,
    device: str = "cpu",
    strategy: str = "auto",
    logger: str = "none",
    run_dir=None,
    wall: bool = False,
) -> float:
    """Median seconds of the epochs after the first of one ``ppl_vae.train`` job (rank 0's clock; ``wall``: the
    whole call's wall-clock time per epoch, checkpoints and logs included). Without
    devices/strategy/logger settings the configuration is one an older ppl_vae also reads (the baseline row)."""
    data = make_data(n)
    pyro.set_rng_seed(0)
    model = build_model(
        ModelConfig(
            name="vae", likelihood="bernoulli", arch="mlp", latent_dim=16, hidden=[200, 200], activation="relu"
        ),
        data.shape,
        num_data=n,
    ).to(device)
    extra = (
        {}
        if (devices, strategy, logger, device) == (1, "auto", "none", "cpu")
        else dict(
            devices=devices,
            logger=logger,
            strategy="ddp" if devices > 1 else strategy,
            accelerator="cuda" if device == "cuda" else "cpu",
        )
    )
    cfg = TrainConfig(epochs=epochs, batch_size=batch, **extra)
    t0 = time.perf_counter()
    res = ppl_vae.train(model, data, cfg, seed=0, progress=False, device=device, run_dir=run_dir)
    if wall:
        return (time.perf_counter() - t0) / epochs
    rank = getattr(res, "rank", 0)  # the baseline tree's result has no rank
    return statistics.median(r["seconds"] for r in res.history[1:]) if rank == 0 else float("nan")


def job(devices: int, batch: int, s: dict, tree: Path = ROOT, n: int | None = None) -> float:
    """Epoch seconds of a job in its own process(es), as a user starts it (``python script.py``), with the
    ppl_vae of ``tree`` (``n`` images; default ``s["n"]``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            f"{devices},{batch},{n or s['n']},{s['epochs']}",
            "--worker-out",
            str(out),
        ]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if res.returncode != 0:
            raise RuntimeError(f"the {devices}-process job failed:\n{res.stderr[-3000:]}")
        return json.loads(out.read_text())["seconds"]


def worker(spec: str, out: str) -> None:
    devices, batch, n, epochs = (int(v) for v in spec.split(","))
    torch.set_num_threads(1)
    sec = epoch_seconds(devices, batch, n, epochs)
    if sec == sec:  # rank 0
        Path(out).write_text(json.dumps({"seconds": sec}))


def main(argv=None):
    ap = parser(__doc__, seeds=None, threads=1)
    ap.add_argument(
        "--baseline",
        default="c3db871",
        help="git revision of the baseline loop (default: the commit before the Fabric path)",
    )
    ap.add_argument("--worker", default=None, help="(internal) devices,batch,n,epochs of one timed job")
    ap.add_argument("--worker-out", default=None, help="(internal) where the worker writes its seconds")
    args = start(ap, argv)
    if args.worker:
        return worker(args.worker, args.worker_out)
    s = QUICK if args.quick else FULL
    out = {"settings": dict(s), "baseline": args.baseline}
    b = s["overhead_batch"]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline],
            check=True,
            capture_output=True,
        )
        try:
            n = s["baseline_n"]
            out["plain_over_baseline"] = ratio_rounds(
                lambda: job(1, b, s, n=n), lambda: job(1, b, s, tree, n=n), s["baseline_rounds"]
            )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    print("plain/baseline", out["plain_over_baseline"], flush=True)
    out["fabric_over_plain"] = ratio_rounds(
        lambda: epoch_seconds(1, b, s["n"], s["epochs"], strategy="single_device"),
        lambda: epoch_seconds(1, b, s["n"], s["epochs"]),
        s["overhead_rounds"],
    )
    print("fabric/plain", out["fabric_over_plain"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out["csv_logger_over_none"] = ratio_rounds(
            lambda: epoch_seconds(1, b, s["n"], s["epochs"], logger="csv", run_dir=Path(tmp) / "csv", wall=True),
            lambda: epoch_seconds(1, b, s["n"], s["epochs"], logger="none", run_dir=Path(tmp) / "none", wall=True),
            s["rounds"],
        )
    print("csv/none", out["csv_logger_over_none"], flush=True)
    out["two_over_one_process"] = {}
    for batch in s["batches"]:
        row = ratio_rounds(lambda batch=batch: job(2, batch, s), lambda batch=batch: job(1, batch, s), s["rounds"])
        row["samples_per_second_two"] = round(s["n"] / statistics.median(row["seconds_a"]), 1)
        row["samples_per_second_one"] = round(s["n"] / statistics.median(row["seconds_b"]), 1)
        out["two_over_one_process"][str(batch)] = row
        print(f"2/1 processes, batch {batch}", row, flush=True)
    if torch.cuda.is_available():
        out["gpu"] = {}
        for batch in s["batches"]:
            row = ratio_rounds(
                lambda batch=batch: epoch_seconds(1, batch, s["n"], s["epochs"], device="cuda"),
                lambda batch=batch: epoch_seconds(1, batch, s["n"], s["epochs"]),
                s["rounds"],
            )
            row["samples_per_second_gpu"] = round(s["n"] / statistics.median(row["seconds_a"]), 1)
            out["gpu"][str(batch)] = row
    else:
        out["gpu"] = None  # no CUDA device on this machine
    finish("scaling", out, args)


if __name__ == "__main__":
    main()
