"""Run-folder ownership: one writer per run folder, for the whole of a training run.

``RunLock(run_dir)`` takes an exclusive lock with :mod:`filelock` (``fcntl`` on Linux and macOS, ``msvcrt`` on
Windows) on ``run_dir/.lock.flock`` and writes the holder's PID, host and start time into ``run_dir/.lock`` (a
separate file: taking the lock truncates its own file). A second process asking for the same folder is refused
with a message that names the holder. The operating system releases the lock when its process ends, however it
ends (``kill -9`` included), so a ``.lock`` left behind by a dead process is stale and simply taken over. Locks are
per process: the same process may not take one folder twice either.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import RunFolderError

LOCK_FILE = ".lock"
FLOCK_FILE = ".lock.flock"

__all__ = ["RunLock", "LOCK_FILE", "FLOCK_FILE"]


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._lock = FileLock(Path(run_dir) / FLOCK_FILE, timeout=0)
        self._held = False

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            holder = _read(self.path)
            who = (
                f"PID {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                if holder
                else "another process"
            )
            raise RunFolderError(
                f"run folder {str(self.path.parent)!r} is being written by {who}; wait for it to "
                "finish, or use another --run-dir"
            ) from None
        self._held = True
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.path.with_name(LOCK_FILE + ".tmp")
        tmp.write_text(json.dumps(holder))
        os.replace(tmp, self.path)  # a reader sees the old holder or the new one, never half of one
        return self

    def __exit__(self, *exc) -> None:
        if self._held:
            self._lock.release()
            self._held = False


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
