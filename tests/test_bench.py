"""Every benchmark script's ``--quick`` mode runs and ends with one JSON object (slow: minutes per script; the
Fashion-MNIST ones need Debian's dataset-fashion-mnist)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))
FASHION = Path("/usr/share/datasets/fashion-mnist")
SPECS = sorted((REPO / "bench" / "specs").glob("*.yaml"))


def _reads_fashion(path: Path) -> bool:
    spec = REPO / "bench" / "specs" / f"{path.stem}.yaml"
    texts = [path.read_text()] + ([spec.read_text()] if spec.is_file() else [])
    return any("fashion" in t for t in texts)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_study_spec_is_a_valid_compare_spec_and_has_its_user(path):
    """A spec of bench/specs/ loads through ppl_vae.compare.load_spec (every run's config and overrides checked);
    a study's spec is read by bench/<study>.py, the others are named in bench/README.md."""
    from ppl_vae.compare import load_spec

    spec = load_spec(path)
    assert spec.runs and spec.seeds
    script = REPO / "bench" / f"{path.stem}.py"
    if script.is_file():
        assert re.search(rf'run_spec\(\s*"{path.stem}"', script.read_text())
    else:
        assert f"bench/specs/{path.name}" in (REPO / "bench" / "README.md").read_text()


def test_every_script_uses_the_shared_harness():
    for path in SCRIPTS:
        text = path.read_text()
        assert "sys.path" not in text, f"{path.name} edits sys.path"
        assert "argparse" not in text, f"{path.name} builds its own command line"
        assert "from _common import" in text and "finish(" in text and "start(" in text, path.name
        for other in SCRIPTS:
            assert f"from {other.stem} import" not in text and f"import {other.stem}\n" not in text, (
                f"{path.name} imports the script {other.name}"
            )


@pytest.mark.slow
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_quick_mode_prints_one_json_object(path, tmp_path):
    if _reads_fashion(path) and not FASHION.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    out = subprocess.run(
        [sys.executable, str(path), "--quick", "--out", str(tmp_path / "ignored.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["environment"]["mode"] == "quick" and last["environment"]["command"]
    assert not (tmp_path / "ignored.json").exists()  # quick mode writes no result file
