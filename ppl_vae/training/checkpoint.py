"""Saving and restoring a run: Pyro's param store, the optimiser, RNG states and the history, atomically.

Pyro's param store is global state and ``pyro.module`` shares tensors with the ``nn.Module`` s, so parameters
are restored *in place*: the model and guide are traced once (which registers every parameter with its
current tensor) and the saved values are copied into those tensors. Modules and store stay one object each.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine

from ..data.atomic import temporary_beside
from ..errors import CheckpointError
from ..infer.signature import adapt
from ..nn.device import owner_module

SCHEMA = 2  # 1: written before this field existed; 2: the one-Adam optimiser state, the model's config


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then an atomic rename: ``path`` is always either the
    previous complete file or the new complete one. A failed write (a full disk, a file-size limit, a folder that
    cannot be written) raises :class:`CheckpointError` naming the file, the bytes it needed and what to do, and leaves
    no temporary file. The cause is read from the operating system's error (``errno``) that torch's writer met, not
    from torch's message, which differs between versions (``unexpected pos ...``, ``file write failed``)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_beside(path)
        with os.fdopen(fd, "wb") as f:  # a Python file: its OSError (with errno) is what torch's error chains to
            torch.save(obj, f)
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(_write_error(path, e, obj)) from e
    except RuntimeError as e:  # torch's zip writer reports a failed write as RuntimeError
        cause = _os_error(e)
        if cause is None and not _writer_failed(e):
            raise  # not a write: a bug, with its own traceback
        raise CheckpointError(_write_error(path, cause, obj, e)) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _os_error(e: BaseException) -> OSError | None:
    """The operating system's error behind ``e`` (``e`` itself, or one it was raised from or during), if any."""
    seen = set()
    link: BaseException | None = e
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError) and link.errno is not None:
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def _writer_failed(e: RuntimeError) -> bool:
    """Whether torch's zip writer (``inline_container.cc``) raised ``e``: it failed to write the file."""
    text = str(e).lower()
    return "inline_container" in text or "write" in text or "unexpected pos" in text


class _Counter:
    """A file-like sink that only counts the bytes written (the size a checkpoint needs)."""

    def __init__(self):
        self.n = 0

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        pass


def _bytes_needed(obj) -> int | None:
    counter = _Counter()
    try:
        torch.save(obj, counter)  # type: ignore[arg-type]  # a writable file-like object is all torch needs
    except Exception:
        return None
    return counter.n


def _write_error(path: Path, e: OSError | None, obj=None, raised: Exception | None = None) -> str:
    needed = _bytes_needed(obj) if obj is not None else None
    size = f" ({needed:,} bytes)" if needed is not None else ""
    code = e.errno if e is not None else None
    limit = _file_size_limit()
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full" if code == errno.ENOSPC else "the disk quota is used up"
        try:
            why += f" ({shutil.disk_usage(path.parent).free:,} bytes free)"
        except OSError:
            pass
        what = "free space or choose another --run-dir"
    elif code == errno.EFBIG or (code is None and limit is not None and needed is not None and needed > limit):
        why = (
            f"the file-size limit of this process is reached (ulimit -f: {limit:,} bytes)"
            if limit
            else "the file is larger than this file system allows"
        )
        what = "raise the limit (ulimit -f unlimited) or choose another --run-dir"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the folder cannot be written (permission denied or read-only)"
        what = "choose another --run-dir"
    elif e is not None:
        why = e.strerror or str(e)
        what = "free space or choose another --run-dir"
    else:  # torch's writer failed and named no cause
        said = (str(raised).strip().splitlines() or [type(raised).__name__])[0]
        why = f"the disk is full or the file could not be written (torch: {said})"
        what = "free space or choose another --run-dir"
    return f"could not write {str(path)!r}{size}: {why}. The previous complete file (if any) is unchanged; {what}"


def _file_size_limit() -> int | None:
    """This process's file-size limit in bytes (``ulimit -f``), or ``None`` when there is none."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def safe_types() -> list:
    """What a checkpoint may hold besides tensors, numbers, strings and containers: the constraints of Pyro's param
    store and NumPy's RNG state (an array and its dtype). Nothing else is unpickled by default."""
    constraint_types = {
        c
        for module in (torch.distributions.constraints, pyro.distributions.constraints)
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, torch.distributions.constraints.Constraint)
    }
    numpy_core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    dtypes = {type(np.dtype(name)) for name in ("uint32", "int64", "float64")}
    return [*constraint_types, np.ndarray, np.dtype, *dtypes, numpy_core.multiarray._reconstruct]


