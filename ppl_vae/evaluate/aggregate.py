"""The aggregate posterior q̂(z) = (1/N) Σ_i q(z | x_i) of a trained model: encodings, a Gaussian mixture fitted
to them, KL(q̂ ‖ p) by Monte Carlo, evaluation with p(z) = q̂(z) (:func:`use_prior`) and decoded samples of q̂
(``ppl-vae sample --from aggregate``).
"""

from __future__ import annotations

import contextlib

import pyro.distributions as dist
import torch
from torch import nn

from ..distributions.priors import GaussianMixturePrior
from ..errors import ConfigError
from ..nn.device import device_of


@torch.no_grad()
def encode_aggregate(
    model, x: torch.Tensor, y=None, draws: str = "sample", batch_size: int = 1000, seed: int = 0
) -> torch.Tensor:
    """Encodings of ``x`` for fitting q̂(z): one draw z_i ~ q(z|x_i) per datapoint (``draws="sample"``, samples of
    the aggregate posterior itself) or the posterior means (``"mean"``). Seeded, on the model's device."""
    if draws not in ("sample", "mean"):
        raise ConfigError(f"draws must be 'sample' or 'mean', got {draws!r}")
    dev = device_of(model)
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(dev)
        yb = None if y is None else y[start : start + batch_size].to(dev)
        loc, scale = model.encode(xb, yb)
        if draws == "sample":
            loc = loc + scale * torch.randn(loc.shape, generator=g).to(dev)
        out.append(loc)
    return torch.cat(out)


def fit_aggregate_posterior(
    model,
    x: torch.Tensor,
    num_components: int = 32,
    covariance_type: str = "full",
    seed: int = 0,
    draws: str = "sample",
    batch_size: int = 1000,
) -> GaussianMixturePrior:
    """q̂(z): a ``num_components``-Gaussian mixture fitted to encodings of ``x`` (normally the training set)."""
    was = model.training
    model.eval()
    try:
        z = encode_aggregate(model, x, draws=draws, batch_size=batch_size, seed=seed)
    finally:
        model.train(was)
    return GaussianMixturePrior.fit(z, num_components, covariance_type, seed=seed)


@torch.no_grad()
def kl_monte_carlo(
    q: GaussianMixturePrior, p=None, num_samples: int = 10_000, repeats: int = 10, seed: int = 0
) -> tuple[float, float]:
    r"""KL(q̂(z) ‖ p(z)) ≈ (1/S) Σ_s [log q̂(z_s) − log p(z_s)], z_s ~ q̂, as mean ± std over ``repeats``
    independent estimates of ``num_samples`` draws each (Lin et al., Table 1: 10k samples, 10 runs).
    ``p`` is a distribution over z (default N(0, I)); draws are seeded (``seed``, ``seed + 1``, ...)."""
    if p is None:
        loc = q.loc.new_zeros(q.latent_dim)
        p = dist.Normal(loc, torch.ones_like(loc)).to_event(1)
    qd = q.distribution
    vals = []
    for r in range(int(repeats)):
        z = q.sample(num_samples, seed=seed + r)
        vals.append(float((qd.log_prob(z) - p.log_prob(z)).double().mean()))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True)) if len(vals) > 1 else 0.0


@contextlib.contextmanager
def use_prior(model, prior: nn.Module):
    """Temporarily replace ``model.prior`` (e.g. by a fitted :class:`GaussianMixturePrior` to evaluate the
    log-likelihood with p(z) = q̂(z)); the original prior is put back afterwards."""
    old = model.prior
    model.prior = prior.to(next((b.device for b in old.buffers()), torch.device("cpu")))
    try:
        yield model
    finally:
        model.prior = old


@torch.no_grad()
def sample_aggregate(
    run,
    n: int = 64,
    seed: int = 0,
    num_components: int = 32,
    covariance_type: str = "full",
    draws: str = "sample",
    return_variance: bool = False,
):
    """``ppl-vae sample RUN_DIR --from aggregate``: decoded means of ``n`` draws from q̂(z), the mixture fitted
    to the encodings of the run's training set. ``run`` is an :class:`ppl_vae.experiment.Run` (uses
    ``run.model``, ``run.data``). Everything is seeded by ``seed``. With ``return_variance`` (models with
    ``decode_variance``, e.g. sigma_vae) also returns σ²(z), the uncertainty map of each sample."""
    if not (isinstance(n, int) and n > 0):
        raise ConfigError(f"--n must be a positive integer, got {n!r}")
    model = run.model
    if getattr(model, "conditional", False):
        raise ValueError(
            "sampling from the aggregate posterior needs an unconditional model; this run's model is conditional"
        )
    q = fit_aggregate_posterior(
        model, run.data.train_x, num_components=num_components, covariance_type=covariance_type, seed=seed, draws=draws
    )
    z = q.sample(n, seed=seed)
    was = model.training
    model.eval()
    try:
        images = model.decode(z)
        if return_variance:
            if not hasattr(model, "decode_variance"):
                raise ValueError(f"{type(model).__name__} has no decode_variance (σ²(z)); use model.name=sigma_vae")
            return images, model.decode_variance(z)
        return images
    finally:
        model.train(was)
