r"""Importance weights of a Pyro model/guide pair, one per datapoint and guide draw: the one computation behind
:class:`~ppl_vae.infer.iwae.TraceIWAE`, :func:`ppl_vae.evaluate.log_likelihood` and the ArviZ diagnostics.

For datapoint i and K draws z_ik ~ q(z | x_i) from the guide,  log w_ik = log p(x_i, z_ik) − log q(z_ik | x_i).

What exactly is computed
------------------------
* ``log w_ik`` is built from the **unscaled** log-densities (``site["unscaled_log_prob"]``; masks are applied,
  scales are not) of every sample site inside the data plate, summed per datapoint over every dim except the
  particle dim and the data-plate dim (event dims and plates nested inside the data plate are summed).
* The data plate's subsample factor N/B multiplies the sum of the per-datapoint bounds, **outside** the
  log-mean-exp, so a minibatch loss is an unbiased estimate of the full-data objective Σ_{i≤N} L_K(x_i).
  (Pyro's ``RenyiELBO(alpha=0)`` uses the scaled ``log_prob`` inside the logsumexp, i.e. it computes
  Σ_i logmeanexp_k((N/B)·log w_ik), which is not an unbiased estimate of anything useful when N > B.)
* Global sites. *Observed* model sites outside the data plate (a global likelihood term, a ``pyro.factor``)
  are counted once: g_k is their log-density for particle k, averaged over the K particles. This is exact
  when they do not depend on the local latents (the intended use); nothing checks that.
  *Latent* sites outside the data plate (a guide sample site that is not per-datapoint) raise
  :class:`GlobalLatentError`: in our VAEs global quantities are parameters (``nn.Parameter``/``pyro.param``);
  a global latent shared by all datapoints would need one importance weight for the whole data set.
* Other scale factors (``poutine.scale``, a second subsampled plate, KL annealing) cannot be put inside a
  log-mean-exp and raise :class:`IWAEError`; so do model latents that the guide does not sample, guide
  sites that the model lacks, enumerated guide sites and (for gradients) guide sites without ``rsample``.

Particles are vectorised like Pyro's ELBOs (an outermost ``pyro.plate("num_particles_vectorized", K,
dim=-(max_plate_nesting + 1))``; nothing is added when K = 1), or drawn in a loop with
``vectorize_particles=False``; there the minibatch indices drawn by the first particle (a plate with
``subsample_size``) are replayed to the others, so the K weights of a datapoint all belong to it. A sizeless data
plate (``pyro.plate("data")``) takes its size B from its sites' batch shapes (N = B, no scaling); one whose sites
disagree (a site broadcast over the plate) raises :class:`~ppl_vae.infer.trace_checks.SizelessPlateError`. When a
vectorised pass fails on a plate's shapes, the program is run once without the particle plate: its own error is
raised if it fails there too, else the hint that the particle dim is what it does not take.

DReG terms (``dreg=True``): ``LogWeights.dreg_w_term`` and ``dreg_w2_term``, built by :mod:`.dreg` (its
docstring has how, and the fallbacks recorded in ``LogWeights.dreg_mode``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape

from .dreg import _dreg_terms, _hooked_replay_trace, _PathWeights, _stop_gradient_trace
from .signature import adapt
from .trace_checks import (
    _SHAPE_HINT,
    PARTICLE_PLATE,
    GlobalLatentError,
    IWAEError,
    NoDataPlateError,
    NonReparameterizedError,
    _check_pass,
    _find_data_plate,
    _is_local,
    _reduce,
    _site_values,
)

__all__ = [
    "importance_log_weights",
    "LogWeights",
    "fork_rng",
    "guess_max_plate_nesting",
    "PARTICLE_PLATE",
    "IWAEError",
    "NoDataPlateError",
    "GlobalLatentError",
    "NonReparameterizedError",
]


def fork_rng():
    """``torch.random.fork_rng`` over the CPU and every initialised CUDA device: the caller's RNG stays untouched."""
    devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    return torch.random.fork_rng(devices=devices)


def guess_max_plate_nesting(model: Callable, guide: Callable, args=(), kwargs=None) -> int:
    """Number of vectorised plate dims used by one (guide, model) run, like ``ELBO._guess_max_plate_nesting``.

    Runs the pair once under ``poutine.block`` inside a forked RNG, so the caller's random stream (and thus the
    draws that follow) do not depend on whether the nesting was guessed or given.
    """
    model, guide = adapt(model, "model"), adapt(guide, "guide")
    kwargs = {} if kwargs is None else kwargs
    with fork_rng(), poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        frame.dim
        for trace in (prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace))
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


