r"""Poisson VAE (Vafaii, Galor & Yates, "Poisson Variational Autoencoder", NeurIPS 2024): spike-count latents.

Generative story, for each datapoint i:
    z_ik ~ Pois(r_k)                 K counts with learned prior rates r (``log_r``)
    x_i ~ p_θ(x | z_i)               a linear decoder (sparse coding) or the configured network
Guide ("predictive coding"): q(z_ik | x_i) = Pois(r_k · δr_k(x_i)), log δr from the encoder (soft-clamped at 10).
ELBO(x) = E_q[log p(x | z)] − Σ_k r_k (1 − δr_k + δr_k log δr_k)   — the Poisson KL, the "metabolic cost" that
makes codes sparse, in closed form.

Counts have no reparameterisation; the relaxed counts of :class:`~ppl_vae.distributions.RelaxedPoisson` (n
exponential inter-arrival times, σ((1 − T_j)/t) summed) carry the gradient, with the temperature t annealed
linearly from 1 to 0.05 over the first half of training by the plan (:class:`VAEPoissonPlan`); in ``eval()``
the samples are hard counts and both sites score them with the Poisson pmf, so ``log_likelihood`` is an honest
importance-sampling estimate of log p(x) = log Σ_z p(x|z) p(z). The objective must use the closed-form KL
(``train.objective: auto`` or ``meanfield``): the log-density of a relaxed (non-integer) count is not defined.
Registered as ``vae_poisson``; ``model.latent_dim`` is K; options ``decoder`` (``linear`` or ``network``),
``prior_rate`` (initial r), ``temperature_start``/``temperature_end``/``anneal_fraction`` and ``hard``
(straight-through hard counts in training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..config.options import Options, option
from ..distributions.families import RelaxedPoisson
from ..distributions.plate import data_plate
from ..errors import ConfigError
from ..nn.device import device_of
from ..nn.networks import build_encoder_decoder
from ..training.plan import TrainingPlan, build_objective, training_plan
from ._common import config_likelihood, require_arch
from .registry import register_model

__all__ = ["VAEPoisson", "VAEPoissonOptions", "VAEPoissonPlan", "LinearDecoder"]


class LinearDecoder(nn.Module):
    """x̂ = W z + b reshaped to the data shape (the sparse-coding decoder; W's columns are the learned features)."""

    def __init__(self, latent_dim: int, data_shape):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.linear = nn.Linear(latent_dim, math.prod(self.data_shape))

    def forward(self, z: torch.Tensor, c=None) -> torch.Tensor:
        return self.linear(z).reshape(*z.shape[:-1], *self.data_shape)


class VAEPoisson(PyroModule):
    """The Poisson VAE as a Pyro program (see the module docstring); ``encoder(x) -> (log δr, _)``."""

    conditional = False
    num_classes = None

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        latent_dim: int,
        *,
        prior_rate: float = 1.0,
        hard: bool = False,
        temperature: tuple = (1.0, 0.05),
        anneal_fraction: float = 0.5,
        num_data: int | None = None,
    ):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent_dim, self.num_data, self.hard = int(latent_dim), num_data, bool(hard)
        self.temperature_start, self.temperature_end = (float(t) for t in temperature)
        self.anneal_fraction = float(anneal_fraction)
        self.log_r = nn.Parameter(torch.full((latent_dim,), math.log(prior_rate)))
        self.register_buffer("temperature", torch.tensor(1.0))

    def _t(self) -> float:
        return float(self.temperature) if self.training else 0.0  # hard counts in eval()

    def log_delta(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.encoder(x)[0]
        return 10.0 - nn.functional.softplus(10.0 - raw)  # soft clamp at 10 (the official code's)

    def prior_dist(self, batch: int) -> RelaxedPoisson:
        return RelaxedPoisson(None, self._t(), hard=self.hard, log_rate=self.log_r.expand(batch, self.latent_dim))

    def guide_dist(self, x: torch.Tensor) -> RelaxedPoisson:
        return RelaxedPoisson(None, self._t(), hard=self.hard, log_rate=self.log_r + self.log_delta(x))

    @pyro_method
    def model(self, x: torch.Tensor, y=None):
        with data_plate(x, self.num_data):
            z = pyro.sample("z", self.prior_dist(x.shape[0]).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z), event_dim=x.dim() - 1, x=x), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, y=None):
        with data_plate(x, self.num_data):
            pyro.sample("z", self.guide_dist(x).to_event(1))

    # the figure API
    def encode(self, x, y=None):
        """(posterior rate, its square root) — the mean and standard deviation of the counts."""
        rate = self.log_r.exp() * self.log_delta(x).exp()
        return rate, rate.sqrt()

    def decode(self, z, y=None):
        return self.likelihood.mean(self.decoder(z))

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x)[0])

    def sample(self, n: int, y=None):
        z = RelaxedPoisson(self.log_r.exp().expand(n, self.latent_dim), 0.0).sample().to(device_of(self))
        return self.decode(z)


