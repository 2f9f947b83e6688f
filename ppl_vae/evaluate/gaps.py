r"""The inference gap and its two parts (Cremer, Li & Duvenaud, "Inference Suboptimality in Variational
Autoencoders", ICML 2018), for any model/guide pair whose latent site is a (diagonal or full-covariance) Gaussian.

For a datapoint x with amortised guide q_φ(z|x) and the best member q*(z|x) of the same family *for that x*,

    log p(x) − ELBO[q_φ]  =  (log p(x) − ELBO[q*])  +  (ELBO[q*] − ELBO[q_φ])
      inference gap           approximation gap          amortisation gap

ELBO[q*] is found by optimising a per-datapoint Gaussian with Adam, started at the amortised q (so it can only
improve on it, up to Monte Carlo noise); log p(x) is an importance-sampled estimate (:func:`log_likelihood`),
which is itself a stochastic lower bound, so the approximation gap is a slight underestimate.

A program whose data plate indexes the whole data set itself (Pyro's subsampling idiom, ``with
pyro.plate("data", len(x), subsample_size=B) as idx: ... x[idx]``) is given ``subsample=B``: it is called with all
of ``x`` and its plate's indices fixed to chunks of B datapoints (:func:`~ppl_vae.evaluate.likelihood.
full_data_log_weights`), and q* is written the same way.

Functions: :func:`elbo_per_datapoint` (Monte Carlo ELBO of each datapoint), :func:`optimised_guide`
(the per-datapoint guide and its optimisation), :func:`amortisation_gap` and :func:`inference_gaps`.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from ..distributions.plate import DATA_PLATE
from ..errors import spell
from ..infer.importance import fork_rng, importance_log_weights
from ..infer.signature import adapt, on_indices
from ..infer.trace_checks import IWAEError
from .latents import _latent_sites
from .likelihood import full_data_log_weights

__all__ = [
    "elbo_per_datapoint",
    "optimised_guide",
    "amortisation_gap",
    "inference_gaps",
    "guide_latent_site",
    "guide_latent_sites",
    "data_plate_size",
    "check_families",
    "FAMILIES",
]

FAMILIES = ("diag", "full")
WINDOW = 100  # steps per window of the convergence rule (Cremer et al.'s code)


def _log_weights(model, guide, x, y, num_particles: int, subsample: int | None) -> torch.Tensor:
    """log p(x_i, z) − log q(z|x_i), (num_particles, len(x)); ``subsample``: the B of a full-data program."""
    if subsample is None:
        return importance_log_weights(model, guide, _args(x, y), num_particles=num_particles, max_plate_nesting=1).log_w
    return full_data_log_weights(model, guide, x, y, subsample, num_particles=num_particles, max_plate_nesting=1).log_w


@torch.no_grad()
def elbo_per_datapoint(
    model,
    guide,
    x: torch.Tensor,
    num_particles: int = 1000,
    batch_size: int = 50,
    chunk: int = 100,
    y=None,
    subsample: int | None = None,
) -> torch.Tensor:
    """Mean over ``num_particles`` guide draws of log p(x_i, z) − log q(z|x_i) for each datapoint (unscaled), in
    batches of ``batch_size`` datapoints (``len(x)`` for a guide with parameters per datapoint of all of x) and
    chunks of ``chunk`` draws. ``subsample``: the B of a program that indexes the whole of ``x`` (it gets all of x,
    its indices in chunks of B). Draws come from the global torch RNG."""
    batch_size = len(x) if subsample is not None else batch_size
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], None if y is None else y[i : i + batch_size]
        acc = torch.zeros(len(xb), dtype=x.dtype, device=x.device)
        for done in range(0, num_particles, chunk):
            k = min(chunk, num_particles - done)
            acc += _log_weights(model, guide, xb, yb, k, subsample).sum(0)
        out.append(acc / num_particles)
    return torch.cat(out)


def _chunk_traces(guide, x, y, subsample: int | None) -> list:
    """Traces of the guide covering every datapoint of x once: one trace, or for a full-data program one per
    chunk of ``subsample`` indices (the last chunk wraps around; the caller cuts what lies past len(x))."""
    if subsample is None:
        return [_trace(guide, x, y)]
    chunks = [torch.arange(i, i + subsample, device=x.device) % len(x) for i in range(0, len(x), subsample)]
    return [_trace(on_indices(adapt(guide), DATA_PLATE, idx), x, y) for idx in chunks]


def _args(x, y):
    return (x,) if y is None else (x, y)


def _trace(fn, x, y=None):
    """One run of ``fn`` traced (gradients off, values discarded, the caller's RNG untouched)."""
    with torch.no_grad(), fork_rng(), poutine.block():
        return poutine.trace(adapt(fn)).get_trace(*_args(x, y))


def data_plate_size(trace, site: str | None = None, default: int = 1) -> int:
    """The full size N of the data plate around ``site`` (default: the first sample site inside it) in
    ``trace``; ``default`` when there is no such plate."""
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or (site is not None and name != site):
            continue
        frame = next((f for f in node["cond_indep_stack"] if f.name == DATA_PLATE), None)
        if frame is not None and frame.full_size is not None:
            return int(frame.full_size)
    return default


def _latent_names(trace) -> list[str]:
    names = _latent_sites(trace)
    if not names:
        raise IWAEError("the guide has no latent sample site")
    return names


def guide_latent_sites(guide, x, y=None) -> list[str]:
    """The names of the guide's latent sample sites, in the order the guide samples them."""
    return _latent_names(_trace(guide, x, y))


def guide_latent_site(guide, x, y=None) -> str:
    """The name of the guide's one latent sample site (an error naming them if there are several)."""
    names = guide_latent_sites(guide, x, y)
    if len(names) != 1:
        raise IWAEError(f"this guide has several latent sites {names}; name one (site=...) where one is needed")
    return names[0]


def _unwrap(fn):
    """(the distribution inside ``fn``'s ``Independent`` and ``MaskedDistribution`` wrappers, the masks met)."""
    d, masks = fn, []
    while isinstance(d, (dist.Independent, dist.MaskedDistribution)):
        if isinstance(d, dist.MaskedDistribution):
            masks.append(d._mask)
        d = d.base_dist
    return d, tuple(masks)


def _gaussian(fn, family=None, name=None):
    """(kind, loc, scale) of the guide's distribution ``fn`` at site ``name``: a Gaussian, masked or not (a
    multimodal guide masks the latents of missing modalities), or — with a ``family`` — any distribution with a
    mean and a variance."""
    d, _ = _unwrap(fn)
    if isinstance(d, dist.MultivariateNormal):
        return "full", d.loc, d.scale_tril
    if isinstance(d, dist.Normal):
        return "diag", d.loc, d.scale
    if family is not None:  # another family (e.g. a mixture): the per-datapoint Gaussian starts at its moments
        try:
            return "diag", fn.mean, fn.variance.sqrt()
        except NotImplementedError:
            pass
    where = "" if name is None else f" (site {name!r})"
    if family is None:
        give = spell("family='diag' or family='full'", "--family diag or --family full")
        fix = f"for another family give {give} (a per-datapoint Gaussian started at the guide's mean and variance)"
    else:
        fix = f"{type(d).__name__} has no mean and variance to start a per-datapoint Gaussian at"
    raise IWAEError(
        f"the gap analysis needs a Gaussian guide site (Normal or MultivariateNormal), got "
        f"{type(fn).__name__}{where}; {fix}"
    )


def check_families(guide, x, y=None, family=None, sites=None) -> None:
    """Raise before any work if a latent site of ``guide`` (``sites``: default all) cannot start a per-datapoint
    Gaussian of ``family`` (the error names the site, its distribution and the way out)."""
    if family is not None and family not in FAMILIES:
        raise IWAEError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    tr = _trace(guide, x, y)
    for name in _latent_names(tr) if sites is None else sites:
        if name in tr.nodes:
            _gaussian(tr.nodes[name]["fn"], family, name)


def _start(fn, family, name=None):
    """(family, loc, raw, masks) of a per-datapoint Gaussian started at the guide's distribution ``fn`` (the
    masks of ``fn``, to be applied to the new site likewise)."""
    kind, loc, scale = _gaussian(fn, family, name)
    masks = _unwrap(fn)[1]
    family = kind if family is None else family
    if family not in FAMILIES:
        raise IWAEError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    with torch.no_grad():
        if family == "diag":
            raw = (scale if kind == "diag" else scale.pow(2).sum(-1).sqrt()).log()
        else:
            tril = scale if kind == "full" else torch.diag_embed(scale)
            raw = torch.tril(tril, -1) + torch.diag_embed(tril.diagonal(dim1=-2, dim2=-1).log())
    return family, loc.detach().clone().requires_grad_(), raw.detach().clone().requires_grad_(), masks


def _start_all(fns, family, name, n: int):
    """:func:`_start` of one site over the chunks of a full-data program (one ``fn`` per chunk of datapoints),
    put together along the datapoint dimension and cut to ``n`` datapoints."""
    if len(fns) == 1:
        return _start(fns[0], family, name)
    starts = [_start(fn, family, name) for fn in fns]
    if any(masks for *_, masks in starts):
        raise IWAEError(f"site {name!r}: a masked guide site in a program that indexes the whole data set")
    loc, raw = (torch.cat([s[i].detach() for s in starts])[:n].clone().requires_grad_() for i in (1, 2))
    return starts[0][0], loc, raw, ()


def _masked(d, masks):
    for m in masks:
        d = d.mask(m)
    return d


def optimised_guide(
    model,
    guide,
    x: torch.Tensor,
    *,
    family: str | None = None,
    steps: int = 300,
    num_particles: int = 16,
    lr: float = 1e-2,
    site=None,
    parameters=(),
    y=None,
    subsample: int | None = None,
    patience: int | None = None,
):
    """A per-datapoint Gaussian guide for ``x`` (``family`` "diag" or "full", default: that of the amortised guide's
    site), started at the amortised q and optimised with Adam (cosine-decayed ``lr`` over ``steps``) on the ELBO
    estimated with ``num_particles`` draws. With ``patience``: Cremer et al.'s convergence rule instead (their
    code's ``optimize_local_q``) — a constant ``lr``, the loss averaged over windows of 100 steps, stopped when
    ``patience`` windows in a row do not improve on the best window (``steps``: the most it may run); the steps run
    and whether it stopped by the rule are in ``local.steps_run`` and ``local.converged``; the model is held fixed
    (only the Gaussians' means and scales get gradients; ``parameters`` is accepted for compatibility and left
    untouched — switching their ``requires_grad`` off made ``pyro.module`` warn). ``site``: a latent site name or a
    list of them (default: all the guide's latent sites; several sites get independent per-datapoint Gaussians —
    mean field across sites —, each started at its amortised distribution in one guide run). ``subsample``: the B of
    a program that indexes the whole of ``x``; q* then indexes it likewise.
    Returns the guide function."""
    traces = _chunk_traces(guide, x, y, subsample)  # every site's amortised distribution for every datapoint
    tr = traces[0]
    sites = _latent_names(tr) if site is None else ([site] if isinstance(site, str) else list(site))
    for name in sites:
        if name not in tr.nodes:
            raise IWAEError(f"the guide has no sample site {name!r}")
    parts = [(name, *_start_all([t.nodes[name]["fn"] for t in traces], family, name, len(x))) for name in sites]
    size = data_plate_size(tr, sites[-1], len(x))

    def local(xb, y=None):
        plate = (
            pyro.plate(DATA_PLATE, size, subsample=torch.arange(len(xb), device=xb.device))
            if subsample is None
            else pyro.plate(DATA_PLATE, len(xb), subsample_size=subsample)  # indexes all of x, as the guide does
        )
        with plate as idx:
            for name, fam, loc, raw, masks in parts:  # a masked amortised site (a missing modality): masked alike
                loc_i, raw_i = (loc, raw) if subsample is None else (loc[idx], raw[idx])
                if fam == "diag":
                    pyro.sample(name, _masked(dist.Normal(loc_i, raw_i.exp()).to_event(1), masks))
                else:
                    L = torch.tril(raw_i, -1) + torch.diag_embed(raw_i.diagonal(dim1=-2, dim2=-1).exp())
                    pyro.sample(name, _masked(dist.MultivariateNormal(loc_i, scale_tril=L), masks))

    leaves = [t for _, _, loc, raw, _ in parts for t in (loc, raw)]
    opt = torch.optim.Adam(leaves, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if patience is None else None
    window, best, worse, done = [], math.inf, 0, 0
    local.converged = False  # type: ignore[attr-defined]
    for done in range(1, steps + 1):  # noqa: B007  (the count is read after the loop)
        lw = _log_weights(model, local, x, y, num_particles, subsample)
        loss = -lw.mean(0).sum()
        # gradients of the per-datapoint Gaussians only: the model's parameters get none and keep requires_grad
        for t, g in zip(leaves, torch.autograd.grad(loss, leaves), strict=True):
            t.grad = g
        opt.step()
        if sched is not None:
            sched.step()
            continue
        window.append(float(loss.detach()))
        if len(window) == WINDOW:
            mean, window = sum(window) / WINDOW, []
            best, worse = (mean, 0) if mean < best else (best, worse + 1)
            if worse >= patience:
                local.converged = True  # type: ignore[attr-defined]
                break
    local.steps_run = done  # type: ignore[attr-defined]
    return local


def amortisation_gap(
    model,
    guide,
    x: torch.Tensor,
    *,
    family: str | None = None,
    steps: int = 300,
    num_particles: int = 16,
    elbo_particles: int = 1000,
    lr: float = 1e-2,
    site=None,
    parameters=(),
    y=None,
    subsample: int | None = None,
    patience: int | None = None,
) -> dict:
    """ELBO of q optimised per datapoint minus the amortised ELBO, per datapoint and summarised.

    Returns ``amortised`` and ``optimised`` (per-datapoint ELBOs, tensors), ``gap`` (their difference, a tensor),
    ``optimised_guide`` (q*, the per-datapoint guide: :func:`optimised_guide`) and the summary floats
    ``amortised_elbo``, ``optimised_elbo``, ``gap_mean``, ``gap_std_error`` and
    ``datapoints_where_optimisation_lost`` (Monte Carlo noise when the amortised q is already optimal).
    ``parameters``: accepted for compatibility (the model is held fixed without touching them:
    :func:`optimised_guide`). ``subsample``: the B of a program that indexes the whole of ``x``; ``patience``: the
    convergence rule of :func:`optimised_guide` (``steps_run`` and ``converged`` say how it ended).
    """
    amortised = elbo_per_datapoint(model, guide, x, elbo_particles, y=y, subsample=subsample)
    local = optimised_guide(
        model,
        guide,
        x,
        family=family,
        steps=steps,
        num_particles=num_particles,
        lr=lr,
        site=site,
        parameters=list(parameters),
        y=y,
        subsample=subsample,
        patience=patience,
    )
    optimised = elbo_per_datapoint(model, local, x, elbo_particles, batch_size=len(x), y=y, subsample=subsample)
    gap = optimised - amortised
    return {
        "amortised": amortised,
        "optimised": optimised,
        "gap": gap,
        "optimised_guide": local,
        "amortised_elbo": float(amortised.mean()),
        "optimised_elbo": float(optimised.mean()),
        "gap_mean": float(gap.mean()),
        "gap_std_error": float(gap.std() / math.sqrt(len(x))) if len(x) > 1 else float("nan"),
        "datapoints_where_optimisation_lost": int((gap < 0).sum()),
        "steps_run": local.steps_run,
        "converged": local.converged,
    }


def inference_gaps(model, guide, x: torch.Tensor, log_px: torch.Tensor, **kwargs) -> dict:
    """:func:`amortisation_gap` plus, with log p̂(x) of the same datapoints (``log_px``), the approximation gap
    log p̂ − optimised ELBO and the inference gap log p̂ − amortised ELBO (per datapoint and their means)."""
    out = amortisation_gap(model, guide, x, **kwargs)
    lp = torch.as_tensor(log_px, dtype=torch.float64, device=x.device)
    out["approximation"] = lp - out["optimised"].double()
    out["inference"] = lp - out["amortised"].double()
    out["log_likelihood"] = float(lp.mean())
    out["approximation_gap"] = float(out["approximation"].mean())
    out["inference_gap"] = float(out["inference"].mean())
    return out
