r"""The base of the multimodal VAEs: :class:`MultimodalVAE`, the generative story that PoE, MoE, MoPoE and sum
pooling share (z ~ N(0, I), x_m ~ p_m(x_m | z) for each observed modality m), the mixture-of-experts base
:class:`ExpertMixtureVAE`, the per-modality networks (:func:`modality_networks`) and the two plans they train with
(stratified IWAE over the mixture's components, random subsets). The experts themselves are in
:mod:`ppl_vae.distributions.experts`.

The evaluation protocol every multimodal model keeps (:mod:`ppl_vae.evaluate.cross_modal`): ``layout``,
``conditional(x, given) -> q(z | x_given)`` and ``decode(z, modality) -> E[x_modality | z]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..data.multimodal import Layout
from ..distributions.experts import ExpertMixture
from ..distributions.likelihoods import CategoricalLikelihood, build_likelihood
from ..distributions.plate import data_plate
from ..errors import ConfigError
from ..infer.component_average import ComponentAverageELBO
from ..infer.stratified import StratifiedIWAE
from ..infer.subsets import SubsetELBO
from ..nn.modality import Embedding
from ..nn.networks import MLPDecoder, MLPEncoder, build_encoder_decoder
from ..training.plan import TrainingPlan, build_objective, training_plan
from ..viz.curves import plot_training_curves
from ..viz.hierarchy import plot_cross_generation


def require_layout(name: str, data_shape) -> Layout:
    """The :class:`Layout` a multimodal builder receives as ``data_shape``, or a ConfigError saying what to set."""
    if not isinstance(data_shape, Layout):
        raise ConfigError(
            f"model.name={name!r} is a multimodal model: it needs multimodal data (set data.multimodal "
            f"to 'poly' or 'image_label'), got data of shape {tuple(data_shape)}"
        )
    return data_shape


def modality_networks(cfg, layout: Layout, out_dim: int, *, expert: str = "gaussian"):
    """One encoder, decoder and likelihood per modality: images get ``model.arch`` networks and
    ``model.likelihood``; labels an MLP and a categorical likelihood. ``expert="gaussian"``: encoders return
    (μ, σ) of dimension ``out_dim``; ``"embedding"``: an MLP to an ``out_dim`` vector (sum pooling)."""
    encoders, decoders, likelihoods = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    hidden = tuple(cfg.hidden)
    for shape, kind in zip(layout.shapes, layout.kinds, strict=False):
        if kind == "label":
            enc = MLPEncoder(shape, cfg.latent_dim, hidden, cfg.activation)
            dec = MLPDecoder(shape, cfg.latent_dim, hidden, cfg.activation)
            lik = CategoricalLikelihood()
        else:
            enc, dec = build_encoder_decoder(
                cfg.arch, shape, cfg.latent_dim, hidden, cfg.activation, channels=cfg.channels
            )
            lik = build_likelihood(
                cfg.likelihood, sigma2=cfg.sigma2, laplace_scale=cfg.laplace_scale, link=cfg.link, data_shape=shape
            )
        encoders.append(Embedding(shape, hidden, out_dim, cfg.activation) if expert == "embedding" else enc)
        decoders.append(dec)
        likelihoods.append(lik)
    return encoders, decoders, likelihoods


class MultimodalVAE(PyroModule):
    r"""One latent z shared by M modalities: z ~ N(0, I), x_m ~ p_m(x_m | z) for each observed m (the
    likelihood of a missing modality is masked out, ``poutine.mask``-style, so it contributes exactly nothing).

    ``model(x, mask=None, subset=None, stratum=None)`` / ``guide(...)``: ``x`` packed ``(B, D)`` or a dict,
    ``mask`` (B, M) bool (None: all observed), ``subset`` a training subset intersected with ``mask`` (the
    sub-sampled objectives, :class:`~ppl_vae.infer.subsets.SubsetELBO`), ``stratum`` the mixture component the
    guide draws from (:class:`~ppl_vae.infer.stratified.StratifiedIWAE`). A method defines
    :meth:`posterior` (its aggregation of the experts).
    """

    has_joint_likelihood = True  # the program is a normalised density of X (see ppl_vae.evaluate.cross_modal)
    _expert_cache: dict | None = None  # set inside sharing_experts()

    def __init__(self, layout: Layout, encoders, decoders, likelihoods, latent_dim: int, num_data: int | None = None):
        super().__init__()
        self.layout = layout
        self.encoders, self.decoders, self.likelihoods = encoders, decoders, likelihoods
        self.latent_dim = latent_dim
        self.num_data = num_data
        self.register_buffer("_zero", torch.zeros(()))

    # -- inputs ---------------------------------------------------------------------------------------------
    def inputs(self, x, mask=None, subset=None):
        """(list of modality tensors, packed x for the plate, effective observed mask (B, M))."""
        parts = self.layout.split(x)
        xs = [parts[n] for n in self.layout.names]
        packed = x if torch.is_tensor(x) else self.layout.pack(parts)
        b = xs[0].shape[0]
        if mask is None:
            mask = self.layout.full_mask(b, xs[0].device)
        mask = torch.as_tensor(mask, device=xs[0].device)
        if mask.shape != (b, self.layout.num_modalities) or mask.dtype != torch.bool:
            raise ValueError(
                f"{type(self).__name__}: mask must be a bool tensor of shape ({b}, "
                f"{self.layout.num_modalities}), got {mask.dtype} {tuple(mask.shape)}"
            )
        if subset is not None:
            mask = mask & torch.as_tensor(subset, device=mask.device)
        return xs, packed, mask

    def experts(self, xs):
        """(locs, scales) of every modality's expert, each (B, M, D) (missing ones are computed and left out
        by the aggregation). Inside :meth:`sharing_experts`, computed once per input (and grad mode)."""
        cache = self._expert_cache
        if cache is None:
            return self._encode(xs)
        key = (torch.is_grad_enabled(), *((t.data_ptr(), t.shape, t.stride(), t._version) for t in xs))
        if key not in cache:
            cache[key] = self._encode(xs)
        return cache[key]

    def _encode(self, xs):
        out = [enc(x) for enc, x in zip(self.encoders, xs, strict=False)]
        return torch.stack([o[0] for o in out], -2), torch.stack([o[1] for o in out], -2)

    @contextmanager
    def sharing_experts(self) -> Iterator[None]:
        """Within the block, :meth:`experts` of the same input tensors (same storage, shape, strides and version)
        and grad mode returns the first call's tensors: the strata of a stratified bound, which all run the guide
        on the same minibatch, encode it once and share the encoders' graph (the same values and gradients, fewer
        passes). Parameters must not change inside the block. A no-op when the encoders are not deterministic
        functions of their input (batch norm or dropout in training mode) or when a block is already open."""
        if self._expert_cache is not None or (self.training and _stateful(self.__dict__["_modules"]["encoders"])):
            yield
            return
        self._expert_cache = {}
        try:
            yield
        finally:
            self._expert_cache = None

    def prior(self, batch: int):
        loc = self._zero.new_zeros(batch, self.latent_dim)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    def observe(self, z, xs, mask, suffix: str = ""):
        """x_m ~ p_m(x_m | z) for each modality, masked by ``mask[:, m]``."""
        decoders, likelihoods = self.decoders, self.likelihoods  # one pyro.module statement each per call
        for m, x in enumerate(xs):
            self._observe(m, z, x, mask[:, m], suffix, decoders[m], likelihoods[m])

    def observe_modality(self, m: int, z, x, keep, suffix: str = ""):
        """Site ``x_<name><suffix>``: x_m ~ p_m(x_m | z), its log-likelihood kept where ``keep`` (B,) is True."""
        self._observe(m, z, x, keep, suffix, self.decoders[m], self.likelihoods[m])

    def _observe(self, m: int, z, x, keep, suffix: str, decoder, likelihood):
        p = likelihood(decoder(z), event_dim=len(self.layout.shapes[m]), x=x)
        pyro.sample(f"x_{self.layout.names[m]}{suffix}", p.mask(keep), obs=x)

    # -- the Pyro program -----------------------------------------------------------------------------------
    @pyro_method
    def model(self, x, mask=None, subset=None, stratum=None):
        xs, packed, mask = self.inputs(x, mask, subset)
        with data_plate(packed, self.num_data):
            z = pyro.sample("z", self.prior(packed.shape[0]))
            self.observe(z, xs, mask)

    @pyro_method
    def guide(self, x, mask=None, subset=None, stratum=None):
        xs, packed, mask = self.inputs(x, mask, subset)
        with data_plate(packed, self.num_data):
            pyro.sample("z", self.posterior(xs, mask, stratum))

    def posterior(self, xs, mask, stratum=None) -> dist.TorchDistribution:
        raise NotImplementedError(f"{type(self).__name__} must define posterior(xs, mask, stratum)")

    # -- evaluation protocol --------------------------------------------------------------------------------
    def conditional(self, x, given) -> dist.TorchDistribution:
        """q(z | x_given) with ``given`` (B, M) bool (the modalities the code may read)."""
        xs, _, given = self.inputs(x, given)
        if not bool(given.any(-1).all()):
            raise ValueError(
                f"{type(self).__name__}.conditional: every row of given must name at least one modality "
                f"(rows {given.any(-1).logical_not().nonzero().flatten()[:5].tolist()} name none)"
            )
        return self.posterior(xs, given)

    def decode(self, z, modality) -> torch.Tensor:
        """E[x_m | z] (images in data space, labels as class probabilities)."""
        m = self.layout.index(modality)
        return self.likelihoods[m].mean(self.decoders[m](z))


class ExpertMixtureVAE(MultimodalVAE):
    """A :class:`MultimodalVAE` whose guide is a mixture with mask-fixed weights (MMVAE, MoPoE): a method defines
    ``components(xs, mask) -> (locs, scales)`` (B, C, D) and ``weights(mask) -> (B, C)``; the guide is their
    :class:`ExpertMixture` (stratum s = component s) and ``strata`` what
    :class:`~ppl_vae.infer.stratified.StratifiedIWAE` weighs the components by. Trained by
    :class:`StratifiedMixturePlan`."""

    def __init__(self, *args, objective: str = "stratified", **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective

    def posterior(self, xs, mask, stratum=None):
        return ExpertMixture(*self.components(xs, mask), self.weights(mask), component=stratum)

    def components(self, xs, mask):
        raise NotImplementedError(f"{type(self).__name__} must define components(xs, mask)")

    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define weights(mask)")

    def strata(self, x, mask=None) -> torch.Tensor:
        """(C, B): the mixture weight of each component for each datapoint."""
        _, _, mask = self.inputs(x, mask)
        return self.weights(mask).T


def _stateful(module: nn.Module) -> bool:
    """Whether a module in training mode holds layers whose output is not a function of the input alone."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return any(isinstance(mod, kinds) for mod in module.modules())


