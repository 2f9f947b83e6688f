r"""LaDDer: a ladder of VAEs with a non-parametric mixture hyperprior (Lin & Clark, "LaDDer: Latent Data
Distribution Modelling with a Generative Prior", BMVC 2020).

Generative model ("meta-embedding": the prior of the outer VAE is itself a VAE), for each datapoint i of N:

    t_i ~ p(t)                              hyperprior: a Gaussian mixture (``ppl_vae.distributions.hyperpriors``),
    dim d_t (2)
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
the floor is the training-set MAE stored after every epoch by the plan (:class:`LaDDerPlan`, a buffer of
:class:`~ppl_vae.distributions.likelihoods.FlooredLaplace`), so that p(x|z) is a fixed density for log-likelihood
evaluation.

Schedule (``model.options``): ``warmup_epochs`` epochs with an N(0, I) prior on z (the official code's
``sg_pretraining``); during them the inner VAE is trained on the detached codes through a zero-valued factor
``ELBO_in(sg z) − sg(ELBO_in(sg z))`` (it adds the inner ELBO's gradient, not its value, so the reported ELBO is
the N(0, I)-prior VAE's); afterwards the ladder prior is switched on, and only those epochs count for ``best.pt`` and
early stopping
(the plan's stage starts scoring there). The BGM hyperprior is refitted to
t ~ q(t|z), z ~ q(z|x) of (a subset of) the training data after every ``refit_every`` epochs and held fixed in
between; the stick-breaking hyperprior is learned by the ELBO instead. With ``prior: normal`` the same class is
the baseline VAE with an N(0, I) prior and the same outer networks and likelihood.
Not reproduced from the official code: its masking of the inner reconstruction error where σ_z > 1, separate
optimisers and gradient clipping per part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..config.options import Options, option
from ..config.sections import ModelConfig
from ..distributions.hyperpriors import BGMHyperprior, StickBreakingHyperprior, build_hyperprior
from ..distributions.likelihoods import FlooredLaplace
from ..distributions.plate import data_plate
from ..errors import ConfigError
from ..nn.device import device_of
from ..nn.networks import GaussianHead, mlp
from ..training.plan import Stage, TrainingPlan, training_plan
from ._common import outer_parts
from .registry import register_model

__all__ = ["LaDDer", "LaDDerOptions", "LaDDerPlan"]


class LaDDer(PyroModule):
    """The LaDDer Pyro program: ``model(x, y=None)`` / ``guide(x, y=None)`` (see the module docstring).

    Parts: ``encoder(x) -> (loc, scale)`` of q(z|x); ``decoder(z) -> raw``; ``likelihood(raw, x) -> p(x|z)``;
    ``inner_encoder(z) -> (loc, scale)`` of q(t|z); ``inner_decoder(t) -> mean of p(z|t)``; ``hyperprior(B) ->
    p(t)``. ``prior="normal"`` drops the ladder (an N(0, I)-prior VAE with the same outer parts).
    """

    conditional = False
    num_classes = None

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        z_dim: int,
        *,
        inner_encoder: nn.Module | None = None,
        inner_decoder: nn.Module | None = None,
        hyperprior: nn.Module | None = None,
        t_dim: int = 2,
        prior: str = "ladder",
        warmup_epochs: int = 0,
        inner_sigma: float = 0.1,
        inner_sigma_bounds=(0.05, 0.1),
        learn_inner_sigma: bool = True,
        warmup_inner: bool = True,
        refit_every: int = 1,
        fit_points: int = 5000,
        num_data: int | None = None,
    ):
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
            pyro.sample("x", self.likelihood(self.decoder(z), event_dim=x.dim() - 1, x=x), obs=x)
        if self.prior == "ladder" and self.training and isinstance(self.hyperprior, StickBreakingHyperprior):
            pyro.factor("stick_prior", self.hyperprior.log_prior())

    @pyro_method
    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            z = pyro.sample("z", self.q_z_given_x(x))
            if self.ladder_active:
                pyro.sample("t", self.q_t_given_z(z))

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
        dev = device_of(self)
        if self.ladder_active:
            t = self.hyperprior.sample(n).to(dev)
            return self.p_z_given_t(t).sample()
        return torch.randn(n, self.z_dim, device=dev)

    def sample(self, n: int, y=None):
        """Decoded means of n ancestral draws t → z → E[x|z] (global torch RNG)."""
        return self.decode_z(self.sample_latent(n))


@training_plan(LaDDer)
class LaDDerPlan(TrainingPlan):
    """One stage that scores epochs only once the ladder prior is on; after every epoch the per-epoch work below
    (switching the ladder on, refitting the BGM hyperprior, the likelihood's evaluation floor)."""

    def stages(self, train):
        m = self.model
        first = m.warmup_epochs + 1 if m.prior == "ladder" and m.warmup_epochs > 0 else 1
        why = f"model.options.warmup_epochs = {m.warmup_epochs}: the ladder prior is on from then"
        return [Stage("train", train, first_scored_epoch=first, scored_from=why)]

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, record: dict, data) -> None:
        """Switch the ladder on after ``warmup_epochs`` epochs, refit the BGM hyperprior to encoded t and store the
        training-set MAE as the likelihood's evaluation floor. Adds ``hyperprior_active``, ``laplace_scale``,
        ``inner_sigma`` and ``ladder_on`` to ``record``. ``data``: a DataBundle (its ``train_x``) or a tensor."""
        m = self.model
        x = None
        if data is not None:
            train_x = data if isinstance(data, torch.Tensor) else data.train_x
            n = min(m.fit_points, len(train_x))
            idx = torch.randperm(len(train_x))[:n]
            x = train_x[idx].to(device_of(m))
        if m.prior == "ladder" and epoch + 1 >= m.warmup_epochs:
            m.ladder_on.fill_(True)
        if x is not None:
            ts, err = [], []
            for xb in x.split(500):
                z = m.q_z_given_x(xb).sample()
                if isinstance(m.likelihood, FlooredLaplace):
                    err.append((m.likelihood.mean(m.decoder(z)) - xb).abs().flatten(1).mean(1))
                if m.prior == "ladder":
                    ts.append(m.q_t_given_z(z).sample())
            if err:
                m.likelihood.set_eval_floor(torch.cat(err))
            refit = (
                m.prior == "ladder"
                and isinstance(m.hyperprior, BGMHyperprior)
                and (m.ladder_active or m.warmup_inner)
                and (epoch + 1) % m.refit_every == 0
            )
            if refit:
                m.hyperprior.fit(torch.cat(ts))
        if m.prior == "ladder":
            record["hyperprior_active"] = m.hyperprior.active_components()
            record["inner_sigma"] = float(m.inner_sigma())
            record["ladder_on"] = bool(m.ladder_on)
        if isinstance(m.likelihood, FlooredLaplace):
            record["laplace_scale"] = float(m.likelihood.scale())


