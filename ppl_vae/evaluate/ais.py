r"""Annealed importance sampling (AIS) of log p(x) for any Pyro model/guide pair with continuous latents (Neal 2001;
as used for VAEs by Wu, Burda, Salakhutdinov & Grosse 2017 and by Cremer, Li & Duvenaud 2018).

For one datapoint x, AIS moves C independent chains through the distributions

    log π_β(z) = log π_0(z) + β · (log p(x, z) − log π_0(z)),    0 = β_0 < β_1 < … < β_T = 1,

from π_0 = the prior p(z) (``initial="prior"``; then log π_β = log p(z) + β log p(x | z)) or the guide q(z | x)
(``initial="guide"``, as Cremer et al.) to the posterior π_1 ∝ p(x, z). Chain c starts at z_0 ~ π_0 and, for
t = 1 … T, adds (β_t − β_{t−1}) · (log p(x, z_{t−1}) − log π_0(z_{t−1})) to its log-weight, then moves z with one
HMC transition that leaves π_{β_t} invariant (none after the last). Each weight is an unbiased estimate of p(x),
so log p̂(x) = logmeanexp_c log w_c is a stochastic lower bound in expectation that tends to log p(x) as T grows;
when π_0 is the exact posterior every weight equals p(x) whatever T (the zero-variance case).

What is computed
----------------
* **Densities** come from the program itself: the model is traced conditioned on the current z
  (``poutine.condition``; its latent sites give log p(z), its observed sites log p(x | z)) and, for
  ``initial="guide"``, the guide likewise (log q(z | x)). They are the *unscaled* log-densities (the data plate's
  N/B is dropped, :class:`~ppl_vae.evaluate.reference.Unscaled`; masks are kept), summed per datapoint as the
  importance weights of :mod:`ppl_vae.infer.importance` are, so log p̂(x) is on the scale of
  :func:`~ppl_vae.evaluate.log_likelihood`. The parameters stay fixed (gradients are taken with respect to z only)
  and the modules run in eval mode.
* **Unconstrained space**: HMC moves u = T⁻¹(z) with T = ``biject_to(support)`` of each latent site (the support
  as the NUTS references read it, :func:`~ppl_vae.evaluate.reference.nuts_support`: a mixture of Gaussians on the
  reals), and every density carries log |det ∂T/∂u|. A discrete latent, one whose support has no such transform,
  one that is not reparameterisable (its log-density has no gradient in z: a ``Delta``, a density computed off the
  autograd graph) and one outside the data plate are refused by name (:class:`AISError`) before any work.
* **HMC**: ``leapfrog_steps`` leapfrog steps with an identity mass matrix and a step size per datapoint (shared by
  its chains), adapted after every transition towards ``target_accept`` (× 1.02 when the chains' mean acceptance
  is above it, × 0.98 otherwise, within ``step_size_bounds``: the rule of Cremer et al.'s code). A proposal with a
  non-finite energy is rejected.
* **Schedule**: ``"sigmoid"`` (Wu et al. 2017: β̃_t = σ(δ (2t/T − 1)), rescaled to [0, 1], δ = 4; small steps at
  both ends) or ``"linear"`` (β_t = t / T); :func:`ais_schedule`.
* **Vectorised**: the chains are a particle plate outside the model's plates (as the vectorised importance
  weights), the datapoints its data plate; batches of datapoints are sized like :func:`log_likelihood`'s
  (:func:`~ppl_vae.evaluate.likelihood.plan_chunks`, four times the bytes per datapoint-chain for the gradient).
  One HMC transition costs ``leapfrog_steps`` forward and backward passes of the program over C × B
  datapoint-chains.

Randomness: one forked RNG seeded with ``seed`` (the caller's RNG is untouched); the same arguments give the same
numbers on the same device. The step-size adaptation reads all chains of a datapoint, so its chains are not
exactly independent; the Monte Carlo standard error (delta method over the chains' weights,
:func:`~ppl_vae.evaluate.likelihood.mc_std_error`) is an approximation that needs several chains.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch.distributions import biject_to

from ..distributions.plate import DATA_PLATE
from ..infer.importance import PARTICLE_PLATE, fork_rng, guess_max_plate_nesting
from ..infer.signature import adapt
from ..infer.trace_checks import IWAEError, _find_data_plate, _is_local, _reduce
from .likelihood import DEFAULT_MAX_BYTES, _check_data, bytes_per_sample, eval_mode, mc_std_error, plan_chunks

__all__ = ["ais_log_likelihood", "ais_schedule", "AISResult", "AISError", "SCHEDULES", "INITIALS"]

SCHEDULES = ("sigmoid", "linear")
INITIALS = ("prior", "guide")
_GRAPH_FACTOR = 4  # the forward graph kept for the backward pass: bytes per datapoint-chain × this


class AISError(IWAEError):
    """A program or an argument AIS cannot take (a discrete or non-reparameterisable latent, a bad schedule); the
    message names the site or argument and the way out."""


@dataclass
class AISResult:
    """Per-datapoint AIS estimates (tensors of shape (N,) unless said) and how they were made."""

    log_px: torch.Tensor  # logmeanexp over chains of the log-weights, nats (float64)
    std_error: torch.Tensor  # Monte Carlo standard error of log_px (delta method over the chains)
    acceptance: torch.Tensor  # mean HMC acceptance rate over chains and transitions
    step_size: torch.Tensor  # the adapted leapfrog step size at the end
    log_weights: torch.Tensor  # (num_chains, N): every chain's log-weight
    num_steps: int
    num_chains: int
    initial: str
    schedule: str
    seconds: float
    extras: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Floats: ``log_likelihood`` (mean over datapoints), ``mc_std_error`` (of that mean, √Σse²/N),
        ``acceptance`` (mean), ``num_data``, ``num_steps``, ``num_chains``, ``initial``, ``schedule``, ``seconds``."""
        n = self.log_px.numel()
        return {
            "log_likelihood": float(self.log_px.mean()) if n else float("nan"),
            "mc_std_error": float(self.std_error.pow(2).sum().sqrt() / n) if n else float("nan"),
            "acceptance": float(self.acceptance.mean()) if n else float("nan"),
            "num_data": n,
            "num_steps": self.num_steps,
            "num_chains": self.num_chains,
            "initial": self.initial,
            "schedule": self.schedule,
            "seconds": self.seconds,
        }