@training_plan(MultimodalVAE)
class MultimodalPlan(TrainingPlan):
    """What every multimodal model's plan shares: its figures show modalities generated from each other (the
    cross-generation grid) instead of reconstructions, prior samples and latent plots of one image."""

    def standard_figures(self, x, y, history, run_dir, seed: int = 0) -> list[str]:
        paths = [plot_cross_generation(self.model, x, Path(run_dir) / "cross_generation.png", seed=seed)]
        if history:
            paths.append(plot_training_curves(history, Path(run_dir) / "training_curves.png"))
        return paths

    def image_figure(self, x, y, path, title: str, seed: int = 0) -> str:
        return plot_cross_generation(self.model, x, path, n=len(x), seed=seed, title=title)


@training_plan(ExpertMixtureVAE)
class StratifiedMixturePlan(MultimodalPlan):
    """The plan of a mixture-guide model with ``strata(x, mask)`` (MMVAE, MoPoE): the stratified bound
    :class:`~ppl_vae.infer.stratified.StratifiedIWAE` with ``train.num_particles`` and ``train.estimator``, its
    strata in one pass (the guide's :class:`ExpertMixture` takes a tensor of strata); for a
    model whose ``objective`` option samples one component per datapoint, the mean of the components' ELBOs
    (:class:`~ppl_vae.infer.component_average.ComponentAverageELBO`)."""

    def objective(self, train):
        if self.model.objective != "stratified":
            if train.num_particles != 1:
                raise ConfigError(
                    f"train.num_particles must be 1 with model.options.objective={self.model.objective!r} (one "
                    f"component and one draw per datapoint), got {train.num_particles}"
                )
            return ComponentAverageELBO()
        return StratifiedIWAE(
            self.model.strata,
            num_particles=train.num_particles,
            estimator=train.estimator,
            shared=self.model.sharing_experts,
            vectorize_strata=True,
        )


class SubsetPlan(MultimodalPlan):
    """The plan of a model trained on subsets of its modalities (``subsets(mask)``: MVAE, sum pooling): the
    average of ``train.objective``'s ELBO over the subsets (:class:`~ppl_vae.infer.subsets.SubsetELBO`), scored on
    the ELBO of all observed modalities (random subsets would make a noisy score choose the checkpoints)."""

    def objective(self, train):
        return SubsetELBO(build_objective(train), self.model.subsets, self.model.layout.num_modalities)

    def validation_objective(self, train):
        return build_objective(train)
