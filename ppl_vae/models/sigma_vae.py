r"""A VAE whose Gaussian likelihood variance σ² is part of the model, after Lin, Roberts, Trigoni & Clark,
"Balancing Reconstruction Quality and Regularisation in Evidence Lower Bound for Variational Autoencoders"
(arXiv:2005.xxxx; AAAI-style text in the project's seeds, file 003).

Generative story, for each datapoint i of N (a minibatch is scaled by N/B):
    z_i ~ p(z) = N(0, I)
    x_i ~ N(g_θ(z_i), σ² I)                      global σ² (stage 1; eq. 5-8), or
    x_i,k ~ N(g_θ,k(z_i), σ²_k(z_i))             per pixel, σ²_k(z) = v_k(z) + σ²_dataset/2 (stage 2; eq. 10)
Guide: q_φ(z_i | x_i) = N(μ_φ(x_i), diag σ_φ²(x_i)).

σ² modes (``model.options.sigma2_mode``):
  fixed        σ² = ``model.sigma2`` (0.5: the original VAE's weighting; 1: β-VAE)
  learned      σ² a ``pyro.param`` (positive), trained by gradient with θ, φ
  closed_form  σ² set to σ*² = (1/d) E_q[‖g(z) − x‖²] (eq. 9): in the model on every training step
               (``closed_form_every: step``, from the minibatch's reconstructions) or after every epoch from the
               whole training set (``epoch``); written in place, so Adam's state for σ² survives
  per_pixel    Algorithm 1: stage 1 trains θ, φ and a global σ² (``stage1_mode``: learned or closed_form) until
               δELBO < ε₁ after ≥ n₁ epochs (``train.stop_delta``, ``train.min_epochs``); stage 2 freezes
               σ²_dataset and trains θ, φ and the variance network v(z) (``options.stage2_*``).
               The plan (:class:`SigmaVAEPlan`) runs the two stages of one ``ppl_vae.train`` call.
Its plan also draws σ²(z) uncertainty maps (Lin et al., Figs. 3 and 4) with the run's figures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyro
import torch
from pyro.nn import pyro_method

from ..config.options import Options, option
from ..config.sections import ModelConfig, TrainConfig
from ..distributions.likelihoods import GaussianLikelihood, PixelVarianceNet, closed_form_sigma2
from ..distributions.plate import data_plate
from ..errors import ConfigError
from ..infer.base import coupled
from ..nn.device import device_of
from ..nn.networks import build_encoder_decoder
from ..training.plan import Stage, TrainingPlan, training_plan
from ..viz.variance import variance_figures
from ._common import require_arch
from .registry import register_model
from .vae import VAE

__all__ = ["SigmaVAE", "SigmaVAEOptions", "SigmaVAEPlan", "MODES"]

MODES = ("fixed", "learned", "closed_form", "per_pixel")


class SigmaVAE(VAE):
    """VAE with σ² in the model: ``likelihood`` is a :class:`~ppl_vae.distributions.likelihoods.GaussianLikelihood` (its
    ``mode`` is fixed, learned or closed_form) and ``variance_net`` an optional
    :class:`~ppl_vae.distributions.likelihoods.PixelVarianceNet` used once :meth:`begin_stage2` has run (buffer
    ``stage``).
    """

    def __init__(
        self,
        encoder,
        decoder,
        likelihood: GaussianLikelihood,
        latent_dim: int,
        variance_net: PixelVarianceNet | None = None,
        num_data: int | None = None,
        closed_form_every: str = "step",
        stage2: dict | None = None,
    ):
        super().__init__(encoder, decoder, likelihood, latent_dim, num_data=num_data)
        if closed_form_every not in ("step", "epoch"):
            raise ConfigError(
                f"model.options.closed_form_every must be one of ['step', 'epoch'], got {closed_form_every!r}"
            )
        self.variance_net = variance_net
        self.closed_form_every = closed_form_every
        self.stage2_options = dict(stage2 or {})
        self.register_buffer("stage", torch.tensor(1))

    # -- state --------------------------------------------------------------------------------------------
    @property
    def per_pixel(self) -> bool:
        """True once stage 2 has begun: σ²_k(z) from the variance network."""
        return self.variance_net is not None and int(self.stage) == 2

    @property
    def sigma2_mode(self) -> str:
        return "per_pixel" if self.variance_net is not None else self.likelihood.mode

    def sigma2(self) -> float:
        """The global σ²: stage-1 / fixed / learned value, or the frozen σ²_dataset in stage 2."""
        if self.per_pixel:
            return self.variance_net.sigma2_dataset
        return float(self.likelihood.sigma2_value())

    def begin_stage2(self) -> float:
        """Algorithm 1, stage 2: freeze σ²_dataset (the current global σ²) as the floor σ²_dataset/2 of the
        variance network, which starts out predicting ≈ σ²_dataset everywhere. Returns σ²_dataset."""
        if self.variance_net is None:
            raise ValueError("begin_stage2 needs a variance network: build the model with sigma2_mode='per_pixel'")
        s2 = float(self.likelihood.sigma2_value())
        self.variance_net.start_from(s2)
        self.stage.fill_(2)
        return s2

    def _closed_form_now(self) -> bool:
        return (
            self.likelihood.mode == "closed_form"
            and self.closed_form_every == "step"
            and self.training
            and torch.is_grad_enabled()
            and not self.per_pixel
        )

    # -- the Pyro program ---------------------------------------------------------------------------------
    @pyro_method
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            z = pyro.sample("z", self.prior(x.shape[0]))
            out = self.decoder(z, None)
            variance = self.variance_net(z, None) if self.per_pixel else None
            if self._closed_form_now():  # eq. 9 on this step's reconstructions, before σ² is read
                self.likelihood.set_sigma2(closed_form_sigma2(self.likelihood.mean(out), x))
            pyro.sample("x", self.likelihood(out, event_dim=x.dim() - 1, variance=variance, x=x), obs=x)

    # -- deterministic helpers: σ²(z) uncertainty maps ----------------------------------------------------
    def decode_variance(self, z: torch.Tensor, y=None) -> torch.Tensor:
        """σ²(z) in the data's shape: per pixel in stage 2, otherwise the global σ² broadcast."""
        if self.per_pixel:
            return self.variance_net(z, None)
        out = self.decoder(z, None)
        return self.likelihood.variance(out)

    def decode_with_variance(self, z: torch.Tensor, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x|z], σ²(z))."""
        return self.decode(z), self.decode_variance(z)

    def reconstruct_with_variance(self, x: torch.Tensor, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, σ²) at the posterior mean of q(z|x)."""
        return self.decode_with_variance(self.encode(x)[0])

    @torch.no_grad()
    def closed_form_sigma2(self, x: torch.Tensor, num_samples: int = 1, batch_size: int = 1000, seed: int = 0) -> float:
        r"""σ*² = (1/(N d S)) Σ_i Σ_s ‖g(z_is) − x_i‖², z_is ~ q(z|x_i) (eq. 9 with S draws per datapoint).

        Draws come from a local generator seeded with ``seed`` (eps ~ N(0, I) on the CPU, in datapoint order),
        so the value is a function of (parameters, x, num_samples, seed)."""
        dev = device_of(self)
        g = torch.Generator().manual_seed(seed)
        total, count = 0.0, 0
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(dev)
            loc, scale = self.encode(xb)
            eps = torch.randn((num_samples, *loc.shape), generator=g).to(dev)
            mean = self.decode(loc + scale * eps)
            total += float((mean - xb).pow(2).sum(dtype=torch.float64))
            count += mean.numel()
        return total / count