def load_checkpoint(path: str | Path, map_location=None, *, trusted: bool = False) -> dict:
    """A checkpoint as saved by the training loop, read without running code from the file (``torch.load`` with
    ``weights_only=True`` and :func:`safe_types`). A file holding other Python objects is refused with a
    :class:`CheckpointError` that names them; ``trusted=True`` unpickles it anyway (only for a file whose origin you
    trust). A damaged or truncated file is a :class:`CheckpointError` that names it (the run folder's other
    checkpoint, ``best.pt`` or ``checkpoint.pt``, may still be whole)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        if trusted:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals(safe_types()):
                ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise _damaged(path, e) from None
        found = re.search(r"(?:GLOBAL |but got <class ')([\w.]+)", str(e))
        raise CheckpointError(
            f"{str(path)!r} holds Python objects beyond tensors, numbers and containers "
            f"({found.group(1) if found else 'an object of an unknown class'}): unpickling it could run code from the "
            "file, so it is not loaded. If you trust where it comes from: ppl-vae evaluate|diagnose|gaps|sample "
            "--trust-pickle, or load_run(..., trusted=True) / load_checkpoint(path, trusted=True)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise _damaged(path, e) from None
    if not isinstance(ckpt, dict) or "param_store" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a ppl-vae checkpoint")
    return ckpt


def _damaged(path: Path, e: Exception) -> CheckpointError:
    other = "checkpoint.pt (--checkpoint last)" if path.name == "best.pt" else "best.pt (--checkpoint best)"
    return CheckpointError(
        f"{str(path)!r} is damaged or truncated and cannot be read ({type(e).__name__}); "
        f"the run's {other} may still be whole"
    )


def register_params(model, guide, *args, **kwargs) -> None:
    """Run guide and model once (values discarded) so that every ``pyro.param`` / ``pyro.module`` is registered."""
    model, guide = adapt(model, "model"), adapt(guide, "guide")  # model(x), model(x, y), model(batch), ...
    with torch.no_grad(), torch.random.fork_rng(devices=[]), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)


def renamed(names: dict, module) -> dict:
    """``names`` (a state dict, a param store's entries, the optimiser's) with the parameter names of an earlier
    release of ``module``'s class mapped to today's: a class may declare ``legacy_names = {old prefix: new prefix}``
    in state-dict form (``"encoder2."``: ``"up.0."``); the store's form (``encoder2$$$…`` → ``up$$$0.…``) and the
    optimiser's (``module.encoder2.…``) follow."""
    legacy = getattr(module, "legacy_names", None) or {}
    if not legacy:
        return names
    forms = []
    for old, new in legacy.items():
        head, _, rest = new.partition(".")
        forms += [(old, new), ("module." + old, "module." + new), (old[:-1] + "$$$", head + "$$$" + rest)]
    out = {}
    for k, v in names.items():
        for old, new in forms:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    return out


def restore_params(model, guide, store_state: dict, *args, **kwargs) -> None:
    """Copy a saved param-store state into the live parameters, in place (see the module docstring)."""
    store = pyro.get_param_store()
    register_params(model, guide, *args, **kwargs)
    live = dict(store.named_parameters())
    owner = owner_module(model)
    saved = renamed(store_state["params"], owner)
    constraints = renamed(store_state.get("constraints", {}), owner)
    with torch.no_grad():
        for name, value in saved.items():
            if name in live:
                if live[name].shape != value.shape:
                    raise CheckpointError(
                        f"checkpoint parameter {name!r} has shape {tuple(value.shape)}, the model's "
                        f"has {tuple(live[name].shape)}: was the run made with another "
                        "configuration?"
                    )
                live[name].copy_(value.to(live[name].device))
            else:
                constraint = constraints.get(name, torch.distributions.constraints.real)
                pyro.param(name, torch.distributions.transform_to(constraint)(value), constraint=constraint)


def load_module_state(module: torch.nn.Module, state: dict, path) -> None:
    """``module.load_state_dict(state)``, a mismatch reported as :class:`CheckpointError` naming the file and the
    tensors whose shapes differ (a configuration edited after the run: another latent size, other layers)."""
    state = renamed(state, module)
    own = module.state_dict()
    shapes = [
        f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if shapes or missing or unexpected:
        parts = (
            ([f"shapes differ: {'; '.join(shapes[:4])}" + (" ..." if len(shapes) > 4 else "")] if shapes else [])
            + ([f"missing: {missing[:4]}"] if missing else [])
            + ([f"unexpected: {unexpected[:4]}"] if unexpected else [])
        )
        raise CheckpointError(
            f"{str(path)!r} was written by a model of another configuration ({'; '.join(parts)}); "
            "was config.yaml edited after the run? Restore its model section or start a new run"
        )
    module.load_state_dict(state)
