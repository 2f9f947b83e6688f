"""The run lock is portable: it stands on filelock, so the package imports where ``fcntl`` does not exist
(Windows), and it keeps refusing a second writer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ppl_vae.errors import RunFolderError
from ppl_vae.training.runlock import LOCK_FILE, RunLock


def test_every_module_imports_without_fcntl():
    code = (
        "import sys, importlib, pkgutil, warnings\n"
        "sys.modules['fcntl'] = None  # as on Windows\n"
        "warnings.filterwarnings('ignore', 'only soft file lock is available')\n"
        "import ppl_vae\n"
        "names = [m.name for m in pkgutil.walk_packages(ppl_vae.__path__, 'ppl_vae.')]\n"
        "names.remove('ppl_vae.__main__')\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) > 90


def test_a_second_lock_on_a_folder_is_refused_with_the_holder(tmp_path):
    with RunLock(tmp_path) as lock:
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] > 0 and lock.path == tmp_path / LOCK_FILE
        with pytest.raises(RunFolderError, match=rf"is being written by PID {holder['pid']} on "):
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path):  # released: taken again
        pass
