r"""The inference-gap report (Cremer, Li & Duvenaud 2018) as one call, with NUTS reference posteriors as an option.

For test images x_i and any model/guide pair whose latent sites are Gaussian (another family: give ``family``; a
hierarchy's sites get independent per-image Gaussians, mean field across sites),

    inference gap  log p(x) − ELBO[q_φ]  =  approximation gap  (log p(x) − ELBO[q*])
                                          +  amortisation gap  (ELBO[q*] − ELBO[q_φ])

with q* the best member of the guide's family for each image (:func:`ppl_vae.evaluate.optimised_guide`) and
log p(x) the importance-sampled estimate from the amortised guide (:func:`ppl_vae.evaluate.log_likelihood`,
``num_samples`` draws). With ``nuts_images`` > 0, the first images also get a NUTS reference posterior
(:func:`ppl_vae.evaluate.reference.nuts_posterior`) and the approximation gap a second time, with log p(x)
estimated by importance sampling from a Student-t fitted to the NUTS draws — independent of the guide — and the
guide's means and variances beside the reference's.

:func:`gap_report` returns a JSON-ready dict; :func:`plot_gaps` draws its bar chart (PNG);
``ppl_vae.experiment.gaps_run`` / ``ppl-vae gaps RUN_DIR`` write both into a run folder.
"""

from __future__ import annotations

import inspect
import math
import os
import time

import numpy as np
import torch

from ..distributions.plate import DATA_PLATE
from ..errors import ProgramError, spell
from ..infer.importance import fork_rng, importance_log_weights
from ..infer.signature import adapt, on_indices
from ..infer.trace_checks import IWAEError
from ..nn.device import eval_mode
from .ais import ais_log_likelihood
from .gaps import check_families, guide_latent_sites, inference_gaps
from .likelihood import full_data_subsample, log_likelihood
from .reference import check_nuts, compare_to_reference, nuts_posterior

__all__ = ["gap_report", "check_gap_report", "plot_gaps", "GAPS"]

GAPS = ("amortisation", "approximation", "inference")


def _summary(v: torch.Tensor) -> dict:
    v = v.double().cpu()
    n = v.numel()
    return {"mean": float(v.mean()), "std_error": float(v.std() / math.sqrt(n)) if n > 1 else float("nan")}


