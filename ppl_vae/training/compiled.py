"""``train.compile: true``: the training objective traced once per batch shape and compiled with ``torch.compile``.

:class:`TracedELBO` runs the model, the guide, Pyro's handlers and the ELBO's trace walking once per batch shape
under ``make_fx``, with the backward pass (``torch.autograd.grad`` of the surrogate loss), and so records the
tensor operations they perform — networks, sampling, log densities, the KL and their gradients — as one graph whose
inputs are the parameters, the buffers and the batch and whose outputs are the loss and the gradients; autograd's
semantics (``detach``, ``no_grad``, DReG's gradient hooks) hold in it because autograd ran them while tracing.
``torch.compile`` compiles that graph, and every step runs it without any Pyro Python. This is ``train.jit``'s
idea (Pyro's ``JitTrace_ELBO``, TorchScript) on ``torch.compile``: Dynamo cannot capture Pyro's ELBO itself (its
handlers split ``Trace_ELBO.differentiable_loss`` into 18 graphs), a trace through it is one graph. The same
limits as ``train.jit``: what the program reads as a Python value (a shape, a check, a β) is fixed in the graph; the
objective must be of Pyro's ``Trace_ELBO`` family or this library's IWAE/DReG, with a reparameterised guide
(:func:`traceable`).

Where the objective cannot be traced (a plan's own objective, several processes, a guide with a discrete site)
the model's networks are compiled instead: the Pyro program runs as written and calls networks whose forward pass
is compiled (``nn.Module.compile``: the module itself is unchanged, so its parameters, ``state_dict`` keys and
checkpoints are those of the eager run). Which networks: the model's attributes named in its ``compiled_networks``
(default ``("encoder", "decoder")``) that are ``nn.Module``\\ s with parameters; a model without such networks
(e.g. a ``(model_fn, guide_fn)`` pair) is trained eagerly with one warning. A network whose compilation fails at
its first call runs eagerly from then on, with one warning naming it and the reason. After
:func:`~ppl_vae.training.fit` the networks are eager again, so an evaluation at other shapes does not recompile.

Compiling costs time once per batch shape (the last, smaller batch of an epoch has its own graph): seconds to tens
of seconds on a CPU, which pays off only over long runs (``bench/overhead.py`` measures it).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import warnings
from collections.abc import Iterator

import pyro
import torch
from pyro import poutine
from torch import nn

from ..infer.base import Objective
from ..infer.importance import fork_rng

__all__ = [
    "compiled_networks",
    "compile_networks",
    "compiled_objective",
    "compiled_fit",
    "traceable",
    "TracedELBO",
    "BACKEND",
    "CompileFallbackWarning",
]

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


# -- the whole objective, traced once per batch shape ---------------------------------------------------------

_TRACEABLE = ("Trace_ELBO", "TraceMeanField_ELBO", "AnalyticKLELBO", "TraceIWAE")
_VALUE_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")


class Untraceable(Exception):
    """Why an objective cannot be traced into one graph (the reason is the message)."""


def traceable(objective) -> bool:
    """Whether ``train.compile`` traces ``objective`` whole: exactly Pyro's ``Trace_ELBO`` or ``TraceMeanField_ELBO``
    or this library's ``AnalyticKLELBO`` or ``TraceIWAE`` (IWAE or DReG; one particle or vectorised particles). A
    subclass — a method's own objective — may read values that change between steps, so its model's networks are
    compiled instead."""
    return type(objective).__name__ in _TRACEABLE and type(objective).__module__.split(".")[0] in ("pyro", "ppl_vae")


class _ValuesAsConstants(torch.overrides.TorchFunctionMode):
    """While tracing: a Python value read from a tensor (``.item()``, ``bool(t)``, ...) is the value it has now,
    read without recording, so Pyro's bookkeeping (``torch_item`` of the loss, ``warn_if_nan``, the argument checks)
    runs as in an eager step; such a value is fixed in the graph, as in ``torch.jit.trace``. The hooks by which
    ``warn_if_nan`` would warn of NaN gradients are not registered (the loop stops on a NaN loss)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "register_hook":
            hook = args[1] if len(args) > 1 else (kwargs or {}).get("hook")
            if getattr(hook, "__module__", None) == "pyro.util":  # warn_if_nan's NaN-gradient warning: not traced
                return torch.utils.hooks.RemovableHandle(collections.OrderedDict())
        if getattr(func, "__name__", None) in _VALUE_READS:
            from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

            with disable_proxy_modes_tracing():
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _Call(nn.Module):
    """``fn(*args)`` with ``module`` as a child, so that ``torch.func.functional_call`` can swap its tensors."""

    def __init__(self, module: nn.Module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args):
        return self.fn(*args)