@dataclass
class LaDDerOptions(Options):
    prior: str = option("ladder", choices=("ladder", "normal"), doc="'normal': the N(0, I)-prior baseline")
    t_dim: int = option(2, gt=0, doc="size of the top latent t of the inner VAE (the hyperprior's space)")
    warmup_epochs: int = option(
        10,
        ge=0,
        doc="epochs with an N(0, I) prior on z before the ladder prior is switched on (they do not count for best.pt "
        "or early stopping)",
    )
    warmup_inner: bool = option(
        True, doc="train the inner VAE on the detached codes during the warm-up (its gradient only)"
    )
    hyperprior: str = option(
        "bgm",
        choices=("bgm", "stick"),
        doc="p(t): bgm (a Bayesian Gaussian mixture refitted after epochs) or stick (a stick-breaking mixture learned"
        " by the ELBO)",
    )
    num_components: int = option(
        20, gt=0, doc="mixture components of the hyperprior (an upper bound: unused ones get no weight)"
    )
    weight_concentration_prior: float = option(
        0.1, gt=0, doc="concentration of the bgm hyperprior's weights (scikit-learn's BayesianGaussianMixture)"
    )
    weight_concentration_prior_type: str = option(
        "dirichlet_distribution",
        choices=("dirichlet_distribution", "dirichlet_process"),
        doc="the bgm's prior on the weights: a Dirichlet distribution or a Dirichlet process",
    )
    bgm_max_iter: int = option(200, gt=0, doc="EM iterations of each bgm refit")
    refit_every: int = option(1, gt=0, doc="epochs between refits of the bgm hyperprior")
    fit_points: int = option(
        5000, gt=0, doc="training images whose codes t ~ q(t|z), z ~ q(z|x) the bgm is refitted to"
    )
    stick_alpha: float = option(1.0, gt=0, doc="concentration α of the stick-breaking hyperprior")
    inner_hidden: list[int] = option(
        [256, 256], item_gt=0, doc="hidden layer sizes of the inner VAE's encoder q(t|z) and decoder g(t)"
    )
    inner_activation: str = option(
        "leaky_relu",
        choices=("relu", "tanh", "elu", "softplus", "leaky_relu"),
        doc="nonlinearity of the inner VAE's networks",
    )
    inner_sigma: float = option(0.1, gt=0, doc="initial standard deviation σ_in of the inner decoder p(z|t)")
    inner_sigma_min: float = option(0.05, gt=0, doc="lower clip of σ_in")
    inner_sigma_max: float = option(0.1, gt=0, doc="upper clip of σ_in (the official code's 0.1)")
    learn_inner_sigma: bool = option(True, doc="learn σ_in (within its clip) rather than keep it fixed")
    likelihood: str = option(
        "floored_laplace",
        choices=("floored_laplace", "config"),
        doc="'config': model.likelihood instead of the floored Laplace",
    )
    laplace_init_scale: float = option(
        0.02,
        gt=0,
        doc="initial scale b of the floored Laplace likelihood (the floor, the batch's mean absolute error, takes "
        "over when it is larger)",
    )

    def check(self):
        if self.inner_sigma_min > self.inner_sigma_max:
            self.fail("inner_sigma_min", f"<= inner_sigma_max ({self.inner_sigma_max})", self.inner_sigma_min)


