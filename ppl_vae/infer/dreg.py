"""The machinery of doubly-reparameterised gradients (Tucker et al. 2019; the estimator itself is derived in
:mod:`.iwae`): the per-particle hooks, the guide's densities with detached parameters, and the two fallbacks.

The doubly reparameterised surrogate of :mod:`ppl_vae.infer.iwae` is S = Σ_k sg(w̃_k)·P_k + Σ_k sg(w̃_k²)·Q_k
(w̃ the normalised weights), and ``dreg=True`` returns P (``LogWeights.dreg_w_term``) and Q
(``LogWeights.dreg_w2_term``), both (K, B), built from **one** model pass and **one** guide pass:

* P = log p(x, z) of the same model pass that gives ``log_w``. The model is replayed not at the guide's draws z
  but at a view of them whose backward multiplies the incoming gradient by w̃_ik (a tensor hook, per particle
  and datapoint; w̃ is set as soon as ``log_w`` is known, before any backward). So ∇(Σ w̃ P) = Σ w̃ A + Σ w̃² B_p:
  the model's direct dependence on θ weighted by w̃, its path through the draws by w̃². The values are unchanged.
* Q = −log q(z; sg ψ): each guide site's ``log_prob`` recomputed at the live draw z with a copy of the site's
  distribution whose tensors are detached (the copy is generic: tensors in ``__dict__`` detached, nested
  distributions and non-module transforms copied recursively, nothing else allowed). Its gradient is −B_q, the
  guide's path through z only.

Fallbacks, chosen per pass and recorded in ``LogWeights.dreg_mode``:

* ``"guide_replay"``: a guide site's distribution cannot be detached generically (it holds an ``nn.Module``, a
  callable or another unknown object), or its tensors depend on an earlier guide draw (a hierarchical guide
  q(z2 | z1): detaching them would also cut the path of z1 through q(z2 | z1), which DReG keeps; checked on the
  autograd graph). Then Q = −[log q(z) − log q(sg z)] with the guide replayed at detached draws: one more
  *guide* pass, the model is still run once.
* ``"replay"``: a latent value does not have the particle and data-plate dims at the positions the plates
  give (e.g. a value replayed without the particle dim), so a per-particle hook cannot be placed. Then the
  model and the guide are both replayed at detached draws: P = log p(x, sg z), Q = log w + log q(sg z) −
  log p(x, sg z) (the original two-pass surrogate).

The hook assumes that log p(x_i, z_ik) depends on the draws of datapoint i and particle k only, as DReG's
derivation does, and that observed sites outside the data plate do not depend on the local latents (their path
gradient through the draws would also be scaled by w̃). A model that couples the batch (batch norm in training
mode; :class:`~ppl_vae.distributions.likelihoods.FlooredLaplace` in training mode, whose scale is floored at the
batch's mean
absolute error: ``ladder``, ``wise_ale``) gets its cross-datapoint path terms weighted w̃_ik·w̃_jl instead of the
two-pass surrogate's w̃_ik² (neither is Tucker et al.'s estimator there); ``_dreg_replay=True`` (``TraceIWAE``'s
private ``_dreg_replay`` attribute) restores the two-pass form. With ``dreg=True``, use ``log_w`` and
``model_terms`` for their values; their gradients carry the hook.
"""

from __future__ import annotations

import weakref

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Distribution, Transform, constraints

from .trace_checks import IWAEError, _frame, _is_local, _reduce


def _stop_gradient_trace(guide_trace) -> poutine.Trace:
    """A trace holding detached copies of the guide's sample values, for ``poutine.replay``."""
    sg = poutine.Trace()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            node = dict(site)
            node["value"] = site["value"].detach()
            sg.add_node(name, **node)
    return sg


# ----------------------------------------------------------------------------------------------------------
# DReG in one pass: the model's path gradient through the draws scaled by w̃ (a hook), and log q at the live
# draws with detached distribution tensors.
# ----------------------------------------------------------------------------------------------------------


class _PathWeights:
    """The normalised weights w̃ (K, B) that the hooks on the model's copies of the draws multiply by; set by
    :func:`importance_log_weights` once ``log_w`` is known (always before any backward)."""

    __slots__ = ("weights",)

    def __init__(self):
        self.weights = None


def _hooked_replay_trace(
    guide_trace, data_plate: str, particle_dim: int | None, holder: _PathWeights, offset: int, K: int
) -> poutine.Trace | None:
    """The guide trace with every differentiable latent value replaced by a view whose gradient is multiplied by
    w̃[offset:offset + k] (per particle and datapoint); None where a value's layout does not allow it."""
    out = poutine.Trace()
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        node = dict(site)
        value = site["value"]
        if not site["is_observed"] and isinstance(value, torch.Tensor) and value.requires_grad:
            frame = _frame(site, data_plate)
            if frame is None:
                return None  # a global latent: rejected by _check_pass, with the replay's messages
            batch_ndim = value.dim() - site["fn"].event_dim
            shape = [1] * value.dim()
            k = K if particle_dim is not None else 1
            positions = [(batch_ndim + frame.dim, int(frame.size))]
            if particle_dim is not None:
                positions.append((batch_ndim + particle_dim, k))
            for pos, size in positions:
                if pos >= 0 and size < 0:  # a sizeless data plate: B is the value's own (checked against the plate)
                    size = value.shape[pos]
                if pos < 0 or value.shape[pos] != size:
                    return None
                shape[pos] = size
            node["value"] = value.view_as(value)
            node["value"].register_hook(_path_hook(holder, offset, k, tuple(shape), name))
        out.add_node(name, **node)
    return out


