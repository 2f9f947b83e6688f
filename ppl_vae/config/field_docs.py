"""The configuration reference, read from the dataclasses: one :class:`FieldDoc` per field of a section (``data``,
``model``, ``train``, ``eval`` and the top level) or of a method's options, with its type, default, allowed values
and ``doc=`` text. ``ppl-vae configs fields`` prints it and the documentation site renders it (docs/_ext), so the
two cannot differ."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import typing

from .options import Options, Section
from .sections import Config

SECTIONS = ("data", "model", "train", "eval")

__all__ = ["FieldDoc", "SECTIONS", "fields_of", "config_fields", "format_fields"]


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """One field: its name, type, default (as YAML writes it), allowed values and documentation."""

    name: str
    type: str
    default: str
    allowed: str
    doc: str


def _type_name(tp) -> str:
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _yaml_value(v) -> str:
    if v is dataclasses.MISSING:
        return "(required)"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and (v == 0 or 1e-3 <= abs(v) < 1e5):
        return repr(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def fields_of(cls) -> list[FieldDoc]:
    """The documentation rows of a section or options dataclass (nested sections are left out)."""
    hints = typing.get_type_hints(cls)
    described = Options.describe.__func__(cls) if issubclass(cls, (Options, Section)) else {}  # type: ignore[attr-defined]
    rows = []
    for f in dataclasses.fields(cls):
        if isinstance(_default(f), Section):
            continue
        allowed = described[f.name][1] if f.name in described else ""
        rows.append(
            FieldDoc(f.name, _type_name(hints[f.name]), _yaml_value(_default(f)), allowed, f.metadata.get("doc", ""))
        )
    return rows


def config_fields() -> dict[str, list[FieldDoc]]:
    """{section prefix: rows} for every section of the configuration; ``""`` is the top level."""
    out = {"": fields_of(Config)}
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            out[f.name] = fields_of(type(_default(f)))
    return out


def format_fields(rows: list[FieldDoc], prefix: str = "", width: int = 100) -> str:
    """The rows as plain text, one block per field: ``prefix.name  (type, default: value)``, the allowed values and
    the documentation, indented."""
    out = []
    for r in rows:
        name = f"{prefix}.{r.name}" if prefix else r.name
        out.append(f"{name}  ({r.type}, default: {r.default})")
        for label, text in (("allowed", r.allowed), ("", r.doc)):
            if text:
                head = f"{label}: " if label else ""
                out.append(textwrap.fill(head + text, width, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(out)
