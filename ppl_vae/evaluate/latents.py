r"""Per-site analysis of a trained guide, for any Pyro model/guide pair (one latent site per layer in a hierarchy).

* :func:`posterior_means` — E_q[z_s | x] per latent site s: the mean of each draw's conditional distribution,
  averaged over ``num_samples`` runs of the guide (exact in one run for a site whose parameters depend on x only).
* :func:`active_units` — Burda, Grosse & Salakhutdinov (2016): unit u of site s is active when
  A_u = Cov_x(E_q[z_u | x]) > ``threshold`` (0.01).
* :func:`kl_per_site` — E_q[log q(z_s | ·) − log p(z_s | ·)] per datapoint, each site's term of the ELBO's KL
  (for a Markov hierarchy the conditional KL of layer s given its parents), by Monte Carlo over the guide.

Sites are those of the guide that are neither observed nor the data plate's subsample; tensors are (N, d) per site
(the site's event flattened). Both functions run the guide and model in ``eval()`` with gradients off.
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .likelihood import eval_mode

__all__ = ["posterior_means", "active_units", "kl_per_site"]


def _latent_sites(trace) -> list[str]:
    return [n for n, s in trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]


def _flat(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.reshape(batch, -1)


def _check(x, num_samples, what="num_samples"):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or len(x) == 0:
        raise ValueError(f"x must be a non-empty tensor of shape (N, ...), got {getattr(x, 'shape', type(x))}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{what} must be a positive integer, got {num_samples!r}")


def posterior_means(guide, x: torch.Tensor, num_samples: int = 1, batch_size: int = 500, y=None
                    ) -> dict[str, torch.Tensor]:
    """{site: (N, d) tensor of E_q[z_site | x]} (see the module docstring)."""
    _check(x, num_samples)
    out: dict[str, list[torch.Tensor]] = {}
    with eval_mode(guide), torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            args = (xb,) if y is None else (xb, y[s:s + batch_size])
            acc: dict[str, torch.Tensor] = {}
            for _ in range(num_samples):
                tr = poutine.trace(guide).get_trace(*args)
                for name in _latent_sites(tr):
                    site = tr.nodes[name]
                    try:
                        mean = site["fn"].mean
                    except NotImplementedError:
                        mean = site["value"]
                    m = _flat(mean.expand_as(site["value"]), len(xb))
                    acc[name] = acc.get(name, 0) + m / num_samples
            for name, m in acc.items():
                out.setdefault(name, []).append(m.cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def active_units(guide, x: torch.Tensor, threshold: float = 0.01, num_samples: int = 1, batch_size: int = 500,
                 y=None) -> dict[str, dict]:
    """{site: {"active": count, "dims": d, "variance": [A_u per unit]}}, A_u = Var_x(E_q[z_u | x])."""
    if not (isinstance(threshold, (int, float)) and threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    if len(x) < 2:
        raise ValueError(f"active_units needs at least 2 datapoints (a variance over x), got {len(x)}")
    means = posterior_means(guide, x, num_samples, batch_size, y)
    out = {}
    for name, m in means.items():
        var = m.double().var(0, unbiased=True)
        out[name] = {"active": int((var > threshold).sum()), "dims": int(var.numel()),
                     "variance": [float(v) for v in var]}
    return out


def kl_per_site(model, guide, x: torch.Tensor, num_samples: int = 10, batch_size: int = 500, y=None
                ) -> dict[str, float]:
    """{site: mean over datapoints of E_q[log q(z_site | ·) − log p(z_site | ·)]}, nats (Monte Carlo)."""
    _check(x, num_samples)
    total: dict[str, float] = {}
    with eval_mode(model, guide), torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            args = (xb,) if y is None else (xb, y[s:s + batch_size])
            for _ in range(num_samples):
                gt = poutine.trace(guide).get_trace(*args)
                mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(*args)
                for name in _latent_sites(gt):
                    if name not in mt.nodes:
                        raise ValueError(f"guide site {name!r} does not appear in the model")
                    g, m = gt.nodes[name], mt.nodes[name]
                    diff = g["fn"].log_prob(g["value"]) - m["fn"].log_prob(m["value"])
                    total[name] = total.get(name, 0.0) + float(diff.sum()) / num_samples
    return {name: v / len(x) for name, v in total.items()}
