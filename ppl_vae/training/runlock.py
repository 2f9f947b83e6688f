"""Run-folder ownership: one writer per run folder, for the whole of a training run.

``RunLock(run_dir)`` takes an advisory ``fcntl`` lock on ``run_dir/.lock`` (created if needed) and writes the
holder's PID, host and start time into it. A second process asking for the same folder is refused with a message
that names the holder. The operating system releases the lock when its process ends, however it ends (``kill -9``
included), so a lock file left behind by a dead process is stale and simply taken over; its old contents are only
reported. Locks are per process: the same process may not take one folder twice either.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import RunFolderError

LOCK_FILE = ".lock"

__all__ = ["RunLock", "LOCK_FILE"]


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            who = (
                f"PID {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                if holder
                else "another process"
            )
            raise RunFolderError(
                f"run folder {str(self.path.parent)!r} is being written by {who}; wait for it to "
                "finish, or use another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            ).encode(),
        )
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}