def check_gap_report(
    model, guide, x: torch.Tensor, *, y=None, family=None, site=None, nuts_images: int = 0, log_px_from: str = "is"
):
    """Every refusal of :func:`gap_report`, made before any of its work from one run of each program on the
    first image (all of x, for a program that indexes the whole data set): the data, NUTS or AIS on a program that
    indexes the whole data set, a latent site the per-image Gaussian of
    ``family`` cannot start at, several sites with NUTS, a latent NUTS cannot transform (a discrete one, say).
    Returns the latent sites the report covers. Each message names what to do in the words of the interface
    (``family='diag'`` in Python, ``--family diag`` on the command line)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or len(x) < 1:
        raise ValueError(f"gap_report needs a tensor of images (N, ...), got {type(x).__name__}")
    if nuts_images < 0 or nuts_images > len(x):
        raise ValueError(
            f"{spell('nuts_images', '--nuts')} must be between 0 and the number of images ({len(x)}), got {nuts_images}"
        )
    modules = eval_mode(inspect.unwrap(model), inspect.unwrap(guide))
    model, guide = adapt(model, "model"), adapt(guide, "guide")
    size = full_data_subsample(guide, x, y, DATA_PLATE)
    if size is not None and (nuts_images or log_px_from != "is"):
        what = spell("nuts_images", "--nuts") if nuts_images else spell("log_px_from='best'", "--log-px best")
        raise ProgramError(
            f"gap_report: {what} needs a program whose data plate runs over the images it is given; this one "
            f"indexes the whole data set itself (its plate '{DATA_PLATE}' draws {size} of the {len(x)} datapoints "
            "passed), which the gaps themselves support: leave it out"
        )
    # one image, or for a full-data program all of x with its plate's indices fixed to the first B
    x1, y1 = (x[:1], None if y is None else y[:1]) if size is None else (x, y)
    if size is not None:
        first = torch.arange(size, device=x.device) % len(x)
        model, guide = on_indices(model, DATA_PLATE, first), on_indices(guide, DATA_PLATE, first)
    with modules:
        sites = guide_latent_sites(guide, x1, y1) if site is None else [site] if isinstance(site, str) else list(site)
        if nuts_images and len(sites) != 1:
            raise ValueError(
                f"the NUTS comparison handles one latent site; this guide has {sites}: "
                f"use {spell('nuts_images=0', '--nuts 0')}"
            )
        check_families(guide, x1, y1, family, sites)
        with torch.no_grad(), fork_rng():  # one importance weight: the trace checks (a model latent the guide lacks)
            importance_log_weights(model, guide, (x1, y1), num_particles=1, max_plate_nesting=1)
        if nuts_images:
            check_nuts(model, x1, y1)
    return sites


def gap_report(
    model,
    guide,
    x: torch.Tensor,
    *,
    y=None,
    num_samples: int = 1000,
    family: str | None = None,
    steps: int = 300,
    num_particles: int = 16,
    lr: float = 1e-2,
    elbo_particles: int = 1000,
    site=None,
    parameters=(),
    seed: int = 0,
    nuts_images: int = 0,
    nuts: dict | None = None,
    image_index=None,
    log_px_from: str = "is",
    ais: dict | None = None,
    patience: int | None = None,
) -> dict:
    """Amortisation, approximation and inference gaps of ``guide`` on the images ``x`` (mean and standard error
    over images, and per image), in nats.

    ``num_samples``: importance draws for log p̂(x). ``family``/``steps``/``num_particles``/``lr``/``patience``: the
    per-image optimisation (:func:`ppl_vae.evaluate.optimised_guide`; with ``patience`` Cremer et al.'s convergence
    rule, ``steps`` the most it may run; ``optimisation`` in the report says how it ended); ``elbo_particles``:
    draws for each ELBO.
    ``parameters``: the model's parameters, held fixed while q* is fitted (no gradient reaches them; their
    ``requires_grad`` is left as it is). ``nuts_images``: how many of the first images get a NUTS reference
    (``nuts``: keyword arguments of :func:`nuts_posterior`, e.g. ``num_chains``, ``num_samples``,
    ``warmup_steps``). ``log_px_from="best"``: log p̂(x) is the largest of three lower bounds in expectation —
    importance sampling from the amortised guide, importance sampling from q* and annealed importance sampling
    (:func:`~ppl_vae.evaluate.ais.ais_log_likelihood` started from the guide; ``ais``: its keyword arguments, e.g.
    ``num_steps``, ``num_chains``), as Cremer et al.'s code takes the best of IWAE and AIS — and the images where
    q*'s ELBO exceeds that log p̂ by more than 3 AIS standard errors are counted (q* has not converged, or log p̂ is
    still low). ``"is"``: the amortised guide's importance sampling only (faster, biased low where the guide is
    poor). Reproducible from ``seed``; the caller's RNG is left as it was.
    Everything that would refuse the work is checked first (:func:`check_gap_report`); the modules behind
    ``model`` and ``guide`` run in eval mode (dropout off, batch norm's running statistics).
    """
    if log_px_from not in LOG_PX_FROM:
        raise IWAEError(f"log_px_from must be one of {list(LOG_PX_FROM)}, got {log_px_from!r}")
    sites = check_gap_report(
        model, guide, x, y=y, family=family, site=site, nuts_images=nuts_images, log_px_from=log_px_from
    )
    modules = eval_mode(inspect.unwrap(model), inspect.unwrap(guide))  # the methods behind adapt's wrappers
    model, guide = adapt(model, "model"), adapt(guide, "guide")
    subsample = full_data_subsample(guide, x, y, DATA_PLATE)  # a program that indexes the whole of x: its B
    parameters = list(parameters)
    t0 = time.perf_counter()
    with modules, torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        log_px = log_likelihood(model, guide, x, num_samples=num_samples, seed=seed, y=y).detach()
        t_ll = time.perf_counter()
        g = inference_gaps(
            model,
            guide,
            x,
            log_px,
            family=family,
            steps=steps,
            num_particles=num_particles,
            elbo_particles=elbo_particles,
            lr=lr,
            site=sites,
            parameters=parameters,
            y=y,
            subsample=subsample,
            patience=patience,
        )
        t_gap = time.perf_counter()
        estimates = {"is_amortised": log_px}
        if log_px_from == "best":
            estimates, log_px, ais_result = _best_log_px(model, guide, x, y, g, log_px, num_samples, seed, ais)
            g["approximation"] = log_px - g["optimised"].double()
            g["inference"] = log_px - g["amortised"].double()
    t_best = time.perf_counter()
    gaps = {"amortisation": g["gap"], "approximation": g["approximation"], "inference": g["inference"]}
    index = list(range(len(x))) if image_index is None else [int(i) for i in image_index]
    out = {
        "num_images": len(x),
        "sites": sites,
        "family": family or "the guide's",
        "num_samples": num_samples,
        "steps": steps,
        "num_particles": num_particles,
        "elbo_particles": elbo_particles,
        "seed": seed,
        "log_likelihood": _summary(log_px),
        "amortised_elbo": _summary(g["amortised"]),
        "optimised_elbo": _summary(g["optimised"]),
        **{k: _summary(v) for k, v in gaps.items()},
        "images_where_optimisation_lost": g["datapoints_where_optimisation_lost"],
        "optimisation": {"steps_run": g["steps_run"], "patience": patience, "converged": g["converged"]},
        "log_px_from": log_px_from,
        "log_likelihood_estimates": {k: _summary(v) for k, v in estimates.items()},
        "seconds": {"log_likelihood": t_ll - t0, "optimisation": t_gap - t_ll, "best_log_px": t_best - t_gap},
        "per_image": {
            "index": index,
            "log_likelihood": log_px.cpu().tolist(),
            "amortised_elbo": g["amortised"].cpu().tolist(),
            "optimised_elbo": g["optimised"].cpu().tolist(),
            **{k: v.cpu().tolist() for k, v in gaps.items()},
            **({f"log_likelihood_{k}": v.cpu().tolist() for k, v in estimates.items()} if len(estimates) > 1 else {}),
        },
    }
    if log_px_from == "best":
        over = g["optimised"].double().cpu() - log_px.cpu() - 3 * ais_result.std_error.cpu()
        out["ais"] = {
            "settings": dict(ais or {}),
            "acceptance": float(ais_result.acceptance.mean()),
            "std_error": float(ais_result.std_error.mean()),
            "best_of": {k: int((v.double().cpu() == log_px.cpu()).sum()) for k, v in estimates.items()},
            "images_where_q_star_exceeds_log_px": int((over > 0).sum()),
        }
    if nuts_images:
        rows = []
        for i in range(nuts_images):
            xi, yi = x[i : i + 1], None if y is None else y[i : i + 1]
            ref = nuts_posterior(
                model, xi, y=yi, guide=guide, seed=seed + 1000 * i, parameters=parameters, **(nuts or {})
            )
            cmp = compare_to_reference(model, guide, xi, ref, y=yi, num_samples=num_samples, seed=seed + i)
            opt = float(g["optimised"][i])
            rows.append(
                {
                    "index": index[i],
                    "max_rhat": ref["max_rhat"],
                    "min_ess": ref["min_ess"],
                    "divergences": ref["divergences"],
                    "nuts_seconds": ref["seconds"],
                    **cmp,
                    "optimised_elbo": opt,
                    "approximation_gap_guide_is": float(log_px[i]) - opt,
                    "approximation_gap_nuts_is": cmp["log_px_nuts_is"] - opt,
                }
            )
        out["nuts"] = {
            "images": rows,
            "settings": dict(nuts or {}),
            "approximation_gap_guide_is": float(np.mean([r["approximation_gap_guide_is"] for r in rows])),
            "approximation_gap_nuts_is": float(np.mean([r["approximation_gap_nuts_is"] for r in rows])),
            "max_rhat": float(max(r["max_rhat"] for r in rows)),
            "divergences": int(sum(r["divergences"] for r in rows)),
        }
    return out


LOG_PX_FROM = ("is", "best")


def _best_log_px(model, guide, x, y, g: dict, log_px_is, num_samples: int, seed: int, ais: dict | None):
    """(the three estimates, their per-image maximum, the AIS result): IS from the amortised guide (given), IS from
    q* (``g["optimised_guide"]``, all images in one batch: it holds parameters for each) and AIS from the guide."""
    local = g["optimised_guide"]
    is_q = log_likelihood(model, local, x, num_samples=num_samples, batch_size=len(x), seed=seed, y=y).detach()
    settings = {"num_steps": 200, "num_chains": 8, "initial": "guide", **(ais or {})}
    result = ais_log_likelihood(model, guide, x, y=y, seed=seed, **settings)
    estimates = {
        "is_amortised": log_px_is.double(),
        "is_optimised": is_q.double().to(log_px_is.device),
        "ais": result.log_px.double().to(log_px_is.device),
    }
    best = torch.stack(list(estimates.values())).amax(0)
    return estimates, best, result


def plot_gaps(report: dict, path, *, title: str | None = None) -> str:
    """Bar chart of the three gaps (mean ± 2 standard errors over images, said under the axis) and, with NUTS
    images, the approximation gap of those images with log p̂(x) from the guide and from the NUTS fit. Saves a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(GAPS)
    means = [report[k]["mean"] for k in names]
    errs = [2 * report[k]["std_error"] if np.isfinite(report[k]["std_error"]) else 0.0 for k in names]
    fig = Figure(figsize=(6.5 if "nuts" in report else 4.5, 3.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(3), means, yerr=errs, color=["tab:orange", "tab:blue", "tab:gray"], capsize=4)
    labels = [f"{k}\n({report['num_images']} images)" for k in names]
    if "nuts" in report:
        rows = report["nuts"]["images"]
        a = [r["approximation_gap_guide_is"] for r in rows]
        b = [r["approximation_gap_nuts_is"] for r in rows]
        ax.bar(
            [3.5, 4.5],
            [np.mean(a), np.mean(b)],
            color=["tab:blue", "tab:green"],
            alpha=0.7,
            yerr=[2 * np.std(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in (a, b)],
            capsize=4,
        )
        labels += [
            f"approx., log p from guide\n({len(rows)} NUTS images)",
            f"approx., log p from NUTS\n({len(rows)} NUTS images)",
        ]
        ax.set_xticks([0, 1, 2, 3.5, 4.5])
    else:
        ax.set_xticks(range(3))
    ax.set_xticklabels(labels, fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("nats per image (mean over images)")
    ax.set_title(title or "Inference gaps", fontsize=9)
    ax.set_xlabel("error bars: ± 2 standard errors of the mean over the images", fontsize=7)  # whatever the title
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png")
    return path
