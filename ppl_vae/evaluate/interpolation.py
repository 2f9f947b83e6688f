r"""Interpolation along the data distribution (the "likelihood path" of Lin & Clark, LaDDer, BMVC 2020).

Between two encodings a = p_0 and b = p_{n+1} in a latent space with a learned density p (LaDDer's hyperprior
p(t), or N(0, I) for a plain VAE), the n intermediate points P = (p_1..p_n) minimise

    J(P) = w_len · Σ_{i=0}^{n} ‖p_{i+1} − p_i‖ / ‖b − a‖                      (path length, 1 for the line)
         + w_even · Var_i(‖p_{i+1} − p_i‖) / mean_i(‖p_{i+1} − p_i‖)²          (even spacing)
         − w_dens · (1/n) Σ_{i=1}^{n} log p(p_i)                                 (stay where the data are)

starting from the straight line, by Adam on P with the endpoints held fixed. The official code balances the same
three terms (path length, step variance, negative log-likelihood of the points); the normalisations here are ours.
The best iterate (lowest J) is returned; if its mean log-density is below the straight line's, the straight line
is returned instead, so the path is never less dense than the line (``PathResult.fallback`` says so).
Decoding the path gives the image strip (:func:`plot_interpolation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["PathResult", "straight_line", "likelihood_path", "path_stats", "interpolate_images", "plot_interpolation"]


@dataclass
class PathResult:
    path: torch.Tensor  # (n + 2, d), endpoints included
    line: torch.Tensor  # (n + 2, d), the straight line
    path_stats: dict = field(default_factory=dict)
    line_stats: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    fallback: bool = False


def straight_line(a: torch.Tensor, b: torch.Tensor, n_steps: int) -> torch.Tensor:
    """n_steps + 2 evenly spaced points from a to b (both included)."""
    w = torch.linspace(0.0, 1.0, n_steps + 2, dtype=a.dtype, device=a.device).unsqueeze(-1)
    return (1 - w) * a.unsqueeze(0) + w * b.unsqueeze(0)


def _steps(path):
    return (path[1:] - path[:-1]).norm(dim=-1)


@torch.no_grad()
def path_stats(path: torch.Tensor, log_density: Callable) -> dict:
    """Length, spacing (coefficient of variation of step lengths) and mean/min log-density of inner points."""
    s = _steps(path)
    lp = log_density(path[1:-1]) if len(path) > 2 else path.new_zeros(1)
    return {
        "length": float(s.sum()),
        "step_cv": float(s.std(unbiased=False) / s.mean().clamp_min(1e-12)),
        "mean_log_density": float(lp.mean()),
        "min_log_density": float(lp.min()),
    }


def _objective(path, chord, log_density, w_len, w_even, w_dens):
    s = _steps(path)
    length = s.sum() / chord
    even = s.var(unbiased=False) / s.mean().pow(2).clamp_min(1e-12)
    dens = -log_density(path[1:-1]).mean()
    return w_len * length + w_even * even + w_dens * dens, (length, even, dens)


def likelihood_path(
    a: torch.Tensor,
    b: torch.Tensor,
    log_density: Callable,
    n_steps: int = 8,
    *,
    w_len: float = 1.0,
    w_even: float = 1.0,
    w_dens: float = 0.2,
    iters: int = 500,
    lr: float = 0.05,
    seed: int = 0,
) -> PathResult:
    """Optimise the n_steps intermediate points between ``a`` and ``b`` (vectors of dim d); see the module docstring.

    ``log_density(points (m, d)) -> (m,)`` must be differentiable (e.g. ``model.prior_log_density`` or
    ``hyperprior.log_prob``). The endpoints of the returned path are ``a`` and ``b`` exactly.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    a = torch.as_tensor(a).detach().float().reshape(-1)
    b = torch.as_tensor(b).detach().to(a).reshape(-1)
    line = straight_line(a, b, n_steps)
    chord = (b - a).norm().clamp_min(1e-8)
    inner = line[1:-1].clone().requires_grad_(True)
    opt = torch.optim.Adam([inner], lr=float(lr) * float(chord))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a tiny symmetric-breaking nudge so the path can leave a saddle on the line
        inner.add_(1e-3 * float(chord) * torch.randn(inner.shape, generator=g).to(inner))
    best, best_j, hist = line[1:-1].clone(), None, []
    with torch.enable_grad():
        for it in range(int(iters)):
            path = torch.cat([a.unsqueeze(0), inner, b.unsqueeze(0)])
            j, (length, even, dens) = _objective(path, chord, log_density, w_len, w_even, w_dens)
            if best_j is None or float(j.detach()) < best_j:
                best_j, best = float(j.detach()), inner.detach().clone()
            if it % 25 == 0:
                hist.append(
                    {
                        "iter": it,
                        "objective": float(j.detach()),
                        "length": float(length.detach()),
                        "spacing": float(even.detach()),
                        "neg_log_density": float(dens.detach()),
                    }
                )
            opt.zero_grad()
            j.backward()
            opt.step()
    with torch.no_grad():
        j_line = float(_objective(line, chord, log_density, w_len, w_even, w_dens)[0])
        if j_line < best_j:
            best = line[1:-1].clone()
    path = torch.cat([a.unsqueeze(0), best, b.unsqueeze(0)])
    ps, ls = path_stats(path, log_density), path_stats(line, log_density)
    fallback = ps["mean_log_density"] < ls["mean_log_density"]
    if fallback:
        path, ps = line.clone(), ls
    return PathResult(path=path, line=line, path_stats=ps, line_stats=ls, history=hist, fallback=fallback)