def ais_schedule(num_steps: int, schedule: str = "sigmoid", delta: float = 4.0) -> torch.Tensor:
    """β_0 = 0 < β_1 < … < β_T = 1 (float64, T + 1 values) for T = ``num_steps``: ``"linear"`` t/T, or
    ``"sigmoid"`` σ(δ (2t/T − 1)) rescaled to run from 0 to 1 (Wu et al. 2017, δ = ``delta``)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise AISError(f"num_steps must be a positive integer, got {num_steps!r}")
    if schedule not in SCHEDULES:
        raise AISError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if schedule == "linear" or num_steps == 1:
        return t
    if not delta > 0:
        raise AISError(f"the sigmoid schedule needs delta > 0, got {delta!r}")
    s = torch.sigmoid(delta * (2 * t - 1))
    beta = (s - s[0]) / (s[-1] - s[0])
    beta[0], beta[-1] = 0.0, 1.0
    return beta


# ----------------------------------------------------------------------------------------------------------
# The program's densities, per chain and datapoint, in the unconstrained space
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Site:
    name: str
    transform: object  # z = transform(u)
    event_dim: int
    pi: int  # position of the chain (particle) dim in the site's value
    di: int  # position of the datapoint dim

    def per_point(self, t: torch.Tensor, C: int, B: int) -> torch.Tensor:
        """Sum of ``t`` (a value-shaped tensor) over every dim but the chain and datapoint dims: (C, B)."""
        return t.movedim((self.pi, self.di), (0, 1)).reshape(C, B, -1).sum(-1)

    def spread(self, m: torch.Tensor, ndim: int) -> torch.Tensor:
        """A (C, B), (1, B) or (C, 1) tensor shaped to broadcast against a ``ndim``-dim value of the site."""
        shape = [1] * ndim
        shape[self.pi], shape[self.di] = m.shape[0], m.shape[1]
        return m.reshape(shape)


def _latent_site(name: str, site) -> bool:
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and not site["infer"].get("_do_not_trace")
    )


def _has_gradient(fn, value) -> bool:
    """Whether ``fn.log_prob`` has a gradient in its value (a mixture of Gaussians has one without ``rsample``; a
    ``Delta`` or a density computed off the autograd graph has none)."""
    with torch.enable_grad():
        v = value.detach().clone().requires_grad_()
        try:
            lp = fn.log_prob(v)
            g = torch.autograd.grad(lp.sum(), v, allow_unused=True)[0] if lp.requires_grad else None
        except RuntimeError:
            return False
    return g is not None


def _refuse(name: str, site, data_plate: str, role: str) -> None:
    """An :class:`AISError` naming ``name`` if AIS cannot move this latent site."""
    from .reference import nuts_support  # the NUTS references' reading of supports (loads ArviZ: imported here)

    fn = getattr(site["fn"], "base", site["fn"])
    kind = f"{type(fn).__name__} (support {site['fn'].support})"
    if site["fn"].support.is_discrete or site["infer"].get("enumerate"):
        raise AISError(
            f"AIS cannot move the {role}'s latent site {name!r}: its {kind} is discrete, and HMC needs a "
            "continuous latent with a gradient; estimate log p(x) of this model with importance sampling "
            "(ppl_vae.evaluate.log_likelihood) instead, or relax the site to a continuous distribution"
        )
    try:
        biject_to(nuts_support(site["fn"].support))
    except NotImplementedError:
        raise AISError(
            f"AIS cannot move the {role}'s latent site {name!r}: its {kind} has no transform to the unconstrained "
            "space HMC moves in (torch.distributions.biject_to); give that site a distribution on the reals, an "
            "interval or the positive numbers, or use ppl_vae.evaluate.log_likelihood"
        ) from None
    if not _has_gradient(site["fn"], site["value"]):
        raise AISError(
            f"AIS cannot move the {role}'s latent site {name!r}: its {kind} is not reparameterisable (its "
            "log-density has no gradient in the value, which HMC follows); use ppl_vae.evaluate.log_likelihood for "
            "this model, or give that site a differentiable density"
        )
    if not _is_local(site, data_plate):
        raise AISError(
            f"AIS cannot move the {role}'s latent site {name!r}: it is outside the data plate {data_plate!r} (a "
            "global latent), and AIS here estimates one p(x_i) per datapoint; put the site inside the data plate "
            "or make it a parameter"
        )


class _Target:
    """log π_0 (A) and log p(x, z) − log π_0 (B) per (chain, datapoint) of one batch, with their gradients."""

    def __init__(self, model, guide, args, C: int, initial: str, data_plate: str, nesting: int | None):
        from .reference import Unscaled, nuts_support

        self.args, self.C, self.initial, self.data_plate = args, C, initial, data_plate
        if nesting is None:
            nesting = guess_max_plate_nesting(model, guide, args)
        self.pdim = -(int(nesting) + 1)
        particles = pyro.plate(PARTICLE_PLATE, C, dim=self.pdim)
        self.model = particles(Unscaled()(model))
        self.guide = particles(Unscaled()(guide))
        with torch.no_grad(), poutine.block():
            tr = poutine.trace(self.model).get_trace(*args)
        tr = prune_subsample_sites(tr)
        latents = [n for n, s in tr.nodes.items() if _latent_site(n, s)]
        if not latents:
            raise AISError("the model has no latent sample site: its log p(x) needs no AIS")
        for n in latents:
            _refuse(n, tr.nodes[n], data_plate, "model")
        plate = _find_data_plate((tr,), data_plate)
        if plate is None:
            raise AISError(
                f"no plate named {data_plate!r} in the model: AIS gives one log p(x_i) per datapoint and needs the "
                "model's per-datapoint sites inside that plate (ppl_vae.distributions.plate.data_plate)"
            )
        self.B, self.ddim = plate.size, plate.dim
        self.latents = latents
        self.sites: dict[str, _Site] = {}
        self.prior_draw = {}
        for n in latents:
            s = tr.nodes[n]
            v = s["value"]
            nb = v.dim() - s["fn"].event_dim
            if nb < -self.pdim or v.shape[nb + self.pdim] != C or v.shape[nb + self.ddim] != self.B:
                raise AISError(
                    f"the model's latent site {n!r} has value shape {tuple(v.shape)}: AIS needs its batch shape to "
                    f"hold the chains at dim {self.pdim} and the datapoints at dim {self.ddim}"
                )
            self.sites[n] = _Site(
                n, biject_to(nuts_support(s["fn"].support)), s["fn"].event_dim, nb + self.pdim, nb + self.ddim
            )
            self.prior_draw[n] = v.detach()
        if initial == "guide":
            with torch.no_grad(), poutine.block():
                gtr = prune_subsample_sites(poutine.trace(self.guide).get_trace(*args))
            glat = [n for n, s in gtr.nodes.items() if _latent_site(n, s)]
            for n in glat:
                _refuse(n, gtr.nodes[n], data_plate, "guide")
            if sorted(glat) != sorted(latents):
                raise AISError(
                    f"initial='guide' needs the guide to sample the model's latent sites {sorted(latents)}; it "
                    f"samples {sorted(glat)}; use initial='prior'"
                )
            self.guide_draw = {n: gtr.nodes[n]["value"].detach() for n in latents}

    def start(self) -> dict:
        """Unconstrained starting points, one per chain and datapoint, drawn from π_0."""
        draw = self.prior_draw if self.initial == "prior" else self.guide_draw
        return {n: self.sites[n].transform.inv(draw[n]).detach() for n in self.latents}

    def _terms(self, fn, z: dict) -> tuple:
        """(Σ over the sites in ``z``, Σ over ``fn``'s other sample sites) of the unscaled, masked log-densities
        per (chain, datapoint), from one run of ``fn`` conditioned on ``z``."""
        tr = poutine.trace(poutine.condition(fn, data=z)).get_trace(*self.args)
        tr = prune_subsample_sites(tr)
        tr.compute_log_prob()
        inside, other = 0.0, 0.0
        for name, site in tr.nodes.items():
            if site["type"] != "sample":
                continue
            if not _is_local(site, self.data_plate):
                raise AISError(
                    f"the site {name!r} is outside the data plate {self.data_plate!r}: its density belongs to no "
                    "one datapoint, and AIS gives one log p(x_i) per datapoint"
                )
            lp = _reduce(
                scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"]), self.ddim, self.pdim, self.C, self.B, name
            )
            if name in z:
                inside = inside + lp
            else:
                other = other + lp
        return inside, other

    def __call__(self, u: dict):
        """(A, B, grad A, grad B) at the unconstrained point ``u`` (dicts of the sites' tensors)."""
        with torch.enable_grad():
            leaves = {n: t.detach().requires_grad_() for n, t in u.items()}
            z, log_j = {}, 0.0
            for n, s in self.sites.items():
                zn = s.transform(leaves[n])
                z[n] = zn
                lj = s.transform.log_abs_det_jacobian(leaves[n], zn)
                nb = zn.dim() - s.event_dim
                if lj.dim() > nb:  # a transform that leaves the event dims unsummed
                    lj = lj.sum(tuple(range(nb, lj.dim())))
                log_j = log_j + _reduce(lj, self.ddim, self.pdim, self.C, self.B, n)
            log_prior, log_lik = self._terms(self.model, z)
            if self.initial == "prior":
                a, b = log_prior + log_j, log_lik
            else:
                log_q = self._terms(self.guide, z)[0]
                a, b = log_q + log_j, log_prior + log_lik - log_q
            names = list(leaves)
            xs = [leaves[n] for n in names]
            gb = torch.autograd.grad(b.sum(), xs, retain_graph=True, allow_unused=True)
            ga = torch.autograd.grad(a.sum(), xs, allow_unused=True)

        def grads(gs):
            return {n: (torch.zeros_like(x) if g is None else g) for n, x, g in zip(names, xs, gs, strict=True)}

        return a.detach(), b.detach(), grads(ga), grads(gb)


# ----------------------------------------------------------------------------------------------------------
# AIS with HMC transitions over one batch
# ----------------------------------------------------------------------------------------------------------


def _where(mask, new: dict, old: dict, sites: dict) -> dict:
    return {n: torch.where(sites[n].spread(mask, old[n].dim()), new[n], old[n]) for n in old}


def _ais_batch(target: _Target, betas, leapfrog_steps, step_size, target_accept, bounds, adapt_step):
    C, B = target.C, target.B
    sites = target.sites
    u = target.start()
    a, b, ga, gb = target(u)
    dtype = next(iter(u.values())).dtype
    eps = torch.full((B,), float(step_size), dtype=dtype, device=a.device)
    log_w = torch.zeros(C, B, dtype=torch.float64, device=a.device)
    accepted = torch.zeros(B, dtype=torch.float64, device=a.device)
    T = len(betas) - 1
    with pyro.validation_enabled(False):  # the first pass (above) was validated; the others repeat it
        for t in range(1, T + 1):
            beta_prev, beta = float(betas[t - 1]), float(betas[t])
            log_w += (beta - beta_prev) * b.double()
            if t == T:
                break
            # one HMC transition leaving π_β invariant: log π_β = a + β b
            v = {n: torch.randn_like(x) for n, x in u.items()}
            h0 = -(a + beta * b) + 0.5 * sum(sites[n].per_point(v[n] ** 2, C, B) for n in v)
            un, vn = dict(u), dict(v)
            g = {n: ga[n] + beta * gb[n] for n in u}
            an, bn, gan, gbn = a, b, ga, gb
            for _ in range(leapfrog_steps):
                for n in un:
                    e = sites[n].spread(eps.unsqueeze(0), un[n].dim())
                    vn[n] = vn[n] + 0.5 * e * g[n]
                    un[n] = un[n] + e * vn[n]
                an, bn, gan, gbn = target(un)
                g = {n: gan[n] + beta * gbn[n] for n in un}
                for n in un:
                    e = sites[n].spread(eps.unsqueeze(0), un[n].dim())
                    vn[n] = vn[n] + 0.5 * e * g[n]
            h1 = -(an + beta * bn) + 0.5 * sum(sites[n].per_point(vn[n] ** 2, C, B) for n in vn)
            log_r = (h0 - h1).double()
            accept = (torch.rand_like(log_r).log() < log_r) & torch.isfinite(log_r)
            u = _where(accept, un, u, sites)
            ga, gb = _where(accept, gan, ga, sites), _where(accept, gbn, gb, sites)
            a, b = torch.where(accept, an, a), torch.where(accept, bn, b)
            rate = accept.double().mean(0)
            accepted += rate
            if adapt_step:
                eps = (eps * torch.where(rate > target_accept, 1.02, 0.98).to(dtype)).clamp(*bounds)
    return log_w, accepted / max(T - 1, 1), eps


def ais_log_likelihood(
    model,
    guide,
    x: torch.Tensor,
    y=None,
    *,
    num_steps: int = 500,
    num_chains: int = 8,
    leapfrog_steps: int = 5,
    step_size: float = 0.1,
    target_accept: float = 0.65,
    adapt_step_size: bool = True,
    step_size_bounds: tuple[float, float] = (1e-4, 0.5),
    schedule: str = "sigmoid",
    initial: str = "prior",
    seed: int = 0,
    batch_size: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    data_plate: str = DATA_PLATE,
    max_plate_nesting: int | None = None,
) -> AISResult:
    """AIS estimate of log p(x_i) for every datapoint of ``x`` (module docstring): ``num_chains`` chains per
    datapoint, ``num_steps`` annealing steps on the ``schedule`` (``"sigmoid"`` or ``"linear"``), from
    ``initial`` = ``"prior"`` p(z) or ``"guide"`` q(z | x) to p(z | x), with an HMC transition of
    ``leapfrog_steps`` leapfrog steps after every step but the last (step size ``step_size`` to start, adapted per
    datapoint towards the acceptance rate ``target_accept`` within ``step_size_bounds`` unless
    ``adapt_step_size=False``). ``model``/``guide`` are called as ``model(x)`` or ``model(x, y)``; the guide is
    used only by ``initial="guide"`` (and to count the plates). Datapoints run in batches of ``batch_size``
    (default: from the memory budget ``max_bytes``). Returns an :class:`AISResult` (``log_px``, ``std_error``,
    ``acceptance``, ``step_size``, ``log_weights``, ``seconds``; ``summary()`` for floats)."""
    y = _check_data(x, y)
    for name, v in (("num_chains", num_chains), ("leapfrog_steps", leapfrog_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise AISError(f"{name} must be a positive integer, got {v!r}")
    if initial not in INITIALS:
        raise AISError(f"initial must be one of {list(INITIALS)}, got {initial!r}")
    lo, hi = (float(s) for s in step_size_bounds)
    if not (0 < lo <= float(step_size) <= hi):
        raise AISError(f"step_size must be positive and within step_size_bounds {step_size_bounds}, got {step_size!r}")
    if not 0 < target_accept < 1:
        raise AISError(f"target_accept must be in (0, 1), got {target_accept!r}")
    betas = ais_schedule(num_steps, schedule)
    N, C = x.shape[0], int(num_chains)
    per = _GRAPH_FACTOR * bytes_per_sample(x)
    batch_size, _ = plan_chunks(N, C, batch_size, C, max_bytes=max_bytes, bytes_per_sample=per)
    t0 = time.perf_counter()
    parts = []
    modules = [inspect.unwrap(f) for f in (model, guide)]
    with eval_mode(*modules), fork_rng():
        model, guide = adapt(model, "model"), adapt(guide, "guide")
        torch.manual_seed(seed)
        nesting = max_plate_nesting
        for start in range(0, N, batch_size):
            xb = x[start : start + batch_size]
            args = (xb,) if y is None else (xb, y[start : start + batch_size])
            target = _Target(model, guide, args, C, initial, data_plate, nesting)
            nesting = -target.pdim - 1
            if target.B != xb.shape[0]:
                raise AISError(
                    f"the plate {data_plate!r} has {target.B} datapoints but the batch has {xb.shape[0]}: the data "
                    "plate must run over the batch passed to the model"
                )
            parts.append(_ais_batch(target, betas, leapfrog_steps, step_size, target_accept, (lo, hi), adapt_step_size))
    log_w = torch.cat([p[0] for p in parts], 1) if parts else torch.zeros(C, 0, dtype=torch.float64)
    log_px = torch.logsumexp(log_w, 0) - math.log(C)
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
    return AISResult(
        log_px=log_px,
        std_error=mc_std_error(ess, C),
        acceptance=torch.cat([p[1] for p in parts]) if parts else log_px.new_zeros(0),
        step_size=torch.cat([p[2] for p in parts]).double() if parts else log_px.new_zeros(0),
        log_weights=log_w,
        num_steps=int(num_steps),
        num_chains=C,
        initial=initial,
        schedule=schedule,
        seconds=time.perf_counter() - t0,
    )