@training_plan(SigmaVAE)
class SigmaVAEPlan(TrainingPlan):
    """One stage for a global σ²; Algorithm 1's two stages for ``sigma2_mode: per_pixel`` (stage 1 until
    δELBO < ε₁ under ``train``, then σ²_dataset is frozen and stage 2 runs under the ``stage2_*`` options). After
    every epoch: the epoch-wise closed-form σ² (``closed_form_every: epoch``) and σ² in the record."""

    def objective(self, train):
        m = self.model
        if m.likelihood.mode == "closed_form" and m.closed_form_every == "step":
            return coupled(super().objective(train), "closed_form_every='step' (σ² from the minibatch)")
        return super().objective(train)

    def stages(self, train: TrainConfig) -> list[Stage]:
        if self.model.variance_net is None:
            return [Stage("train", train)]
        stage2 = Stage("stage2", self.stage2_config(train), epochs_from="model.options.stage2_epochs")
        return [Stage("stage1", train), stage2]

    def stage2_config(self, train: TrainConfig) -> TrainConfig:
        """Stage-2 training settings: ``train`` with epochs, stop_delta, min_epochs and lr from the options."""
        o = self.model.stage2_options
        cfg = dataclasses.replace(
            train,
            epochs=o.get("stage2_epochs", 20),
            stop_delta=o.get("stage2_stop_delta"),
            min_epochs=o.get("stage2_min_epochs", 1),
            lr=o.get("stage2_lr") or train.lr,
            kl_warmup_epochs=0,
        )
        cfg.validate("model.options.stage2")
        return cfg

    def begin_stage(self, stage: Stage) -> None:
        if stage.name == "stage2":
            self.model.begin_stage2()

    def on_epoch_end(self, epoch: int, record: dict, data) -> None:
        m = self.model
        if m.likelihood.mode == "closed_form" and m.closed_form_every == "epoch" and not m.per_pixel:
            was = m.training
            m.eval()
            value = m.closed_form_sigma2(data.train_x, seed=epoch)
            m.train(was)
            m.likelihood.set_sigma2(value)
        record["sigma2"] = m.sigma2()
        record["stage"] = int(m.stage)

    def figures(self, x, y, run_dir, seed: int = 0) -> list[str]:
        """σ²(z) uncertainty maps of reconstructions and samples (Lin et al., Figs. 3 and 4)."""
        return variance_figures(self.model, x, run_dir, seed=seed)


