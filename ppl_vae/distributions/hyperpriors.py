r"""Non-parametric mixture hyperpriors p(t) for the top latent of LaDDer (Lin & Clark, "LaDDer: Latent Data
Distribution Modelling with a Generative Prior", BMVC 2020).

Two ways to get a mixture whose number of effective components is decided by the data:

(a) :class:`BGMHyperprior` — a variational Bayesian Gaussian mixture (scikit-learn's
    ``BayesianGaussianMixture``, finite Dirichlet or truncated Dirichlet-process weight prior, full covariances)
    refitted to encoded ``t`` between epochs and held fixed in between (the scheme of LaDDer's official code).
    Its point estimate is used as the density

        p(t) = Σ_k w_k N(t; m_k, S_k),   w_k = E_q[π_k] (``weights_``), m_k = ``means_``, S_k = ``covariances_``

    which is exactly ``GaussianMixture.score_samples`` with those parameters (a normalised density, so it can be a
    prior inside an ELBO). scikit-learn's ``BayesianGaussianMixture.score_samples`` is a different, *unnormalised*
    quantity, log Σ_k exp(E_q[log π_k] + E_q[log N(t; μ_k, Λ_k⁻¹)]) with the Wishart/Dirichlet expectations
    (Bishop 2006, eqs. 10.64–10.66); :meth:`BGMHyperprior.expected_log_prob` reproduces it for comparison.
    All fitted numbers are module buffers, so checkpoints (``module.state_dict()``) carry the fitted prior.

(b) :class:`StickBreakingHyperprior` — a truncated stick-breaking (Sethuraman 1994) mixture of diagonal Gaussians
    learned inside the Pyro program by gradient ascent on the ELBO:

        v_k = sigmoid(a_k) (k < K),  v_K = 1,   π_k = v_k Π_{j<k} (1 − v_j),   p(t) = Σ_k π_k N(t; μ_k, diag σ_k²)

    with an optional Beta(1, α) prior on each v_k (a MAP estimate of a truncated Dirichlet-process mixture; the
    model adds Σ_k log Beta(v_k; 1, α) once per step through :meth:`log_prior`).

Both return, for a batch of size B, a Pyro distribution with batch shape (B,) and event shape (d,).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from scipy.special import digamma
from torch import nn

from ..errors import ConfigError

__all__ = ["BGMHyperprior", "StickBreakingHyperprior", "build_hyperprior"]


class _MixtureHyperprior(nn.Module):
    """What both hyperpriors share: ``p(t)`` from ``self.distribution()`` with batch shape ``(B,)`` for a model."""

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        return self.distribution().expand((batch_size,))

    def log_prob(self, t: torch.Tensor) -> torch.Tensor:
        return self.distribution().log_prob(t)

    def sample(self, n: int) -> torch.Tensor:
        return self.distribution().sample((n,))


class BGMHyperprior(_MixtureHyperprior):
    """Bayesian Gaussian mixture p(t) refitted with scikit-learn and stored as buffers.

    Before the first :meth:`fit` it is N(0, I) (every component at the origin with unit covariance).
    ``weight_concentration_prior_type`` is ``"dirichlet_process"`` (truncated stick-breaking) or
    ``"dirichlet_distribution"`` (the official code's choice, with concentration 0.1).
    """

    def __init__(
        self,
        dim: int,
        num_components: int = 20,
        *,
        weight_concentration_prior: float = 0.1,
        weight_concentration_prior_type: str = "dirichlet_distribution",
        max_iter: int = 200,
        reg_covar: float = 1e-6,
        warm_start: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if not (isinstance(num_components, int) and num_components > 0):
            raise ConfigError(f"model.options.num_components must be a positive integer, got {num_components!r}")
        if weight_concentration_prior_type not in ("dirichlet_process", "dirichlet_distribution"):
            raise ConfigError(
                "model.options.weight_concentration_prior_type must be 'dirichlet_process' or "
                f"'dirichlet_distribution', got {weight_concentration_prior_type!r}"
            )
        if not (isinstance(weight_concentration_prior, (int, float)) and weight_concentration_prior > 0):
            raise ConfigError(
                "model.options.weight_concentration_prior must be a positive number, got "
                f"{weight_concentration_prior!r}"
            )
        self.dim, self.num_components = int(dim), int(num_components)
        self.bgm_kwargs = dict(
            n_components=self.num_components,
            covariance_type="full",
            max_iter=int(max_iter),
            weight_concentration_prior=float(weight_concentration_prior),
            weight_concentration_prior_type=weight_concentration_prior_type,
            reg_covar=float(reg_covar),
            warm_start=bool(warm_start),
            random_state=int(seed),
        )
        self._bgm = None
        K, d = self.num_components, self.dim
        self.register_buffer("weights", torch.full((K,), 1.0 / K))
        self.register_buffer("means", torch.zeros(K, d))
        self.register_buffer("covariances", torch.eye(d).expand(K, d, d).clone())
        # variational quantities, only for expected_log_prob (= BayesianGaussianMixture.score_samples)
        self.register_buffer("expected_log_weights", torch.full((K,), -math.log(K)))
        self.register_buffer("degrees_of_freedom", torch.full((K,), float("nan")))
        self.register_buffer("mean_precision", torch.full((K,), float("nan")))
        self.register_buffer("num_fits", torch.zeros((), dtype=torch.long))

    # ----- fitting -----
    def fit(self, t) -> BGMHyperprior:
        """Refit to points ``t`` (N, d) (tensor or array) and copy the result into the buffers."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import BayesianGaussianMixture

        x = t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"BGMHyperprior.fit expects points of shape (N, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("BGMHyperprior.fit: the encoded points contain NaN or inf")
        if self._bgm is None:
            self._bgm = BayesianGaussianMixture(**self.bgm_kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self._bgm.fit(x)
        self.load_sklearn(self._bgm)
        return self

    @torch.no_grad()
    def load_sklearn(self, bgm) -> None:
        """Copy a fitted ``BayesianGaussianMixture`` (or ``GaussianMixture``) into the buffers."""
        if bgm.covariance_type != "full":
            raise ValueError(f"only covariance_type='full' is supported, got {bgm.covariance_type!r}")
        K = len(bgm.weights_)
        if K != self.num_components:
            raise ValueError(f"the mixture has {K} components, the hyperprior {self.num_components}")

        def put(name, value):
            buf = getattr(self, name)
            buf.copy_(torch.as_tensor(np.asarray(value), dtype=buf.dtype, device=buf.device))

        put("weights", bgm.weights_ / bgm.weights_.sum())
        put("means", bgm.means_)
        put("covariances", bgm.covariances_)
        if hasattr(bgm, "degrees_of_freedom_"):
            put("expected_log_weights", bgm._estimate_log_weights())
            put("degrees_of_freedom", bgm.degrees_of_freedom_)
            put("mean_precision", bgm.mean_precision_)
        else:
            put("expected_log_weights", np.log(bgm.weights_))
        self.num_fits += 1

    # ----- densities -----
    def distribution(self) -> dist.MixtureSameFamily:
        """p(t) = Σ_k w_k N(t; m_k, S_k) with batch shape () and event shape (d,)."""
        tril = torch.linalg.cholesky(self.covariances)
        comp = dist.MultivariateNormal(self.means, scale_tril=tril)
        return dist.MixtureSameFamily(dist.Categorical(probs=self.weights), comp)

    def active_components(self, threshold: float = 1e-2) -> int:
        """Components with weight ≥ ``threshold`` (the official code's report of 'active mixtures')."""
        return int((self.weights >= threshold).sum())

    @torch.no_grad()
    def expected_log_prob(self, t: torch.Tensor) -> torch.Tensor:
        """scikit-learn's ``BayesianGaussianMixture.score_samples`` (unnormalised; see the module docstring):

        log Σ_k exp( E[log π_k] + ½ E[log|Λ_k|] − (d/2) log 2π − ½ (d/β_k + ν_k (t − m_k)ᵀ W_k (t − m_k)) ),
        with ν_k W_k = S_k⁻¹, E[log|Λ_k|] = Σ_{i<d} ψ((ν_k − i)/2) + d log 2 + log|W_k|.
        """
        if torch.isnan(self.degrees_of_freedom).any():
            raise RuntimeError("expected_log_prob needs a BayesianGaussianMixture fit")
        t = t.double()
        d = self.dim
        nu, beta = self.degrees_of_freedom.double(), self.mean_precision.double()
        S = self.covariances.double()
        log_gauss = dist.MultivariateNormal(self.means.double(), covariance_matrix=S).log_prob(t.unsqueeze(-2))
        # N(t; m, S) uses precision νW; the expectation needs ½ log|W| = ½ log|νW| − (d/2) log ν
        log_gauss = log_gauss - 0.5 * d * torch.log(nu)
        dig = torch.as_tensor(
            digamma(0.5 * (nu.cpu().numpy()[None, :] - np.arange(d)[:, None])).sum(0),
            dtype=torch.float64,
            device=t.device,
        )
        log_lambda = d * math.log(2.0) + dig
        lw = log_gauss + 0.5 * (log_lambda - d / beta) + self.expected_log_weights.double()
        return torch.logsumexp(lw, dim=-1)


class StickBreakingHyperprior(_MixtureHyperprior):
    """Truncated stick-breaking mixture of K diagonal Gaussians, learned by gradient (see the module docstring)."""

    def __init__(
        self, dim: int, num_components: int = 20, *, alpha: float = 1.0, init_scale: float = 2.0, seed: int = 0
    ):
        super().__init__()
        if not (isinstance(num_components, int) and num_components > 1):
            raise ConfigError(
                f"model.options.num_components must be an integer > 1 for the stick-breaking "
                f"hyperprior, got {num_components!r}"
            )
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ConfigError(f"model.options.stick_alpha must be a positive number, got {alpha!r}")
        g = torch.Generator().manual_seed(seed)
        self.dim, self.num_components, self.alpha = int(dim), int(num_components), float(alpha)
        K = self.num_components
        # start at equal weights π_k = 1/K: v_k = 1/(K − k) for k = 0..K−2
        v0 = 1.0 / torch.arange(K, 1, -1, dtype=torch.float)
        self.stick_logits = nn.Parameter(torch.logit(v0.clamp(1e-4, 1 - 1e-4)))
        self.means = nn.Parameter(init_scale * torch.randn(K, dim, generator=g))
        self.raw_scales = nn.Parameter(torch.zeros(K, dim))

    def stick_fractions(self) -> torch.Tensor:
        return torch.sigmoid(self.stick_logits)

    def weights(self) -> torch.Tensor:
        """π_k = v_k Π_{j<k}(1 − v_j), the last stick taking the remainder (Σ π = 1)."""
        log_v = F.logsigmoid(self.stick_logits)
        log_1mv = F.logsigmoid(-self.stick_logits)
        cum = torch.cat([log_1mv.new_zeros(1), torch.cumsum(log_1mv, 0)])
        log_pi = torch.cat([log_v, log_v.new_zeros(1)]) + cum
        return log_pi.exp()

    def scales(self) -> torch.Tensor:
        return F.softplus(self.raw_scales) / F.softplus(torch.zeros(())) + 1e-3

    def distribution(self) -> dist.MixtureSameFamily:
        comp = dist.Normal(self.means, self.scales()).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(probs=self.weights()), comp)

    def log_prior(self) -> torch.Tensor:
        """Σ_{k<K} log Beta(v_k; 1, α) = Σ_k [log α + (α − 1) log(1 − v_k)]."""
        return (math.log(self.alpha) + (self.alpha - 1.0) * F.logsigmoid(-self.stick_logits)).sum()

    def active_components(self, threshold: float = 1e-2) -> int:
        return int((self.weights() >= threshold).sum())


def build_hyperprior(kind: str, dim: int, num_components: int, seed: int = 0, **kw) -> nn.Module:
    """``"bgm"`` → :class:`BGMHyperprior`, ``"stick"`` → :class:`StickBreakingHyperprior`."""
    if kind == "bgm":
        return BGMHyperprior(dim, num_components, seed=seed, **kw)
    if kind == "stick":
        return StickBreakingHyperprior(dim, num_components, seed=seed, **kw)
    raise ConfigError(f"model.options.hyperprior must be 'bgm' or 'stick', got {kind!r}")