@dataclass
class LogWeights:
    """Unscaled per-datapoint log importance weights of K guide draws and their parts.

    ``log_w[k, i] = Σ_{local model sites} log p − Σ_{guide sites} log q`` for particle k and datapoint i of the
    minibatch; every per-site entry has shape (K, B) (``global_terms``: (K,)). With ``dreg=True`` the DReG terms
    P, Q of the surrogate Σ_k sg(w̃) P + Σ_k sg(w̃²) Q are filled in (see "DReG terms" in the module docstring).
    """

    log_w: torch.Tensor  # (K, B)
    scale: float  # N / B of the data plate (1.0 without a data plate)
    num_data: int  # N
    model_terms: dict = field(default_factory=dict)  # local model sites (latent and observed): (K, B)
    guide_terms: dict = field(default_factory=dict)  # guide sites: (K, B)
    global_terms: dict = field(default_factory=dict)  # observed model sites outside the data plate: (K,)
    observed_sites: tuple = ()  # names of the observed local model sites
    values: dict = field(default_factory=dict)  # guide draws, (K, B, ...) (``keep_values=True``)
    observed: dict = field(default_factory=dict)  # observed local values, (B, ...) (``keep_values=True``)
    dreg_w_term: torch.Tensor | None = None  # (K, B): P of the DReG surrogate Σ w̃ P + Σ w̃² Q (``dreg=True``)
    dreg_w2_term: torch.Tensor | None = None  # (K, B): Q of the DReG surrogate (``dreg=True``)
    dreg_mode: str | None = None  # "one_pass", "guide_replay" or "replay" (module docstring)

    @property
    def num_particles(self) -> int:
        return self.log_w.shape[0]

    @property
    def batch_size(self) -> int:
        return self.log_w.shape[1]

    @property
    def global_log_w(self) -> torch.Tensor:
        """(K,) sum of the global terms (zeros without global sites)."""
        total = self.log_w.new_zeros(self.num_particles)
        for t in self.global_terms.values():
            total = total + t
        return total

    def per_datapoint_bound(self) -> torch.Tensor:
        """L_K(x_i) = logmeanexp_k log w_ik, shape (B,), unscaled."""
        return torch.logsumexp(self.log_w, dim=0) - math.log(self.num_particles)

    def bound(self) -> torch.Tensor:
        """(N/B) Σ_i L_K(x_i) + mean_k g_k: the minibatch estimate of the full-data IWAE bound (a scalar)."""
        out = self.scale * self.per_datapoint_bound().sum()
        if self.global_terms:
            out = out + self.global_log_w.mean()
        return out


