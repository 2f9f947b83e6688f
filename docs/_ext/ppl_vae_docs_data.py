"""What the documentation site reads from the code and from the committed benchmark results — without Sphinx, so
that ``tests/test_docs.py`` checks the same rows and paths the pages show (``ppl_vae_docs.py`` renders them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

# the configuration reference is the library's own: `ppl-vae configs fields` prints the same rows
from ppl_vae.config.field_docs import SECTIONS, FieldDoc, config_fields, fields_of  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"


class DocsDataError(Exception):
    """A page names something the code or bench/ does not have."""


def option_fields() -> dict[str, list[FieldDoc]]:
    """{method name: rows of its ``model.options``} for every registered method."""
    from ppl_vae.models.registry import get_method, model_names

    return {name: fields_of(get_method(name).options) for name in model_names()}


def shipped_configs_of(method: str) -> dict[str, Path]:
    from ppl_vae.config.sections import shipped_configs
    from ppl_vae.models.registry import resolve_name

    out = {}
    for name, entry in shipped_configs().items():
        raw = yaml.safe_load(entry.read_text()) or {}
        model = (raw.get("model") or {}).get("name", "vae")
        if resolve_name(model) == method:
            out[name] = Path(str(entry))
    return out


def summary_rows() -> list[list[str]]:
    """The rows of the summary table of bench/README.md ("Summary: method, claim, verdict")."""
    lines = (BENCH / "README.md").read_text().splitlines()
    rows, inside = [], False
    for line in lines:
        if line.startswith("## Summary"):
            inside = True
            continue
        if inside and line.startswith("## "):
            break
        if inside and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append(cells)
    if len(rows) < 2:
        raise DocsDataError("bench/README.md has no summary table under '## Summary'")
    return rows


def resolve(data, path: str):
    """The value at ``path`` (keys joined by ``/``; the longest key that matches wins, so keys that contain ``/``
    work); KeyError naming the first key that is missing."""
    parts = path.split("/")
    node, i = data, 0
    while i < len(parts):
        if isinstance(node, list):
            node, i = node[int(parts[i])], i + 1
            continue
        for j in range(len(parts), i, -1):
            key = "/".join(parts[i:j])
            if isinstance(node, dict) and key in node:
                node, i = node[key], j
                break
        else:
            there = sorted(node)[:20] if isinstance(node, dict) else type(node).__name__
            raise KeyError(
                f"{path!r}: nothing matches {'/'.join(parts[i:])!r} under {'/'.join(parts[:i]) or '/'!r} "
                f"(keys there: {there})"
            )
    return node


def _result(study: str) -> dict:
    path = RESULTS / f"{study}.json"
    if not path.is_file():
        raise FileNotFoundError(path)
    return json.loads(path.read_text())
