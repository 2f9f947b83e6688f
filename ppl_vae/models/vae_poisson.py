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

The official code's training choices (hadivafaii/PoissonVAE, read at its head: ``main/vae.py``,
``main/config_vae.py``, ``base/utils_model.py``), each an option that is off by default:

* ``kl_anneal_fraction``/``kl_beta_start``/``kl_constant_fraction``: the KL weight β per optimiser step as the
  official ``beta_anneal_linear`` (:func:`kl_beta_schedule`): β = ``kl_beta_start`` (official 1e-4) for the first
  ⌈c·T⌉ of the T steps (c = ``kl_constant_fraction``, official 0.01 for a network decoder, 0 for the linear one),
  then linearly to 1 over the next ``kl_anneal_fraction`` (official 0.5) of the steps, then 1. The plan wraps the
  training objective so that β scales both latent terms (the closed-form KL); validation is scored with β = 1 and
  only epochs that end at β = 1 may become ``best.pt``.
* ``prior_init: uniform``: log r_k ~ U[−6, h], h = ``prior_log_rate_high`` (official: −2 for a network decoder,
  −4 for the linear one; the default null picks that by ``decoder``).
* ``rate_clamp``: the posterior log-rate soft-clamped from above, log(r·δr) → c − softplus(c − log(r·δr)) (official
  c = 5). The official code clamps only the rate it samples from and computes the KL from the unclamped log δr;
  here the KL is that of the clamped posterior that is sampled (the two agree while r·δr ≪ e^c ≈ 148).

What remains ours: the relaxed counts' temperature is set per epoch (official: per step, same endpoints and
fraction); Adam with the library's schedules (official: Adamax, cosine); the official weight initialisation
(N(0, 0.05–0.1)) is not reproduced.

Parity (``bench/parity/poisson_vae.py``, issue 36): beside the authors' code (hadivafaii/PoissonVAE at d6accdc)
with the same MLP, initial weights, Adam and schedules on Fashion-MNIST (15 epochs, 3 seeds), the 5-NN accuracies
on log δr at 200 / 1,000 / all labels and the fraction of zero counts agree within the official seed spread
(differences ≤ 0.003).
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
from ..infer.base import Objective, surrogate_and_value
from ..nn.device import device_of
from ..nn.networks import build_encoder_decoder
from ..training.plan import Stage, TrainingPlan, build_objective, training_plan
from ..training.probe import ScaleLatents
from ._common import config_likelihood, require_arch
from .registry import register_model

__all__ = ["VAEPoisson", "VAEPoissonOptions", "VAEPoissonPlan", "LinearDecoder", "KLAnnealedELBO", "kl_beta_schedule"]

PRIOR_LOG_RATE_LOW = -6.0  # the lower end of the official uniform initialisation of the prior log-rates
PRIOR_LOG_RATE_HIGH = {"network": -2.0, "linear": -4.0}  # its upper end, by decoder (official ``prior_clamp``)


def kl_beta_schedule(
    step: int, total: int, *, start: float = 1e-4, anneal_fraction: float = 0.5, constant_fraction: float = 0.0
) -> float:
    """The KL weight β at optimiser step ``step`` (0-based) of ``total``, as the official ``beta_anneal_linear``:
    ``start`` for steps < a = ⌈c·T⌉, then ``linspace(start, 1, b − a)`` for a ≤ step < b = ⌈(c + p)·T⌉, then 1
    (c = ``constant_fraction``, p = ``anneal_fraction``, T = ``total``)."""
    a = math.ceil(constant_fraction * total)
    b = math.ceil((constant_fraction + anneal_fraction) * total)
    if step < a:
        return float(start)
    if step < b:
        n = b - a
        return float(start) if n == 1 else float(start) + (step - a) * (1.0 - float(start)) / (n - 1)
    return 1.0


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
        prior_log_rate_range: tuple | None = None,
        rate_clamp: float | None = None,
        kl_anneal: tuple = (1e-4, 0.0, 0.0),
    ):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent_dim, self.num_data, self.hard = int(latent_dim), num_data, bool(hard)
        self.temperature_start, self.temperature_end = (float(t) for t in temperature)
        self.anneal_fraction = float(anneal_fraction)
        self.rate_clamp = None if rate_clamp is None else float(rate_clamp)
        self.kl_beta_start, self.kl_anneal_fraction, self.kl_constant_fraction = (float(v) for v in kl_anneal)
        if prior_log_rate_range is None:  # every k at log prior_rate
            log_r = torch.full((latent_dim,), math.log(prior_rate))
        else:  # log r_k ~ U[low, high] (global torch RNG), the official initialisation
            log_r = torch.empty(latent_dim).uniform_(*(float(v) for v in prior_log_rate_range))
        self.log_r = nn.Parameter(log_r)
        self.register_buffer("temperature", torch.tensor(1.0))

    @property
    def kl_annealed(self) -> bool:
        """Whether the plan weights the KL by β < 1 on some training steps."""
        return self.kl_anneal_fraction > 0 or self.kl_constant_fraction > 0

    def _t(self) -> float:
        return float(self.temperature) if self.training else 0.0  # hard counts in eval()

    def log_delta(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.encoder(x)[0]
        return 10.0 - nn.functional.softplus(10.0 - raw)  # soft clamp at 10 (the official code's)

    def prior_dist(self, batch: int) -> RelaxedPoisson:
        return RelaxedPoisson(None, self._t(), hard=self.hard, log_rate=self.log_r.expand(batch, self.latent_dim))

    def guide_log_rate(self, x: torch.Tensor) -> torch.Tensor:
        """log(r · δr(x)), soft-clamped from above at ``rate_clamp`` when set (c − softplus(c − ·))."""
        log_rate = self.log_r + self.log_delta(x)
        if self.rate_clamp is None:
            return log_rate
        return self.rate_clamp - nn.functional.softplus(self.rate_clamp - log_rate)

    def guide_dist(self, x: torch.Tensor) -> RelaxedPoisson:
        return RelaxedPoisson(None, self._t(), hard=self.hard, log_rate=self.guide_log_rate(x))

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
        rate = self.guide_log_rate(x).exp()
        return rate, rate.sqrt()

    def decode(self, z, y=None):
        return self.likelihood.mean(self.decoder(z))

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x)[0])

    def sample(self, n: int, y=None):
        z = RelaxedPoisson(self.log_r.exp().expand(n, self.latent_dim), 0.0).sample().to(device_of(self))
        return self.decode(z)


