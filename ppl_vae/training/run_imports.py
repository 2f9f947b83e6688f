"""A run folder keeps the code its configuration imports: the ``.py`` files of ``imports:`` are copied into
``RUN/imports/`` with their SHA-256 in ``RUN/imports/SHA256SUMS`` (the format of ``sha256sum``), and the run's
config.yaml names the copies (relative to itself). So ``ppl-vae evaluate RUN`` works from any folder and after the
original file changed, and a copy edited since the run was trained is refused before its code runs on
``--resume`` or when the run is loaded. Modules imported by name (``my_package.methods``) are not copied."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from ..data.atomic import write_text
from ..errors import CheckpointError, ConfigError

IMPORTS_DIR = "imports"
SUMS = "SHA256SUMS"

__all__ = ["IMPORTS_DIR", "SUMS", "keep_imports", "check_imports"]


def _is_file(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def keep_imports(imports: list[str], run_dir: Path) -> list[str]:
    """Copy the files of ``imports`` into ``run_dir/imports`` (a file already there stays), write their SHA-256,
    and return the list as the run's config.yaml writes it (``imports/<file>.py`` for a file, a module as is)."""
    entries, sums = [], {}
    for entry in imports:
        if not _is_file(entry):
            entries.append(entry)
            continue
        src = Path(entry).expanduser().resolve()
        if not src.is_file():
            raise ConfigError(f"imports: {entry!r} is not a Python file")
        rel = f"{IMPORTS_DIR}/{src.name}"
        if rel in sums:
            raise ConfigError(
                f"imports: two files are called {src.name!r} ({entry!r} and another): a run folder keeps its "
                "imports side by side, so rename one"
            )
        dest = run_dir / rel
        if dest.resolve() != src:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dest)
        sums[rel] = _sha256(dest)
        entries.append(rel)
    if sums:
        write_text(run_dir / IMPORTS_DIR / SUMS, "".join(f"{digest}  {rel}\n" for rel, digest in sums.items()))
    return entries


def check_imports(run_dir: Path) -> None:
    """Refuse a run whose kept import files changed (or went missing) since it was trained: their code would
    build another model than the checkpoint's. Runs without ``imports/SHA256SUMS`` have nothing to check."""
    sums = run_dir / IMPORTS_DIR / SUMS
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        digest, _, rel = line.partition("  ")
        if not rel:
            continue
        path = run_dir / rel
        fix = (
            f"restore it; or, if the change is meant, record it with `cd {run_dir} && sha256sum "
            f"{IMPORTS_DIR}/*.py > {IMPORTS_DIR}/{SUMS}`"
        )
        if not path.is_file():
            raise CheckpointError(f"the run in {str(run_dir)!r} imports {rel!r}, which is missing: {fix}")
        if _sha256(path) != digest:
            raise CheckpointError(
                f"{str(path)!r} changed since the run in {str(run_dir)!r} was trained (its SHA-256 is not the one "
                f"in {IMPORTS_DIR}/{SUMS}): {fix}"
            )
