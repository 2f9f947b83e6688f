"""The package stands alone: the sdist and the wheel built from a copy of the tree (the tree itself is left as it is)
carry what they must — the wheel the shipped configs and the license, the sdist the tests with their helpers,
fixtures, notebooks and bench scripts — the sdist's tests collect from the unpacked folder, and the wheel installed
in a fresh virtual environment outside the tree runs the README's commands from an empty folder (27 s on 2 idle
cores: four interpreters importing torch and a one-epoch run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what a build never reads: version control, environments, build outputs, caches, runs
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "runs", "*.egg-info", "__pycache__", "*.pyc", ".*_cache", ".cache",
    ".ipynb_checkpoints", ".coverage", ".whl",
)  # fmt: skip
SHIPPED = sorted(p.stem for p in (REPO / "ppl_vae" / "configs").glob("*.yaml"))


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist built from a copy of the tree, unpacked, and the wheel built from that unpacked sdist — what
    ``python -m build`` does, here with the setuptools of this environment (no download)."""
    base = tmp_path_factory.mktemp("packaging")
    src, out = base / "src", base / "dist"
    shutil.copytree(REPO, src, symlinks=True, ignore=IGNORE)
    build = "import sys; from setuptools import build_meta as b; b.build_{}(sys.argv[1])"
    _run([sys.executable, "-c", build.format("sdist"), out], cwd=src)
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(base / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (base / "unpacked").iterdir()
    _run([sys.executable, "-c", build.format("wheel"), out], cwd=unpacked)
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "unpacked": unpacked, "wheel": wheel, "src": src}


def test_the_wheel_carries_the_shipped_configs_the_license_and_the_metadata(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = whl.read(meta).decode()
    assert {f"ppl_vae/configs/{n}.yaml" for n in SHIPPED} <= names and "vae_digits" in SHIPPED
    assert {n.split("/")[0] for n in names} == {"ppl_vae", meta.split("/")[0]}  # no tests, bench or notebooks
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for line in [
        "License-Expression: MIT",
        "Requires-Python: >=3.11",
        "Classifier: Operating System :: OS Independent",
        "Classifier: Programming Language :: Python :: 3.11",
        "Classifier: Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Project-URL: Homepage, https://github.com/ppl-vae/ppl-vae",
        "Project-URL: Issues, https://github.com/ppl-vae/ppl-vae/issues",
        "Description-Content-Type: text/markdown",
    ]:
        assert f"\n{line}\n" in metadata, line
    assert "\nKeywords: " in metadata and "\nAuthor: " in metadata


def test_the_sdist_carries_what_its_tests_need(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tests = {
        p.relative_to(dists["src"]).as_posix() for p in (dists["src"] / "tests").rglob("*") if p.is_file()
    }  # conftest.py, the helpers tests/_*.py, tests/fixtures/ (runs, arrays), every test file
    assert "tests/conftest.py" in tests and "tests/fixtures/run_0_1/best.pt" in tests
    assert not tests - names, sorted(tests - names)
    docs = {"LICENSE", "README.md", "ARCHITECTURE.md", "CHANGELOG.md", "pyproject.toml", "MANIFEST.in"}
    assert docs <= names, sorted(docs - names)
    assert {f"ppl_vae/configs/{n}.yaml" for n in SHIPPED} | {f"configs/{n}.yaml" for n in SHIPPED} <= names
    assert {p.relative_to(REPO).as_posix() for p in (REPO / "notebooks").glob("*.ipynb")} <= names
    assert {p.relative_to(REPO).as_posix() for p in (REPO / "bench").glob("*.py")} <= names


def test_the_sdist_tests_collect_in_the_unpacked_folder(dists):
    """Collection from the unpacked sdist imports its own ppl_vae (the folder is first on sys.path)."""
    unpacked = dists["unpacked"]
    where = _run([sys.executable, "-c", "import ppl_vae; print(ppl_vae.__file__)"], cwd=unpacked).stdout
    assert Path(where.strip()).is_relative_to(unpacked)
    out = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=unpacked)
    assert "tests collected" in out.stdout, out.stdout[-2000:]  # a collection error exits non-zero (_run)
    assert "tests/test_packaging.py::test_the_sdist_tests_collect_in_the_unpacked_folder" in out.stdout


@pytest.mark.skipif(os.name == "nt", reason="the venv layout (bin/, the ppl-vae script) is POSIX's here")
def test_the_wheel_in_a_fresh_venv_runs_the_readme_commands(dists, tmp_path):
    """A fresh venv outside the tree with the wheel alone installed (`--no-deps --no-index`); the heavy dependencies
    come from this environment's site-packages through a .pth file (a path line: this environment's own .pth files,
    the editable install of the tree among them, are not read). From an empty folder: the README's commands."""
    times = {}
    start = time.perf_counter()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    purelib = Path(
        _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    )
    here = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # torch & co., in order
    (purelib / "_ppl_vae_test_deps.pth").write_text("".join(f"{p}\n" for p in here))
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "--ignore-installed"]
    _run([*pip, dists["wheel"]], cwd=tmp_path)
    times["venv + install"] = time.perf_counter() - start

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", MPLBACKEND="Agg", OMP_NUM_THREADS="1")

    def cli(*args: str, **kw) -> str:
        t = time.perf_counter()
        out = _run([venv / "bin" / "ppl-vae", *args], cwd=work, env=env, **kw).stdout
        times[" ".join(args[:2])] = time.perf_counter() - t
        return out

    code = "import ppl_vae.config.sections as s; print(s.__file__); print(s.shipped_configs()['vae_digits'])"
    where = _run([py, "-c", code], cwd=work, env=env).stdout.split()
    for path in where:  # the installed package and its package data, not the tree
        assert Path(path).is_relative_to(purelib) and not Path(path).is_relative_to(REPO), path

    rows = cli("configs").splitlines()
    assert [r.split()[0] for r in rows[1:-1]] == SHIPPED
    assert "copied vae_fashion to vae_fashion.yaml" in cli("configs", "copy", "vae_fashion")
    assert (work / "vae_fashion.yaml").read_text() == (REPO / "ppl_vae" / "configs" / "vae_fashion.yaml").read_text()
    out = cli("train", "vae_digits", "train.epochs=1", "model.hidden=[32]", "--no-progress", "--run-dir", "run")
    assert "run folder: run" in out and (work / "run" / "reconstructions.png").is_file()
    cli("evaluate", "run", "--num-samples", "20", "--max-test", "100")
    ev = json.loads((work / "run" / "evaluation.json").read_text())
    assert ev["num_test"] == 100 and ev["num_samples"] == 20 and ev["test_log_likelihood"] > ev["test_elbo"]
    assert sorted(p.name for p in work.iterdir()) == ["run", "vae_fashion.yaml"]  # nothing else written here
    print("timings (s):", {k: round(v, 1) for k, v in times.items()})
