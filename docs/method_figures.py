"""Figures of the method pages that no benchmark study draws: a shipped config trained by ``ppl-vae train CONFIG``
(one torch thread, the config's seed; the Fashion-MNIST ones for fewer epochs than shipped, to keep this to minutes
on a CPU) and one of the figures its run folder gets, copied to ``docs/_static/methods/<method>.png``;
``docs/_static/methods/figures.json`` records the command, the run's test ELBO and the date of each.

    python docs/method_figures.py              # all of them (about 10 minutes on 2 CPU cores)
    python docs/method_figures.py cvae vlac    # some

The method pages show them with ``{bench-figure} docs/_static/methods/<method>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_static" / "methods"
FIGURES = {  # method: (shipped config, overrides, figure of its run folder)
    "cvae": ("cvae_digits", [], "class_conditional.png"),
    "vlac": ("vlac_digits", [], "reconstructions.png"),
    "rme": ("rme_fashion", ["train.epochs=5"], "reconstructions.png"),
    "sigma_vae": ("sigma_vae_fashion", ["train.epochs=10"], "prior_samples.png"),
}


def draw(method: str, tmp: Path) -> dict:
    config, overrides, figure = FIGURES[method]
    run = tmp / method
    args = [config, *overrides, "train.threads=1"]
    cmd = [sys.executable, "-m", "ppl_vae", "train", *args, "--run-dir", str(run), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{method}: `ppl-vae train {config}` failed:\n{done.stderr[-2000:]}")
    found = re.search(r"test ELBO: (-?[0-9.]+)", done.stdout + done.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / figure, OUT / f"{method}.png")
    return {
        "command": "ppl-vae train " + " ".join(args),
        "figure": figure,
        "test_elbo": float(found.group(1)) if found else None,
        "date": datetime.date.today().isoformat(),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="*", help=f"methods to draw, of {', '.join(FIGURES)} (default: all)")
    args = ap.parse_args(argv)
    unknown = [m for m in args.methods if m not in FIGURES]
    if unknown:
        ap.error(f"no figure is drawn here for {unknown}; choose from {list(FIGURES)}")
    record_file = OUT / "figures.json"
    records = json.loads(record_file.read_text()) if record_file.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods or list(FIGURES):
            records[method] = draw(method, Path(tmp))
            print(method, records[method], flush=True)
    record_file.write_text(json.dumps(dict(sorted(records.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
