r"""One small layer over both current ArviZ lines: **0.23.x** (Python 3.11; ``InferenceData``) and **1.x**
(Python ≥ 3.12; ``xarray.DataTree``, the arviz-base / arviz-stats / arviz-plots split).

Everything in ppl_vae that touches ArviZ goes through these functions, so each difference between the lines is
handled in one place:

* the container: :func:`from_dict` takes ``{group: {var: array}}`` on both lines (0.23's ``az.from_dict`` wants
  one keyword per group; 1.x's the nested dict, with attributes per group), :func:`groups` lists its groups and
  ``data[group][var]`` reads a variable on both;
* **PSIS** (:func:`psislw`) takes **log importance weights** (larger = more weight; samples first) on both lines
  and smooths their right tail: 0.23's ``az.psislw(lw)`` does that; 1.x's
  ``arviz_stats.base.array_stats.psislw`` smooths the tail of its *negated* input (it expects log-likelihood
  values, as PSIS-LOO's weights are 1/p(y_i | θ)), so it is called with ``-lw``; what it returns are already
  smoothed *log-weights* (not negated), which are then normalised as 0.23 normalises them. A naive port
  (``psislw(lw)`` on 1.x) fits the bounded left tail and reports k̂ < 0 for weights
  whose true k̂ is above 1;
* ESS and R-hat of MCMC draws (:func:`ess`, :func:`rhat`: bulk ESS and rank-normalised split R-hat on both);
* netCDF (:func:`to_netcdf`, :func:`from_netcdf`; the h5netcdf engine on both);
* ``pyro.infer.MCMC`` → ArviZ (:func:`from_pyro_mcmc`): ``az.from_pyro`` on 0.23; on 1.x, which has no Pyro
  converter, the ``from_dict`` recipe — ``posterior`` from ``mcmc.get_samples(group_by_chain=True)``,
  ``sample_stats.diverging`` from ``mcmc.diagnostics()["divergences"]`` — and on both the ``log_likelihood``
  group from the caller's per-draw values;
* the k̂ plot (:func:`plot_khat`): ArviZ's own ``plot_khat`` on each line (0.23 takes the k̂ values; 1.x an
  ``ELPDData`` holding them), saved as PNG with no pyplot figure left open.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23 announces its 1.x refactor at import
    import arviz as az

__all__ = [
    "az",
    "ARVIZ_VERSION",
    "ARVIZ_1",
    "from_dict",
    "groups",
    "is_arviz_data",
    "psislw",
    "ess",
    "rhat",
    "to_netcdf",
    "from_netcdf",
    "from_pyro_mcmc",
    "plot_khat",
]

ARVIZ_VERSION = az.__version__
ARVIZ_1 = int(ARVIZ_VERSION.split(".")[0]) >= 1

if ARVIZ_1:
    from arviz_stats.base import array_stats as _array_stats
    from xarray import DataTree as _Container
else:
    _Container = az.InferenceData


def is_arviz_data(obj) -> bool:
    """True for this line's container (``InferenceData`` on 0.23, ``DataTree`` on 1.x)."""
    return isinstance(obj, _Container)


def groups(data) -> list[str]:
    """The group names of an ArviZ container, e.g. ``["posterior", "sample_stats"]``."""
    return list(data.children) if ARVIZ_1 else list(data.groups())


def from_dict(
    data: dict[str, dict[str, np.ndarray]],
    *,
    coords: dict | None = None,
    dims: dict | None = None,
    attrs: dict | None = None,
):
    """An ArviZ container from ``{group: {var: array}}`` (arrays of the sampled groups start with (chain, draw);
    ``observed_data`` and ``constant_data`` have no sample dims). ``dims`` names each variable's dims after
    (chain, draw); ``attrs`` go on the root (1.x) or on every group (0.23, which has no root)."""
    data = {g: {k: np.asarray(v) for k, v in d.items()} for g, d in data.items() if d}
    if ARVIZ_1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = az.from_dict(data, coords=coords, dims=dims)
        out.attrs.update(attrs or {})
        return out
    return az.from_dict(**data, coords=coords, dims=dims, attrs=attrs)


