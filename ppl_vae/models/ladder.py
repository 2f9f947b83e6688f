r"""LaDDer: a ladder of VAEs with a non-parametric mixture hyperprior (Lin & Clark, "LaDDer: Latent Data
Distribution Modelling with a Generative Prior", BMVC 2020).

Generative model ("meta-embedding": the prior of the outer VAE is itself a VAE), for each datapoint i of N:

    t_i ~ p(t)                              hyperprior: a Gaussian mixture (``ppl_vae.hyperpriors``), dim d_t (2)
    z_i | t_i ~ N(g_ψ(t_i), σ_in² I)        inner decoder, σ_in learned and clipped to [σ_min, σ_max]
    x_i | z_i ~ Π_k Laplace(x_ik; f_θ(z_i)_k, b)   outer decoder, one learned scale b floored at the batch's MAE

Guide (amortised, nested):   q(z, t | x) = q_φ(z | x) q_η(t | z),  both diagonal Gaussians, reparameterised.

The nested bound. The outer ELBO is E_q(z|x)[log p(x|z)] + H[q(z|x)] + E_q(z|x)[log p(z)]; log p(z) is intractable
and is replaced by the inner ELBO

    log p(z) ≥ ELBO_in(z) = E_q(t|z)[log p(z|t)] + H[q(t|z)] + E_q(t|z)[log p(t)],

giving  L(x) = E_q(z|x)[log p(x|z)] + H[q(z|x)] + E_q(z|x)[ELBO_in(z)] ≤ log p(x).  This is exactly the ordinary
ELBO of the Pyro program below (sites t, z, x in the model; z, t in the guide), so ``Trace_ELBO`` (or
``TraceIWAE``) trains every parameter jointly, and ``ppl_vae.evaluate.log_likelihood`` estimates log p(x) by
importance sampling over both latents with the guide as proposal:
log p̂(x) = logmeanexp_s [log p(t_s) + log p(z_s|t_s) + log p(x|z_s) − log q(z_s|x) − log q(t_s|z_s)].

Outer likelihood (official code, "Supplementary Material C"): Laplace with one scale b = max(b_θ, MAE_batch),
MAE_batch = mean_{i,k} |x_ik − f_θ(z_i)_k|, log p(x|z) = −Σ_k |x_k − f_k(z)|/b − D log 2b. The gradient of the
floored objective equals the gradient with the floor held fixed (the floor is the optimal b). b_θ starts at 0.02,
below the MAE, so the floor (the per-batch closed-form optimum of b) is active from the first step; the official
code starts b_θ at 0.5 and gives it its own, larger learning rate, reaching the floor within a few epochs, which a
single global learning rate on log b here would take tens of epochs to do. In ``eval()`` mode
the floor is the training-set MAE stored by :meth:`LaDDer.on_epoch_end` (a buffer), so that p(x|z) is a fixed
density for log-likelihood evaluation.

Schedule (``model.options``): ``warmup_epochs`` epochs with an N(0, I) prior on z (the official code's
``sg_pretraining``); during them the inner VAE is trained on the detached codes through a zero-valued factor
``ELBO_in(sg z) − sg(ELBO_in(sg z))`` (it adds the inner ELBO's gradient, not its value, so the reported ELBO is
the N(0, I)-prior VAE's); afterwards the ladder prior is switched on. The BGM hyperprior is refitted to
t ~ q(t|z), z ~ q(z|x) of (a subset of) the training data after every ``refit_every`` epochs and held fixed in
between; the stick-breaking hyperprior is learned by the ELBO instead. With ``prior: normal`` the same class is
the baseline VAE with an N(0, I) prior and the same outer networks and likelihood.
Not reproduced from the official code: its masking of the inner reconstruction error where σ_z > 1, separate
optimisers and gradient clipping per part.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..hyperpriors import BGMHyperprior, StickBreakingHyperprior, build_hyperprior
from ..likelihoods import build_likelihood
from ..nets import GaussianHead, build_encoder_decoder, mlp
from ._common import data_plate, module_device
from .registry import check_options, register_model

__all__ = ["LaDDer", "FlooredLaplace", "EventLikelihood", "LADDER_DEFAULTS", "build_ladder", "build_outer"]


class FlooredLaplace(nn.Module):
    """p(x|z) = Π_k Laplace(x_k; link(out_k), b), b = max(exp(log_b), floor) (see the module docstring).

    ``forward(out, x)``: in training mode the floor is the MAE of this call's batch (``x`` given), in eval mode
    the stored buffer ``eval_floor``. ``event_dims`` is the number of data dims (3 for images).
    """

    def __init__(self, event_dims: int, init_scale: float = 0.02, link: str = "sigmoid", floor: bool = True):
        super().__init__()
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ConfigError(f"model.options.laplace_init_scale must be a positive number, got {init_scale!r}")
        self.event_dims = int(event_dims)
        self.link = link
        self.floor = bool(floor)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.register_buffer("eval_floor", torch.zeros(()))

    def _mean(self, out):
        return torch.sigmoid(out) if self.link == "sigmoid" else out

    def scale(self, mean: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        b = self.log_scale.exp()
        if not self.floor:
            return b
        if self.training and x is not None and mean is not None:
            return torch.maximum(b, (mean - x).abs().mean())
        return torch.maximum(b, self.eval_floor)

    def forward(self, out: torch.Tensor, x: torch.Tensor | None = None) -> dist.TorchDistribution:
        mean = self._mean(out)
        return dist.Laplace(mean, self.scale(mean, x)).to_event(self.event_dims)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self._mean(out)


class EventLikelihood(nn.Module):
    """Wraps a ``ppl_vae.likelihoods`` module so that its event dims are the data dims (not ``out.dim() − 1``),
    which keeps vectorised particles (an extra leading batch dim) correct. ``forward(out, x=None)``."""

    def __init__(self, base: nn.Module, event_dims: int):
        super().__init__()
        self.base = base
        self.event_dims = int(event_dims)

    def forward(self, out: torch.Tensor, x: torch.Tensor | None = None) -> dist.TorchDistribution:
        d = self.base(out)
        while isinstance(d, dist.Independent):
            d = d.base_dist
        return d.to_event(self.event_dims)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self.base.mean(out)


class LaDDer(PyroModule):
    """The LaDDer Pyro program: ``model(x, y=None)`` / ``guide(x, y=None)`` (see the module docstring).

    Parts: ``encoder(x) -> (loc, scale)`` of q(z|x); ``decoder(z) -> raw``; ``likelihood(raw, x) -> p(x|z)``;
    ``inner_encoder(z) -> (loc, scale)`` of q(t|z); ``inner_decoder(t) -> mean of p(z|t)``; ``hyperprior(B) ->
    p(t)``. ``prior="normal"`` drops the ladder (an N(0, I)-prior VAE with the same outer parts).
    """

    conditional = False
    num_classes = None

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: nn.Module, z_dim: int, *,
                 inner_encoder: nn.Module | None = None, inner_decoder: nn.Module | None = None,
                 hyperprior: nn.Module | None = None, t_dim: int = 2, prior: str = "ladder",
                 warmup_epochs: int = 0, inner_sigma: float = 0.1, inner_sigma_bounds=(0.05, 0.1),
                 learn_inner_sigma: bool = True, warmup_inner: bool = True, refit_every: int = 1,
                 fit_points: int = 5000, num_data: int | None = None):
        super().__init__()
        if prior not in ("ladder", "normal"):
            raise ConfigError(f"model.options.prior must be 'ladder' or 'normal', got {prior!r}")
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.z_dim, self.t_dim = int(z_dim), int(t_dim)
        self.prior = prior
        self.num_data = num_data
        self.warmup_epochs, self.refit_every, self.fit_points = int(warmup_epochs), int(refit_every), int(fit_points)
        self.warmup_inner = bool(warmup_inner)
        self.register_buffer("ladder_on", torch.tensor(prior == "ladder" and warmup_epochs == 0))
        if prior == "ladder":
            if inner_encoder is None or inner_decoder is None or hyperprior is None:
                raise ValueError("prior='ladder' needs inner_encoder, inner_decoder and hyperprior")
            lo, hi = (float(v) for v in inner_sigma_bounds)
            if not (0 < lo <= hi):
                raise ConfigError(f"model.options inner_sigma_min/max must satisfy 0 < min <= max, got {lo}, {hi}")
            self.inner_encoder, self.inner_decoder, self.hyperprior = inner_encoder, inner_decoder, hyperprior
            self.inner_sigma_bounds = (lo, hi)
            log_s = torch.tensor(math.log(min(max(float(inner_sigma), lo), hi)))
            if learn_inner_sigma:
                self.inner_log_sigma = nn.Parameter(log_s)
            else:
                self.register_buffer("inner_log_sigma", log_s)

    # ----- small pieces -----
    @property
    def ladder_active(self) -> bool:
        return self.prior == "ladder" and bool(self.ladder_on)

    @property
    def first_scored_epoch(self) -> int:
        """The first (1-based) epoch whose validation ELBO is of the final model: after the N(0, I) warm-up the
        ladder prior changes the objective, so ``experiment.train`` sets ``train.best_from_epoch`` to at least
        this (``best.pt`` and ``patience`` never compare ELBOs of two different models)."""
        return self.warmup_epochs + 1 if self.prior == "ladder" and self.warmup_epochs > 0 else 1

    @property
    def latent_dim(self) -> int:
        """The top latent: t for the ladder, z for the N(0, I)-prior baseline."""
        return self.t_dim if self.prior == "ladder" else self.z_dim

    def inner_sigma(self) -> torch.Tensor:
        """σ_in = clip(exp(s), σ_min, σ_max) (the official code clips the learned inner σ the same way)."""
        lo, hi = self.inner_sigma_bounds
        return self.inner_log_sigma.exp().clamp(lo, hi)

    def p_z_given_t(self, t: torch.Tensor) -> dist.TorchDistribution:
        loc = self.inner_decoder(t)
        return dist.Normal(loc, self.inner_sigma().expand_as(loc)).to_event(1)

    def q_t_given_z(self, z: torch.Tensor) -> dist.TorchDistribution:
        loc, scale = self.inner_encoder(z)
        return dist.Normal(loc, scale).to_event(1)

    def q_z_given_x(self, x: torch.Tensor) -> dist.TorchDistribution:
        loc, scale = self.encoder(x)
        return dist.Normal(loc, scale).to_event(1)

    def inner_elbo(self, z: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """Single-sample (averaged over ``num_samples``) ELBO_in(z) = E_q(t|z)[log p(z|t) + log p(t) − log q(t|z)]."""
        q = self.q_t_given_z(z)
        t = q.rsample((num_samples,))
        val = self.p_z_given_t(t).log_prob(z) + self.hyperprior.log_prob(t) - q.log_prob(t)
        return val.mean(0)

    # ----- the Pyro program -----
    @pyro_method
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None):
        B = x.shape[0]
        with data_plate(x, self.num_data):
            if self.ladder_active:
                t = pyro.sample("t", self.hyperprior(B))
                z = pyro.sample("z", self.p_z_given_t(t))
            else:
                loc = x.new_zeros(B, self.z_dim)
                z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
                if self.prior == "ladder" and self.warmup_inner and self.training:
                    aux = self.inner_elbo(z.detach())
                    pyro.factor("inner_warmup", aux - aux.detach())
            pyro.sample("x", self.likelihood(self.decoder(z), x), obs=x)
        if self.prior == "ladder" and self.training and isinstance(self.hyperprior, StickBreakingHyperprior):
            pyro.factor("stick_prior", self.hyperprior.log_prior())

    @pyro_method
    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            z = pyro.sample("z", self.q_z_given_x(x))
            if self.ladder_active:
                pyro.sample("t", self.q_t_given_z(z))

    # ----- per-epoch work (called by ppl_vae.experiment.train through fit's on_epoch_end) -----
    @torch.no_grad()
    def on_epoch_end(self, epoch: int, record: dict | None = None, data=None) -> None:
        """Switch the ladder on after ``warmup_epochs`` epochs, refit the BGM hyperprior to encoded t and store the
        training-set MAE as the likelihood's evaluation floor. Adds ``hyperprior_active``, ``laplace_scale``,
        ``inner_sigma`` and ``ladder_on`` to ``record``."""
        record = {} if record is None else record
        x = None
        if data is not None:
            train_x = data.train_x if hasattr(data, "train_x") else data
            n = min(self.fit_points, len(train_x))
            idx = torch.randperm(len(train_x))[:n]
            x = train_x[idx].to(module_device(self))
        if self.prior == "ladder" and epoch + 1 >= self.warmup_epochs:
            self.ladder_on.fill_(True)
        if x is not None:
            zs, ts, err = [], [], []
            for xb in x.split(500):
                z = self.q_z_given_x(xb).sample()
                zs.append(z)
                if isinstance(self.likelihood, FlooredLaplace):
                    err.append((self.likelihood.mean(self.decoder(z)) - xb).abs().flatten(1).mean(1))
                if self.prior == "ladder":
                    ts.append(self.q_t_given_z(z).sample())
            if err:
                self.likelihood.eval_floor.fill_(torch.cat(err).mean())
            refit = (self.prior == "ladder" and isinstance(self.hyperprior, BGMHyperprior)
                     and (self.ladder_active or self.warmup_inner) and (epoch + 1) % self.refit_every == 0)
            if refit:
                self.hyperprior.fit(torch.cat(ts))
        if self.prior == "ladder":
            record["hyperprior_active"] = self.hyperprior.active_components()
            record["inner_sigma"] = float(self.inner_sigma())
            record["ladder_on"] = bool(self.ladder_on)
        if isinstance(self.likelihood, FlooredLaplace):
            record["laplace_scale"] = float(self.likelihood.scale())

    # ----- figure / evaluation API -----
    def encode_z(self, x, y=None):
        """(loc, scale) of q(z|x)."""
        return self.encoder(x)

    def encode(self, x, y=None):
        """(loc, scale) of the top latent: q(t | z = E[z|x]) for the ladder, q(z|x) for the baseline."""
        loc, scale = self.encoder(x)
        if self.prior == "ladder":
            return self.inner_encoder(loc)
        return loc, scale

    def decode_z(self, z, y=None):
        return self.likelihood.mean(self.decoder(z))

    def decode(self, v, y=None):
        """E[x | z = g(t)] for the ladder (``v`` = t), E[x | z] for the baseline (``v`` = z)."""
        if self.prior == "ladder":
            return self.decode_z(self.inner_decoder(v))
        return self.decode_z(v)

    def reconstruct(self, x, y=None):
        return self.decode_z(self.encoder(x)[0])

    def prior_log_density(self, v: torch.Tensor) -> torch.Tensor:
        """log p of the top latent: the hyperprior log p(t) (ladder) or log N(z; 0, I) (baseline)."""
        if self.prior == "ladder":
            return self.hyperprior.log_prob(v)
        return dist.Normal(torch.zeros_like(v), 1.0).log_prob(v).sum(-1)

    def sample_latent(self, n: int) -> torch.Tensor:
        """n draws of z from the generative model (ancestral through t for the ladder)."""
        dev = module_device(self)
        if self.ladder_active:
            t = self.hyperprior.sample(n).to(dev)
            return self.p_z_given_t(t).sample()
        return torch.randn(n, self.z_dim, device=dev)

    def sample(self, n: int, y=None):
        """Decoded means of n ancestral draws t → z → E[x|z] (global torch RNG)."""
        return self.decode_z(self.sample_latent(n))


LADDER_DEFAULTS = {
    "prior": "ladder",
    "t_dim": 2,
    "warmup_epochs": 10,
    "warmup_inner": True,
    "hyperprior": "bgm",
    "num_components": 20,
    "weight_concentration_prior": 0.1,
    "weight_concentration_prior_type": "dirichlet_distribution",
    "bgm_max_iter": 200,
    "refit_every": 1,
    "fit_points": 5000,
    "stick_alpha": 1.0,
    "inner_hidden": [256, 256],
    "inner_activation": "leaky_relu",
    "inner_sigma": 0.1,
    "inner_sigma_min": 0.05,
    "inner_sigma_max": 0.1,
    "learn_inner_sigma": True,
    "likelihood": "floored_laplace",
    "laplace_init_scale": 0.02,
}


def _pos_int(name, v, zero_ok=False):
    ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if zero_ok else v > 0)
    if not ok:
        what = "a non-negative integer" if zero_ok else "a positive integer"
        raise ConfigError(f"model.options.{name} must be {what}, got {v!r}")


def _pos_num(name, v):
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ConfigError(f"model.options.{name} must be a positive number, got {v!r}")


def _check_ladder_options(o: dict) -> None:
    for k in ("t_dim", "num_components", "bgm_max_iter", "refit_every", "fit_points"):
        _pos_int(k, o[k])
    _pos_int("warmup_epochs", o["warmup_epochs"], zero_ok=True)
    for k in ("weight_concentration_prior", "stick_alpha", "inner_sigma", "inner_sigma_min", "inner_sigma_max",
              "laplace_init_scale"):
        _pos_num(k, o[k])
    if o["inner_sigma_min"] > o["inner_sigma_max"]:
        raise ConfigError(f"model.options.inner_sigma_min must be <= inner_sigma_max, got {o['inner_sigma_min']} > "
                          f"{o['inner_sigma_max']}")
    for k in ("warmup_inner", "learn_inner_sigma"):
        if not isinstance(o[k], bool):
            raise ConfigError(f"model.options.{k} must be true or false, got {o[k]!r}")
    if o["prior"] not in ("ladder", "normal"):
        raise ConfigError(f"model.options.prior must be 'ladder' or 'normal', got {o['prior']!r}")
    if o["hyperprior"] not in ("bgm", "stick"):
        raise ConfigError(f"model.options.hyperprior must be 'bgm' or 'stick', got {o['hyperprior']!r}")
    h = o["inner_hidden"]
    if not (isinstance(h, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in h)):
        raise ConfigError(f"model.options.inner_hidden must be a list of positive integers, got {h!r}")


def build_outer(cfg: ModelConfig, data_shape, o: dict):
    """(encoder, decoder, likelihood) of the outer VAE x → z, shared by LaDDer and WiSE-ALE."""
    if o["likelihood"] not in ("floored_laplace", "config"):
        raise ConfigError(f"model.options.likelihood must be 'floored_laplace' or 'config', got {o['likelihood']!r}")
    if cfg.arch not in ("mlp", "conv"):
        raise ConfigError(f"model.arch must be 'mlp' or 'conv' for model.name={cfg.name!r}, got {cfg.arch!r}")
    enc, dec = build_encoder_decoder(cfg.arch, data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation,
                                     channels=cfg.channels)
    event_dims = len(tuple(data_shape))
    if o["likelihood"] == "floored_laplace":
        lik = FlooredLaplace(event_dims, o["laplace_init_scale"], link=cfg.link)
    else:
        lik = EventLikelihood(build_likelihood(cfg.likelihood, sigma2=cfg.sigma2, laplace_scale=cfg.laplace_scale,
                                               link=cfg.link), event_dims)
    return enc, dec, lik


def build_ladder(cfg: ModelConfig, data_shape, num_data, num_classes, defaults: dict | None = None,
                 cls=LaDDer, **overrides):
    """LaDDer (or a subclass) from a ``ModelConfig``; ``cfg.latent_dim`` is the size of z."""
    o = check_options(cfg, defaults if defaults is not None else LADDER_DEFAULTS)
    o.update(overrides)
    _check_ladder_options(o)
    enc, dec, lik = build_outer(cfg, data_shape, o)
    kw = {}
    if o["prior"] == "ladder":
        act = o["inner_activation"]
        hidden = tuple(o["inner_hidden"])
        if o["hyperprior"] == "bgm":
            hp = build_hyperprior("bgm", o["t_dim"], o["num_components"],
                                  weight_concentration_prior=o["weight_concentration_prior"],
                                  weight_concentration_prior_type=o["weight_concentration_prior_type"],
                                  max_iter=o["bgm_max_iter"])
        else:
            hp = build_hyperprior("stick", o["t_dim"], o["num_components"], alpha=o["stick_alpha"])
        kw = dict(inner_encoder=GaussianHead(cfg.latent_dim, hidden, o["t_dim"], act),
                  inner_decoder=mlp(o["t_dim"], hidden, cfg.latent_dim, act), hyperprior=hp)
    return cls(enc, dec, lik, cfg.latent_dim, t_dim=o["t_dim"], prior=o["prior"], warmup_epochs=o["warmup_epochs"],
               inner_sigma=o["inner_sigma"], inner_sigma_bounds=(o["inner_sigma_min"], o["inner_sigma_max"]),
               learn_inner_sigma=o["learn_inner_sigma"], warmup_inner=o["warmup_inner"],
               refit_every=o["refit_every"], fit_points=o["fit_points"], num_data=num_data, **kw)


@register_model("ladder")
def _build_ladder(cfg: ModelConfig, data_shape, num_data, num_classes):
    return build_ladder(cfg, data_shape, num_data, num_classes)

