"""Variational Laplace Autoencoder (Park, Kim & Kim, ICML 2019): the standard VAE with the Laplace guide.

Model: z ~ N(0, I), x ~ p_θ(x | z) (Bernoulli or Gaussian). Guide: from the encoder's μ₀(x), T damped Newton
steps on the locally linearised decoder, then q(z|x) = N(μ_T, Λ(μ_T)⁻¹) with Λ = WᵀDW + I (full covariance; see
:mod:`ppl_vae.guides.laplace`). Registered as ``vlae`` with options ``num_steps``
(T, default 4) and ``damping`` ("vlae" for η_t = 0.5/(t+1), a number in (0, 1], or "line_search" for the
per-point best step by the exact log joint — our addition, see :mod:`ppl_vae.guides.laplace`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch

from ..config.options import Options, option
from ..distributions.likelihoods import BernoulliLikelihood, GaussianLikelihood
from ..errors import ConfigError
from ..guides.laplace import (
    GRADIENTS,
    MeanEncoder,
    laplace_posterior,
    precision_to_scale_tril,
    relu_mlp_layers,
    vlae_damping,
)
from ..nn.networks import BURDA, build_encoder_decoder
from ._common import config_likelihood, require_arch
from .registry import register_model
from .vae import VAE

__all__ = ["VLAE", "VLAEOptions"]


class VLAE(VAE):
    """A :class:`~ppl_vae.models.VAE` whose guide is the VLAE Laplace approximation.

    ``encoder(x, c) -> μ₀`` (a :class:`~ppl_vae.guides.laplace.MeanEncoder`); ``decoder``, ``likelihood`` and
    the prior as in the VAE (Bernoulli or Gaussian likelihood with a fixed σ²).
    """

    def __init__(
        self,
        encoder,
        decoder,
        likelihood,
        latent_dim: int,
        *,
        num_steps: int = 4,
        damping=vlae_damping,
        gradient: str = "unrolled",
        num_data: int | None = None,
        num_classes: int | None = None,
    ):
        super().__init__(encoder, decoder, likelihood, latent_dim, num_data=num_data, num_classes=num_classes)
        if isinstance(likelihood, BernoulliLikelihood):
            self._kind, self._link = "bernoulli", None
        elif isinstance(likelihood, GaussianLikelihood):
            self._kind, self._link = "gaussian", likelihood.link
        else:
            raise ConfigError(f"vlae needs model.likelihood 'bernoulli' or 'gaussian', got {type(likelihood).__name__}")
        self.num_steps = int(num_steps)
        self.damping = damping
        self.gradient = gradient

    def posterior(self, x: torch.Tensor, c: torch.Tensor | None = None):
        """(μ, scale_tril) of q(z|x): the Laplace approximation after ``num_steps`` damped Newton steps."""
        mu0 = self.encoder(x, c)
        if c is None:
            fn = lambda z: self.decoder(z).reshape(z.shape[0], -1)  # noqa: E731
            layers = relu_mlp_layers(self.decoder)
        else:
            fn = lambda z: self.decoder(z, c).reshape(z.shape[0], -1)  # noqa: E731
            layers = None
        sigma2 = self.likelihood.sigma2 if self._kind == "gaussian" else 1.0  # read now: σ² may be learned
        mu, prec = laplace_posterior(
            x,
            mu0,
            fn,
            likelihood=self._kind,
            sigma2=sigma2,
            num_steps=self.num_steps,
            damping=self.damping,
            layers=layers,
            link=self._link,
            gradient=self.gradient,
        )
        return mu, precision_to_scale_tril(prec)

    def guide_dist(self, x, c=None) -> dist.MultivariateNormal:
        """The Laplace q(z|x) = N(μ, Λ⁻¹) (used by the inherited ``guide``)."""
        mu, tril = self.posterior(x, c)
        return dist.MultivariateNormal(mu, scale_tril=tril)

    def encode(self, x, y=None):
        """(mean, marginal std) of the Laplace q(z|x)."""
        mu, tril = self.posterior(x, self._c(y))
        return mu, tril.pow(2).sum(-1).sqrt()


def _is_damping(value) -> bool:
    return value in ("vlae", "line_search") or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    )


@dataclass
class VLAEOptions(Options):
    num_steps: int = option(4, ge=0, doc="T, damped Newton steps from the encoder's mean")
    damping: str | float = option(
        "vlae",
        check=_is_damping,
        what="'vlae' (η_t = 0.5/(t+1)), 'line_search' or a number in (0, 1]",
        doc="step sizes of the Newton steps: vlae (η_t = 0.5/(t + 1), the paper's), line_search (per image, the best "
        "of η ∈ {1, ½, ¼, ⅛, 0}) or a fixed number",
    )
    gradient: str = option(
        "unrolled",
        choices=GRADIENTS,
        doc="backpropagate through every step (the paper's), the last step only, or the "
        "implicit-function gradient at the mode (see ppl_vae.guides.laplace)",
    )

    def damping_schedule(self):
        return (
            vlae_damping
            if self.damping == "vlae"
            else self.damping
            if self.damping == "line_search"
            else float(self.damping)
        )


@register_model("vlae", options=VLAEOptions, aliases=("vae_laplace",))
def build_vlae(cfg, options: VLAEOptions, data_shape, num_data, num_classes) -> VLAE:
    if cfg.likelihood not in ("bernoulli", "gaussian"):
        raise ConfigError(
            f"model.likelihood must be 'bernoulli' or 'gaussian' for model.name={cfg.name!r} (the "
            f"Laplace guide needs a twice-differentiable likelihood), got {cfg.likelihood!r}"
        )
    require_arch(cfg, "mlp", "burda1")
    lik = config_likelihood(cfg, data_shape)
    if cfg.arch == "burda1":
        b = BURDA["burda1"]
        latent_dim, hidden, act = b["latent_dim"], b["hidden"], b["act"]
    else:
        latent_dim, hidden, act = cfg.latent_dim, tuple(cfg.hidden), cfg.activation
    _, dec = build_encoder_decoder(cfg.arch, data_shape, latent_dim, hidden, act, channels=cfg.channels)
    enc = MeanEncoder(data_shape, latent_dim, hidden, act)
    return VLAE(
        enc,
        dec,
        lik,
        latent_dim,
        num_steps=options.num_steps,
        damping=options.damping_schedule(),
        gradient=options.gradient,
        num_data=num_data,
    )
