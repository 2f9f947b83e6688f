"""Priors p(z) as modules that return a Pyro distribution with batch shape ``(B,)``: the standard normal, a learned
diagonal Gaussian mixture (the clustering prior), an autoregressive flow, and a Gaussian mixture fitted to the aggregate
posterior (its analysis: :mod:`ppl_vae.evaluate.aggregate`)."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from ..errors import ConfigError


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I_d)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("_zero", torch.zeros(()))
        self._cached = None

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        key = (batch_size, self._zero.device, self._zero.dtype)
        if self._cached is None or self._cached[0] != key:  # one distribution per batch size and device
            loc = self._zero.new_zeros(batch_size, self.latent_dim)
            self._cached = (key, dist.Normal(loc, torch.ones_like(loc)).to_event(1))
        return self._cached[1]


class AutoregressiveFlowPrior(nn.Module):
    r"""p_AF(z): N(0, I) pushed through ``num_flows`` affine autoregressive flows (MADE networks,
    Pyro's ``AffineAutoregressive`` / ``AutoRegressiveNN``), with the dimensions reversed between flows.

    Direction (Chen et al. 2017, "Variational Lossy Autoencoder", §3.2): ε = f(z) with
    ε_d = (z_d − μ_d(z_{<d})) / σ_d(z_{<d}) is Pyro's *forward* (parallel) pass of each ``AffineAutoregressive``,
    so the prior is ``TransformedDistribution(N(0, I), [flow.inv, ...])``: scoring any z (the guide's draws, every
    step) is one parallel pass per flow, log p(z) = log N(f(z)) + log |det ∂f/∂z|; sampling the prior is the
    sequential direction (D passes per flow), used only for generation. The flows are submodules, so
    ``pyro.module`` / a ``PyroModule`` parent registers their parameters (they train and checkpoint)."""

    def __init__(self, latent_dim: int, num_flows: int = 2, hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        from pyro.distributions.transforms import AffineAutoregressive
        from pyro.nn import AutoRegressiveNN

        if latent_dim < 2:
            raise ConfigError(f"an autoregressive-flow prior needs latent_dim >= 2, got {latent_dim}")
        if num_flows < 1:
            raise ConfigError(f"num_flows must be a positive integer, got {num_flows}")
        self.latent_dim = latent_dim
        self.flows = nn.ModuleList(
            AffineAutoregressive(AutoRegressiveNN(latent_dim, list(hidden))) for _ in range(num_flows)
        )
        self.register_buffer("_zero", torch.zeros(()))
        self.register_buffer("_reverse", torch.arange(latent_dim - 1, -1, -1))

    def transforms(self) -> list:
        from pyro.distributions.transforms import Permute

        out = []
        for i, flow in enumerate(self.flows):
            if i:
                out.append(Permute(self._reverse))
            out.append(flow.inv)
        return out

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        loc = self._zero.new_zeros(batch_size, self.latent_dim)
        base = dist.Normal(loc, torch.ones_like(loc)).to_event(1)
        return dist.TransformedDistribution(base, self.transforms())


# --------------------------------------------------------------------------- fitted aggregate posterior


class _MixturePrior(nn.Module):
    """Shape of a mixture prior whose component means are ``loc`` (num_components, latent_dim)."""

    @property
    def num_components(self) -> int:
        return self.loc.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.loc.shape[1]


class LearnedMixturePrior(_MixturePrior):
    r"""p(z) = Σ_c π_c N(z; μ_c, diag σ_c²) with learned π (``logits``), μ (``loc``) and σ (``scale``):
    the clustering prior of VaDE / VLAC. ``prior(B)`` is the ``MixtureSameFamily`` (batch shape (B,));
    :meth:`weights` and :meth:`component` are the two halves for a model that samples c itself (and enumerates
    it); :meth:`cluster_log_probs` is log p(c | z); :meth:`init_from` fits scikit-learn's diagonal
    ``GaussianMixture`` to codes (the usual initialisation, without which the clusters degenerate)."""

    def __init__(self, num_components: int, latent_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.loc = nn.Parameter(torch.randn(num_components, latent_dim, generator=g))
        self.raw_scale = nn.Parameter(torch.zeros(num_components, latent_dim))  # σ = softplus(raw) · (1/log 2)

    @property
    def scale(self) -> torch.Tensor:
        return nn.functional.softplus(self.raw_scale) / 0.6931471805599453 + 1e-4

    def weights(self, batch_size: int) -> dist.Categorical:
        return dist.Categorical(logits=self.logits).expand([batch_size])

    def component(self, c: torch.Tensor) -> dist.TorchDistribution:
        """N(μ_c, diag σ_c²) for a tensor of component indices c (any shape; event (latent_dim,))."""
        return dist.Normal(self.loc[c], self.scale[c]).to_event(1)

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        mix = dist.MixtureSameFamily(
            dist.Categorical(logits=self.logits), dist.Normal(self.loc, self.scale).to_event(1)
        )
        return mix.expand([batch_size])

    def cluster_log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """log p(c | z), shape (..., num_components)."""
        joint = self.logits.log_softmax(-1) + dist.Normal(self.loc, self.scale).log_prob(z.unsqueeze(-2)).sum(-1)
        return joint.log_softmax(-1)

    @torch.no_grad()
    def init_from(self, z: torch.Tensor, seed: int = 0) -> None:
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(self.num_components, covariance_type="diag", random_state=seed, reg_covar=1e-4)
        gm.fit(z.detach().double().cpu().numpy())
        dev = self.loc.device
        self.logits.copy_(torch.as_tensor(gm.weights_, device=dev).log())
        self.loc.copy_(torch.as_tensor(gm.means_, device=dev))
        sd = torch.as_tensor(gm.covariances_, device=dev).sqrt() - 1e-4
        self.raw_scale.copy_(torch.log(torch.expm1((sd * 0.6931471805599453).clamp_min(1e-6))))


class GaussianMixturePrior(_MixturePrior):
    r"""q̂(z) = Σ_m w_m N(z; μ_m, Σ_m): a Gaussian mixture fitted to the aggregate posterior
    q(z) = (1/N) Σ_i q(z|x_i) (Lin, Roberts, Trigoni & Clark, eqs. 11-12; M = 32 for MNIST/Fashion-MNIST, 500 for
    CelebA), used to sample and, in evaluation, as p(z) (their Table 3, "Approx. Agg. Posterior").

    Like every prior here, ``prior(B)`` is a Pyro distribution with batch shape ``(B,)`` and event shape
    ``(latent_dim,)`` (a ``MixtureSameFamily`` of full-covariance Gaussians), so it can replace a model's
    ``prior`` (see :func:`use_prior`). Weights, means and Cholesky factors are buffers. Build one with
    :meth:`fit` (scikit-learn's ``GaussianMixture``) or :func:`fit_aggregate_posterior`.
    """

    def __init__(
        self, weights: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor, covariance_type: str = "full"
    ):
        super().__init__()
        weights, loc, scale_tril = (torch.as_tensor(t, dtype=torch.float32) for t in (weights, loc, scale_tril))
        m, d = loc.shape
        if weights.shape != (m,) or scale_tril.shape != (m, d, d):
            raise ValueError(
                f"GaussianMixturePrior: weights {tuple(weights.shape)}, loc {tuple(loc.shape)} and "
                f"scale_tril {tuple(scale_tril.shape)} do not fit together"
            )
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("loc", loc)
        self.register_buffer("scale_tril", scale_tril)
        self.covariance_type = covariance_type

    @property
    def distribution(self) -> dist.TorchDistribution:
        """The unbatched mixture (batch shape (), event shape (latent_dim,))."""
        return dist.MixtureSameFamily(
            dist.Categorical(probs=self.weights), dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril)
        )

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        return self.distribution.expand([batch_size])

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.distribution.log_prob(z)

    def sample(self, n: int, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws (n, latent_dim), reproducible: from a CPU generator seeded with ``seed`` (or ``generator``);
        the global RNG is neither used nor advanced. Component m ~ Categorical(w), then z = μ_m + L_m ε."""
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        w, loc, tril = self.weights.cpu(), self.loc.cpu(), self.scale_tril.cpu()
        comp = torch.multinomial(w, int(n), replacement=True, generator=generator)
        eps = torch.randn(int(n), self.latent_dim, generator=generator)
        z = loc[comp] + (tril[comp] @ eps.unsqueeze(-1)).squeeze(-1)
        return z.to(self.loc.device)

    @classmethod
    def fit(
        cls,
        z: torch.Tensor,
        num_components: int = 32,
        covariance_type: str = "full",
        seed: int = 0,
        reg_covar: float = 1e-6,
        max_iter: int = 200,
        n_init: int = 1,
    ) -> GaussianMixturePrior:
        """EM fit of scikit-learn's ``GaussianMixture`` to encodings ``z`` (N, latent_dim), seeded."""
        from sklearn.mixture import GaussianMixture

        if not (isinstance(num_components, int) and not isinstance(num_components, bool) and num_components > 0):
            raise ConfigError(f"num_components must be a positive integer, got {num_components!r}")
        if covariance_type not in ("full", "diag", "tied", "spherical"):
            raise ConfigError(
                f"covariance_type must be one of ['full', 'diag', 'tied', 'spherical'], got {covariance_type!r}"
            )
        zn = torch.as_tensor(z).detach().double().cpu().numpy()
        if zn.ndim != 2 or len(zn) < num_components:
            raise ValueError(
                f"GaussianMixturePrior.fit needs at least num_components={num_components} encodings "
                f"of shape (N, latent_dim), got {zn.shape}"
            )
        gm = GaussianMixture(
            num_components,
            covariance_type=covariance_type,
            random_state=seed,
            reg_covar=reg_covar,
            max_iter=max_iter,
            n_init=n_init,
        ).fit(zn)
        m, d = gm.means_.shape
        cov = torch.as_tensor(gm.covariances_, dtype=torch.float64)
        if covariance_type == "diag":
            cov = torch.diag_embed(cov)
        elif covariance_type == "spherical":
            cov = cov[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif covariance_type == "tied":
            cov = cov.expand(m, d, d)
        prior = cls(
            torch.as_tensor(gm.weights_), torch.as_tensor(gm.means_), torch.linalg.cholesky(cov), covariance_type
        )
        prior.converged = bool(gm.converged_)
        return prior.to(torch.as_tensor(z).device)

    def state(self) -> dict:
        return {
            "weights": self.weights.cpu(),
            "loc": self.loc.cpu(),
            "scale_tril": self.scale_tril.cpu(),
            "covariance_type": self.covariance_type,
        }

    @classmethod
    def from_state(cls, state: dict) -> GaussianMixturePrior:
        return cls(state["weights"], state["loc"], state["scale_tril"], state.get("covariance_type", "full"))
