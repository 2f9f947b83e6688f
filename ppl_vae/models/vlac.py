r"""VLAC (Willetts, Roberts & Holmes, "Disentangling to Cluster: Gaussian Mixture Variational Ladder Autoencoders",
arXiv 1909.11501, 2019): the Variational Ladder Autoencoder with Gaussian-mixture priors, clustering in its layers.

Generative story (sites ``z1`` … ``zL``; on the mixture layers also ``c_l``):
    c_l ~ Cat(π_l),  z_l | c_l ~ N(μ_{c_l}, diag σ²_{c_l})      on the layers in ``mixture_layers``
    z_l ~ N(0, I)                                              on the others
    x ~ p_θ(x | f_0(z̃_1)),  z̃ the ladder of :mod:`~ppl_vae.models.vladder` (gated add or concat)
Guide (the VLAE's): q(z_l | x) = N(μ_l(h_l), diag σ_l²(h_l)), h_l = g_l(h_{l−1}), h_0 = x; no c site.

Two codings of one objective (``coding``):
* ``mixture`` — p(z_l) = Σ_c π_c N(z_l; μ_c, σ_c) as a ``MixtureSameFamily`` site; any ELBO.
  ELBO = E_q[log p(x|z) + Σ_l log p(z_l) − log q(z_l|x)]; with q(c|x) = p(c|z) this is exactly the VaDE objective.
* ``enumerate`` — c_l is a model site marked for parallel enumeration and the plan trains with
  ``TraceEnum_ELBO``, which sums c out (the same ELBO, on the same draws); ``cluster_posterior`` then comes from
  Pyro's ``infer_discrete``.
Cluster assignment: argmax_c p(c_l | z_l = μ_l(x)) (:meth:`VLAC.cluster`). Warm-up (the plan): the mixture
layers have an N(0, I) prior for ``warmup_epochs`` epochs, then each mixture is initialised by a diagonal
``GaussianMixture`` fitted to draws of q(z_l | x) for up to ``fit_points`` training images and switched on; only
epochs after that are scored. With ``layers: 1`` this is the flat mixture-prior VAE (the generative model of
VaDE / GM-DGM), the baseline. Registered as ``vlac``.

Checked against the paper: only its abstract could be read (the full text of arXiv 1909.11501 could not be
reached; the project's source extracts hold the abstract only; no official VLAC code was found). Verified from the
abstract: a VLAE ladder with Gaussian-mixture priors; "disentangled clustering" — different attributes are meant to
land in different layers and one "could wish to cluster in any of them", so which layer is clustered depends on the
attribute wanted; the headline result is test cluster accuracy over digit identity on SVHN against a GM-DGM;
clusters learned jointly over several layers; component-wise generation. Not stated there: which layer the SVHN
digit-identity accuracy is read from or how that layer is picked (labels, inspection or a rule), and how the cluster
posterior and assignment are defined. Next-best evidence, the authors' GM-DGM baseline code
(MatthewWilletts/GM-DGM, ``src/models/gm_dgm.py``): an amortised classifier q(c|x) with q(z|x, c), c summed out
as Σ_c q(c|x) ELBO(x, c) + H[q(c|x)], clusters argmax_c q(c|x).

Our choices: no classifier; q(c_l|x) := p(c_l|z_l) (VaDE / MFCVAE style), so the objective is the ELBO with a
mixture prior; clusters at z_l = μ_l(x); the warm-up and the GaussianMixture initialisation; :meth:`VLAC.cluster`
defaults to the highest mixture layer (a convention only). The layer to report is left to the caller:
``bench/hierarchies.py`` picks it without labels, as the used layer (≥ 1 active unit) with the highest
KL(q(z_l|x) ‖ p(z_l)) on training images, and reports every layer beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, infer_discrete
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..config.options import Options, option
from ..distributions.plate import data_plate
from ..distributions.priors import LearnedMixturePrior, StandardNormalPrior
from ..errors import ConfigError
from ..nn.device import device_of
from ..nn.ladder_nets import LadderDecoder, LadderEncoder
from ..training.plan import Stage, TrainingPlan, build_objective, training_plan
from ._common import LadderFigures, config_likelihood, require_arch, require_hidden
from .registry import register_model

__all__ = ["VLAC", "VLACOptions", "VLACPlan", "EnumeratedClusters"]


class VLAC(LadderFigures, PyroModule):
    """The ladder of :class:`~ppl_vae.models.VLadder` with learned Gaussian-mixture priors on ``mixture_layers``
    (1-based); see the module docstring."""

    conditional = False
    num_classes = None

    def __init__(
        self,
        data_shape,
        likelihood: nn.Module,
        latent_dims,
        hidden=(256, 256),
        act: str = "relu",
        combination: str = "gated",
        arch: str = "mlp",
        channels: int = 32,
        mixture_layers=(),
        num_components: int = 10,
        coding: str = "mixture",
        warmup_epochs: int = 5,
        fit_points: int = 10000,
        num_data: int | None = None,
    ):
        super().__init__()
        self.latent_dims = [int(d) for d in latent_dims]
        self.latent_dim, self.layers = sum(self.latent_dims), len(self.latent_dims)
        self.mixture_layers = sorted(set(mixture_layers)) or list(range(1, self.layers + 1))
        if coding not in ("mixture", "enumerate"):
            raise ConfigError(f"model.options.coding must be 'mixture' or 'enumerate', got {coding!r}")
        bad = [l for l in self.mixture_layers if not 1 <= l <= self.layers]
        if bad:
            raise ConfigError(f"model.options.mixture_layers must be layers in 1..{self.layers}, got {bad}")
        self.coding, self.warmup_epochs, self.fit_points = coding, int(warmup_epochs), int(fit_points)
        self.likelihood, self.num_data = likelihood, num_data
        self.encoder = LadderEncoder(data_shape, self.latent_dims, tuple(hidden), act, arch, channels)
        self.decoder = LadderDecoder(data_shape, self.latent_dims, tuple(hidden), act, combination, arch, channels)
        self.normal = nn.ModuleList([StandardNormalPrior(d) for d in self.latent_dims])
        self.mixtures = nn.ModuleDict(
            {str(l): LearnedMixturePrior(num_components, self.latent_dims[l - 1], seed=l) for l in self.mixture_layers}
        )
        self.register_buffer("mixture_on", torch.tensor(self.warmup_epochs == 0))

    def prior_site(self, l: int, batch: int, coding: str, mixtures_on: bool) -> torch.Tensor:
        """Sample site z_l (and c_l under ``enumerate``) of the model."""
        if str(l) not in self.mixtures or not mixtures_on:
            return pyro.sample(f"z{l}", self.normal[l - 1](batch))
        mix = self.mixtures[str(l)]
        if coding == "mixture":
            return pyro.sample(f"z{l}", mix(batch))
        c = pyro.sample(f"c{l}", mix.weights(batch), infer={"enumerate": "parallel"})
        return pyro.sample(f"z{l}", mix.component(c))

    def program(self, x: torch.Tensor, coding: str, mixtures_on: bool):
        """The generative program with the coding and the mixtures' state given (``model`` uses the module's)."""
        with data_plate(x, self.num_data):
            zs = [self.prior_site(l, x.shape[0], coding, mixtures_on) for l in range(1, self.layers + 1)]
            pyro.sample("x", self.likelihood(self.decoder(zs), event_dim=x.dim() - 1, x=x), obs=x)

    @pyro_method
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None):
        self.program(x, self.coding, bool(self.mixture_on))

    @pyro_method
    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None):
        with data_plate(x, self.num_data):
            for l, (loc, scale) in enumerate(self.encoder(x), 1):
                pyro.sample(f"z{l}", dist.Normal(loc, scale).to_event(1))

    # ----- clusters
    @torch.no_grad()
    def cluster(self, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """argmax_c p(c_l | z_l = μ_l(x)) for mixture layer ``layer`` (default: the highest)."""
        layer = self.mixture_layers[-1] if layer is None else layer
        if str(layer) not in self.mixtures:
            raise ValueError(f"layer {layer} has no mixture prior (mixture layers: {self.mixture_layers})")
        mu = self.encoder(x)[layer - 1][0]
        return self.mixtures[str(layer)].cluster_log_probs(mu).argmax(-1)

    @torch.no_grad()
    def cluster_posterior(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{c_l: MAP cluster} by Pyro's ``infer_discrete`` on the enumerated model with z_l = μ_l(x)."""
        zs = {f"z{l}": loc for l, (loc, _) in enumerate(self.encoder(x), 1)}
        conditioned = pyro.poutine.condition(self.program, data=zs)
        tr = pyro.poutine.trace(infer_discrete(conditioned, first_available_dim=-2, temperature=0)).get_trace(
            x, "enumerate", True
        )
        return {f"c{l}": tr.nodes[f"c{l}"]["value"] for l in self.mixture_layers}

    @torch.no_grad()
    def fit_mixtures(self, x: torch.Tensor, seed: int = 0) -> None:
        """Initialise every mixture from a diagonal GaussianMixture fitted to one draw of z_l ~ q(z_l | x) per image
        (the aggregate posterior: a unit the warm-up left unused keeps unit variance, where a fit to the means μ_l
        would give it a near-zero variance that then decides every cluster), and switch the mixtures on."""
        g = torch.Generator(device=x.device).manual_seed(seed)
        draws = [
            [
                loc + scale * torch.randn(loc.shape, generator=g, device=loc.device, dtype=loc.dtype)
                for loc, scale in self.encoder(xb)
            ]
            for xb in x.split(1000)
        ]
        for l in self.mixture_layers:
            self.mixtures[str(l)].init_from(torch.cat([d[l - 1] for d in draws]), seed)
        self.mixture_on.fill_(True)

    # ----- the figure API (z = [z_1, …, z_L]; split/encode/decode/reconstruct from LadderFigures)
    def prior_sample(self, n: int, component: dict[int, int] | None = None) -> torch.Tensor:
        """n draws of z = [z_1..z_L] from the prior; ``component`` {layer: c} fixes c_l on those layers."""
        component = component or {}
        dev, zs = device_of(self), []
        for l in range(1, self.layers + 1):
            if str(l) in self.mixtures and bool(self.mixture_on):
                mix = self.mixtures[str(l)]
                c = torch.full((n,), int(component[l]), device=dev) if l in component else mix.weights(n).sample()
                zs.append(mix.component(c).sample())
            else:
                zs.append(torch.randn(n, self.latent_dims[l - 1], device=dev))
        return torch.cat(zs, -1)

    def sample(self, n: int, y=None):
        return self.decode(self.prior_sample(n))


