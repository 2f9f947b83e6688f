r"""Per-site analysis of a trained guide, for any Pyro model/guide pair (one latent site per layer in a hierarchy).

* :func:`posterior_means` — E_q[z_s | x] per latent site s: the mean of each draw's conditional distribution,
  averaged over ``num_samples`` runs of the guide (exact in one run for a site whose parameters depend on x only).
* :func:`active_units` — Burda, Grosse & Salakhutdinov (2016): unit u of site s is active when
  A_u = Cov_x(E_q[z_u | x]) > ``threshold`` (0.01).
* :func:`kl_per_site` — E_q[log q(z_s | ·) − log p(z_s | ·)] per datapoint, each site's term of the ELBO's KL
  (for a Markov hierarchy the conditional KL of layer s given its parents), by Monte Carlo over the guide (so any
  prior works, a flow prior included).
* :func:`mutual_information` — I_q(x; z) under q(x, z) = p_data(x) q(z | x):
  E_x E_{q(z|x)}[log q(z | x) − log q(z)] with the aggregate posterior q(z) ≈ (1/N) Σ_j q(z | x_j) over the N
  datapoints given (the estimator of Hoffman & Johnson's decomposition used by He et al. 2019); biased low by
  at most log N, the value for a code that identifies its datapoint.

Sites are those of the guide that are neither observed nor the data plate's subsample; tensors are (N, d) per site
(the site's event flattened). Both functions run the guide and model in ``eval()`` with gradients off.
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..infer.signature import adapt
from ..nn.device import eval_mode
from .clustering import probe_accuracy
from .likelihood import datapoint_chunks

__all__ = ["posterior_means", "active_units", "kl_per_site", "mutual_information", "latent_summary"]


def _latent_sites(trace) -> list[str]:
    return [
        n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]


def _flat(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.reshape(batch, -1)


def _check(x, num_samples, what="num_samples"):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or len(x) == 0:
        raise ValueError(f"x must be a non-empty tensor of shape (N, ...), got {getattr(x, 'shape', type(x))}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{what} must be a positive integer, got {num_samples!r}")


def posterior_means(
    guide, x: torch.Tensor, num_samples: int = 1, batch_size: int = 500, y=None
) -> dict[str, torch.Tensor]:
    """{site: (N, d) tensor of E_q[z_site | x]} (see the module docstring)."""
    _check(x, num_samples)
    guide = adapt(guide, "guide")
    out: dict[str, list[torch.Tensor]] = {}
    with eval_mode(guide), torch.no_grad():
        for wrap, args, rows, keep in datapoint_chunks(guide, x, y, batch_size):
            acc: dict[str, torch.Tensor] = {}
            for _ in range(num_samples):
                tr = poutine.trace(wrap(guide)).get_trace(*args)
                for name in _latent_sites(tr):
                    site = tr.nodes[name]
                    try:
                        mean = site["fn"].mean
                    except NotImplementedError:
                        mean = site["value"]
                    m = _flat(mean.expand_as(site["value"]), rows)[:keep]
                    acc[name] = acc.get(name, 0) + m / num_samples
            for name, m in acc.items():
                out.setdefault(name, []).append(m.cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def active_units(
    guide, x: torch.Tensor, threshold: float = 0.01, num_samples: int = 1, batch_size: int = 500, y=None
) -> dict[str, dict]:
    """{site: {"active": count, "dims": d, "variance": [A_u per unit]}}, A_u = Var_x(E_q[z_u | x])."""
    if not (isinstance(threshold, (int, float)) and threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    if len(x) < 2:
        raise ValueError(f"active_units needs at least 2 datapoints (a variance over x), got {len(x)}")
    means = posterior_means(guide, x, num_samples, batch_size, y)
    out = {}
    for name, m in means.items():
        var = m.double().var(0, unbiased=True)
        out[name] = {
            "active": int((var > threshold).sum()),
            "dims": int(var.numel()),
            "variance": [float(v) for v in var],
        }
    return out


def kl_per_site(
    model, guide, x: torch.Tensor, num_samples: int = 10, batch_size: int = 500, y=None
) -> dict[str, float]:
    """{site: mean over datapoints of E_q[log q(z_site | ·) − log p(z_site | ·)]}, nats (Monte Carlo)."""
    _check(x, num_samples)
    model, guide = adapt(model, "model"), adapt(guide, "guide")
    total: dict[str, float] = {}
    with eval_mode(model, guide), torch.no_grad():
        for wrap, args, rows, keep in datapoint_chunks(guide, x, y, batch_size):
            for _ in range(num_samples):
                gt = poutine.trace(wrap(guide)).get_trace(*args)
                mt = poutine.trace(poutine.replay(wrap(model), trace=gt)).get_trace(*args)
                for name in _latent_sites(gt):
                    if name not in mt.nodes:
                        raise ValueError(f"guide site {name!r} does not appear in the model")
                    g, m = gt.nodes[name], mt.nodes[name]
                    diff = g["fn"].log_prob(g["value"]) - m["fn"].log_prob(m["value"])
                    diff = diff.reshape(rows, -1)[:keep] if rows != keep else diff
                    total[name] = total.get(name, 0.0) + float(diff.sum()) / num_samples
    return {name: v / len(x) for name, v in total.items()}


def mutual_information(
    guide, x: torch.Tensor, num_samples: int = 1, chunk: int = 256, y=None, site: str | None = None
) -> float:
    """I_q(x; z) in nats for the guide's one latent site (or ``site``), from ``num_samples`` draws per datapoint
    (module docstring); O(N²) density evaluations, in chunks of ``chunk`` draws."""
    _check(x, num_samples)
    if len(x) < 2:
        raise ValueError(f"mutual_information needs at least 2 datapoints, got {len(x)}")
    N = len(x)
    guide = adapt(guide, "guide")
    with eval_mode(guide), torch.no_grad():
        # q(· | x_j) for every datapoint: one guide run (a program that indexes the whole data set: one per chunk)
        chunks = datapoint_chunks(guide, x, y, N)
        parts = [(poutine.trace(wrap(guide)).get_trace(*args), keep) for wrap, args, _, keep in chunks]
        names = _latent_sites(parts[0][0])
        name = site if site is not None else (names[0] if len(names) == 1 else None)
        if name is None or name not in parts[0][0].nodes:
            raise ValueError(f"mutual_information needs one latent site (or site=...); the guide has {names}")
        fns = [(tr.nodes[name]["fn"], keep) for tr, keep in parts]
        total = 0.0
        for _ in range(num_samples):
            draws = [fn.sample() for fn, _ in fns]  # one draw per datapoint
            z = torch.cat([d[:keep] for d, (_, keep) in zip(draws, fns, strict=True)])
            own = torch.cat([fn.log_prob(d)[:keep] for d, (fn, keep) in zip(draws, fns, strict=True)])  # log q(z_i|x_i)
            agg = []
            for s in range(0, N, chunk):
                zi = z[s : s + chunk].unsqueeze(1)  # (c, 1, ...) against every q(· | x_j)
                lq = torch.cat([fn.log_prob(zi)[:, :keep] for fn, keep in fns], 1)
                agg.append(torch.logsumexp(lq, dim=1) - math.log(N))
            total += float((own - torch.cat(agg)).double().mean())
    return total / num_samples


def latent_summary(model, guide, x: torch.Tensor, y=None, train_x=None, train_y=None, *, seed: int = 0) -> dict:
    """What the code carries on ``x``: KL(q ‖ p) per latent site (:func:`kl_per_site`, 4 draws), active units per
    site, I_q(x; z) (one latent site; None otherwise) and, given labelled training images ``train_x``/``train_y``
    and labels ``y``, the accuracy of a logistic probe of the class from E_q[z | x] (all sites concatenated; None
    otherwise). ``y`` goes to the programs as everywhere (a conditional model's code is probed given the label).
    Reproducible from ``seed``; the caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        kl = kl_per_site(model, guide, x, num_samples=4, y=y)
        au = active_units(guide, x, y=y)
        mi = mutual_information(guide, x, y=y) if len(au) == 1 else None
        probe = None
        if train_y is not None and y is not None:
            ztr = torch.cat(list(posterior_means(guide, train_x, y=train_y).values()), -1)
            zte = torch.cat(list(posterior_means(guide, x, y=y).values()), -1)
            n = len(train_x)
            probe = probe_accuracy(ztr, train_y.cpu(), zte, y.cpu(), num_labels=(n,))[n]
    return {
        "num_images": len(x),
        "kl": {k: float(v) for k, v in kl.items()},
        "kl_total": float(sum(kl.values())),
        "active_units": {k: v["active"] for k, v in au.items()},
        "latent_dims": {k: v["dims"] for k, v in au.items()},
        "mutual_information": mi,
        "probe_accuracy": probe,
    }
