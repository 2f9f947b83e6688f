r"""Mixture-of-Gaussians posteriors as Pyro guides: a reparameterised diagonal-Gaussian mixture and the
Gaussian-mixture posterior with the variance-collapse regulariser (GAMIX; Rivera, "How to train your VAE", 2023).

Why a mixture needs care in Pyro
--------------------------------
* ``torch.distributions.MixtureSameFamily`` has no ``rsample``: Pyro's ``Trace_ELBO`` then falls back to
  score-function gradients, and :class:`~ppl_vae.infer.iwae.TraceIWAE` (pathwise only) gets no gradient.
* Enumerating the component index c *only in the guide* does not give a bound: E_{q(c)} E_{q(z|c)}[log p(x,z) −
  log q(z|c) − log q(c)] replaces the marginal log q(z) = log Σ_c π_c q(z|c) by log q(z|c) + log q(c) ≤ log q(z),
  which overshoots log p(x) (two identical components equal to the posterior overshoot by exactly log 2).

:class:`DiagNormalMixture` is a proper distribution over z alone (``log_prob`` is the marginal mixture density)
with an exact pathwise ``rsample``: *implicit reparameterisation* of the distributional transform (Graves 2016,
"Stochastic backpropagation through mixture density distributions"; Figurnov, Mohamed & Mnih 2018, "Implicit
Reparameterization Gradients"). Write the transform u = T(z; φ), u_j = F_j(z_j | z_<j; φ), the conditional CDFs

    F_j(z_j | z_<j) = Σ_k w_kj Φ((z_j − μ_kj)/σ_kj),   w_kj = softmax_k(log π_k + Σ_{i<j} log N(z_i; μ_ki, σ_ki)).

u is uniform and independent of φ, so a draw z (component index + Gaussian noise, no gradient) moves with φ as
dz/dφ = −(∂T/∂z)⁻¹ ∂T/∂φ (implicit function theorem). ∂T/∂z is lower triangular with diagonal f_j (the
conditional densities) and, for i < j, ∂T_j/∂z_i = Σ_k w_kj (Φ_kj − T_j) g_ki, g_ki = −(z_i − μ_ki)/σ_ki².
``rsample`` returns z̃ = z − (∂T/∂z)⁻¹ (T(z; φ) − sg T(z; φ)): its value is z, its gradient is exactly the one
above (one triangular solve per draw, computed in float64). The estimator is unbiased for every φ (the
component logits included), works for any dimension (D = 1 too) and for any batch/particle shape, so the
same guide runs with ``Trace_ELBO``, ``TraceIWAE`` (IWAE and DReG estimators) and ``log_likelihood``.

GAMIX
-----
Rivera's posterior is a mixture of Gaussians and his regulariser keeps the posterior variances from collapsing.
Here q(z|x) = Σ_k π_k(x) N(μ_k(x), diag σ_k²(x)) (one MLP trunk, K heads) and the training loss is

    loss(x) = −ELBO(x) + γ · (1/K) Σ_k Σ_j (σ_kj²(x) − log σ_kj²(x) − 1)                       (GAMIX)

with the ELBO computed with the exact mixture density (so it is a bound and the test log-likelihood is an honest
importance-sampling estimate). The penalty is the variance part of each component's KL to N(0, I), 2·[½(σ² −
log σ² − 1)]; it grows like −log σ² as σ → 0. γ = 0.1 is the coefficient of the author's code
(``-0.1 * (1 + log σ² − σ²)`` summed over the latent dimensions).
The values reported as "ELBO" during training are the ELBO alone (the penalty only enters the gradient).

Rivera's own objective (the minibatch's aggregate posterior moment-matched to N(0, I)) is
:class:`ppl_vae.infer.aggregate_kl.AggregateKLObjective`; the penalised ELBO is
:class:`ppl_vae.infer.penalised.PenalisedELBO`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints

from ..nn.networks import MIN_SCALE, mlp

__all__ = ["DiagNormalMixture", "MixtureEncoder", "MixtureGuideMixin", "variance_collapse_penalty", "mixture_moments"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class DiagNormalMixture(TorchDistribution):
    """q(z) = Σ_k softmax(logits)_k N(z; locs_k, diag scales_k²), batch shape ``(...)``, event shape ``(d,)``.

    ``logits``: ``(..., K)``; ``locs``, ``scales``: ``(..., K, d)``. ``rsample`` is pathwise (implicit
    reparameterisation, see the module docstring); ``log_prob`` is the marginal mixture density.
    """

    arg_constraints = {"logits": constraints.real, "locs": constraints.real, "scales": constraints.positive}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, logits: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor, validate_args=None):
        if locs.dim() < 2 or scales.shape[-2:] != locs.shape[-2:] or logits.shape[-1] != locs.shape[-2]:
            raise ValueError(
                f"DiagNormalMixture needs logits (..., K), locs and scales (..., K, d); got logits "
                f"{tuple(logits.shape)}, locs {tuple(locs.shape)}, scales {tuple(scales.shape)}"
            )
        K, d = locs.shape[-2:]
        batch_shape = torch.broadcast_shapes(logits.shape[:-1], locs.shape[:-2], scales.shape[:-2])
        self.logits = logits.expand(batch_shape + (K,))
        self.locs = locs.expand(batch_shape + (K, d))
        self.scales = scales.expand(batch_shape + (K, d))
        super().__init__(batch_shape, torch.Size((d,)), validate_args=validate_args)

    @property
    def num_components(self) -> int:
        return self.locs.shape[-2]

    @property
    def log_weights(self) -> torch.Tensor:
        """log π_k, shape (..., K)."""
        return self.logits - self.logits.logsumexp(-1, keepdim=True)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        K, d = self.locs.shape[-2:]
        return DiagNormalMixture(
            self.logits.expand(batch_shape + (K,)),
            self.locs.expand(batch_shape + (K, d)),
            self.scales.expand(batch_shape + (K, d)),
            validate_args=False,
        )

    def component_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log N(value; μ_k, σ_k) for every component, shape (..., K)."""
        u = (value.unsqueeze(-2) - self.locs) / self.scales
        return (-0.5 * u.pow(2) - self.scales.log() - _HALF_LOG_2PI).sum(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return torch.logsumexp(self.log_weights + self.component_log_prob(value), dim=-1)

    @property
    def mean(self) -> torch.Tensor:
        return mixture_moments(self.log_weights, self.locs, self.scales)[0]

    @property
    def variance(self) -> torch.Tensor:
        return mixture_moments(self.log_weights, self.locs, self.scales)[1]

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self._draw(torch.Size(sample_shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        z = self._draw(torch.Size(sample_shape))
        params = (self.logits, self.locs, self.scales)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            z = implicit_mixture_rsample(z, self.log_weights, self.locs, self.scales)
        return z

    def _draw(self, sample_shape: torch.Size) -> torch.Tensor:
        """Component index ~ Categorical(π), then a Gaussian draw from that component (no gradient)."""
        with torch.no_grad():
            shape = sample_shape + self.batch_shape
            K, d = self.locs.shape[-2:]
            idx = torch.distributions.Categorical(logits=self.logits.detach()).sample(sample_shape)
            index = idx[..., None, None].expand(shape + (1, d))
            loc = self.locs.detach().expand(shape + (K, d)).gather(-2, index).squeeze(-2)
            scale = self.scales.detach().expand(shape + (K, d)).gather(-2, index).squeeze(-2)
            return loc + scale * torch.randn_like(loc)


def implicit_mixture_rsample(
    z: torch.Tensor, log_weights: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor, min_log_density: float = -80.0
) -> torch.Tensor:
    r"""z̃ with the value of the (detached) mixture draw ``z`` and the implicit reparameterisation gradient.

    ``z``: ``(..., d)``; ``log_weights``: ``(..., K)``; ``locs``/``scales``: ``(..., K, d)`` (broadcast against
    z's leading dims). Conditional densities below exp(``min_log_density``) are clamped (a draw that far in
    every component's tail has probability ~0; the clamp only prevents a division by zero).
    """
    out_dtype = z.dtype
    dt = torch.float64
    z0 = z.detach().to(dt)
    lw = log_weights.to(dt)
    mu, sd = locs.to(dt), scales.to(dt)
    u = (z0.unsqueeze(-2) - mu) / sd  # (..., K, d)
    ell = -0.5 * u.pow(2) - sd.log() - _HALF_LOG_2PI  # log N(z_i; μ_ki, σ_ki)
    cum = torch.cumsum(ell, dim=-1) - ell  # Σ_{i<j} ℓ_ki (exclusive)
    a = lw.unsqueeze(-1) + cum
    log_w = a - torch.logsumexp(a, dim=-2, keepdim=True)  # log w_kj (conditional weights)
    log_phi = torch.special.log_ndtr(u)
    T = torch.logsumexp(log_w + log_phi, dim=-2).exp()  # (..., d) conditional CDFs
    with torch.no_grad():
        log_f = torch.logsumexp(log_w + ell, dim=-2).clamp_min(min_log_density)  # conditional log-densities
        g = -u / sd  # ∂ℓ_ki/∂z_i
        c = (log_w - log_f.unsqueeze(-2)).exp() * (log_phi.exp() - T.unsqueeze(-2))  # w_kj (Φ_kj − T_j)/f_j
        A = torch.einsum("...kj,...ki->...ji", c, g)  # (∂T/∂z)_ji / f_j
        d = A.shape[-1]
        A = torch.tril(A, diagonal=-1) + torch.eye(d, dtype=dt, device=A.device)
    delta = (T - T.detach()) / log_f.exp()  # zero value, carries ∂T/∂φ / f
    batch = torch.broadcast_shapes(A.shape[:-2], delta.shape[:-1])
    rhs = delta.expand(batch + (d,)).unsqueeze(-1)
    y = torch.linalg.solve_triangular(A.expand(batch + (d, d)), rhs, upper=False, unitriangular=True).squeeze(-1)
    return (z0 - y).to(out_dtype)


def mixture_moments(log_weights: torch.Tensor, locs: torch.Tensor, scales: torch.Tensor):
    """Mean and per-coordinate variance of a diagonal-Gaussian mixture: Σ π μ, Σ π (σ² + μ²) − mean²."""
    w = log_weights.exp().unsqueeze(-1)
    mean = (w * locs).sum(-2)
    var = (w * (scales.pow(2) + locs.pow(2))).sum(-2) - mean.pow(2)
    return mean, var.clamp_min(0.0)


def variance_collapse_penalty(scales: torch.Tensor) -> torch.Tensor:
    """(1/K) Σ_k Σ_j (σ_kj² − log σ_kj² − 1) per datapoint (Rivera 2023), shape (...,) from ``(..., K, d)``."""
    v = scales.pow(2)
    return (v - v.log() - 1.0).sum(-1).mean(-1)


class MixtureEncoder(nn.Module):
    """q(z|x) = Σ_k π_k(x) N(μ_k(x), diag σ_k²(x)) from one MLP trunk with K heads (on the pixels, or on the
    features of an image ``trunk``).

    ``forward(x, c=None) -> (logits (B, K), locs (B, K, d), scales (B, K, d))``; σ = softplus(·) + 1e-4.
    """

    def __init__(
        self,
        data_shape,
        latent_dim: int,
        num_components: int,
        hidden=(256, 256),
        act: str = "relu",
        cond_dim: int = 0,
        trunk: nn.Module | None = None,
        trunk_dim: int | None = None,
    ):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.latent_dim, self.num_components = latent_dim, num_components
        self.trunk = trunk  # optional image features (a conv or ResNet trunk) under the MLP heads
        in_dim = (trunk_dim if trunk is not None else math.prod(self.data_shape)) + cond_dim
        self.net = mlp(in_dim, hidden, num_components * (2 * latent_dim + 1), act)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None):
        h = (self.trunk(x) if self.trunk is not None else x).reshape(x.shape[0], -1)
        if c is not None:
            h = torch.cat([h, c.to(h.dtype)], dim=-1)
        out = self.net(h)
        K, d = self.num_components, self.latent_dim
        logits = out[:, :K]
        loc, raw = out[:, K:].reshape(-1, K, 2 * d).chunk(2, dim=-1)
        return logits, loc, F.softplus(raw) + MIN_SCALE


class MixtureGuideMixin:
    """``encode`` for models whose ``guide_dist`` is a :class:`DiagNormalMixture`: the mixture's mean and marginal
    standard deviation (figures, latent plots)."""

    def encode(self, x, y=None):
        q = self.guide_dist(x, self._c(y))
        mean, var = mixture_moments(q.log_weights, q.locs, q.scales)
        return mean, var.sqrt()