@register_model("ladder", options=LaDDerOptions)
def build_ladder(cfg: ModelConfig, o: LaDDerOptions, data_shape, num_data, num_classes) -> LaDDer:
    """LaDDer from a ``ModelConfig``; ``cfg.latent_dim`` is the size of z."""
    enc, dec, lik = outer_parts(cfg, data_shape, o.likelihood, o.laplace_init_scale)
    kw = {}
    if o.prior == "ladder":
        hidden = tuple(o.inner_hidden)
        if o.hyperprior == "bgm":
            hp = build_hyperprior(
                "bgm",
                o.t_dim,
                o.num_components,
                weight_concentration_prior=o.weight_concentration_prior,
                weight_concentration_prior_type=o.weight_concentration_prior_type,
                max_iter=o.bgm_max_iter,
            )
        else:
            hp = build_hyperprior("stick", o.t_dim, o.num_components, alpha=o.stick_alpha)
        kw = dict(
            inner_encoder=GaussianHead(cfg.latent_dim, hidden, o.t_dim, o.inner_activation),
            inner_decoder=mlp(o.t_dim, hidden, cfg.latent_dim, o.inner_activation),
            hyperprior=hp,
        )
    return LaDDer(
        enc,
        dec,
        lik,
        cfg.latent_dim,
        t_dim=o.t_dim,
        prior=o.prior,
        warmup_epochs=o.warmup_epochs,
        inner_sigma=o.inner_sigma,
        inner_sigma_bounds=(o.inner_sigma_min, o.inner_sigma_max),
        learn_inner_sigma=o.learn_inner_sigma,
        warmup_inner=o.warmup_inner,
        refit_every=o.refit_every,
        fit_points=o.fit_points,
        num_data=num_data,
        **kw,
    )