def _run_pass(
    model,
    guide,
    args,
    kwargs,
    *,
    K: int,
    particle_dim: int | None,
    data_plate: str,
    dreg: bool,
    require_reparam: bool,
    keep_values: bool,
    max_plate_nesting,
    path_weights: _PathWeights | None = None,
    offset: int = 0,
    dreg_replay: bool = False,
    subsample: poutine.Trace | None = None,
) -> dict:
    mode = None
    if subsample is not None:  # the minibatch indices of the first particle (looped particles)
        model, guide = poutine.replay(model, trace=subsample), poutine.replay(guide, trace=subsample)
    try:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        replay_source = guide_trace
        if dreg:
            hooked = (
                None
                if dreg_replay
                else _hooked_replay_trace(guide_trace, data_plate, particle_dim, path_weights, offset, K)
            )
            mode = "replay" if hooked is None else "one_pass"
            replay_source = guide_trace if hooked is None else hooked
        model_trace = poutine.trace(poutine.replay(model, trace=replay_source)).get_trace(*args, **kwargs)
        if mode == "replay":
            sg = _stop_gradient_trace(guide_trace)
            model_sg = poutine.trace(poutine.replay(model, trace=sg)).get_trace(*args, **kwargs)
            guide_sg = poutine.trace(poutine.replay(guide, trace=sg)).get_trace(*args, **kwargs)
    except ValueError as e:
        if particle_dim is not None and "Shape mismatch inside plate" in str(e):
            raise _ParticleShapeError(_SHAPE_HINT.format(K=K, plate=PARTICLE_PLATE, dim=particle_dim, err=e)) from e
        raise
    full_model_trace, full_guide_trace = model_trace, guide_trace
    drawn = poutine.Trace()  # the subsample sites (minibatch indices) of this pass, for the particles after it
    for trace in (full_guide_trace, full_model_trace):
        for name, site in trace.nodes.items():
            if site_is_subsample(site) and name not in drawn:
                drawn.add_node(name, **site)
    model_trace = prune_subsample_sites(model_trace)
    guide_trace = prune_subsample_sites(guide_trace)
    plate = _find_data_plate((model_trace, guide_trace), data_plate)
    _check_pass(model_trace, guide_trace, plate, data_plate, require_reparam)  # our messages first
    if is_validation_enabled():
        check_model_guide_match(
            full_model_trace, full_guide_trace, -particle_dim if particle_dim is not None else max_plate_nesting
        )
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    if is_validation_enabled():
        nesting = -particle_dim if particle_dim is not None else max_plate_nesting
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, nesting)

    B = plate.size if plate is not None else 0
    ddim = plate.dim if plate is not None else None
    out = {"plate": plate, "model": {}, "guide": {}, "global": {}, "observed_sites": [], "values": {}, "observed": {}}
    out["subsample"] = drawn

    def lp_of(site):
        return scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])

    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if _is_local(site, data_plate):
            out["model"][name] = _reduce(lp_of(site), ddim, particle_dim, K, B, name)
            if site["is_observed"]:
                out["observed_sites"].append(name)
                if keep_values:
                    out["observed"][name] = _site_values(
                        site["value"].detach(), site["fn"].event_dim, ddim, particle_dim, K, B
                    )[0]
        else:
            out["global"][name] = _reduce(lp_of(site), None, particle_dim, K, B, name)
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        out["guide"][name] = _reduce(lp_of(site), ddim, particle_dim, K, B, name)
        if keep_values:
            out["values"][name] = _site_values(site["value"].detach(), site["fn"].event_dim, ddim, particle_dim, K, B)
    if dreg:
        out.update(
            _dreg_terms(
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
                model_sg if mode == "replay" else None,
                guide_sg if mode == "replay" else None,
                lp_of,
            )
        )
    return out


class _ParticleShapeError(IWAEError):
    """A plate shape mismatch while the particles run vectorised (re-checked without the particle plate)."""


def _own_error(model, guide, args, kwargs, data_plate: str) -> Exception | None:
    """The error of one plain (K = 1, not vectorised) pass of the program, or None if it runs: tells a program
    that is wrong by itself from one that only does not take the particle plate. RNG, param store untouched."""
    try:
        with fork_rng(), poutine.block(), torch.no_grad():
            _run_pass(
                model,
                guide,
                args,
                kwargs,
                K=1,
                particle_dim=None,
                data_plate=data_plate,
                dreg=False,
                require_reparam=False,
                keep_values=False,
                max_plate_nesting=float("inf"),
            )
    except Exception as e:  # noqa: BLE001 - any failure of the program itself is what the caller should see
        return e
    return None


def _cat(parts: list[dict], key: str) -> dict:
    names = list(parts[0][key])
    for p in parts[1:]:
        if list(p[key]) != names:
            raise IWAEError(
                f"the model/guide structure changed between particles ({key} sites {names} vs "
                f"{list(p[key])}); TraceIWAE needs the same sites in every particle"
            )
    return {n: torch.cat([p[key][n] for p in parts], dim=0) for n in names}


