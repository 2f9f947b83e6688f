"""Typed per-method options: one dataclass per method, validated by one mechanism.

A method declares what it accepts under ``model.options`` as a dataclass of :class:`Options`, each field typed and,
where it needs one, constrained with :func:`option`::

    @dataclass
    class RMEOptions(Options):
        num_components: int = option(3, gt=0)
        divergence_weight: float = option(0.5, ge=0.0, le=1.0)
        grow_every: int = option(0, ge=0)

``RMEOptions.parse({"num_components": 0})`` raises ``ConfigError: model.options.num_components must be a positive
integer, got 0``; unknown keys are refused with the list of known ones. Types understood: ``int``, ``float``
(a YAML integer is accepted and converted), ``bool``, ``str`` (with ``choices``), ``list[int]``, ``list[float]``,
``list[str]``, and ``X | None`` of those. Cross-field rules go in :meth:`Options.check`, reporting through
:meth:`Options.fail` so that every message has the same shape.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError, did_you_mean

__all__ = ["Options", "NoOptions", "Section", "option"]

_PREFIX = "model.options"


def option(
    default: Any,
    *,
    choices=None,
    gt=None,
    ge=None,
    lt=None,
    le=None,
    item_gt=None,
    check=None,
    what: str | None = None,
    doc: str = "",
    suggest=None,
):
    """A dataclass field with a default and constraints: ``choices`` (allowed values), ``gt``/``ge``/``lt``/``le``
    (bounds on a number), ``item_gt`` (bound on each number of a list). For a value no type annotation
    describes (e.g. a name *or* a number), ``check(value) -> bool`` decides and ``what`` says what is expected;
    ``suggest`` lists the names a refused value is compared with ("did you mean ...?") where ``choices`` is not
    given."""
    if check is not None and what is None:
        raise TypeError("option(check=...) needs what=, the description used in error messages")
    meta = {
        "choices": tuple(choices) if choices is not None else None,
        "gt": gt,
        "ge": ge,
        "lt": lt,
        "le": le,
        "item_gt": item_gt,
        "check": check,
        "what": what,
        "doc": doc,
        "suggest": tuple(suggest) if suggest is not None else None,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    """A finite int or float (not a bool, not an int too large for a float)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float's range
        return False


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 200, 200, 200
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 10


def _shown(value) -> str:
    """``repr(value)`` for a message, cut to a readable length: a YAML value can nest aliases so that its full repr
    takes hours (``a: &a [1, 1]``, ``b: &b [*a, *a]``, ...)."""
    try:
        return _REPR.repr(value)
    except Exception:  # an int of more than 4300 digits, a value whose repr fails
        return f"a {type(value).__name__}"


def _bounds(meta: Mapping, kind: str) -> str:
    gt, ge, lt, le = meta.get("gt"), meta.get("ge"), meta.get("lt"), meta.get("le")
    noun = "an integer" if kind == "integer" else "a number"
    if ge is not None and ge != 0 and gt is None and lt is None and le is None:
        return f"{noun} >= {ge}"
    if kind == "integer":
        if gt == 0 and ge is None and lt is None and le is None:
            return "a positive integer"
        if ge == 0 and gt is None and lt is None and le is None:
            return "a non-negative integer"
    if gt == 0 and ge is None and lt is None and le is None:
        return f"a positive {'integer' if kind == 'integer' else 'number'}"
    lo = f"({gt}" if gt is not None else f"[{ge}" if ge is not None else "(-inf"
    hi = f"{lt})" if lt is not None else f"{le}]" if le is not None else "inf)"
    if lo == "(-inf" and hi == "inf)":
        return f"an {kind}" if kind == "integer" else "a number"
    return f"{'an integer' if kind == 'integer' else 'a number'} in {lo}, {hi}"


def _in_bounds(v, meta: Mapping) -> bool:
    gt, ge, lt, le = meta.get("gt"), meta.get("ge"), meta.get("lt"), meta.get("le")
    return (gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt) and (le is None or v <= le)


