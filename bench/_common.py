"""Shared bits of the benchmark scripts: the environment record and the result file."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a small run (< 5 min on 2 CPU cores); prints the JSON only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def paired(a, b) -> tuple[float, float]:
    """Mean of a − b over the same items (test images) and its standard error (ddof = 1)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def ll_mc_std_error(ess, num_samples: int) -> float:
    """Monte Carlo s.e. of the mean importance-sampled log p̂(x) over images: per image the delta-method s.e.
    sqrt(1/ESS − 1/S) of log p̂ (S draws, effective sample size ESS), combined as sqrt(Σ se²)/n."""
    mc = (1.0 / ess - 1.0 / num_samples).clamp(min=0).sqrt()
    return float(mc.pow(2).sum().sqrt() / len(mc))


def over_seeds(per_seed: list[tuple[float, float]]) -> tuple[float, float]:
    """Combine paired differences (mean, s.e.) from several training seeds: the mean of the means, and a standard
    error sqrt(stdev(means)²/n + mean(s.e.)²/n) — spread over seeds plus the test-set s.e. (1 seed: that alone)."""
    means = [m for m, _ in per_seed]
    n = len(means)
    spread = statistics.stdev(means) / math.sqrt(n) if n > 1 else 0.0
    test_se = statistics.mean(se for _, se in per_seed)
    return statistics.mean(means), math.sqrt(spread ** 2 + test_se ** 2 / n)


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": device,
           "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import pyro

        env["pyro"] = pyro.__version__
    except ImportError:
        pass
    return env


def finish(name: str, result: dict, quick: bool, out: str | None = None) -> None:
    """Full mode writes bench/results/<name>.json (or ``out``, e.g. a second seed's file); both modes print the JSON
    object as the last line."""
    if not quick:
        path = Path(out) if out else RESULTS / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
