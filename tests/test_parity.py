"""bench/parity (issue 36): without an official checkout every script starts and fails clearly (exit status 2, a
message naming the repository, the commit and how to get it); the verdict rule of the harness."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "bench" / "parity"
SCRIPTS = sorted(p for p in PARITY.glob("*.py") if p.name != "harness.py")


def test_there_are_parity_scripts():
    assert {p.stem for p in SCRIPTS} >= {"poisson_vae", "mmvae", "mopoe"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
@pytest.mark.parametrize("official", [None, "empty"])
def test_quick_without_a_checkout_fails_clearly(path, official, tmp_path):
    cmd = [sys.executable, str(path), "--quick"] + ([] if official is None else ["--official", str(tmp_path)])
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    text = path.read_text()
    repo = text.split('REPO = "')[1].split('"')[0]
    commit = text.split('COMMIT = "')[1].split('"')[0]
    assert f"github.com/{repo}" in out.stderr and commit in out.stderr
    assert ("--official PATH is required" if official is None else "is missing") in out.stderr
    assert "Traceback" not in out.stderr


def test_verdict_rule():
    sys.path.insert(0, str(PARITY))
    try:
        import harness
    finally:
        sys.path.remove(str(PARITY))
    official = [0.70, 0.72, 0.71]  # mean 0.71, sd 0.01: band [0.69, 0.73]
    assert harness.verdict([0.725, 0.73, 0.725], official)["verdict"] == "implementation agrees"
    far = harness.verdict([0.74, 0.75, 0.76], official)
    assert far["verdict"] == "disagrees" and far["difference"] == pytest.approx(0.04)
    assert harness.verdict([0.69], [0.69])["verdict"] == "implementation agrees"  # one seed: the value itself