def importance_log_weights(
    model: Callable,
    guide: Callable,
    args=(),
    kwargs=None,
    *,
    num_particles: int = 1,
    vectorize_particles: bool = True,
    max_plate_nesting: int | float | None = None,
    data_plate: str = "data",
    dreg: bool = False,
    require_reparam: bool = False,
    keep_values: bool = False,
    particle_groups: int = 1,
    _dreg_replay: bool = False,
) -> LogWeights:
    """Draw K guide samples per datapoint and return the (K, B) matrix of unscaled log importance weights.

    The one function behind :class:`TraceIWAE`, :func:`ppl_vae.evaluate.log_likelihood` and
    :func:`ppl_vae.evaluate.posterior_diagnostics`. ``max_plate_nesting`` counts the model's own plates
    (the particle plate is added on top); ``None`` guesses it when needed. ``dreg=True`` also returns the terms
    P, Q of the DReG surrogate from the same pass (module docstring; ``_dreg_replay=True``, for tests, forces the
    two-pass ``"replay"`` fallback); ``require_reparam=True`` rejects guide sites without ``rsample``;
    ``keep_values=True`` keeps the guide draws and observed values. ``particle_groups=G``: the K particles are G
    consecutive blocks of K/G, each with a log-mean-exp of its own (the strata of
    :class:`~ppl_vae.infer.stratified.StratifiedIWAE` in one pass), so DReG's path weights w̃ are normalised within
    a block. Gradients flow unless the caller disables them.
    """
    model, guide = adapt(model, "model"), adapt(guide, "guide")
    kwargs = {} if kwargs is None else kwargs
    if (
        isinstance(num_particles, bool)
        or not isinstance(num_particles, (int, float))
        or int(num_particles) != num_particles
        or num_particles < 1
    ):
        raise IWAEError(f"num_particles must be a positive integer, got {num_particles!r}")
    K = int(num_particles)
    if (
        isinstance(particle_groups, bool)
        or not isinstance(particle_groups, int)
        or particle_groups < 1
        or K % particle_groups
    ):
        raise IWAEError(
            f"particle_groups must be a positive integer dividing num_particles={K}, got {particle_groups!r}"
        )
    holder = _PathWeights() if dreg else None
    common = dict(
        data_plate=data_plate,
        dreg=dreg,
        require_reparam=require_reparam,
        keep_values=keep_values,
        path_weights=holder,
        dreg_replay=_dreg_replay,
    )
    if vectorize_particles and K > 1:
        if max_plate_nesting is None or max_plate_nesting == float("inf"):
            max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        pdim = -(int(max_plate_nesting) + 1)
        particles = pyro.plate(PARTICLE_PLATE, K, dim=pdim)
        try:
            parts = [
                _run_pass(
                    particles(model),
                    particles(guide),
                    args,
                    kwargs,
                    K=K,
                    particle_dim=pdim,
                    max_plate_nesting=-pdim,
                    **common,
                )
            ]
        except _ParticleShapeError:
            own = _own_error(model, guide, args, kwargs, data_plate)
            if own is None:
                raise  # the program runs without the particle plate: the hint on vectorisation applies
            own.add_note(f"(raised by the model/guide itself, run once without TraceIWAE's {K} vectorised particles)")
            raise own from None
    else:
        # every particle sees the minibatch of the first: its subsample indices are replayed to the others, so the
        # K weights of a column belong to one datapoint (a plate with subsample_size draws new ones per call)
        nesting = float("inf") if max_plate_nesting is None else max_plate_nesting
        parts = []
        for k in range(K):
            sub = parts[0]["subsample"] if parts and len(parts[0]["subsample"].nodes) else None
            parts.append(
                _run_pass(
                    model,
                    guide,
                    args,
                    kwargs,
                    K=1,
                    particle_dim=None,
                    max_plate_nesting=nesting,
                    offset=k,
                    subsample=sub,
                    **common,
                )
            )
    plate = parts[0]["plate"]
    model_terms, guide_terms = _cat(parts, "model"), _cat(parts, "guide")
    global_terms = _cat(parts, "global")
    ref = next(iter([*model_terms.values(), *guide_terms.values(), *global_terms.values()]), None)
    B = plate.size if plate is not None else 0
    if ref is None:
        log_w = torch.zeros(K, B)
    else:
        log_w = ref.new_zeros(K, B)
    for t in model_terms.values():
        log_w = log_w + t
    for t in guide_terms.values():
        log_w = log_w - t
    lw = LogWeights(
        log_w=log_w,
        scale=plate.full_size / plate.size if plate is not None and plate.size > 0 else 1.0,
        num_data=plate.full_size if plate is not None else 0,
        model_terms=model_terms,
        guide_terms=guide_terms,
        global_terms=global_terms,
        observed_sites=tuple(parts[0]["observed_sites"]),
    )
    if keep_values:
        lw.values = _cat(parts, "values")
        lw.observed = parts[0]["observed"]
    if dreg:
        g = particle_groups  # w̃ for the hooks (before any backward), normalised within each block of particles
        holder.weights = torch.softmax(log_w.detach().reshape(g, K // g, B), dim=1).reshape(K, B)
        lw.dreg_w_term = torch.cat([_as_kb(p["dreg_w"], log_w, len(parts)) for p in parts], dim=0)
        lw.dreg_w2_term = torch.cat([_as_kb(p["dreg_w2"], log_w, len(parts)) for p in parts], dim=0)
        modes = {p["dreg_mode"] for p in parts}
        lw.dreg_mode = modes.pop() if len(modes) == 1 else "mixed:" + ",".join(sorted(modes))
    return lw


def _as_kb(t, log_w: torch.Tensor, num_parts: int) -> torch.Tensor:
    k = log_w.shape[0] // num_parts
    t = torch.as_tensor(t, dtype=log_w.dtype, device=log_w.device)
    return t.expand(k, log_w.shape[1])