class KLAnnealedELBO(Objective):
    """``base`` with the latent sites of model and guide scaled by β = ``beta()`` (the closed-form KL term times β,
    the reconstruction term as is): the official code's ``recon + β · KL``."""

    def __init__(self, base, beta):
        super().__init__(num_particles=1)
        self.base, self.beta = base, beta

    def _scaled(self, fn):
        beta = float(self.beta())
        return fn if beta == 1.0 else ScaleLatents(beta)(fn)

    def _get_trace(self, model, guide, args, kwargs):
        return self.base._get_trace(model, guide, args, kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        return float(self.base.loss(self._scaled(model), self._scaled(guide), *args, **kwargs))

    def loss_and_surrogate(self, model, guide, *args, **kwargs):
        return surrogate_and_value(self.base, self._scaled(model), self._scaled(guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        return float(self.base.loss_and_grads(self._scaled(model), self._scaled(guide), *args, **kwargs))


@training_plan(VAEPoisson)
class VAEPoissonPlan(TrainingPlan):
    """The closed-form Poisson KL; the temperature from ``temperature_start`` to ``temperature_end`` linearly over
    the first ``anneal_fraction`` of the epochs (set after every epoch for the next one); with KL annealing on,
    the KL weight β of :func:`kl_beta_schedule` per optimiser step (``kl_step`` is kept in the checkpoints)."""

    def __init__(self, model):
        super().__init__(model)
        self._step, self._total_steps, self._steps_per_epoch = 0, 1, 1

    def objective(self, train):
        if train.objective not in ("auto", "meanfield"):
            raise ConfigError(
                f"train.objective must be 'auto' or 'meanfield' for model.name='vae_poisson' (the KL of "
                f"Poisson counts is used in closed form; a relaxed count has no log-density), got "
                f"{train.objective!r}"
            )
        self._epochs = train.epochs
        base = build_objective(train)
        if not self.model.kl_annealed:
            return base
        if train.jit:
            raise ConfigError(
                "train.jit must be false for model.name='vae_poisson' with model.options.kl_anneal_fraction or "
                "kl_constant_fraction > 0 (a compiled ELBO keeps the KL weight β it was traced with)"
            )
        self._count_steps(train)
        return KLAnnealedELBO(base, self.kl_beta)

    def validation_objective(self, train):
        """β = 1: the validation ELBO is the model's own, at every epoch."""
        return build_objective(train) if self.model.kl_annealed else None

    def _count_steps(self, train) -> None:
        if self.model.num_data is None:
            raise ConfigError(
                "model.options.kl_anneal_fraction > 0 needs the training-set size to count the optimiser steps: "
                "build vae_poisson with num_data (build_model(..., num_data=len(train_x)))"
            )
        self._steps_per_epoch = math.ceil(int(self.model.num_data) / train.batch_size)
        self._total_steps = max(1, train.epochs * self._steps_per_epoch)

    def kl_beta(self, step: int | None = None) -> float:
        """β of optimiser step ``step`` (default: the current one)."""
        m = self.model
        return kl_beta_schedule(
            self._step if step is None else step,
            self._total_steps,
            start=m.kl_beta_start,
            anneal_fraction=m.kl_anneal_fraction,
            constant_fraction=m.kl_constant_fraction,
        )

    def stages(self, train):
        if not self.model.kl_annealed:
            return super().stages(train)
        self._count_steps(train)
        m = self.model
        reach = math.ceil((m.kl_constant_fraction + m.kl_anneal_fraction) * self._total_steps)  # first step at β = 1
        first = min(train.epochs, max(1, math.ceil(reach / self._steps_per_epoch)))
        why = (
            f"model.options.kl_anneal_fraction = {m.kl_anneal_fraction} (after kl_constant_fraction = "
            f"{m.kl_constant_fraction}): the KL weight reaches 1 then"
        )
        return [Stage("train", train, first_scored_epoch=first, scored_from=why)]

    def temperature_at(self, epoch: int) -> float:
        m = self.model
        span = max(1.0, m.anneal_fraction * self._epochs)
        frac = min(1.0, epoch / span)
        return m.temperature_start + frac * (m.temperature_end - m.temperature_start)

    def begin_stage(self, stage):
        self._epochs = stage.train.epochs
        self._step = 0
        if self.model.kl_annealed:
            self._count_steps(stage.train)
        self.model.temperature.fill_(self.temperature_at(0))

    def on_step_end(self, x, y):
        self._step += 1

    def on_epoch_end(self, epoch, record, data):
        record["temperature"] = float(self.model.temperature)
        if self.model.kl_annealed:
            record["kl_beta"] = self.kl_beta(max(self._step - 1, 0))  # β of the epoch's last step
        with torch.no_grad():
            z = self.model.prior_dist(1).sample()
        record["prior_rate_mean"] = float(self.model.log_r.detach().exp().mean())
        record["prior_zero_fraction"] = float((z == 0).float().mean())
        self.model.temperature.fill_(self.temperature_at(epoch + 1))

    def state_dict(self) -> dict:
        return {"kl_step": self._step} if self.model.kl_annealed else {}

    def load_state_dict(self, state) -> None:
        if state and "kl_step" in state:
            self._step = int(state["kl_step"])


@dataclass
class VAEPoissonOptions(Options):
    decoder: str = option("network", choices=("network", "linear"), doc="the configured network or x̂ = W z + b")
    prior_rate: float = option(1.0, gt=0, doc="initial prior rate r")
    temperature_start: float = option(1.0, gt=0, doc="temperature t of the relaxed counts at the first epoch")
    temperature_end: float = option(0.05, gt=0, doc="temperature t at the end of the annealing (and after it)")
    anneal_fraction: float = option(0.5, gt=0, le=1.0, doc="fraction of the epochs over which t is annealed")
    hard: bool = option(False, doc="straight-through hard counts in training")
    prior_init: str = option(
        "constant",
        choices=("constant", "uniform"),
        doc="initial prior log-rates: constant (log prior_rate) or uniform (log r_k ~ U[−6, prior_log_rate_high], "
        "the official code's)",
    )
    prior_log_rate_high: float | None = option(
        None,
        gt=PRIOR_LOG_RATE_LOW,
        doc="upper end of the uniform initialisation; null: the official −2 (network decoder) or −4 (linear)",
    )
    rate_clamp: float | None = option(
        None,
        doc="soft upper clamp c of the posterior log-rate, c − softplus(c − log(r·δr)) (official: 5); null: none",
    )
    kl_anneal_fraction: float = option(
        0.0,
        ge=0,
        le=1.0,
        doc="fraction of the optimiser steps over which the KL weight β rises linearly from kl_beta_start to 1 "
        "(official: 0.5); 0 with kl_constant_fraction 0: β = 1 throughout",
    )
    kl_beta_start: float = option(1e-4, gt=0, le=1.0, doc="β at the start of the KL annealing (official: 1e-4)")
    kl_constant_fraction: float = option(
        0.0,
        ge=0,
        lt=1.0,
        doc="fraction of the steps held at kl_beta_start before β rises (official: 0.01 with a network decoder, "
        "0 with the linear one)",
    )


@register_model("vae_poisson", options=VAEPoissonOptions)
def build_vae_poisson(cfg, o: VAEPoissonOptions, data_shape, num_data, num_classes) -> VAEPoisson:
    require_arch(cfg, "mlp", "conv")
    enc, dec = build_encoder_decoder(
        cfg.arch, data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation, channels=cfg.channels
    )
    if o.decoder == "linear":
        dec = LinearDecoder(cfg.latent_dim, data_shape)
    if o.kl_constant_fraction + o.kl_anneal_fraction > 1.0:
        raise ConfigError(
            f"model.options.kl_constant_fraction + kl_anneal_fraction must be at most 1 (β reaches 1 before the "
            f"last step), got {o.kl_constant_fraction} + {o.kl_anneal_fraction}"
        )
    high = PRIOR_LOG_RATE_HIGH[o.decoder] if o.prior_log_rate_high is None else o.prior_log_rate_high
    if o.prior_init == "constant" and o.prior_log_rate_high is not None:
        raise ConfigError(
            f"model.options.prior_log_rate_high is used with prior_init: uniform only, got prior_log_rate_high="
            f"{o.prior_log_rate_high} with prior_init: constant (set prior_init: uniform or drop it)"
        )
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
        prior_log_rate_range=(PRIOR_LOG_RATE_LOW, high) if o.prior_init == "uniform" else None,
        rate_clamp=o.rate_clamp,
        kl_anneal=(o.kl_beta_start, o.kl_anneal_fraction, o.kl_constant_fraction),
    )
