"""VAE with the recursive mixture guide (Kim & Pavlovic, "Recursive Inference for Variational Autoencoders",
NeurIPS 2020): q(z|x) = Σ_k α_k(x) N(μ_k(x), diag σ_k²(x)), grown as q_m = (1 − ε_m) q_{m−1} + ε_m h_m, each
component chosen by the functional-gradient criterion of :mod:`ppl_vae.guides.recursive` (exact objective and
deviations there). Registered as ``vae_recursive`` with options ``num_components`` (K, default 3),
``divergence_weight`` (λ, 0.5), ``log_ratio_cap`` (κ nats, 5.0) and ``grow_every`` (epochs between activating
components; 0 = all active from the start).
"""

from __future__ import annotations

import math

import torch
from pyro.nn import pyro_method
from torch.func import functional_call

from ..errors import ConfigError
from ..guides.mixture import mixture_moments
from ..guides.recursive import (RecursiveMixtureELBO, RecursiveMixtureEncoder, recursive_mixture_distribution,
                                recursive_mixture_terms)
from ..likelihoods import build_likelihood
from ..nets import build_encoder_decoder
from .registry import check_options, register_model
from .vae import VAE


class MixtureGuideMixin:
    """``encode`` for mixture guides: the mixture's mean and marginal std (figures, latent plots)."""

    def encode(self, x, y=None):
        q = self.guide_dist(x, self._c(y))
        mean, var = mixture_moments(q.log_weights, q.locs, q.scales)
        return mean, var.sqrt()


class RecursiveMixtureVAE(MixtureGuideMixin, VAE):
    """A VAE whose guide is the recursive mixture of ``encoder`` (a :class:`RecursiveMixtureEncoder`).

    ``make_objective`` returns the recursive objective (:class:`~ppl_vae.guides.recursive.RecursiveMixtureELBO`);
    the guide itself is an ordinary mixture site, so the model also runs with ``Trace_ELBO``/``TraceIWAE``.
    The number of active components is a buffer (saved in checkpoints).
    """

    def __init__(self, encoder: RecursiveMixtureEncoder, decoder, likelihood, latent_dim: int, *,
                 divergence_weight: float = 0.5, log_ratio_cap: float = 5.0, grow_every: int = 0,
                 num_data: int | None = None, num_classes: int | None = None):
        super().__init__(encoder, decoder, likelihood, latent_dim, num_data=num_data, num_classes=num_classes)
        self.num_components = encoder.num_components
        self.divergence_weight, self.log_ratio_cap = float(divergence_weight), float(log_ratio_cap)
        self.grow_every = int(grow_every)
        self.register_buffer("num_active", torch.tensor(1 if self.grow_every > 0 else self.num_components))

    def guide_dist(self, x, c=None):
        locs, scales, eps_logits = self.encoder(x, c, int(self.num_active))
        return recursive_mixture_distribution(locs, scales, eps_logits)


    def _log_joint(self, x, z, c, frozen: bool):
        """log p(x, z) for z (B, n, d) → (B, n); ``frozen`` detaches the decoder's and likelihood's parameters."""
        B, n, d = z.shape
        zf = z.reshape(B * n, d)
        cf = None if c is None else c.repeat_interleave(n, 0)
        xf = x.repeat_interleave(n, 0)
        if frozen:
            state = {k: v.detach() for k, v in self.decoder.state_dict(keep_vars=True).items()}
            out = functional_call(self.decoder, state, (zf, cf))
            lstate = {k: v.detach() for k, v in self.likelihood.state_dict(keep_vars=True).items()}
            lik = functional_call(self.likelihood, lstate, (out,)) if lstate else self.likelihood(out)
        else:
            lik = self.likelihood(self.decoder(zf, cf))
        return (lik.log_prob(xf) + self.prior(B * n).log_prob(zf)).reshape(B, n)

    @pyro_method
    def recursive_terms(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """Per-datapoint (surrogate, ELBO(q_M)) of the recursive objective (see ppl_vae.guides.recursive)."""
        c = self._c(y)
        locs, scales, eps_logits = self.encoder(x, c, int(self.num_active))
        return recursive_mixture_terms(locs, scales, eps_logits, lambda z: self._log_joint(x, z, c, False),
                                       lambda z: self._log_joint(x, z, c, True),
                                       divergence_weight=self.divergence_weight, log_ratio_cap=self.log_ratio_cap)

    def make_objective(self, train_cfg):
        if train_cfg.objective != "elbo":
            raise ConfigError(f"train.objective must be 'elbo' for model.name='vae_recursive' (it trains with its "
                              f"own recursive-mixture objective), got {train_cfg.objective!r}")
        if train_cfg.kl_warmup_epochs:
            raise ConfigError("train.kl_warmup_epochs must be 0 for model.name='vae_recursive' (the recursive "
                              f"objective has no KL term to anneal), got {train_cfg.kl_warmup_epochs!r}")
        if train_cfg.num_particles != 1:
            raise ConfigError("train.num_particles must be 1 for model.name='vae_recursive' (one draw per "
                              f"component is used), got {train_cfg.num_particles!r}")
        return RecursiveMixtureELBO(self)

    def on_epoch_end(self, epoch: int, record: dict, data=None):
        """With ``grow_every`` > 0, component m becomes active after m·grow_every epochs."""
        if self.grow_every > 0:
            self.num_active.fill_(min(self.num_components, 1 + (epoch + 1) // self.grow_every))
        record["num_components_active"] = int(self.num_active)


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"model.options.{name} must be a positive integer, got {v!r}")


def _number(name, v, lo, hi=math.inf):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi) or not math.isfinite(v):
        raise ConfigError(f"model.options.{name} must be a number in [{lo}, {hi}], got {v!r}")


@register_model("vae_recursive")
def _build_vae_recursive(cfg, data_shape, num_data, num_classes):
    opts = check_options(cfg, {"num_components": 3, "divergence_weight": 0.5, "log_ratio_cap": 5.0,
                               "grow_every": 0})
    _positive_int("num_components", opts["num_components"])
    _number("divergence_weight", opts["divergence_weight"], 0.0, 1.0)
    _number("log_ratio_cap", opts["log_ratio_cap"], 0.0)
    g = opts["grow_every"]
    if isinstance(g, bool) or not isinstance(g, int) or g < 0:
        raise ConfigError(f"model.options.grow_every must be a non-negative integer, got {g!r}")
    if cfg.arch != "mlp":
        raise ConfigError(f"model.arch must be 'mlp' for model.name='vae_recursive', got {cfg.arch!r}")
    lik = build_likelihood(cfg.likelihood, sigma2=cfg.sigma2, laplace_scale=cfg.laplace_scale, link=cfg.link)
    _, dec = build_encoder_decoder("mlp", data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation)
    enc = RecursiveMixtureEncoder(data_shape, cfg.latent_dim, opts["num_components"], tuple(cfg.hidden),
                                  cfg.activation)
    return RecursiveMixtureVAE(enc, dec, lik, cfg.latent_dim, divergence_weight=float(opts["divergence_weight"]),
                               log_ratio_cap=float(opts["log_ratio_cap"]), grow_every=g, num_data=num_data)