def _path_hook(holder: _PathWeights, offset: int, k: int, shape: tuple, name: str):
    def hook(grad):
        w = holder.weights
        if w is None:
            raise IWAEError(
                f"DReG: the importance weights were not set before the backward pass through site "
                f"'{name}' (use the LogWeights of importance_log_weights(dreg=True) as returned)"
            )
        return grad * w[offset : offset + k].reshape(shape).to(grad.dtype)

    return hook


class _NotDetachable(Exception):
    pass


_ATOMS = (int, float, bool, complex, str, type(None), torch.Size, torch.dtype, torch.device, constraints.Constraint)


def _detached_copy(obj, tensors: list, memo: dict | None = None):
    """A copy of a distribution with every tensor detached (originals appended to ``tensors``).

    Recurses into nested distributions and transforms (``base_dist``, ``transforms``, a transform's inverse; cycles
    are copied once); raises :class:`_NotDetachable` for anything that might hold live parameters out of reach
    (an ``nn.Module``, a function, an unknown object).
    """
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return obj.detach()
    if isinstance(obj, _ATOMS):
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.nn.Module):
        raise _NotDetachable(type(obj).__name__)
    if isinstance(obj, (Distribution, Transform)):
        try:
            state = vars(obj)
        except TypeError:
            raise _NotDetachable(type(obj).__name__) from None
        if any(c.__dict__.get("__slots__") for c in type(obj).__mro__):  # attributes outside __dict__
            raise _NotDetachable(type(obj).__name__)
        new = object.__new__(type(obj))
        memo[id(obj)] = new
        new.__dict__.update({k: _detached_copy(v, tensors, memo) for k, v in state.items()})
        return new
    if isinstance(obj, weakref.ref):  # Transform._inv in some torch versions: a cache rebuilt on demand
        return None
    if type(obj) in (tuple, list):
        return type(obj)(_detached_copy(v, tensors, memo) for v in obj)
    if type(obj) is dict:
        return {k: _detached_copy(v, tensors, memo) for k, v in obj.items()}
    raise _NotDetachable(type(obj).__name__)


def _reaches(tensors, targets: set) -> bool:
    """Whether the autograd graph of ``tensors`` reaches one of the nodes ``targets``."""
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node in targets:
            return True
        if node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return False


def _detached_guide_fns(guide_trace) -> dict | None:
    """{site: copy of its distribution with detached tensors}, or None where that would not give log q(z; sg ψ)
    (an undetachable distribution, or one whose tensors depend on an earlier guide draw)."""
    fns, earlier, leaf_draw = {}, set(), False
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        tensors = []
        try:
            fns[name] = _detached_copy(site["fn"], tensors)
        except _NotDetachable:
            return None
        live = [t for t in tensors if t.requires_grad]
        if live and (leaf_draw or (earlier and _reaches(live, earlier))):
            return None
        value = site["value"]
        if isinstance(value, torch.Tensor) and value.requires_grad:
            if value.grad_fn is None:
                leaf_draw = True  # a draw that *is* a parameter: dependence cannot be told apart, be safe
            else:
                earlier.add(value.grad_fn)
    return fns


def _dreg_terms(
    mode,
    out,
    guide,
    args,
    kwargs,
    guide_trace,
    full_guide_trace,
    ddim,
    particle_dim,
    K,
    B,
    data_plate,
    model_sg,
    guide_sg,
    lp_of,
) -> dict:
    """P and Q of the DReG surrogate Σ w̃ P + Σ w̃² Q for one pass (module docstring, "DReG terms")."""
    log_p = sum(out["model"].values(), 0.0)
    log_q = sum(out["guide"].values(), 0.0)
    if mode == "replay":
        model_sg = prune_subsample_sites(model_sg)
        guide_sg = prune_subsample_sites(guide_sg)
        model_sg.compute_log_prob()
        guide_sg.compute_log_prob()
        log_p_sg = sum(
            (
                _reduce(lp_of(s), ddim, particle_dim, K, B, n)
                for n, s in model_sg.nodes.items()
                if s["type"] == "sample" and _is_local(s, data_plate)
            ),
            0.0,
        )
        log_q_sg = sum(
            (
                _reduce(lp_of(s), ddim, particle_dim, K, B, n)
                for n, s in guide_sg.nodes.items()
                if s["type"] == "sample"
            ),
            0.0,
        )
        return {"dreg_w": log_p_sg, "dreg_w2": log_p - log_q + log_q_sg - log_p_sg, "dreg_mode": mode}
    fns = _detached_guide_fns(guide_trace)
    if fns is not None:
        log_q_path = 0.0
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            lp = fns[name].log_prob(site["value"], *site["args"], **site["kwargs"])
            log_q_path = log_q_path + _reduce(scale_and_mask(lp, 1.0, site["mask"]), ddim, particle_dim, K, B, name)
        return {"dreg_w": log_p, "dreg_w2": -log_q_path, "dreg_mode": "one_pass"}
    sg = _stop_gradient_trace(full_guide_trace)  # subsample sites included: the same minibatch indices
    guide_sg = prune_subsample_sites(poutine.trace(poutine.replay(guide, trace=sg)).get_trace(*args, **kwargs))
    guide_sg.compute_log_prob()
    log_q_sg = sum(
        (_reduce(lp_of(s), ddim, particle_dim, K, B, n) for n, s in guide_sg.nodes.items() if s["type"] == "sample"),
        0.0,
    )
    return {"dreg_w": log_p, "dreg_w2": log_q_sg - log_q, "dreg_mode": "guide_replay"}