@training_plan(VAEPoisson)
class VAEPoissonPlan(TrainingPlan):
    """The closed-form Poisson KL; the temperature from ``temperature_start`` to ``temperature_end`` linearly over
    the first ``anneal_fraction`` of the epochs (set after every epoch for the next one)."""

    def objective(self, train):
        if train.objective not in ("auto", "meanfield"):
            raise ConfigError(
                f"train.objective must be 'auto' or 'meanfield' for model.name='vae_poisson' (the KL of "
                f"Poisson counts is used in closed form; a relaxed count has no log-density), got "
                f"{train.objective!r}"
            )
        self._epochs = train.epochs
        return build_objective(train)

    def temperature_at(self, epoch: int) -> float:
        m = self.model
        span = max(1.0, m.anneal_fraction * self._epochs)
        frac = min(1.0, epoch / span)
        return m.temperature_start + frac * (m.temperature_end - m.temperature_start)

    def begin_stage(self, stage):
        self._epochs = stage.train.epochs
        self.model.temperature.fill_(self.temperature_at(0))

    def on_epoch_end(self, epoch, record, data):
        record["temperature"] = float(self.model.temperature)
        with torch.no_grad():
            z = self.model.prior_dist(1).sample()
        record["prior_rate_mean"] = float(self.model.log_r.detach().exp().mean())
        record["prior_zero_fraction"] = float((z == 0).float().mean())
        self.model.temperature.fill_(self.temperature_at(epoch + 1))


@dataclass
class VAEPoissonOptions(Options):
    decoder: str = option("network", choices=("network", "linear"), doc="the configured network or x̂ = W z + b")
    prior_rate: float = option(1.0, gt=0, doc="initial prior rate r")
    temperature_start: float = option(1.0, gt=0)
    temperature_end: float = option(0.05, gt=0)
    anneal_fraction: float = option(0.5, gt=0, le=1.0, doc="fraction of the epochs over which t is annealed")
    hard: bool = option(False, doc="straight-through hard counts in training")


@register_model("vae_poisson", options=VAEPoissonOptions)
def build_vae_poisson(cfg, o: VAEPoissonOptions, data_shape, num_data, num_classes) -> VAEPoisson:
    require_arch(cfg, "mlp", "conv")
    enc, dec = build_encoder_decoder(
        cfg.arch, data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation, channels=cfg.channels
    )
    if o.decoder == "linear":
        dec = LinearDecoder(cfg.latent_dim, data_shape)
    return VAEPoisson(
        enc,
        dec,
        config_likelihood(cfg, data_shape),
        cfg.latent_dim,
        prior_rate=o.prior_rate,
        hard=o.hard,
        temperature=(o.temperature_start, o.temperature_end),
        anneal_fraction=o.anneal_fraction,
        num_data=num_data,
    )