class EnumeratedClusters(ELBO):
    """The ``enumerate`` coding's objective: ``TraceEnum_ELBO`` (c summed out) once the mixtures are on, plain
    ``Trace_ELBO`` during the warm-up, whose N(0, I) priors have no c site to enumerate (TraceEnum_ELBO would
    warn on every step). The same ELBO either way; the choice is made per call from ``vlac.mixture_on``."""

    def __init__(self, vlac: VLAC, num_particles: int = 1):
        super().__init__(num_particles=num_particles, max_plate_nesting=1)
        self.vlac = vlac
        self.warmup = Trace_ELBO(num_particles=num_particles, max_plate_nesting=1)
        self.enumerated = TraceEnum_ELBO(num_particles=num_particles, max_plate_nesting=1)

    def current(self) -> ELBO:
        return self.enumerated if bool(self.vlac.mixture_on) else self.warmup

    def _get_trace(self, model, guide, args, kwargs):
        return self.current()._get_trace(model, guide, args, kwargs)

    def loss(self, model, guide, *args, **kwargs):
        return self.current().loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return self.current().loss_and_grads(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return self.current().differentiable_loss(model, guide, *args, **kwargs)


@training_plan(VLAC)
class VLACPlan(TrainingPlan):
    """Warm-up with N(0, I) priors, then the mixtures fitted to draws of q(z_l | x) and switched on (scored from the
    next epoch); under ``coding: enumerate`` :class:`EnumeratedClusters` (``TraceEnum_ELBO`` once the mixtures are
    on)."""

    def objective(self, train):
        if self.model.coding == "enumerate":
            if train.objective not in ("auto", "elbo"):
                raise ConfigError(
                    f"train.objective must be 'auto' or 'elbo' with model.options.coding='enumerate' "
                    f"(TraceEnum_ELBO sums the clusters out), got {train.objective!r}"
                )
            return EnumeratedClusters(self.model, train.num_particles)
        return build_objective(train)

    def test_objective(self):
        return EnumeratedClusters(self.model) if self.model.coding == "enumerate" else super().test_objective()

    def stages(self, train):
        w = self.model.warmup_epochs
        return [Stage("train", train, first_scored_epoch=w + 1 if 0 < w < train.epochs else 1)]

    def on_epoch_end(self, epoch, record, data):
        m = self.model
        if not bool(m.mixture_on) and epoch + 1 >= m.warmup_epochs and data is not None:
            x = data if isinstance(data, torch.Tensor) else data.train_x
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))[: m.fit_points]
            m.fit_mixtures(x[idx].to(device_of(m)), seed=epoch)
        record["mixture_on"] = bool(m.mixture_on)


