"""Observation models p(x | z) as small ``nn.Module`` s.

A likelihood turns the decoder's raw output ``out`` (shape ``(B, *event_shape)``) into a Pyro distribution
whose batch shape is ``(B,)`` and whose event shape is the data shape, ready for
``pyro.sample("x", likelihood(out, event_dim=x.dim() - 1), obs=x)`` inside the data plate; ``mean(out)`` is E[x | z] in data space.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from .errors import ConfigError

_LINKS = {"sigmoid": torch.sigmoid, "identity": lambda t: t}


def _event_dim(out: torch.Tensor, event_dim: int | None) -> int:
    """Event dims of p(x|z): given by the caller (the data's ``x.dim() - 1``, which stays right when particle
    plates add batch dims on the left), else all dims of ``out`` but the first."""
    return out.dim() - 1 if event_dim is None else event_dim


def _link(name: str):
    if name not in _LINKS:
        raise ConfigError(f"model.link must be one of {sorted(_LINKS)}, got {name!r}")
    return _LINKS[name]


class BernoulliLikelihood(nn.Module):
    """p(x|z) = Π_k Bernoulli(x_k; sigmoid(out_k)).

    Grey levels in [0, 1] are accepted as targets (the cross-entropy of Kingma & Welling's MNIST
    experiments); the log-density is a proper log-likelihood only for binary data.
    """

    def forward(self, out: torch.Tensor, event_dim: int | None = None) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=out, validate_args=False).to_event(_event_dim(out, event_dim))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


class GaussianLikelihood(nn.Module):
    """p(x|z) = N(x; link(out), σ² I) with a fixed variance σ² (learned σ² lives in ``variance``)."""

    def __init__(self, sigma2: float = 1.0, link: str = "sigmoid"):
        super().__init__()
        if not (isinstance(sigma2, (int, float)) and sigma2 > 0 and math.isfinite(sigma2)):
            raise ConfigError(f"model.sigma2 must be a positive number, got {sigma2!r}")
        self.sigma2 = float(sigma2)
        self.link = link
        self._f = _link(link)

    def forward(self, out: torch.Tensor, event_dim: int | None = None) -> dist.TorchDistribution:
        return dist.Normal(self._f(out), math.sqrt(self.sigma2)).to_event(_event_dim(out, event_dim))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self._f(out)


class LaplaceLikelihood(nn.Module):
    """p(x|z) = Π_k Laplace(x_k; link(out_k), b) with a fixed scale b."""

    def __init__(self, scale: float = 0.1, link: str = "sigmoid"):
        super().__init__()
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ConfigError(f"model.laplace_scale must be a positive number, got {scale!r}")
        self.scale = float(scale)
        self.link = link
        self._f = _link(link)

    def forward(self, out: torch.Tensor, event_dim: int | None = None) -> dist.TorchDistribution:
        return dist.Laplace(self._f(out), self.scale).to_event(_event_dim(out, event_dim))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self._f(out)


def build_likelihood(name: str, *, sigma2: float = 1.0, laplace_scale: float = 0.1, link: str = "sigmoid"):
    """A likelihood by name: ``bernoulli``, ``gaussian`` (fixed σ²) or ``laplace``."""
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(sigma2=sigma2, link=link)
    if name == "laplace":
        return LaplaceLikelihood(scale=laplace_scale, link=link)
    raise ConfigError(f"model.likelihood must be one of ['bernoulli', 'gaussian', 'laplace'], got {name!r}")
