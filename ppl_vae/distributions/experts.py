r"""The experts of multimodal VAEs: the product and the mixture of Gaussian experts, the prior of a mixture, and
the subsets of modalities they are taken over (the models that use them: :mod:`ppl_vae.models.multimodal_base`).

Notation: the expert of modality m is q_m(z | x_m) = N(μ_m, diag σ_m²), its precision T_m = σ_m^{−2}; S is the
set of observed modalities of a datapoint (its ``mask``, optionally intersected with a training ``subset``).

* :func:`product_of_experts`: PoE(S) ∝ p(z)^[prior] Π_{m∈S} q_m, a Gaussian with T = [1] + Σ_{m∈S} T_m and
  μ = Σ_{m∈S} T_m μ_m / T (Wu & Goodman 2018; the prior expert N(0, I) included when ``prior``).
* :class:`ExpertMixture`: Σ_c w_c N(μ_c, σ_c²) with the weights w fixed by the mask (not learned), so choosing
  a component and reparameterising inside it is a pathwise, unbiased gradient; ``component=c`` draws from that
  component only (the strata of :class:`~ppl_vae.infer.stratified.StratifiedIWAE`) while ``log_prob`` stays the
  full mixture density log q(z | X).
"""

from __future__ import annotations

import itertools
import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints, kl_divergence, register_kl


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
    if empty.any():  # keep one observed modality, uniformly
        scores = torch.rand(mask.shape, device=mask.device) * mask
        keep = keep | (empty.unsqueeze(-1) & (scores == scores.max(-1, keepdim=True).values) & mask)
    return keep


def _expand_experts(d, cls, batch_shape, _instance=None):
    """A new ``cls`` with ``d``'s expert tensors (``locs``/``scales`` (…, C, D), ``weights`` (…, C)) expanded to
    ``batch_shape`` — what a plate asks of the two expert distributions below; each copies its own other fields."""
    batch_shape = torch.Size(batch_shape)
    new = d._get_checked_instance(cls, _instance)
    new.locs = d.locs.expand(batch_shape + d.locs.shape[-2:])
    new.scales = d.scales.expand(batch_shape + d.scales.shape[-2:])
    new.weights = d.weights.expand(batch_shape + d.weights.shape[-1:])
    dist.TorchDistribution.__init__(new, batch_shape, d.event_shape, validate_args=False)
    return new


