r"""Latent distributions with reparameterised samples that Pyro and torch do not ship.

* :class:`Epanechnikov` (Qin & Huang, arXiv 2405.12783): density (3/4h)(1 − u²) on |u| ≤ 1, u = (z − μ)/h —
  compact support. rsample by the closed-form inverse CDF of F(u) = (2 + 3u − u³)/4:
  z = μ + h·2 sin(arcsin(2U − 1)/3), U ~ Uniform(0, 1). Mean μ, variance h²/5, entropy log h + 5/3 − log 3.
  The exact KL to a Gaussian is registered with ``torch.distributions.kl_divergence``:

      KL(Epa(μ, h) ‖ N(m, s²)) = log s + ½ log 2π + ((μ − m)² + h²/5)/(2s²) − log h − (5/3 − log 3)

  (−H(q) − E_q log p, with E_q (z − m)² = (μ − m)² + h²/5); against N(0, 1) it is minimised at μ = 0, h = √5
  (the variance matched), where it is ½ log 2π + ½ − ½ log 5 − 5/3 + log 3 ≈ 0.0462 nats: an unused
  Epanechnikov latent is never free.
* :class:`RelaxedPoisson` (Vafaii, Galor & Yates, NeurIPS 2024): spike counts through n exponential inter-arrival
  times T_j = Σ_{i≤j} E_i, E_i ~ Exponential(rate): the hard count Σ_j 1[T_j < 1] is Poisson(rate) (truncated at
  n), the relaxed count Σ_j σ((1 − T_j)/t) is differentiable in the rate; ``hard=True`` passes the hard count
  forward and the relaxed gradient back (straight-through), ``temperature=0`` gives hard counts (evaluation).
  ``log_prob`` is the Poisson pmf (a probability only at integer values: use it with hard counts). The KL between
  two of them, or to a ``Poisson``, is the Poisson KL r_q log(r_q/r_p) − r_q + r_p (torch's), which for
  q = Pois(r·δr), p = Pois(r) is r(1 − δr + δr log δr).
* :class:`DefensiveMixture` (Hesterberg, "Weighted average importance sampling and defensive mixture
  distributions", Technometrics 1995): (1 − α) q + α N(mean q, c · Var q) over q's whole event — a proposal
  whose support is the real line, for importance sampling with a compact-support q.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import broadcast_all

__all__ = [
    "Epanechnikov",
    "RelaxedPoisson",
    "CompactSupport",
    "DefensiveMixture",
    "EPANECHNIKOV_ENTROPY",
    "poisson_truncation",
]

EPANECHNIKOV_ENTROPY = 5.0 / 3.0 - math.log(3.0)  # differential entropy of the unit kernel, nats
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_3_4 = math.log(0.75)


class CompactSupport:
    """Marker of a distribution whose support is bounded (importance sampling with it as the proposal only
    integrates over that support: :func:`ppl_vae.evaluate.log_likelihood` then mixes in a wider Gaussian)."""


class Epanechnikov(CompactSupport, TorchDistribution):
    """The Epanechnikov (parabolic) kernel with location ``loc`` and half-width ``scale`` (see the module)."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real  # the support depends on the parameters: -inf outside it, see log_prob
    has_rsample = True

    def __init__(self, loc, scale, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return Epanechnikov(self.loc.expand(batch_shape), self.scale.expand(batch_shape), validate_args=False)

    @staticmethod
    def unit_icdf(p: torch.Tensor) -> torch.Tensor:
        """The inverse of F(u) = (2 + 3u − u³)/4 on [−1, 1]: u = 2 sin(arcsin(2p − 1)/3)."""
        return 2.0 * torch.sin(torch.asin((2.0 * p - 1.0).clamp(-1.0, 1.0)) / 3.0)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * self.unit_icdf(u)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        u = (value - self.loc) / self.scale
        # 1 − u² as (1 − |u|)(1 + |u|); a draw on the edge may land a rounding error outside |u| ≤ 1
        a = u.abs()
        inside = a <= 1.0 + 1e-6
        one_minus = ((1.0 - a).clamp_min(0.0) * (1.0 + a)).clamp_min(torch.finfo(u.dtype).tiny)
        lp = _LOG_3_4 - self.scale.log() + one_minus.log()
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        u = ((value - self.loc) / self.scale).clamp(-1.0, 1.0)
        return (2.0 + 3.0 * u - u.pow(3)) / 4.0

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        return self.loc + self.scale * self.unit_icdf(value)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return self.scale.pow(2) / 5.0

    def entropy(self) -> torch.Tensor:
        return self.scale.log() + EPANECHNIKOV_ENTROPY


@register_kl(Epanechnikov, torch.distributions.Normal)
def _kl_epanechnikov_normal(q: Epanechnikov, p) -> torch.Tensor:
    second_moment = (q.loc - p.loc).pow(2) + q.scale.pow(2) / 5.0
    return p.scale.log() + _HALF_LOG_2PI + second_moment / (2 * p.scale.pow(2)) - q.scale.log() - EPANECHNIKOV_ENTROPY


def poisson_truncation(rate_max: float, tail: float = 1e-5) -> int:
    """n: the (1 − ``tail``) quantile of Poisson(``rate_max``), at least 8 — how many arrivals are drawn (the
    official code's n for rate 200 is about 263)."""
    from scipy.stats import poisson

    return max(8, int(poisson.ppf(1.0 - tail, max(float(rate_max), 1e-6))) + 1)


class RelaxedPoisson(TorchDistribution):
    """Relaxed Poisson counts (see the module docstring). ``rate`` > 0; ``temperature`` t ≥ 0 (0: hard counts);
    ``n`` arrivals (default :func:`poisson_truncation` of the largest rate); ``hard``: straight-through."""

    arg_constraints = {"log_rate": constraints.real}  # a negative rate gives a NaN log-rate and fails it
    support = constraints.nonnegative
    has_rsample = True

    def __init__(
        self,
        rate=None,
        temperature: float = 1.0,
        n: int | None = None,
        hard: bool = False,
        validate_args=None,
        *,
        log_rate=None,
    ):
        if (rate is None) == (log_rate is None):
            raise ValueError("RelaxedPoisson takes exactly one of rate and log_rate")
        # the log-rate is kept: the KL is computed from it, so a rate that underflows to 0 stays finite
        self.log_rate = torch.as_tensor(log_rate) if log_rate is not None else torch.as_tensor(rate).log()
        self.rate = torch.as_tensor(rate) if rate is not None else self.log_rate.exp()
        self.temperature = float(temperature)
        if self.temperature < 0:
            raise ValueError(f"RelaxedPoisson temperature must be >= 0, got {temperature!r}")
        self.n = int(n) if n is not None else poisson_truncation(float(self.rate.detach().max()))
        self.hard = bool(hard)
        super().__init__(self.rate.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        new = RelaxedPoisson(self.rate.expand(shape), self.temperature, self.n, self.hard, validate_args=False)
        new.log_rate = self.log_rate.expand(shape)
        return new

    def _arrivals(self, sample_shape) -> torch.Tensor:
        """T_j, shape (n, *sample_shape, *batch_shape): cumulative sums of Exponential(rate) draws (pathwise)."""
        shape = (self.n,) + self._extended_shape(sample_shape)
        e = -torch.log(torch.rand(shape, dtype=self.rate.dtype, device=self.rate.device).clamp_min(1e-38))
        # a rate that underflowed to 0 would give an infinite arrival time and a NaN gradient (0 · ∞)
        return torch.cumsum(e / self.rate.clamp_min(1e-12), dim=0)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        t = self._arrivals(sample_shape)
        count = (t < 1.0).to(t.dtype).sum(0)
        if self.temperature == 0:
            return count
        relaxed = torch.sigmoid((1.0 - t) / self.temperature).sum(0)
        return count + (relaxed - relaxed.detach()) if self.hard else relaxed

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return (self._arrivals(sample_shape) < 1.0).to(self.rate.dtype).sum(0)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return dist.Poisson(self.rate, validate_args=False).log_prob(value)

    @property
    def mean(self) -> torch.Tensor:
        return self.rate

    @property
    def variance(self) -> torch.Tensor:
        return self.rate


def _poisson_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(Pois(q) ‖ Pois(p)) = p (1 − δ + δ log δ), δ = q/p (torch's formula), from the log-rates: with δ
    computed as exp(log δ) its gradient stays finite when δ underflows (δ log δ through ``xlogy`` would give
    0 · ∞ = NaN)."""
    log_delta = log_q - log_p
    delta = log_delta.exp()
    return log_p.exp() * (1.0 - delta + delta * log_delta)


@register_kl(RelaxedPoisson, RelaxedPoisson)
def _kl_relaxed_relaxed(q: RelaxedPoisson, p: RelaxedPoisson) -> torch.Tensor:
    return _poisson_kl(q.log_rate, p.log_rate)


@register_kl(RelaxedPoisson, torch.distributions.Poisson)
def _kl_relaxed_poisson(q: RelaxedPoisson, p) -> torch.Tensor:
    return _poisson_kl(q.log_rate, p.rate.log())


class DefensiveMixture(TorchDistribution):
    """(1 − ``weight``) ``proposal`` + ``weight`` N(mean, ``inflation`` · variance of ``proposal``), one
    component per event (all of an event's coordinates come from the same component). Sampling only (no
    gradient): it is an evaluation-time proposal."""

    arg_constraints = {}
    support = constraints.real
    has_rsample = False

    def __init__(self, proposal, weight: float = 0.1, inflation: float = 4.0, validate_args=None):
        if not 0.0 < float(weight) < 1.0:
            raise ValueError(f"DefensiveMixture weight must lie in (0, 1), got {weight!r}")
        if not float(inflation) > 0.0:
            raise ValueError(f"DefensiveMixture inflation must be > 0, got {inflation!r}")
        self.proposal, self.weight, self.inflation = proposal, float(weight), float(inflation)
        event_dim = len(proposal.event_shape)
        wide = dist.Normal(proposal.mean, (self.inflation * proposal.variance).sqrt(), validate_args=False)
        self.wide = wide.to_event(event_dim) if event_dim else wide
        super().__init__(proposal.batch_shape, proposal.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        new = DefensiveMixture.__new__(DefensiveMixture)
        new.proposal, new.wide = self.proposal.expand(batch_shape), self.wide.expand(batch_shape)
        new.weight, new.inflation = self.weight, self.inflation
        TorchDistribution.__init__(new, torch.Size(batch_shape), self.event_shape, validate_args=False)
        return new

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            a, b = self.proposal.sample(sample_shape), self.wide.sample(sample_shape)
            batch = a.shape[: a.dim() - len(self.event_shape)]
            pick = torch.rand(batch, device=a.device) < self.weight
            return torch.where(pick.reshape(batch + (1,) * len(self.event_shape)), b, a)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(
            math.log1p(-self.weight) + self.proposal.log_prob(value), math.log(self.weight) + self.wide.log_prob(value)
        )

    @property
    def mean(self) -> torch.Tensor:
        return self.proposal.mean

    @property
    def variance(self) -> torch.Tensor:
        return (1.0 - self.weight + self.weight * self.inflation) * self.proposal.variance  # same mean
