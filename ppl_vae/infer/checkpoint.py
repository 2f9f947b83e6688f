"""Saving and restoring a run: Pyro's param store, the optimiser, RNG states and the history, atomically.

Pyro's param store is global state and ``pyro.module`` shares tensors with the ``nn.Module`` s, so parameters
are restored *in place*: the model and guide are traced once (which registers every parameter with its
current tensor) and the saved values are copied into those tensors. Modules and store stay one object each.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine


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
    """torch.save to a temporary file in the same folder, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | Path, map_location=None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    return torch.load(path, map_location=map_location, weights_only=False)


def register_params(model, guide, *args, **kwargs) -> None:
    """Run guide and model once (values discarded) so that every ``pyro.param`` / ``pyro.module`` is registered."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)


def restore_params(model, guide, store_state: dict, *args, **kwargs) -> None:
    """Copy a saved param-store state into the live parameters, in place (see the module docstring)."""
    store = pyro.get_param_store()
    register_params(model, guide, *args, **kwargs)
    live = dict(store.named_parameters())
    saved = store_state["params"]
    with torch.no_grad():
        for name, value in saved.items():
            if name in live:
                if live[name].shape != value.shape:
                    raise ValueError(f"checkpoint parameter {name!r} has shape {tuple(value.shape)}, the model's has "
                                     f"{tuple(live[name].shape)}: was the run made with another configuration?")
                live[name].copy_(value.to(live[name].device))
            else:
                constraint = store_state.get("constraints", {}).get(name, torch.distributions.constraints.real)
                pyro.param(name, torch.distributions.transform_to(constraint)(value), constraint=constraint)
