"""Where a model lives: the one helper every layer asks (models follow the device of their parameters)."""

from __future__ import annotations

import inspect

import torch

__all__ = ["owner_module", "device_of"]


def owner_module(obj) -> torch.nn.Module | None:
    """``obj`` itself if it is an ``nn.Module``, the module ``obj`` is a bound method of (``vae.model``), else None."""
    if isinstance(obj, torch.nn.Module):
        return obj
    if not inspect.ismethod(obj) and hasattr(obj, "__wrapped__"):  # a wrapper of a program (functools.wraps)
        obj = inspect.unwrap(obj, stop=inspect.ismethod)
    owner = obj.__self__ if inspect.ismethod(obj) else None
    return owner if isinstance(owner, torch.nn.Module) else None


def device_of(obj) -> torch.device:
    """The device of the first parameter (else buffer) of ``obj``'s module (see :func:`owner_module`); CPU for
    anything without one (a plain function, a ``(model, guide)`` pair, a module without tensors)."""
    module = owner_module(obj)
    if module is not None:
        for t in module.parameters():
            return t.device
        for t in module.buffers():
            return t.device
    return torch.device("cpu")
