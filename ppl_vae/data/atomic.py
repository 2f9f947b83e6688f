"""Files written atomically: a temporary file beside the target, renamed onto it when complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["temporary_beside", "write_text"]


def temporary_beside(path: Path) -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file in ``path``'s folder (so that ``os.replace`` onto ``path`` is atomic),
    with the mode ``open()`` would give it: ``mkstemp`` creates 0600, a run's files are 0644 under umask 022."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    umask = os.umask(0o022)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_text(path: Path, text: str) -> None:
    """Write a small text file atomically: a killed process leaves the previous file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
