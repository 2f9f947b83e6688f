r"""Posterior diagnostics of an amortised guide as an ArviZ container, and PSIS k̂ of its importance weights.

Works on both current ArviZ lines (0.23.x: ``InferenceData``; 1.x: ``xarray.DataTree``) through
:mod:`ppl_vae.evaluate.azcompat`, which also handles 1.x's flipped PSIS sign.

For chosen datapoints x_i, S draws z_is ~ q(z | x_i) give the self-normalised importance sampler of p(z | x_i)
with weights w_is = p(x_i, z_is)/q(z_is | x_i). How trustworthy it is (and how good q is as a posterior
approximation) is read off the right tail of the weights: the Pareto k̂ of PSIS (Yao, Vehtari, Simpson &
Gelman, "Yes, but Did It Work?: Evaluating Variational Inference", ICML 2018; Vehtari et al., "Pareto smoothed
importance sampling", JMLR 2024): k̂ < 0.5 good, 0.5–0.7 usable, > 0.7 unreliable (the importance
estimates, including log p̂(x) of :func:`ppl_vae.evaluate.log_likelihood`, then have a huge or infinite
variance). ESS = (Σ w)² / Σ w² = 1 / Σ w̃² (normalised weights w̃) is the number of equally weighted draws the
weighted sample is worth.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..infer.importance import fork_rng, importance_log_weights
from ..infer.signature import adapt
from ..infer.trace_checks import IWAEError
from ..nn.device import eval_mode
from . import azcompat
from .likelihood import full_data_log_weights, full_data_subsample

__all__ = ["posterior_diagnostics", "psis_diagnostics", "plot_khat", "KHAT_GOOD", "KHAT_BAD"]

KHAT_GOOD = 0.5
KHAT_BAD = 0.7


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@torch.no_grad()
def posterior_diagnostics(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int = 1000,
    seed: int = 0,
    y=None,
    *,
    data_plate: str = "data",
    vectorize_particles: bool = True,
    max_plate_nesting: int | None = None,
    datapoint_index=None,
):
    """S guide draws per datapoint of ``x`` (the chosen datapoints, shape (B, ...)) as an ArviZ container
    (``InferenceData`` on arviz 0.23, ``DataTree`` on 1.x; ``data[group][var]`` reads both).

    Groups (dims ``chain`` = 1, ``draw`` = S, ``datapoint`` = B, then each variable's own dims):

    * ``posterior``: each latent site of the guide, e.g. ``z`` with dims (chain, draw, datapoint, z_dim_0);
    * ``log_likelihood``: log p(x_i | z) per observed site inside the data plate, dims (chain, draw, datapoint);
    * ``sample_stats``: ``log_weight`` = log p(x_i, z) − log q(z | x_i), ``log_joint`` = log p(x_i, z) and
      ``log_q`` = log q(z | x_i), each (chain, draw, datapoint), unscaled (independent of ``num_data``);
    * ``observed_data``: the observed values (datapoint, ...).

    ``datapoint_index`` labels the datapoints (e.g. their indices in the data set; default 0..B−1). Runs under
    ``no_grad`` in eval mode with a forked RNG seeded by ``seed``; the log-weights are those of
    :func:`ppl_vae.infer.importance.importance_log_weights`.
    """
    S = int(num_samples)
    args = (x,) if y is None else (x, y)
    options = dict(
        num_particles=S, vectorize_particles=vectorize_particles, max_plate_nesting=max_plate_nesting, keep_values=True
    )
    with eval_mode(model, guide), fork_rng():
        model, guide = adapt(model, "model"), adapt(guide, "guide")
        size = full_data_subsample(guide, x, y, data_plate)
        torch.manual_seed(seed)
        if size is None:
            lw = importance_log_weights(model, guide, args, data_plate=data_plate, **options)
        else:  # a program that indexes the whole data set x: every datapoint, in chunks of its subsample size
            lw = full_data_log_weights(model, guide, x, y, size, data_plate, **options)
    B = lw.batch_size
    if datapoint_index is None:
        datapoint_index = np.arange(B)
    datapoint_index = np.asarray(datapoint_index)
    if datapoint_index.shape != (B,):
        raise IWAEError(f"datapoint_index must have {B} entries, got shape {datapoint_index.shape}")
    posterior = {name: _np(v)[None] for name, v in lw.values.items()}
    log_lik = {name: _np(lw.model_terms[name])[None] for name in lw.observed_sites}
    latent_names = [n for n in lw.model_terms if n not in lw.observed_sites]
    log_joint = sum((lw.model_terms[n] for n in lw.model_terms), torch.zeros_like(lw.log_w))
    log_q = sum((lw.guide_terms[n] for n in lw.guide_terms), torch.zeros_like(lw.log_w))
    sample_stats = {"log_weight": _np(lw.log_w)[None], "log_joint": _np(log_joint)[None], "log_q": _np(log_q)[None]}
    observed = {name: _np(v) for name, v in lw.observed.items()}
    dims = {}  # (chain, draw,) datapoint, then <name>_dim_0, ... (the same names on both ArviZ lines)
    for group, skip in ((posterior, 3), (log_lik, 3), (sample_stats, 3), (observed, 1)):
        for name, v in group.items():
            dims.setdefault(name, ["datapoint", *(f"{name}_dim_{i}" for i in range(v.ndim - skip))])
    return azcompat.from_dict(
        {"posterior": posterior, "log_likelihood": log_lik, "sample_stats": sample_stats, "observed_data": observed},
        coords={"datapoint": datapoint_index},
        dims=dims,
        attrs={
            "inference_library": "pyro",
            "method": "importance sampling from the guide",
            "num_samples": S,
            "seed": int(seed),
            "latent_sites": ",".join(latent_names),
            "data_plate": data_plate,
        },
    )


def _log_weight_matrix(obj) -> tuple[np.ndarray, np.ndarray]:
    """(S, B) float64 log-weights and datapoint labels from an ArviZ container, a DataArray or an array."""
    if azcompat.is_arviz_data(obj):
        if "sample_stats" not in azcompat.groups(obj) or "log_weight" not in obj["sample_stats"]:
            raise IWAEError(
                "this ArviZ data has no sample_stats.log_weight; build it with "
                "posterior_diagnostics or pass the (S, B) log-weights directly"
            )
        obj = obj["sample_stats"]["log_weight"]
    if hasattr(obj, "dims") and hasattr(obj, "stack"):  # xarray.DataArray (chain, draw, datapoint)
        da = obj.stack(__sample__=("chain", "draw")).transpose("__sample__", ...)
        labels = da["datapoint"].values if "datapoint" in da.coords else np.arange(da.shape[1])
        return np.asarray(da.values, dtype=np.float64).reshape(da.shape[0], -1), np.asarray(labels)
    arr = obj.detach().cpu().double().numpy() if isinstance(obj, torch.Tensor) else np.asarray(obj, np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    elif arr.ndim == 3:  # (chain, draw, datapoint)
        arr = arr.reshape(-1, arr.shape[-1])
    elif arr.ndim != 2:
        raise IWAEError(f"log-weights must have shape (S,), (S, B) or (chain, draw, B); got {arr.shape}")
    return arr, np.arange(arr.shape[1])


def psis_diagnostics(obj, reff: float = 1.0, const_rtol: float = 1e-6) -> dict:
    """Per-datapoint PSIS Pareto k̂ and importance-sampling ESS of the guide's log-weights.

    ``obj``: the ArviZ data of :func:`posterior_diagnostics` (its ``sample_stats.log_weight``), or
    log-weights of shape (S, B) (samples first, as :class:`~ppl_vae.infer.importance.LogWeights`), (S,) or
    (chain, draw, B), as a tensor or array. Returns a dict of numpy arrays over datapoints: ``khat``
    (:func:`ppl_vae.evaluate.azcompat.psislw`, the right tail of the weights on either ArviZ line), ``ess`` = 1/Σ w̃²
    of the raw weights, ``ess_fraction`` = ess/S, ``datapoint``; and
    ``num_samples`` = S. Degenerate case: if a datapoint's log-weights are all equal up to rounding
    (spread ≤ ``const_rtol``·max(1, max|log w|), i.e. q equals the posterior there), there is no tail to fit
    (``psislw`` would report k̂ = inf): k̂ is reported as −inf (bounded weights) and ESS = S.
    """
    lw, labels = _log_weight_matrix(obj)
    S, B = lw.shape
    if S < 2:
        raise IWAEError(f"PSIS needs several draws per datapoint, got S = {S}")
    if not np.all(np.isfinite(lw) | (lw == -np.inf)):
        raise IWAEError("log-weights contain NaN or +inf")
    _, khat = azcompat.psislw(lw, r_eff=reff)
    finite = np.where(np.isfinite(lw), lw, np.nan)
    spread = np.nanmax(finite, 0) - np.nanmin(finite, 0)
    degenerate = spread <= const_rtol * np.maximum(1.0, np.nanmax(np.abs(finite), 0))
    khat = np.where(degenerate, -np.inf, khat)
    w = np.exp(lw - lw.max(0, keepdims=True))
    w = w / w.sum(0, keepdims=True)
    ess = 1.0 / (w**2).sum(0)
    return {"khat": khat, "ess": ess, "ess_fraction": ess / S, "datapoint": labels, "num_samples": S}


def plot_khat(khat, path, *, title: str = "PSIS diagnostic of the guide", labels=None) -> str:
    """Save a PNG of k̂ per datapoint with the 0.5 and 0.7 thresholds marked; returns ``path``.

    ``khat``: an array, or the dict of :func:`psis_diagnostics`. Uses matplotlib's Agg canvas directly
    (no pyplot state, no ``show``). k̂ = −inf (weights constant) is drawn at the bottom edge as a triangle.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(khat, dict):
        labels = khat.get("datapoint") if labels is None else labels
        khat = khat["khat"]
    k = np.asarray(khat.detach().cpu() if isinstance(khat, torch.Tensor) else khat, dtype=np.float64).reshape(-1)
    idx = np.arange(len(k))
    finite = np.isfinite(k)
    lo = min(-0.5, np.min(k[finite]) - 0.1) if finite.any() else -0.5
    hi = max(1.0, np.max(k[finite]) + 0.1) if finite.any() else 1.0
    fig = Figure(figsize=(max(4.0, min(12.0, 0.15 * len(k) + 3)), 3.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = np.where(k > KHAT_BAD, "tab:red", np.where(k > KHAT_GOOD, "tab:orange", "tab:blue"))
    ax.scatter(idx[finite], k[finite], c=colors[finite], s=14, zorder=3)
    if (~finite).any():
        y = np.where(k[~finite] > 0, hi, lo)
        ax.scatter(
            idx[~finite],
            y,
            marker="v",
            c=np.where(k[~finite] > 0, "tab:red", "tab:blue"),
            s=18,
            zorder=3,
            label="k-hat = ±inf (at the edge)",
        )
    ax.axhline(KHAT_GOOD, color="tab:orange", ls="--", lw=1, label=f"{KHAT_GOOD}: good below")
    ax.axhline(KHAT_BAD, color="tab:red", ls="--", lw=1, label=f"{KHAT_BAD}: unreliable above")
    ax.set_ylim(lo - 0.05, hi + 0.05)
    ax.set_xlabel("datapoint")
    ax.set_ylabel("Pareto k-hat")
    if labels is not None and len(labels) == len(k) and len(k) <= 30:
        ax.set_xticks(idx)
        ax.set_xticklabels([str(v) for v in labels], rotation=90, fontsize=7)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png")
    return path