class ExpertMixture(dist.TorchDistribution):
    """q(z) = Σ_c w_c N(z; μ_c, diag σ_c²): ``locs``/``scales`` (B, C, D), ``weights`` (B, C) (rows sum to 1,
    zeros allowed), batch shape (B,), event shape (D,). ``component=c``: rsample from component c only (a
    stratum); ``component`` a LongTensor (e.g. (S, 1): one stratum per particle of a particle plate): each draw
    from the component its entry names, the batch shape that tensor's shape broadcast with (B,) (every stratum in
    one pass, :class:`~ppl_vae.infer.stratified.StratifiedIWAE` with ``vectorize_strata``); ``log_prob`` is
    always the mixture's."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, locs, scales, weights, component: int | None = None, validate_args=None):
        self.locs, self.scales, self.weights = locs, scales, weights
        self.component = component
        batch = locs.shape[:-2]
        if torch.is_tensor(component):
            batch = torch.broadcast_shapes(component.shape, batch)
        super().__init__(batch, locs.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        """A stratum (``component`` set) expands its tensors, so that a site under a particle plate keeps this
        class (whose tensors DReG can detach, :mod:`ppl_vae.infer.dreg`) and draws the same ``randn`` as Pyro's
        generic expansion; the full mixture keeps that generic expansion (its categorical draws)."""
        if self.component is None:
            return super().expand(batch_shape, _instance)
        new = _expand_experts(self, ExpertMixture, batch_shape, _instance)
        new.component = self.component
        return new

    @property
    def mean(self):
        return (self.weights.unsqueeze(-1) * self.locs).sum(-2)

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        if isinstance(self.component, int):
            loc, scale = self.locs[..., self.component, :], self.scales[..., self.component, :]
        else:
            if self.component is None:
                idx = torch.distributions.Categorical(probs=self.weights).sample(sample_shape)  # (S…, B)
            else:
                idx = self.component.expand(shape)
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
        return torch.logsumexp(
            self.component_log_probs(z)
            + self.weights.clamp_min(1e-30).log()
            + torch.where(self.weights > 0, 0.0, -math.inf),
            dim=-1,
        )


class ExpertPrior(dist.TorchDistribution):
    r"""The data-dependent prior of MMVM (Sutter et al. 2024) for one modality's latent, as a log-density:

        log r(z) = α log N(z; 0, I) + (1 − α) log h(z),
        ``kind="mixture"``:   log h(z) = log Σ_m̃ w_m̃ q_m̃(z)        (the mixture of experts itself),
        ``kind="pairwise"``:  log h(z) = Σ_m̃ w_m̃ log q_m̃(z)        (the official code's bound),

    so that E_{q_m}[log q_m − log r] is α KL(q_m ‖ N(0, I)) + (1 − α) KL(q_m ‖ h) (mixture: estimated by Monte
    Carlo, exactly the divergence to the mixture) or α KL(q_m ‖ N(0, I)) + (1 − α) Σ_m̃ w_m̃ KL(q_m ‖ q_m̃) (pairwise:
    the convex upper bound on KL(q_m ‖ h)). ``locs``/``scales`` (B, M, D), ``weights`` (B, M). For 0 < α < 1, and
    for ``pairwise``, r is not normalised (a regulariser, as in the paper); ``sample`` draws from N(0, I) when
    α = 1 and from h otherwise (the mixture, or for ``pairwise`` the normalised Gaussian ∝ Π q_m̃^{w_m̃}).

    For a diagonal Gaussian q_m, ``kl_divergence(q_m, r)`` of the ``pairwise`` kind is that sum in closed form (as
    the official code computes it), so the default objective (``train.objective: auto``) does not sample it; the
    ``mixture`` kind has no closed form and stays sampled."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, locs, scales, weights, alpha: float = 0.0, kind: str = "pairwise", validate_args=None):
        if kind not in ("mixture", "pairwise"):
            raise ValueError(f"ExpertPrior kind must be 'mixture' or 'pairwise', got {kind!r}")
        self.locs, self.scales, self.weights, self.alpha, self.kind = locs, scales, weights, float(alpha), kind
        super().__init__(locs.shape[:-2], locs.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        """Its tensors expanded (what a plate asks for), so that the closed-form KL still finds this class."""
        new = _expand_experts(self, ExpertPrior, batch_shape, _instance)
        new.alpha, new.kind = self.alpha, self.kind
        return new

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


@register_kl(torch.distributions.Independent, ExpertPrior)
def _kl_gaussian_expert_prior(q, r: ExpertPrior) -> torch.Tensor:
    """α KL(q ‖ N(0, I)) + (1 − α) Σ_m̃ w_m̃ KL(q ‖ q_m̃) for a diagonal Gaussian q (``pairwise`` only: the exact
    KL to the ``mixture`` has no closed form, so it raises NotImplementedError and the ELBO samples it)."""
    base = q.base_dist
    if r.kind != "pairwise" or not isinstance(base, torch.distributions.Normal) or q.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    loc, scale = base.loc.unsqueeze(-2), base.scale.unsqueeze(-2)  # (B, 1, D) against the experts (B, M, D)
    pair = kl_divergence(dist.Normal(loc, scale), dist.Normal(r.locs, r.scales)).sum(-1)  # (B, M)
    out = (pair * r.weights).sum(-1)
    if r.alpha == 0:
        return out
    std = kl_divergence(base, dist.Normal(torch.zeros_like(base.loc), torch.ones_like(base.scale))).sum(-1)
    return r.alpha * std + (1 - r.alpha) * out