def _split_optional(tp):
    """(inner type, allows None) of ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"option type {tp} is not supported (only X | None unions)")
    return tp, False


def _convert(tp, meta: Mapping, value):
    """(ok, converted value, what was expected) for one field."""
    if meta.get("check") is not None:
        return bool(meta["check"](value)), value, meta["what"]
    tp, optional = _split_optional(tp)
    suffix = " or null" if optional else ""
    if value is None:
        return optional, None, _describe(tp, meta) + suffix
    choices = meta.get("choices")
    if choices is not None:
        return value in choices, value, f"one of {list(choices)}" + suffix
    if tp is bool:
        return isinstance(value, bool), value, "true or false" + suffix
    if tp is int:
        return _is_int(value) and _in_bounds(value, meta), value, _bounds(meta, "integer") + suffix
    if tp is float:
        ok = _is_num(value) and _in_bounds(value, meta)
        return ok, float(value) if ok else value, _bounds(meta, "number") + suffix
    if tp is str:
        return isinstance(value, str) and value != "", value, "a non-empty string" + suffix
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        what = _describe(tp, meta) + suffix
        if not isinstance(value, list):
            return False, value, what
        bound = meta.get("item_gt")
        out = []
        for v in value:
            if item is int:
                ok = _is_int(v) and (bound is None or v > bound)
            elif item is float:
                ok = _is_num(v) and (bound is None or v > bound)
                v = float(v) if ok else v
            elif item is str:
                ok = isinstance(v, str)
            else:
                raise TypeError(f"option type {tp} is not supported")
            if not ok:
                return False, value, what
            out.append(v)
        return True, out, what
    raise TypeError(f"option type {tp} is not supported")


def _checked(where: str, tp, meta: Mapping, value):
    """``value`` converted for its field, or the one message every option and config field fails with:
    ``ConfigError: model.latent_dim must be a positive integer, got -3``."""
    ok, converted, what = _convert(tp, meta, value)
    if not ok:
        names = meta.get("choices") if meta.get("choices") is not None else meta.get("suggest")
        hint = did_you_mean(value, names) if names is not None else ""
        raise ConfigError(f"{where} must be {what}, got {_shown(value)}{hint}")
    return converted


def _describe(tp, meta: Mapping) -> str:
    if meta.get("what") is not None:
        return meta["what"]
    if meta.get("choices") is not None:
        return f"one of {list(meta['choices'])}"
    if tp is bool:
        return "true or false"
    if tp is int:
        return _bounds(meta, "integer")
    if tp is float:
        return _bounds(meta, "number")
    if tp is str:
        return "a non-empty string"
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        name = {int: "integers", float: "numbers", str: "strings"}[item]
        if meta.get("item_gt") == 0:
            name = f"positive {name}"
        return f"a list of {name}"
    return str(tp)


@dataclass
class Options:
    """Base of every method's options dataclass (see the module docstring)."""

    @classmethod
    def parse(cls, values: dict | None = None, where: str = _PREFIX, method: str | None = None):
        """Validated options from a mapping (``model.options``); missing fields take their defaults."""
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigError(f"{where} must be a mapping of method-specific options, got {_shown(values)}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known), key=str)  # YAML keys may be numbers, null, ...
        if unknown:
            who = f" for model.name={method!r}" if method else ""
            hint = "".join(did_you_mean(k, known, f"{where}.") for k in unknown)
            raise ConfigError(f"{where} has unknown keys {unknown}{who}{hint}; known: {sorted(known)}")
        kwargs = {name: _checked(f"{where}.{name}", hints[name], known[name].metadata, v) for name, v in values.items()}
        opts = cls(**kwargs)
        opts._where = where  # type: ignore[attr-defined]  # the prefix of fail()'s messages
        opts.check()
        return opts

    def check(self) -> None:
        """Cross-field rules of a method (override; report with :meth:`fail`)."""

    def fail(self, name: str, what: str, value) -> None:
        raise ConfigError(f"{getattr(self, '_where', _PREFIX)}.{name} must be {what}, got {_shown(value)}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def describe(cls) -> dict:
        """{field: (default, what is expected)} — for documentation and error messages."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else typing.cast(Callable, f.default_factory)()
            if f.metadata.get("check") is not None:
                out[f.name] = (default, f.metadata["what"])
                continue
            tp, optional = _split_optional(hints[f.name])
            out[f.name] = (default, _describe(tp, f.metadata) + (" or null" if optional else ""))
        return out


@dataclass
class NoOptions(Options):
    """A method without options."""


class Section:
    """Base of the configuration's sections (``data``, ``model``, ``train``, ``eval`` and the top level): their
    fields are declared with :func:`option` and checked by the same rules and messages as a method's options;
    cross-field rules go in :meth:`check`."""

    _prefix: typing.ClassVar[str] = ""

    def validate(self, p: str | None = None) -> typing.Self:
        """The section itself when every field is valid, else a :class:`ConfigError` naming the field (``p`` is the
        prefix of the messages, default the section's name); nested sections are validated under their names."""
        p = type(self)._prefix if p is None else p
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            where = f"{p}.{f.name}" if p else f.name
            if isinstance(value, Section):
                value.validate(where)
                continue
            _checked(where, hints[f.name], f.metadata, value)
        self.check(p)
        return self

    def check(self, p: str) -> None:
        """Cross-field rules of the section (override)."""
