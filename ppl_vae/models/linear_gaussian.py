"""The linear-Gaussian VAE: the exact oracle for bounds, estimators, guides and the training loop.

    z ~ N(0, I_d),   x | z ~ N(W z + b, σ² I_D)

Everything is Gaussian in closed form (probabilistic PCA; Tipping & Bishop 1999):
    log p(x)   = log N(x; b, W Wᵀ + σ² I)
    p(z | x)   = N(μ, Σ),  Σ = (I + WᵀW/σ²)⁻¹,  μ = Σ Wᵀ (x − b)/σ²
With the exact posterior as guide, log p(x,z) − log q(z|x) = log p(x) for every z, so every ELBO, IWAE bound
and importance-sampling estimate equals log p(x) exactly.

Guides (``guide_type``):
  * ``"exact"``: q = p(z|x) computed from the current W, b, σ (full-covariance ``MultivariateNormal``);
    ``guide_shift`` and ``guide_scale`` perturb it to a known, worse guide: N(μ + shift, scale² Σ).
  * ``"amortized"``: a learnable diagonal Gaussian with a linear encoder, N(A x + c, diag softplus(s)²).
Data are flat vectors ``x`` of shape (B, D).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..distributions.plate import data_plate


class LinearGaussianVAE(PyroModule):
    """The linear-Gaussian VAE of the module docstring: ``model(x)`` / ``guide(x)`` with the exact
    ``log_marginal(x)`` and ``posterior(x)``, a guide chosen by ``guide_type`` (``exact``, perturbed by
    ``guide_shift``/``guide_scale``, or ``amortized``); ``W`` and ``b`` drawn from ``seed`` unless given."""

    conditional = False
    num_classes = None

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        sigma: float = 0.5,
        *,
        W: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
        guide_type: str = "exact",
        guide_shift: float = 0.0,
        guide_scale: float = 1.0,
        num_data: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if guide_type not in ("exact", "amortized"):
            raise ValueError(f"guide_type must be 'exact' or 'amortized', got {guide_type!r}")
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(data_dim, latent_dim, generator=g) if W is None else torch.as_tensor(W, dtype=torch.float)
        b = torch.randn(data_dim, generator=g) if b is None else torch.as_tensor(b, dtype=torch.float)
        self.W = nn.Parameter(W.clone())
        self.b = nn.Parameter(b.clone())
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.guide_type = guide_type
        self.guide_shift, self.guide_scale = float(guide_shift), float(guide_scale)
        self.num_data = num_data
        if guide_type == "amortized":
            self.enc_A = nn.Parameter(0.01 * torch.randn(latent_dim, data_dim, generator=g))
            self.enc_c = nn.Parameter(torch.zeros(latent_dim))
            self.enc_s = nn.Parameter(torch.zeros(latent_dim))

    # ----- the Pyro program -----
    @pyro_method
    def model(self, x: torch.Tensor, y=None):
        W, b = self.W, self.b
        with data_plate(x, self.num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, self.sigma).to_event(1), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, y=None):
        with data_plate(x, self.num_data):
            pyro.sample("z", self.guide_dist(x))

    def guide_dist(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z|x) with batch shape (B,)."""
        if self.guide_type == "exact":
            mu, cov = self.posterior(x)
            mu = mu + self.guide_shift
            return dist.MultivariateNormal(mu, scale_tril=self.guide_scale * torch.linalg.cholesky(cov))
        scale = F.softplus(self.enc_s) + 1e-4
        return dist.Normal(x @ self.enc_A.T + self.enc_c, scale.expand(x.shape[0], -1)).to_event(1)

    # ----- closed forms -----
    def posterior(self, x: torch.Tensor):
        """Exact p(z|x) = N(μ, Σ): returns μ (B, d) and Σ (d, d)."""
        W, s2 = self.W, self.sigma**2
        prec = torch.eye(self.latent_dim, device=x.device) + W.T @ W / s2
        cov = torch.linalg.inv(prec)
        cov = 0.5 * (cov + cov.T)
        mu = (x - self.b) @ W @ cov / s2
        return mu, cov

    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(b, W Wᵀ + σ² I)."""
        C = self.W @ self.W.T + self.sigma**2 * torch.eye(self.data_dim, device=self.W.device)
        return dist.MultivariateNormal(self.b, covariance_matrix=C)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per datapoint, shape (B,)."""
        return self.marginal().log_prob(x)

    def exact_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """ELBO of the current guide in closed form (exact guide: shift/scale perturbation; amortized: diagonal)."""
        q = self.guide_dist(x)
        if isinstance(q, dist.MultivariateNormal):
            m, L = q.loc, q.scale_tril
            S = L @ L.mT
        else:
            m, sd = q.base_dist.loc, q.base_dist.scale
            S = torch.diag_embed(sd**2)
        W, b, s2, D, d = self.W, self.b, self.sigma**2, self.data_dim, self.latent_dim
        resid = x - m @ W.T - b
        tr_WSW = torch.einsum("ij,...jk,ik->...", W, S, W)
        e_loglik = -0.5 * D * math.log(2 * math.pi * s2) - 0.5 * ((resid**2).sum(-1) + tr_WSW) / s2
        logdet = torch.logdet(S)
        tr_S = S.diagonal(dim1=-2, dim2=-1).sum(-1)
        kl = 0.5 * (tr_S + (m**2).sum(-1) - d - logdet)
        return e_loglik - kl

    @torch.no_grad()
    def simulate(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x from the model."""
        z = torch.randn(n, self.latent_dim, generator=generator)
        return z @ self.W.T + self.b + self.sigma * torch.randn(n, self.data_dim, generator=generator)

    # figure API (data are vectors, so "images" are the vectors themselves)
    def encode(self, x, y=None):
        q = self.guide_dist(x)
        if isinstance(q, dist.MultivariateNormal):
            return q.loc, q.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt().expand_as(q.loc)
        return q.base_dist.loc, q.base_dist.scale

    def decode(self, z, y=None):
        return z @ self.W.T + self.b

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x)[0])

    def sample(self, n: int, y=None):
        return self.decode(torch.randn(n, self.latent_dim, device=self.W.device))