@dataclass
class VLACOptions(Options):
    layers: int = option(3, ge=1, doc="L, the number of latent layers (each of size model.latent_dim)")
    combination: str = option(
        "gated",
        choices=("gated", "concat"),
        doc="how a layer joins the ladder: gated (the official code's z̃ + g ⊙ W z, a learned gate) or concat",
    )
    mixture_layers: list[int] = option([], item_gt=0, doc="1-based layers with a mixture prior ([]: every layer)")
    num_components: int = option(10, ge=1, doc="mixture components per mixture layer")
    coding: str = option(
        "mixture",
        choices=("mixture", "enumerate"),
        doc="MixtureSameFamily prior, or c enumerated by TraceEnum_ELBO (the same ELBO)",
    )
    warmup_epochs: int = option(5, ge=0, doc="epochs with N(0, I) priors before the mixtures are fitted")
    fit_points: int = option(10000, ge=1, doc="training images whose draws of q(z_l | x) initialise the mixtures")


@register_model("vlac", options=VLACOptions)
def build_vlac(cfg, o: VLACOptions, data_shape, num_data, num_classes) -> VLAC:
    require_arch(cfg, "mlp", "conv")
    require_hidden(cfg)
    return VLAC(
        data_shape,
        config_likelihood(cfg, data_shape),
        [cfg.latent_dim] * o.layers,
        cfg.hidden,
        cfg.activation,
        o.combination,
        cfg.arch,
        cfg.channels,
        o.mixture_layers,
        o.num_components,
        o.coding,
        o.warmup_epochs,
        o.fit_points,
        num_data=num_data,
    )
