"""Trace plumbing of the importance weights: finding the data plate in a model/guide trace, checking a pass
(local latents, reparameterisation, shapes) and reducing a site's log-density to one value per particle and
datapoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PplVaeError

PARTICLE_PLATE = "num_particles_vectorized"


class IWAEError(PplVaeError, ValueError):
    """A model/guide pair that importance weighting as implemented here cannot handle; the message says why."""


class NoDataPlateError(IWAEError):
    """Latent sites exist but no plate with the expected name (``data_plate``) was found."""


class GlobalLatentError(IWAEError):
    """The guide samples a latent outside the data plate (a global latent)."""


class SizelessPlateError(IWAEError):
    """The data plate has no size and its sites' batch shapes do not give one."""


class NonReparameterizedError(IWAEError):
    """A guide site has no ``rsample``, so the pathwise IWAE/DReG gradients do not apply."""


# ----------------------------------------------------------------------------------------------------------
# One pass: trace the guide, replay the model, reduce every site to (k, B) per-datapoint terms.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Plate:
    dim: int
    size: int  # B (subsample size)
    full_size: int  # N


def _float_scale(scale, site_name: str) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise IWAEError(
                f"site '{site_name}' has a tensor-valued scale of shape {tuple(scale.shape)}; "
                "TraceIWAE only supports the data plate's scalar subsample scale N/B"
            )
        return float(scale)
    return float(scale)


def _find_data_plate(traces, data_plate: str) -> _Plate | None:
    found: dict = {}
    sizes: list = []  # (site, its size at the dim of a sizeless data plate)
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            for f in site["cond_indep_stack"]:
                if f.name != data_plate:
                    continue
                if not f.vectorized:
                    raise IWAEError(
                        f"the plate '{data_plate}' at site '{name}' is sequential (``for i in pyro.plate(...)``); "
                        f"TraceIWAE needs a vectorised data plate: ``with pyro.plate('{data_plate}', N, "
                        "subsample=...)`` (see ppl_vae.distributions.plate.data_plate)"
                    )
                size = int(f.size) if f.size is not None else -1
                full = int(f.full_size) if f.full_size is not None else size
                found.setdefault((f.dim, size, full), name)
                if size < 0:  # a sizeless plate, ``pyro.plate(name)``: its size is that of the sites' batch dim
                    value, fn = site["value"], site["fn"]
                    shape = torch.broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - fn.event_dim])
                    sizes.append((name, int(shape[f.dim]) if len(shape) >= -f.dim else 1))
    if not found:
        return None
    if len(found) > 1:
        desc = ", ".join(f"dim {d} size {s} of {n} at '{site}'" for (d, s, n), site in found.items())
        raise IWAEError(f"the plate '{data_plate}' appears with different dims/sizes: {desc}")
    ((dim, size, full),) = found
    if size < 0:
        size = full = max(s for _, s in sizes)
        odd = {n: s for n, s in sizes if s != size}
        if odd:
            raise SizelessPlateError(
                f"the plate '{data_plate}' has no size (``pyro.plate('{data_plate}')``) and its sites disagree on "
                f"it: {size} datapoints at dim {dim}, but {odd} (a site broadcast over the plate would be counted "
                f"once per datapoint). Give the plate its size: ``pyro.plate('{data_plate}', len(x))``"
            )
    return _Plate(dim, size, full)


def _is_local(site, data_plate: str) -> bool:
    return any(f.name == data_plate for f in site["cond_indep_stack"])


def _no_plate_message(data_plate: str, names) -> str:
    return (
        f"no plate named '{data_plate}' was found, but the guide samples the latent site(s) {sorted(names)}. "
        "TraceIWAE computes one importance weight per datapoint, so per-datapoint sites must live inside the "
        f"data plate: use ppl_vae.distributions.plate.data_plate(x, num_data) or ``with pyro.plate('{data_plate}', "
        "N, subsample=torch.arange(len(x))):`` in both model and guide, or tell TraceIWAE your plate's name "
        "with TraceIWAE(data_plate='<name>')"
    )