class TracedELBO:
    """``train.compile``'s objective: ``objective`` (:func:`traceable`) traced once per batch shape — through the
    model, the guide, Pyro's handlers and the ELBO's trace walking — into one graph of tensor operations
    (``make_fx``) whose inputs are the module's parameters and buffers, the param store's other parameters and the
    batch, and whose outputs are the loss's value and the gradients of the surrogate loss (an
    :class:`~ppl_vae.infer.base.Objective`'s ``loss_and_surrogate``, else Pyro's ``differentiable_loss`` for both);
    that graph runs under ``torch.compile`` and ``loss_and_grads`` adds its gradients to the parameters' ``.grad``.
    Nothing of Pyro runs at a compiled step: what the trace read as a Python value (a shape, a check, β) is fixed in
    the graph, so ``key()`` (β of a KL warm-up) is part of the graph's key.

    Requirements, checked when tracing: every guide site reparameterised (the value of Pyro's surrogate loss is
    then the loss), every parameter created before the trace (one eager pass under a forked RNG creates them) and no
    parameter captured as a constant. Where one fails, or the compiled graph cannot run, :attr:`failed` holds the
    reason, that step and every later one run ``objective`` eagerly and ``on_fallback(reason)`` is called once.
    While ``static()`` is false (the epochs of a KL warm-up, β changing every epoch) the steps run eagerly.
    ``loss`` (validation) runs ``objective`` eagerly."""

    def __init__(self, objective, module: nn.Module, backend=None, key=None, static=None, on_fallback=None):
        self.objective, self.module, self.backend = objective, module, backend
        self.key, self.static, self.on_fallback = key or (lambda: None), static or (lambda: True), on_fallback
        self.graphs: dict = {}
        self.failed: str | None = None

    def __getattr__(self, name):  # num_particles, max_plate_nesting, ... of the wrapped objective
        if name == "objective":
            raise AttributeError(name)
        return getattr(self.objective, name)

    @property
    def traces(self) -> int:
        return len(self.graphs)

    def loss(self, model, guide, *args, **kwargs):
        return self.objective.loss(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return self.objective.differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if self.failed is None and self.static():
            tensors, rest = _split(args, kwargs)
            key = (
                _identity(model),
                _identity(guide),
                self.key(),
                rest,
                tuple((t.shape, t.dtype, t.device) for t in tensors),
            )
            try:
                return self._compiled_step(key, model, guide, args, kwargs, tensors)
            except Untraceable as e:
                self.graphs.pop(key, None)
                value = self.objective.loss_and_grads(model, guide, *args, **kwargs)  # a user's error raises here
                self.failed = str(e)
                if self.on_fallback is not None:
                    self.on_fallback(self.failed)
                return value
        return self.objective.loss_and_grads(model, guide, *args, **kwargs)

    def _compiled_step(self, key, model, guide, args, kwargs, tensors) -> float:
        """One step through the graph of ``key`` (traced first if new); :class:`Untraceable` if it cannot run."""
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._trace(model, guide, args, kwargs)
        inputs = graph.inputs()
        try:
            with torch.no_grad():  # the graph computes the gradients itself
                value, *grads = graph.fn(*inputs, *tensors)
        except _dynamo_errors() as e:
            raise Untraceable(_reason(e)) from e
        for i, g in zip(graph.trained, grads, strict=True):
            if g is not None:
                p = inputs[i]
                p.grad = g if p.grad is None else p.grad + g
        return value.item()

    def _trace(self, model, guide, args, kwargs) -> _Graph:
        from torch.fx.experimental.proxy_tensor import make_fx

        store = pyro.get_param_store()
        with torch.no_grad(), fork_rng(), poutine.block():  # every parameter exists before the trace
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            self.objective.loss(model, guide, *args, **kwargs)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not _subsample(site):
                if not getattr(site["fn"], "has_rsample", False):
                    raise Untraceable(f"the guide's site {name!r} ({type(site['fn']).__name__}) is not reparameterised")
        graph = _Graph(self.module, store)
        if graph.size == 0:
            raise Untraceable("the model has no parameters")
        tensors, _ = _split(args, kwargs)
        objective = self.objective

        def step(*flat):
            params, batch = flat[: graph.size], iter(flat[graph.size :])
            call_args = tuple(next(batch) if torch.is_tensor(a) else a for a in args)
            call_kwargs = {k: next(batch) if torch.is_tensor(v) else v for k, v in kwargs.items()}
            with graph.swapped(params) as swap:
                surrogate, value = torch.func.functional_call(
                    _Call(self.module, lambda: _surrogate_and_value(objective, model, guide, call_args, call_kwargs)),
                    swap,
                    (),
                    strict=False,
                )
            # the backward pass is traced too: autograd's own semantics (detach, no_grad, tensor hooks) hold in it
            trained = [params[i] for i in graph.trained]
            grads = torch.autograd.grad(surrogate, trained, allow_unused=True) if surrogate.requires_grad else ()
            return (value, *grads) if grads else (value, *[None] * len(trained))

        names_before = set(store.keys())
        try:
            with fork_rng(), _ValuesAsConstants(), warnings.catch_warnings():  # the trace draws no step's noise
                warnings.filterwarnings("ignore", category=UserWarning)
                gm = make_fx(step, tracing_mode="real")(*graph.inputs(), *tensors)
        except Exception as e:  # noqa: BLE001 - any failure to trace means: train eagerly, with the reason
            raise Untraceable(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
        if set(store.keys()) != names_before:
            raise Untraceable(f"parameters created while tracing: {sorted(set(store.keys()) - names_before)}")
        for name, buf in gm.named_buffers():
            if buf.requires_grad or isinstance(buf, nn.Parameter):
                raise Untraceable(f"a trainable tensor is read as a constant ({name})")
        for attr in vars(gm).values():
            if torch.is_tensor(attr) and attr.requires_grad:
                raise Untraceable("a trainable tensor outside the module and the param store is read as a constant")
        graph.gm = gm
        graph.fn = torch.compile(gm, backend=self.backend or BACKEND, fullgraph=True, dynamic=False)
        return graph


class _Graph:
    """The inputs of one traced graph: the module's parameters and buffers, then the param store's parameters
    that the module does not own (unconstrained, as the store keeps them)."""

    def __init__(self, module: nn.Module, store):
        self.module, self.store = module, store
        self.param_names = [n for n, _ in module.named_parameters()]
        self.buffer_names = [n for n, _ in module.named_buffers()]
        own = {id(p) for p in module.parameters()}
        self.store_names = [n for n, p in store._params.items() if id(p) not in own]
        store_of = {id(p): n for n, p in store._params.items()}
        self.param_store_names = [store_of.get(id(p)) for p in module.parameters()]  # pyro.module's names
        self.size = len(self.param_names) + len(self.buffer_names) + len(self.store_names)
        self.trained = [i for i, t in enumerate(self.inputs()) if t.requires_grad]  # what gets a gradient
        self.gm = self.fn = None

    def inputs(self) -> list[torch.Tensor]:
        params, buffers = dict(self.module.named_parameters()), dict(self.module.named_buffers())
        return (
            [params[n] for n in self.param_names]
            + [buffers[n] for n in self.buffer_names]
            + [self.store._params[n] for n in self.store_names]
        )

    @contextlib.contextmanager
    def swapped(self, flat):
        """The tensors ``flat`` in place of the real ones: in the param store (so ``pyro.param`` and
        ``pyro.module`` return them) and as ``module.*`` names for ``functional_call``."""
        n_p, n_b = len(self.param_names), len(self.buffer_names)
        swap = {f"module.{n}": t for n, t in zip(self.param_names, flat[:n_p], strict=True)}
        swap.update({f"module.{n}": t for n, t in zip(self.buffer_names, flat[n_p : n_p + n_b], strict=True)})
        saved = dict(self.store._params)
        for store_name, t in zip(self.param_store_names, flat[:n_p], strict=True):
            if store_name is not None:
                self.store._params[store_name] = t
        for name, t in zip(self.store_names, flat[n_p + n_b :], strict=True):
            self.store._params[name] = t
        try:
            yield swap
        finally:
            self.store._params.clear()
            self.store._params.update(saved)


def _split(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], tuple]:
    """The tensors among the arguments (the graph's inputs) and a hashable record of the rest (fixed in the graph)."""
    tensors = [a for a in args if torch.is_tensor(a)] + [v for v in kwargs.values() if torch.is_tensor(v)]
    rest = tuple("<tensor>" if torch.is_tensor(a) else repr(a) for a in args) + tuple(
        (k, "<tensor>" if torch.is_tensor(v) else repr(v)) for k, v in sorted(kwargs.items())
    )
    return tensors, rest


def _surrogate_and_value(objective, model, guide, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(objective, Objective):
        surrogate, value = objective.loss_and_surrogate(model, guide, *args, **kwargs)
        return surrogate, value.detach()
    loss = objective.differentiable_loss(model, guide, *args, **kwargs)
    return loss, loss.detach()


def _identity(fn):
    """What stays the same between calls of ``fn``: a bound method is a new object at every attribute access."""
    return (id(fn.__self__), fn.__func__) if inspect.ismethod(fn) else id(fn)


def _subsample(site) -> bool:
    from pyro.poutine.subsample_messenger import _Subsample

    return isinstance(site["fn"], _Subsample)


@contextlib.contextmanager
def compiled_objective(objective, module, *, key=None, static=None, whole: bool = True, backend=None) -> Iterator:
    """``train.compile`` for one :func:`~ppl_vae.training.fit`: yields the objective to train with — a
    :class:`TracedELBO` where ``objective`` is :func:`traceable`, ``module`` has parameters and ``whole`` (one
    process) — else ``objective`` itself with the module's networks compiled (:func:`compile_networks`). A
    :class:`TracedELBO` that cannot trace falls back to the compiled networks with one warning naming the reason."""
    if module is None or not whole or not traceable(objective) or not any(True for _ in module.parameters()):
        with compile_networks(module, backend):
            yield objective
        return
    stack = contextlib.ExitStack()

    def fallback(reason: str) -> None:
        warnings.warn(
            f"train.compile: the objective of {type(module).__name__} could not be traced whole ({reason}); it "
            "runs eagerly with its networks compiled",
            CompileFallbackWarning,
            stacklevel=4,
        )
        stack.enter_context(compile_networks(module, backend))

    with stack:
        yield TracedELBO(objective, module, backend=backend, key=key, static=static, on_fallback=fallback)


@contextlib.contextmanager
def compiled_fit(loop) -> Iterator[None]:
    """``train.compile`` for one :func:`~ppl_vae.training.fit` loop: while it runs, ``loop.elbo`` is
    :func:`compiled_objective`'s (one process: the objective traced whole; epochs of a KL warm-up run eagerly, β is
    part of the graph's key)."""
    if not loop.cfg.compile:
        yield
        return
    elbo = loop.elbo
    ctx = compiled_objective(
        elbo,
        loop.module,
        key=lambda: loop.warmup.beta,
        static=lambda: loop.warmup.beta == loop.cfg.kl_weight,
        whole=loop.fabric is None,
    )
    with ctx as loop.elbo:
        try:
            yield
        finally:
            loop.elbo = elbo
