"""Denormal floats flushed to zero while training (``train.flush_denormal``): epoch time of ``ppl-vae train`` with
the CPU's default arithmetic and with ``torch.set_flush_denormal(True)``, and whether the training changed.

Importance weights far below the largest one (IWAE, DReG, the strata of MMVAE) and the gradients they scale
underflow below 1.2e-38, the float32 denormal range, where a CPU computes tens of times slower; flushing them to
zero removes that cost.

Rows (per workload; each run a fresh ``python -m ppl_vae train`` process, one torch thread, no validation set,
interleaved rounds; epoch times as ``metrics.jsonl`` records them, epochs after the first):

  seconds            {"off": …, "on": …} median epoch seconds
  on_over_off        flushed ÷ default (< 1: faster), the median of per-round ratios
  train_elbo         the last epoch's training bound of each (the same seed and data: equal unless a flushed value
                     changed the training)

Workloads (the shipped configs on Debian's Fashion-MNIST):

  vae_b100     ``vae_fashion`` (the README's main job: closed-form KL, batch 100)
  iwae50       ``vae_fashion`` with ``train.objective=iwae``, K = 50
  mmvae_k4     ``mmvae_polyfashion`` (3 image modalities, stratified DReG, K = 4, batch 128)

    python bench/denormals.py            # full: 3 rounds, 3 epochs
    python bench/denormals.py --quick    # 1 round, 2 epochs, half the images
The last line of stdout is the JSON summary (full mode also writes bench/results/denormals.json).
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

WORKLOADS = {
    "vae_b100": ("vae_fashion", [], 6000),
    "iwae50": ("vae_fashion", ["train.objective=iwae", "train.num_particles=50"], 4000),
    "mmvae_k4": ("mmvae_polyfashion", [], 2000),
}
FULL = dict(rounds=3, epochs=3, scale=1.0)
QUICK = dict(rounds=1, epochs=2, scale=0.5)


def run(config: str, extra: list[str], images: int, flush: bool, s: dict, tmp: Path) -> list[dict]:
    """The epoch records of one fresh ``ppl-vae train`` process."""
    folder = Path(tempfile.mkdtemp(dir=tmp)) / "r"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, "-m", "ppl_vae", "train", config, *extra, f"data.limit={int(images * s['scale'])}"]
    cmd += ["data.val_fraction=0", f"train.epochs={s['epochs']}", "train.threads=1"]
    cmd += [f"train.flush_denormal={str(flush).lower()}", "--run-dir", str(folder), "--no-progress", "--no-figures"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv=None) -> dict:
    args = start(parser(__doc__, seeds=None, threads=1), argv)
    s = QUICK if args.quick else FULL
    seconds = {w: {"off": [], "on": []} for w in WORKLOADS}
    bound = {w: {} for w in WORKLOADS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(s["rounds"]):
            for name, (config, extra, images) in WORKLOADS.items():
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):  # neither mode always goes first
                    records = run(config, extra, images, mode == "on", s, Path(tmp))
                    seconds[name][mode].append(statistics.median(rec["seconds"] for rec in records[1:]))
                    bound[name][mode] = records[-1]["train_elbo"]
    rows = {}
    for name, per in seconds.items():
        ratios = [on / off for on, off in zip(per["on"], per["off"], strict=True)]
        rows[name] = {
            "seconds": {mode: round(statistics.median(v), 4) for mode, v in per.items()},
            "on_over_off": round(statistics.median(ratios), 4),
            "rounds": {mode: [round(x, 4) for x in v] for mode, v in per.items()},
            "train_elbo": bound[name],
        }
    result = {
        "settings": s,
        "workloads": {
            k: {"config": c, "overrides": e, "images": int(n * s["scale"])} for k, (c, e, n) in WORKLOADS.items()
        },
        "rows": rows,
    }
    return finish("denormals", result, args)


if __name__ == "__main__":
    main()