def _check_pass(model_trace, guide_trace, plate: _Plate | None, data_plate: str, require_reparam: bool) -> None:
    guide_latents = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
    if plate is None and guide_latents:
        raise NoDataPlateError(_no_plate_message(data_plate, guide_latents))
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["infer"].get("enumerate") or site["infer"].get("_enumerate_dim") is not None:
            raise IWAEError(
                f"guide site '{name}' is enumerated (infer={{'enumerate': ...}}); TraceIWAE samples "
                "every latent from the guide and does not support enumeration: remove the "
                "enumerate flag or use TraceEnum_ELBO"
            )
        if not _is_local(site, data_plate):
            raise GlobalLatentError(
                f"guide site '{name}' is sampled outside the plate '{data_plate}' (a global latent). TraceIWAE "
                "weights each datapoint separately and supports per-datapoint latents only: make global "
                "quantities parameters (nn.Parameter / pyro.param), move the site inside the data plate, or "
                "use Trace_ELBO for models with global latents"
            )
        if name not in model_trace.nodes or model_trace.nodes[name]["type"] != "sample":
            raise IWAEError(
                f"guide site '{name}' has no sample site in the model (auxiliary guide variables are "
                "not supported by TraceIWAE)"
            )
        if require_reparam and not site["is_observed"] and not site["fn"].has_rsample:
            raise NonReparameterizedError(
                f"guide site '{name}' has distribution {type(site['fn']).__name__}, which has no rsample: the "
                "IWAE and DReG gradients implemented here are pathwise and need reparameterised guide sites "
                "(a continuous, reparameterisable or relaxed distribution, e.g. RelaxedBernoulliStraightThrough). "
                "TraceIWAE.loss and log_likelihood still work; for score-function gradients use Trace_ELBO or "
                "TraceGraph_ELBO"
            )
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"]:
            if name not in guide_latents:
                raise IWAEError(
                    f"model latent site '{name}' has no guide site: TraceIWAE draws every latent from "
                    "the guide (add it to the guide, or observe it)"
                )
            if not _is_local(site, data_plate):
                raise GlobalLatentError(
                    f"model site '{name}' is sampled outside the plate '{data_plate}' in the "
                    "model but inside it in the guide; model and guide must agree"
                )
    for trace in (model_trace, guide_trace):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            local = _is_local(site, data_plate)
            expected = plate.full_size / plate.size if (local and plate is not None) else 1.0
            actual = _float_scale(site["scale"], name)
            if not math.isclose(actual, expected, rel_tol=1e-6):
                raise IWAEError(
                    f"site '{name}' has scale {actual:g} but TraceIWAE expected {expected:g} (the plate "
                    f"'{data_plate}' subsample factor N/B{'' if local else ', i.e. 1 outside the data plate'}). "
                    "Other scale factors (poutine.scale, KL annealing, subsampled plates other than the data "
                    "plate) cannot be applied inside the log-mean-exp of an importance-weighted bound"
                )
            if local:
                for f in site["cond_indep_stack"]:
                    if f.vectorized and f.name not in (data_plate, PARTICLE_PLATE) and f.dim < plate.dim:
                        raise IWAEError(
                            f"site '{name}' is in plate '{f.name}' (dim {f.dim}) to the left of the data plate "
                            f"'{data_plate}' (dim {plate.dim}): TraceIWAE needs the data plate to be the "
                            "outermost plate of per-datapoint sites (nest other plates inside it)"
                        )


def _reduce(lp: torch.Tensor, data_dim: int | None, particle_dim: int | None, K: int, B: int, name: str):
    """Sum a site's log-density over every dim but the particle and data dims: (K, B), or (K,) if data_dim None."""
    keep = [d for d in (particle_dim, data_dim) if d is not None]
    nd = max([-d for d in keep] + [0])
    if lp.dim() < nd:
        lp = lp.reshape((1,) * (nd - lp.dim()) + tuple(lp.shape))
    if particle_dim is not None and lp.dim() > nd and any(s != 1 for s in lp.shape[: lp.dim() - nd]):
        raise IWAEError(
            f"site '{name}' has log-density shape {tuple(lp.shape)} with batch dims left of the "
            f"particle dim {particle_dim} (enumeration?); TraceIWAE does not support them"
        )
    sum_dims = [d for d in range(-lp.dim(), 0) if d not in keep]
    if sum_dims:
        lp = lp.sum(dim=sum_dims, keepdim=True)
    kp = lp.shape[particle_dim] if particle_dim is not None else 1
    bd = lp.shape[data_dim] if data_dim is not None else 1
    out = lp.reshape(kp, bd).expand(K if particle_dim is not None else 1, B if data_dim is not None else 1)
    return out if data_dim is not None else out[:, 0]


def _site_values(
    value: torch.Tensor, event_dim: int, data_dim: int, particle_dim: int | None, K: int, B: int
) -> torch.Tensor:
    """A site's value as (k, B, *rest): particle dim first, datapoint second, then nested batch and event dims."""
    batch = value.shape[: value.dim() - event_dim]
    ev = value.shape[value.dim() - event_dim :]
    nd = max(-data_dim, -particle_dim if particle_dim is not None else 0, len(batch))
    v = value.reshape((1,) * (nd - len(batch)) + tuple(batch) + tuple(ev))
    di = nd + data_dim
    if particle_dim is None:
        v = v.unsqueeze(0)
        di, pi = di + 1, 0
    else:
        pi = nd + particle_dim
    v = v.movedim((pi, di), (0, 1))
    # drop size-1 leftover batch dims (nested plates keep theirs)
    rest_batch = v.shape[2 : v.dim() - event_dim]
    keep = [s for s in rest_batch if s != 1]
    v = v.reshape(v.shape[0], v.shape[1], *keep, *ev)
    return v.expand(K if particle_dim is not None else 1, B, *v.shape[2:])


def _frame(site, name: str):
    for f in site["cond_indep_stack"]:
        if f.name == name and f.vectorized:
            return f
    return None


_SHAPE_HINT = (
    "while running {K} particles vectorised: TraceIWAE adds an outermost plate '{plate}' at dim {dim}, so every "
    "sample site gets an extra batch dim on the left. A distribution in the model or guide does not allow it "
    "(a common cause: .to_event(out.dim() - 1), which counts the particle dim as an event dim; take the number "
    "of event dims from the data shape instead). Fix the model, or use TraceIWAE(vectorize_particles=False). "
    "Original error: {err}"
)
