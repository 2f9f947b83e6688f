r"""Parts of multimodal VAEs: per-modality experts and decoders, the product and the mixture of Gaussian experts,
and :class:`MultimodalVAE`, the generative story that PoE, MoE, MoPoE and sum pooling share.

Notation: the expert of modality m is q_m(z | x_m) = N(μ_m, diag σ_m²), its precision T_m = σ_m^{−2}; S is the
set of observed modalities of a datapoint (its ``mask``, optionally intersected with a training ``subset``).

* :func:`product_of_experts`: PoE(S) ∝ p(z)^[prior] Π_{m∈S} q_m, a Gaussian with T = [1] + Σ_{m∈S} T_m and
  μ = Σ_{m∈S} T_m μ_m / T (Wu & Goodman 2018; the prior expert N(0, I) included when ``prior``).
* :class:`ExpertMixture`: Σ_c w_c N(μ_c, σ_c²) with the weights w fixed by the mask (not learned), so choosing
  a component and reparameterising inside it is a pathwise, unbiased gradient; ``component=c`` draws from that
  component only (the strata of :class:`~ppl_vae.infer.stratified.StratifiedIWAE`) while ``log_prob`` stays the
  full mixture density log q(z | X).
* The evaluation protocol every multimodal model keeps (:mod:`ppl_vae.evaluate.multimodal`): ``layout``,
  ``conditional(x, given) -> q(z | x_given)`` and ``decode(z, modality) -> E[x_modality | z]``.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn
from torch.distributions import constraints

from .errors import ConfigError
from .infer.plan import TrainingPlan, build_objective, training_plan
from .infer.stratified import StratifiedIWAE
from .infer.subsets import SubsetELBO
from .likelihoods import CategoricalLikelihood, build_likelihood
from .multimodal import Layout
from .nets import MIN_SCALE, MLPDecoder, MLPEncoder, build_encoder_decoder, mlp
from .plate import data_plate

__all__ = ["product_of_experts", "ExpertMixture", "ExpertPrior", "MultimodalVAE", "modality_networks",
           "nonempty_subsets", "require_layout", "random_subsets", "StratifiedMixturePlan",
           "uniform_weights", "ExpertMixtureVAE", "SubsetPlan"]


def require_layout(name: str, data_shape) -> Layout:
    """The :class:`Layout` a multimodal builder receives as ``data_shape``, or a ConfigError saying what to set."""
    if not isinstance(data_shape, Layout):
        raise ConfigError(f"model.name={name!r} is a multimodal model: it needs multimodal data (set data.multimodal "
                          f"to 'poly' or 'image_label'), got data of shape {tuple(data_shape)}")
    return data_shape


def product_of_experts(locs: torch.Tensor, scales: torch.Tensor, present: torch.Tensor, prior: bool = True):
    """(loc, scale) of the normalised product of the present experts (``locs``/``scales`` (..., M, D),
    ``present`` (..., M) bool), times N(0, I) when ``prior``. A row with no expert and no prior gets N(0, I)."""
    t = scales.pow(-2) * present.unsqueeze(-1).to(scales.dtype)
    total = t.sum(-2) + (1.0 if prior else 0.0)
    empty = total <= 0
    total = torch.where(empty, torch.ones_like(total), total)
    loc = torch.where(empty, torch.zeros_like(total), (locs * t).sum(-2) / total)
    return loc, total.rsqrt()


def nonempty_subsets(m: int) -> torch.Tensor:
    """The 2^M − 1 non-empty subsets of M modalities as a (2^M − 1, M) bool tensor, singletons first."""
    subsets = [c for r in range(1, m + 1) for c in itertools.combinations(range(m), r)]
    out = torch.zeros(len(subsets), m, dtype=torch.bool)
    for i, c in enumerate(subsets):
        out[i, list(c)] = True
    return out


def uniform_weights(members: torch.Tensor) -> torch.Tensor:
    """Uniform weights over the ``True`` entries of each row of a bool tensor (rows with none stay zero)."""
    w = members.to(torch.get_default_dtype())
    return w / w.sum(-1, keepdim=True).clamp_min(1)


def random_subsets(mask: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Each observed modality kept with probability ``p`` (global torch RNG), at least one kept per row."""
    keep = (torch.rand(mask.shape, device=mask.device) < p) & mask
    empty = ~keep.any(-1)
    if empty.any():   # keep one observed modality, uniformly
        scores = torch.rand(mask.shape, device=mask.device) * mask
        keep = keep | (empty.unsqueeze(-1) & (scores == scores.max(-1, keepdim=True).values) & mask)
    return keep