def psislw(log_weights: np.ndarray, r_eff: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed log-weights and k̂ of ``log_weights`` (S, B): S draws (first) for each of B targets.

    Returns (smoothed log-weights (S, B), normalised per column (logsumexp 0, as 0.23 does), and k̂ (B,)). The
    right tail of the *weights* is fitted on both ArviZ lines (see the module docstring for the 1.x sign). The
    lines agree to rounding when 3√(S/r_eff) is an integer (e.g. S = 400, 900, 1600); otherwise 0.23 fits
    ⌈3√(S/r_eff)⌉ tail draws and 1.x ⌊3√(S/r_eff)⌋, one draw fewer, which moves k̂ by a few hundredths."""
    lw = np.ascontiguousarray(np.asarray(log_weights, dtype=np.float64).T)  # (B, S): samples last
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both lines warn on k̂ > 0.7; callers report k̂ instead
        if ARVIZ_1:
            try:
                smoothed, khat = _array_stats.psislw(-lw, r_eff=r_eff, axis=-1)  # returns log-weights, not −
            except ValueError:  # 1.x refuses a tail of equal values; 0.23 reports k̂ = inf: do the same
                smoothed, khat = np.array(lw), np.full(lw.shape[0], np.inf)
                for b in range(lw.shape[0]):
                    try:
                        smoothed[b], khat[b] = _array_stats.psislw(-lw[b], r_eff=r_eff, axis=-1)
                    except ValueError:
                        pass
            smoothed = np.asarray(smoothed, dtype=np.float64)
            smoothed = smoothed - _logsumexp(smoothed)
        else:
            smoothed, khat = az.psislw(lw, reff=r_eff)
    return np.asarray(smoothed, dtype=np.float64).T, np.asarray(khat, dtype=np.float64).reshape(lw.shape[0])


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = np.max(a, axis=-1, keepdims=True)
    return m + np.log(np.exp(a - m).sum(-1, keepdims=True))


def _chain_draw(draws) -> np.ndarray:
    a = np.asarray(draws, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"MCMC draws must have shape (chain, draw, ...), got {a.shape}")
    return a


def ess(draws) -> np.ndarray:
    """Bulk effective sample size of draws of shape (chain, draw, *event) → shape ``event``."""
    a = _chain_draw(draws)
    if ARVIZ_1:
        return np.asarray(_array_stats.ess(a, chain_axis=0, draw_axis=1, method="bulk"))
    return np.asarray(az.ess(az.convert_to_dataset({"v": a}), method="bulk")["v"].values)


def rhat(draws) -> np.ndarray:
    """Rank-normalised split R-hat of draws of shape (chain, draw, *event) → shape ``event``."""
    a = _chain_draw(draws)
    if ARVIZ_1:
        return np.asarray(_array_stats.rhat(a, chain_axis=0, draw_axis=1, method="rank"))
    return np.asarray(az.rhat(az.convert_to_dataset({"v": a}), method="rank")["v"].values)


def to_netcdf(data, path) -> str:
    """Write an ArviZ container to a netCDF file (h5netcdf engine); returns the path."""
    path = os.fspath(path)
    data.to_netcdf(path, engine="h5netcdf")  # InferenceData and DataTree share the call
    return path


def from_netcdf(path):
    """Read what :func:`to_netcdf` wrote: ``InferenceData`` (0.23) or ``DataTree`` (1.x), loaded into memory."""
    path = os.fspath(path)
    if ARVIZ_1:
        import xarray as xr

        return xr.open_datatree(path, engine="h5netcdf").load()
    out = az.from_netcdf(path, engine="h5netcdf")
    for g in out.groups():
        out[g].load()
    return out


def _mcmc_parts(mcmcs) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Posterior draws (chain, draw, ...) and the (chain, draw) divergence mask of one or several MCMC runs
    (several single-chain runs are stacked along ``chain``)."""
    post: dict[str, list[np.ndarray]] = {}
    div = []
    for m in mcmcs:
        samples = m.get_samples(group_by_chain=True)
        n_chain, n_draw = next(iter(samples.values())).shape[:2]
        for k, v in samples.items():
            post.setdefault(k, []).append(v.detach().cpu().numpy())
        mask = np.zeros((n_chain, n_draw), dtype=bool)
        found = m.diagnostics().get("divergences", {})
        for i, key in enumerate(sorted(found)):
            mask[i, np.asarray(found[key], dtype=int)] = True
        div.append(mask)
    return {k: np.concatenate(v, 0) for k, v in post.items()}, np.concatenate(div, 0)


def from_pyro_mcmc(
    mcmc,
    *,
    log_likelihood: dict[str, np.ndarray] | None = None,
    coords: dict | None = None,
    dims: dict | None = None,
    attrs: dict | None = None,
):
    """ArviZ container of a finished ``pyro.infer.MCMC`` run (or a list of them, stacked as chains).

    Groups: ``posterior`` (every sampled site), ``sample_stats.diverging`` (chain, draw) and, when given,
    ``log_likelihood`` (``{site: (chain, draw, ...)}``, e.g. log p(x | z) of each draw). On 0.23 one run goes
    through ``az.from_pyro`` (its own log-likelihood pass switched off: it needs a vectorisable model) and
    several through ``az.concat``; on 1.x the :func:`from_dict` recipe."""
    runs = list(mcmc) if isinstance(mcmc, (list, tuple)) else [mcmc]
    if not runs:
        raise ValueError("from_pyro_mcmc needs at least one MCMC run")
    if not ARVIZ_1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = [az.from_pyro(m, log_likelihood=False, coords=coords, dims=dims) for m in runs]
            out = parts[0] if len(parts) == 1 else az.concat(*parts, dim="chain", reset_dim=True)
        if log_likelihood:
            ll = az.from_dict(
                log_likelihood={k: np.asarray(v) for k, v in log_likelihood.items()}, coords=coords, dims=dims
            )
            out.extend(ll)
        for g in out.groups():
            out[g].attrs.update(attrs or {})
        return out
    posterior, diverging = _mcmc_parts(runs)
    data = {"posterior": posterior, "sample_stats": {"diverging": diverging}}
    if log_likelihood:
        data["log_likelihood"] = log_likelihood
    return from_dict(data, coords=coords, dims=dims, attrs={"inference_library": "pyro", **(attrs or {})})


KHAT_LINES = (
    (0.5, ":", "0.5: good below"),
    (0.7, "-.", "0.7: unreliable above"),
    (1.0, "--", "1.0: infinite variance above"),
)


def plot_khat(khat: np.ndarray, path, *, labels=None, title: str | None = None, xlabel: str = "datapoint") -> str:
    """ArviZ's own k̂ plot of the values ``khat`` (one per datapoint), saved as a PNG at ``path``: the x axis
    labelled ``xlabel``, the thresholds 0.5, 0.7 and 1.0 drawn and named in a legend."""
    import xarray as xr
    from matplotlib import pyplot as plt

    k = np.asarray(khat, dtype=np.float64).reshape(-1)
    finite = k[np.isfinite(k)]
    lo = min(0.0, finite.min()) - 0.1 if finite.size else 0.0
    hi = max(1.0, finite.max()) + 0.1 if finite.size else 1.1
    k = np.where(np.isnan(k), np.nan, np.clip(k, lo, hi))  # ±inf drawn at the edges
    labels = np.arange(len(k)) if labels is None else np.asarray(labels)
    before = set(plt.get_fignums())
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # 0.23 prefers ELPDData; arrays are supported
            if ARVIZ_1:
                da = xr.DataArray(k, dims=["datapoint"], coords={"datapoint": labels}, name="pareto_k")
                elpd = az.ELPDData(
                    elpd=float("nan"),
                    se=float("nan"),
                    p=float("nan"),
                    n_samples=0,
                    n_data_points=len(k),
                    scale="log",
                    warning=bool((k > 0.7).any()),
                    good_k=0.7,
                    pareto_k=da,
                )
                pc = az.plot_khat(elpd, backend="matplotlib", hline_values=[0.5, 0.7, 1.0])
                fig, ax = pc.viz["figure"].item(), pc.viz["plot"].item()
            else:
                ax = np.ravel(az.plot_khat(k, show_hlines=False, show=False))[0]
                fig = ax.get_figure()
        # the thresholds, drawn here on both lines (1.x draws none, 0.23 draws them without a legend)
        lines = [ax.axhline(h, color="C1", ls=ls, lw=1, label=f"$\\hat{{k}}$ = {what}") for h, ls, what in KHAT_LINES]
        ax.legend(handles=lines, loc="best", fontsize=8, framealpha=0.8)
        ax.set_xlabel(f"{xlabel} (index)")
        ax.set_ylabel("PSIS $\\hat{k}$ (Pareto shape)")
        if title:
            fig.suptitle(title)
        fig.savefig(path, format="png", dpi=110)
    finally:
        for n in set(plt.get_fignums()) - before:
            plt.close(n)
    return path