@torch.no_grad()
def interpolate_images(model, x_a: torch.Tensor, x_b: torch.Tensor, n_steps: int = 8, **kw):
    """Encode two images to the model's top latent (``model.encode`` means), build the likelihood path under
    ``model.prior_log_density`` and decode both paths. Returns (PathResult, path_images, line_images)."""
    va = model.encode(x_a.unsqueeze(0))[0][0]
    vb = model.encode(x_b.unsqueeze(0))[0][0]
    res = likelihood_path(va, vb, model.prior_log_density, n_steps, **kw)
    return res, model.decode(res.path), model.decode(res.line)


def plot_interpolation(
    path_images: torch.Tensor,
    line_images: torch.Tensor,
    path: str,
    *,
    res: PathResult | None = None,
    log_density: Callable | None = None,
    title: str = "",
    extent: float | None = None,
) -> str:
    """A PNG: top row the likelihood path's images, bottom row the straight line's; with ``res`` and a 2-D
    latent, a third panel draws both paths over the density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def strip(imgs):
        imgs = imgs.detach().cpu().float().clamp(0, 1)
        imgs = imgs.reshape(imgs.shape[0], -1, *imgs.shape[-2:])
        if imgs.shape[1] == 1:
            row = torch.cat(list(imgs[:, 0]), dim=1).numpy()
            return row, "gray"
        return torch.cat(list(imgs.permute(0, 2, 3, 1)), dim=1).numpy(), None

    two_d = res is not None and res.path.shape[-1] == 2 and log_density is not None
    n = path_images.shape[0]
    fig = plt.figure(figsize=(0.9 * n + (2.6 if two_d else 0), 2.2), dpi=80)
    width = 0.72 if two_d else 0.98
    for r, (imgs, name) in enumerate(((path_images, "likelihood path"), (line_images, "straight line"))):
        ax = fig.add_axes([0.01, 0.52 - 0.48 * r, width, 0.42])
        row, cmap = strip(imgs)
        ax.imshow(row, cmap=cmap, vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(name, fontsize=8)
    if two_d:
        ax = fig.add_axes([0.76, 0.08, 0.22, 0.84])
        pts = torch.cat([res.path, res.line]).cpu().numpy()
        lo, hi = pts.min(0), pts.max(0)
        pad = 0.5 * (hi - lo).max() + 0.5
        c = 0.5 * (lo + hi)
        e = extent or pad + 0.5 * (hi - lo).max()
        gx, gy = np.meshgrid(np.linspace(c[0] - e, c[0] + e, 80), np.linspace(c[1] - e, c[1] + e, 80))
        grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=res.path.dtype)
        with torch.no_grad():
            z = log_density(grid).reshape(80, 80).cpu().numpy()
        ax.contourf(gx, gy, np.maximum(z, z.max() - 12), levels=20, cmap="viridis")
        p, ln = res.path.cpu().numpy(), res.line.cpu().numpy()
        ax.plot(ln[:, 0], ln[:, 1], "w--o", ms=2, lw=1)
        ax.plot(p[:, 0], p[:, 1], "r-o", ms=2, lw=1)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8, y=1.0)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return str(path)