class ExpertMixture(dist.TorchDistribution):
    """q(z) = Σ_c w_c N(z; μ_c, diag σ_c²): ``locs``/``scales`` (B, C, D), ``weights`` (B, C) (rows sum to 1,
    zeros allowed), batch shape (B,), event shape (D,). ``component=c``: rsample from component c only (a
    stratum); ``log_prob`` is always the mixture's."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, locs, scales, weights, component: int | None = None, validate_args=None):
        self.locs, self.scales, self.weights = locs, scales, weights
        self.component = component
        super().__init__(locs.shape[:-2], locs.shape[-1:], validate_args=False)

    @property
    def mean(self):
        return (self.weights.unsqueeze(-1) * self.locs).sum(-2)

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.locs.shape[:-2]
        if self.component is not None:
            loc, scale = self.locs[..., self.component, :], self.scales[..., self.component, :]
        else:
            idx = torch.distributions.Categorical(probs=self.weights).sample(sample_shape)       # (S…, B)
            gather = idx.unsqueeze(-1).unsqueeze(-1).expand(*idx.shape, 1, self.locs.shape[-1])
            loc = self.locs.expand(*shape, *self.locs.shape[-2:]).gather(-2, gather).squeeze(-2)
            scale = self.scales.expand(*shape, *self.scales.shape[-2:]).gather(-2, gather).squeeze(-2)
        eps = torch.randn(shape + self.event_shape, dtype=self.locs.dtype, device=self.locs.device)
        return loc + scale * eps

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def component_log_probs(self, z):
        """log N(z; μ_c, σ_c²) summed over D, shape (…, B, C)."""
        z = z.unsqueeze(-2)
        return dist.Normal(self.locs, self.scales, validate_args=False).log_prob(z).sum(-1)

    def log_prob(self, z):
        return torch.logsumexp(self.component_log_probs(z) + self.weights.clamp_min(1e-30).log()
                               + torch.where(self.weights > 0, 0.0, -math.inf), dim=-1)


class ExpertPrior(dist.TorchDistribution):
    r"""The data-dependent prior of MMVM (Sutter et al. 2024) for one modality's latent, as a log-density:

        log r(z) = α log N(z; 0, I) + (1 − α) log h(z),
        ``kind="mixture"``:   log h(z) = log Σ_m̃ w_m̃ q_m̃(z)        (the mixture of experts itself),
        ``kind="pairwise"``:  log h(z) = Σ_m̃ w_m̃ log q_m̃(z)        (the official code's bound),

    so that E_{q_m}[log q_m − log r] is α KL(q_m ‖ N(0, I)) + (1 − α) KL(q_m ‖ h) (mixture: estimated by Monte
    Carlo, exactly the divergence to the mixture) or α KL(q_m ‖ N(0, I)) + (1 − α) Σ_m̃ w_m̃ KL(q_m ‖ q_m̃) (pairwise:
    the convex upper bound on KL(q_m ‖ h)). ``locs``/``scales`` (B, M, D), ``weights`` (B, M). For 0 < α < 1, and
    for ``pairwise``, r is not normalised (a regulariser, as in the paper); ``sample`` draws from N(0, I) when
    α = 1 and from h otherwise (the mixture, or for ``pairwise`` the normalised Gaussian ∝ Π q_m̃^{w_m̃})."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, locs, scales, weights, alpha: float = 0.0, kind: str = "pairwise", validate_args=None):
        if kind not in ("mixture", "pairwise"):
            raise ValueError(f"ExpertPrior kind must be 'mixture' or 'pairwise', got {kind!r}")
        self.locs, self.scales, self.weights, self.alpha, self.kind = locs, scales, weights, float(alpha), kind
        super().__init__(locs.shape[:-2], locs.shape[-1:], validate_args=False)

    def log_prob(self, z):
        mix = ExpertMixture(self.locs, self.scales, self.weights)
        if self.kind == "mixture":
            log_h = mix.log_prob(z)
        else:
            log_h = (mix.component_log_probs(z) * self.weights).sum(-1)
        if self.alpha == 0:
            return log_h
        log_n = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return self.alpha * log_n + (1 - self.alpha) * log_h

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        if self.alpha == 1:
            return torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)
        if self.kind == "mixture":
            return ExpertMixture(self.locs, self.scales, self.weights).rsample(sample_shape)
        t = self.scales.pow(-2) * self.weights.unsqueeze(-1)
        total = t.sum(-2)
        loc = (self.locs * t).sum(-2) / total
        return loc + total.rsqrt() * torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)


def modality_networks(cfg, layout: Layout, out_dim: int, *, expert: str = "gaussian"):
    """One encoder, decoder and likelihood per modality: images get ``model.arch`` networks and
    ``model.likelihood``; labels an MLP and a categorical likelihood. ``expert="gaussian"``: encoders return
    (μ, σ) of dimension ``out_dim``; ``"embedding"``: an MLP to an ``out_dim`` vector (sum pooling)."""
    encoders, decoders, likelihoods = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    hidden = tuple(cfg.hidden)
    for shape, kind in zip(layout.shapes, layout.kinds):
        if kind == "label":
            enc = MLPEncoder(shape, cfg.latent_dim, hidden, cfg.activation)
            dec = MLPDecoder(shape, cfg.latent_dim, hidden, cfg.activation)
            lik = CategoricalLikelihood()
        else:
            enc, dec = build_encoder_decoder(cfg.arch, shape, cfg.latent_dim, hidden, cfg.activation,
                                             channels=cfg.channels)
            lik = build_likelihood(cfg.likelihood, sigma2=cfg.sigma2, laplace_scale=cfg.laplace_scale, link=cfg.link,
                                   data_shape=shape)
        encoders.append(Embedding(shape, hidden, out_dim, cfg.activation) if expert == "embedding" else enc)
        decoders.append(dec)
        likelihoods.append(lik)
    return encoders, decoders, likelihoods


