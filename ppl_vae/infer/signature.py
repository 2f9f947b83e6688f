"""How a Pyro program takes its data, read once from its signature.

Pyro users write ``model(x)`` (Pyro's own VAE tutorial), ``model(x, y)`` or ``model(x, y=None)``. The training
loop and the evaluation call every pair as ``fn(x, y)``; :func:`adapt` makes a one-argument program fit that call
(its labels are simply not passed: a model that does not condition on them does not need them).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from ..errors import ProgramError

__all__ = ["data_arguments", "adapt"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


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
    """``fn`` itself when it takes ``(x, y)``; a wrapper that calls ``fn(x)`` when it takes ``x`` only; a
    :class:`ProgramError` naming ``role`` when it takes no data argument."""
    if isinstance(fn, _TakesXOnly):
        return fn
    n = data_arguments(fn)
    if n == 2:
        return fn
    if n == 0:
        name = fn.__qualname__ if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__name__
        raise ProgramError(
            f"the {role} {name}() takes no data argument: ppl-vae calls it with the minibatch, so write "
            f"{role}(x) or {role}(x, y=None)"
        )

    return _TakesXOnly(fn)


class _TakesXOnly:
    """``fn(x)`` called as ``fn(x, y)`` (the labels are not passed on); adapting it again returns it as it is."""

    def __init__(self, fn: Callable):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, x, y=None, *args, **kwargs):
        return self.fn(x, *args, **kwargs)