@dataclass
class SigmaVAEOptions(Options):
    sigma2_mode: str = option(
        "learned",
        choices=MODES,
        doc="how σ² is set: fixed (model.sigma2), learned (by gradient), closed_form (the mean squared error, eq. 9) "
        "or per_pixel (Algorithm 1: a global σ², then a per-pixel σ²(z) network)",
    )
    closed_form_every: str = option(
        "step",
        choices=("step", "epoch"),
        doc="when closed_form sets σ²: every training step (from the minibatch) or after every epoch (from the whole "
        "training set)",
    )
    stage1_mode: str = option(
        "learned",
        choices=("learned", "closed_form"),
        doc="how per_pixel's first stage sets its global σ²: learned or closed_form",
    )
    stage2_epochs: int = option(20, gt=0, doc="epochs of per_pixel's second stage (σ²(z))")
    stage2_stop_delta: float | None = option(
        None, ge=0, doc="the δELBO < ε₂ rule of the second stage (like train.stop_delta); null: off"
    )
    stage2_min_epochs: int = option(1, gt=0, doc="epochs of the second stage before stage2_stop_delta may stop it")
    stage2_lr: float | None = option(None, gt=0, doc="learning rate of the second stage; null: train.lr")


@register_model("sigma_vae", options=SigmaVAEOptions)
def build_sigma_vae(cfg: ModelConfig, o: SigmaVAEOptions, data_shape, num_data, num_classes) -> SigmaVAE:
    """``model.name: sigma_vae``; options: :class:`SigmaVAEOptions` and the module docstring."""
    if cfg.likelihood != "gaussian":
        raise ConfigError(f"model.likelihood must be 'gaussian' for model.name='sigma_vae', got {cfg.likelihood!r}")
    require_arch(cfg, "mlp", "conv")
    mode = o.sigma2_mode
    lik = GaussianLikelihood(sigma2=cfg.sigma2, link=cfg.link, mode=o.stage1_mode if mode == "per_pixel" else mode)
    enc, dec = build_encoder_decoder(
        cfg.arch, data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation, channels=cfg.channels
    )
    var_net = None
    if mode == "per_pixel":
        _, v = build_encoder_decoder(
            cfg.arch, data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation, channels=cfg.channels
        )
        var_net = PixelVarianceNet(v)
    stage2 = {k: v for k, v in o.to_dict().items() if k.startswith("stage2_")}
    return SigmaVAE(
        enc,
        dec,
        lik,
        cfg.latent_dim,
        variance_net=var_net,
        num_data=num_data,
        closed_form_every=o.closed_form_every,
        stage2=stage2,
    )
