"""``train.compile: true``: the model's networks compiled with ``torch.compile`` while it trains.

The Pyro program still runs as written — its ``pyro.sample`` sites, plates, poutine handlers and the objective's
trace walking stay eager Python — and calls networks whose forward pass is compiled (``nn.Module.compile``: the
module itself is unchanged, so its parameters, ``state_dict`` keys and checkpoints are those of the eager run).
Which networks: the model's attributes named in its ``compiled_networks`` (default ``("encoder", "decoder")``)
that are ``nn.Module``\\ s with parameters; a model without such networks (e.g. a ``(model_fn, guide_fn)`` pair) is
trained eagerly with one warning. A network whose compilation fails at its first call runs eagerly from then on,
with one warning naming it and the reason. After :func:`~ppl_vae.training.fit` the networks are eager again, so an
evaluation at other shapes does not recompile.

Compiling costs time once per stage and per mode (the first training step, the first validation pass): tens of
seconds on a CPU, which pays off only over long runs (``bench/overhead.py`` measures it).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["compiled_networks", "compile_networks", "BACKEND", "CompileFallbackWarning"]

BACKEND = "inductor"
"""The ``torch.compile`` backend (the tests use ``"eager"``: Dynamo's capture without code generation)."""
DEFAULT_NETWORKS = ("encoder", "decoder")
_NON_LEAF_GRAD = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"


class CompileFallbackWarning(UserWarning):
    """A network (or a whole model) that ``train.compile`` trains eagerly, and why."""


def _dynamo_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc

    return (exc.TorchDynamoException,)


def _reason(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause of a Dynamo error (a backend's own exception, when it raised)."""
    cause = getattr(e, "inner_exception", None) or e.__cause__ or e
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0].strip()[:200]}" if lines else type(cause).__name__


def compiled_networks(model) -> dict[str, nn.Module]:
    """name → network: the attributes of ``model`` named in ``model.compiled_networks`` (default encoder and
    decoder) that are ``nn.Module``\\ s with parameters."""
    names = getattr(model, "compiled_networks", DEFAULT_NETWORKS)
    out = {}
    for name in names:
        net = getattr(model, name, None)
        if isinstance(net, nn.Module) and any(True for _ in net.parameters()):
            out[name] = net
    return out


def _guarded(name: str, net: nn.Module, backend: str):
    """The compiled call of ``net``: on a Dynamo/compiler failure, warn once and run eagerly from then on."""
    compiled = torch.compile(net._call_impl, backend=backend)

    def call(*args, **kwargs):
        try:
            with warnings.catch_warnings():  # Dynamo reads .grad of non-leaf tensors while it traces
                warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning)
                return compiled(*args, **kwargs)
        except _dynamo_errors() as e:
            net._compiled_call_impl = None
            warnings.warn(
                f"train.compile: the network {name!r} ({type(net).__name__}) could not be compiled and runs eagerly "
                f"({_reason(e)})",
                CompileFallbackWarning,
                stacklevel=2,
            )
            return net._call_impl(*args, **kwargs)

    return call


@contextlib.contextmanager
def compile_networks(model, backend: str | None = None) -> Iterator[list[str]]:
    """Within the block, the networks of ``model`` (:func:`compiled_networks`) run compiled; yields their names.
    Networks already compiled by the caller are left as they are (and not counted)."""
    nets = compiled_networks(model) if model is not None else {}
    if not nets:
        what = type(model).__name__ if model is not None else "a (model_fn, guide_fn) pair"
        warnings.warn(
            f"train.compile: {what} has no networks to compile (attributes {list(DEFAULT_NETWORKS)}, or the names "
            "in its compiled_networks); it trains eagerly",
            CompileFallbackWarning,
            stacklevel=3,
        )
    mine = {name: net for name, net in nets.items() if getattr(net, "_compiled_call_impl", None) is None}
    for name, net in mine.items():
        net._compiled_call_impl = _guarded(name, net, backend or BACKEND)
    try:
        yield list(mine)
    finally:
        for net in mine.values():
            net._compiled_call_impl = None
