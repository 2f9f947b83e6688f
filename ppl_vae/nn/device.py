"""Where a model lives: the one helper every layer asks (models follow the device of their parameters)."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator

import torch

__all__ = [
    "owner_module",
    "device_of",
    "eval_mode",
    "auto_threads",
    "use_threads",
    "denormals_flushed",
    "flush_denormals",
]


def auto_threads(cores: int | None = None) -> int:
    """The CPU threads of a run when ``train.threads`` is null: half the cores, at least 1 and at most 4 — one
    thread on a 2-core machine, where torch's default (one per core) collapses beside any other busy process
    (``bench/threads.py``: the numbers are in bench/README.md)."""
    cores = os.cpu_count() if cores is None else cores
    return max(1, min(4, (cores or 1) // 2))


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads for this process (``None``: :func:`auto_threads`); returns the number set."""
    n = auto_threads() if threads is None else int(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def denormals_flushed() -> bool:
    """Whether this CPU thread flushes denormal floats to zero (probed: 1e-38 · 1e-2 is 1e-40, or 0 when flushed)."""
    return float(torch.tensor(1e-38) * 1e-2) == 0.0


@contextlib.contextmanager
def flush_denormals(on: bool = True) -> Iterator[bool]:
    """Within the block, this CPU thread flushes denormal floats (|x| < 1.2e-38 in float32) to zero
    (``torch.set_flush_denormal``; ``train.flush_denormal``), and restores the previous mode after. Arithmetic on
    denormals is tens of times slower on a CPU, and training makes them: importance weights far below the largest
    (IWAE, DReG) and the gradients they scale underflow into that range. torch's worker threads started after the
    flag is set inherit it. Yields whether flushing is on (False where the CPU cannot)."""
    before = denormals_flushed()
    if on == before:
        yield before
        return
    applied = torch.set_flush_denormal(on)
    try:
        yield applied and on
    finally:
        if applied:
            torch.set_flush_denormal(before)


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


@contextlib.contextmanager
def eval_mode(*fns) -> Iterator[None]:
    """Put the modules behind ``fns`` (modules or their bound methods) in eval mode; restore every flag after."""
    modules = []
    for fn in fns:
        obj = getattr(fn, "__self__", fn)
        if isinstance(obj, torch.nn.Module) and all(obj is not m for m in modules):
            modules.append(obj)
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training