class Embedding(nn.Module):
    """φ_m(x_m): the flattened modality through an MLP to a vector (the summands of sum pooling)."""

    def __init__(self, shape, hidden, out_dim: int, act: str = "relu"):
        super().__init__()
        self.net = mlp(math.prod(shape), hidden, out_dim, act)

    def forward(self, x):
        return self.net(x.reshape(x.shape[0], -1))


class GaussianFromSum(nn.Module):
    """ρ(h) → (μ, σ) of a diagonal Gaussian (σ = softplus + floor), the head of sum pooling."""

    def __init__(self, in_dim: int, hidden, latent_dim: int, act: str = "relu"):
        super().__init__()
        self.net = mlp(in_dim, hidden, 2 * latent_dim, act)

    def forward(self, h):
        loc, raw = self.net(h).chunk(2, dim=-1)
        return loc, nn.functional.softplus(raw) + MIN_SCALE


class MultimodalVAE(PyroModule):
    r"""One latent z shared by M modalities: z ~ N(0, I), x_m ~ p_m(x_m | z) for each observed m (the
    likelihood of a missing modality is masked out, ``poutine.mask``-style, so it contributes exactly nothing).

    ``model(x, mask=None, subset=None, stratum=None)`` / ``guide(...)``: ``x`` packed ``(B, D)`` or a dict,
    ``mask`` (B, M) bool (None: all observed), ``subset`` a training subset intersected with ``mask`` (the
    sub-sampled objectives, :class:`~ppl_vae.infer.subsets.SubsetELBO`), ``stratum`` the mixture component the
    guide draws from (:class:`~ppl_vae.infer.stratified.StratifiedIWAE`). A method defines
    :meth:`posterior` (its aggregation of the experts).
    """

    has_joint_likelihood = True   # the program is a normalised density of X (see ppl_vae.evaluate.multimodal)

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
            raise ValueError(f"{type(self).__name__}: mask must be a bool tensor of shape ({b}, "
                             f"{self.layout.num_modalities}), got {mask.dtype} {tuple(mask.shape)}")
        if subset is not None:
            mask = mask & torch.as_tensor(subset, device=mask.device)
        return xs, packed, mask

    def experts(self, xs):
        """(locs, scales) of every modality's expert, each (B, M, D) (missing ones are computed and left out
        by the aggregation)."""
        out = [enc(x) for enc, x in zip(self.encoders, xs)]
        return torch.stack([o[0] for o in out], -2), torch.stack([o[1] for o in out], -2)

    def prior(self, batch: int):
        loc = self._zero.new_zeros(batch, self.latent_dim)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    def observe(self, z, xs, mask, suffix: str = ""):
        """x_m ~ p_m(x_m | z) for each modality, masked by ``mask[:, m]``."""
        for m, x in enumerate(xs):
            self.observe_modality(m, z, x, mask[:, m], suffix)

    def observe_modality(self, m: int, z, x, keep, suffix: str = ""):
        """Site ``x_<name><suffix>``: x_m ~ p_m(x_m | z), its log-likelihood kept where ``keep`` (B,) is True."""
        p = self.likelihoods[m](self.decoders[m](z), event_dim=len(self.layout.shapes[m]), x=x)
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
            raise ValueError(f"{type(self).__name__}.conditional: every row of given must name at least one modality "
                             f"(rows {given.any(-1).logical_not().nonzero().flatten()[:5].tolist()} name none)")
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


@training_plan(ExpertMixtureVAE)
class StratifiedMixturePlan(TrainingPlan):
    """The plan of a mixture-guide model with ``strata(x, mask)`` (MMVAE, MoPoE): the stratified bound
    :class:`~ppl_vae.infer.stratified.StratifiedIWAE` with ``train.num_particles`` and ``train.estimator``."""

    def objective(self, train):
        return StratifiedIWAE(self.model.strata, num_particles=train.num_particles, estimator=train.estimator)


class SubsetPlan(TrainingPlan):
    """The plan of a model trained on subsets of its modalities (``subsets(mask)``: MVAE, sum pooling): the
    average of ``train.objective``'s ELBO over the subsets (:class:`~ppl_vae.infer.subsets.SubsetELBO`), scored on
    the ELBO of all observed modalities (random subsets would make a noisy score choose the checkpoints)."""

    def objective(self, train):
        return SubsetELBO(build_objective(train), self.model.subsets, self.model.layout.num_modalities)

    def validation_objective(self, train):
        return build_objective(train)
