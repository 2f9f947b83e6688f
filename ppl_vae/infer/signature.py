"""How a Pyro program takes its data, read once from its signature.

Pyro users write ``model(x)`` (Pyro's own VAE tutorial), ``model(x, y)`` or ``model(x, y=None)``; some write
keyword-only data (``model(*, x, y=None)``) or one dict of the batch (``model(batch)`` reading ``batch["x"]``). The
training loop and the evaluation call every pair as ``fn(x, y)``; :func:`adapt` makes each form fit that call:

* two positional parameters (or ``*args``): ``fn(x, y)`` as it is;
* one positional parameter named ``batch``: ``fn({"x": x, "y": y})``;
* one other positional parameter: ``fn(x)`` (the labels are not passed: a model that does not condition on them
  does not need them);
* no positional parameter and keyword-only data (``x`` / ``data`` / ``obs``, and ``y`` / ``labels``): by keyword.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from pyro.poutine.messenger import Messenger

from ..errors import ProgramError

__all__ = ["data_arguments", "adapt", "on_indices"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
X_NAMES = ("x", "data", "obs")  # keyword-only names of the data
Y_NAMES = ("y", "labels")  # keyword-only names of the labels
ACCEPTED = "fn(x), fn(x, y), fn(x, y=None), fn(batch) with batch['x'], or keyword-only fn(*, x, y=None)"


def data_arguments(fn: Callable) -> int:
    """How many data arguments ``fn`` takes by position: 0, 1 (``x``) or 2 (``x`` and ``y``, or ``*args``); a
    program whose signature cannot be read (a builtin, a C function) is taken to accept ``(x, y)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return 2
    return min(2, sum(p.kind in _POSITIONAL for p in params))


def adapt(fn: Callable, role: str = "model") -> Callable:
    """``fn`` as a callable ``(x, y)`` (see the module's text for the forms read); a :class:`ProgramError` naming
    ``role`` and the forms accepted when it takes no data argument. Adapting twice returns the first wrapper."""
    if isinstance(fn, _Adapted):
        return fn
    n = data_arguments(fn)
    if n == 2:
        return fn
    if n == 1:
        first = next(iter(inspect.signature(fn).parameters))
        return _Adapted(fn, "batch" if first == "batch" else "x")
    keywords = _keyword_data(fn)
    if keywords is not None:
        return _Adapted(fn, "keywords", keywords)
    name = fn.__qualname__ if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__name__
    raise ProgramError(
        f"the {role} {name}() takes no data argument: ppl-vae calls it with the minibatch; write it as one of "
        f"{ACCEPTED.replace('fn', role)}"
    )


def _keyword_data(fn: Callable) -> tuple[str, str | None] | None:
    """The names of ``fn``'s keyword-only data and label parameters, or ``None``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    kw = [n for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY]
    xs = [n for n in kw if n in X_NAMES]
    if not xs:
        return None
    ys = [n for n in kw if n in Y_NAMES]
    return xs[0], (ys[0] if ys else None)


class _Adapted:
    """``fn`` called as ``fn(x, y)``: ``fn(x)``, ``fn({"x": x, "y": y})`` or by keyword (``how``)."""

    def __init__(self, fn: Callable, how: str, keywords: tuple[str, str | None] | None = None):
        self.fn, self.how, self.keywords = fn, how, keywords
        functools.update_wrapper(self, fn)

    def __call__(self, x, y=None, *args, **kwargs):
        if self.how == "x":
            return self.fn(x, *args, **kwargs)
        if self.how == "batch":
            return self.fn({"x": x, "y": y}, *args, **kwargs)
        assert self.keywords is not None
        xname, yname = self.keywords
        if yname is not None:
            kwargs[yname] = y
        return self.fn(*args, **{xname: x}, **kwargs)


class _OnIndices(Messenger):
    """Sets the subsample indices of the plate ``name`` (a program that indexes the whole data set by them)."""

    def __init__(self, name: str, indices):
        super().__init__()
        self.name, self.indices = name, indices

    def _pyro_sample(self, msg) -> None:
        if msg["name"] == self.name and type(msg["fn"]).__name__ == "_Subsample":
            msg["value"] = self.indices


def on_indices(fn: Callable, plate: str, indices) -> Callable:
    """``fn`` with the subsample of its plate ``plate`` fixed to ``indices`` (as ``poutine.replay`` fixes a
    model's to its guide's), not marked observed: a full-data program evaluated on chosen datapoints."""
    return _OnIndices(plate, indices)(fn)
