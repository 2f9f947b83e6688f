r"""The mean of a mixture guide's component ELBOs, one component sampled per datapoint (Sutter, Daunhawer & Vogt,
"Generalized Multimodal ELBO", ICLR 2021, the MoPoE objective as the paper and its code train it):

    L(X) = Σ_c w_c(X) ELBO(q_c) = Σ_c w_c E_{q_c}[log p(X | z)] − Σ_c w_c KL(q_c ‖ p),   q = Σ_c w_c q_c

estimated with one draw z ~ q_{c}, c ~ w(X), for the reconstruction (one pass of the decoders, where the stratified
bound of :class:`~ppl_vae.infer.stratified.StratifiedIWAE` runs one per component) and every component's KL to the
Gaussian prior in closed form. The weights w are fixed by the mask (not learned), so choosing the component and
reparameterising inside it gives an unbiased, pathwise gradient of L. By the convexity of the KL, L ≤ the ELBO of
the mixture q itself (what the stratified bound estimates, with K = 1): a looser bound at a fraction of the cost.

The guide's latent site must be an :class:`~ppl_vae.distributions.experts.ExpertMixture` and the model's the same
site under a diagonal Gaussian prior (``Normal(...).to_event(1)``); every other model site must be observed.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from pyro.util import warn_if_nan
from torch.distributions import kl_divergence

from ..distributions.experts import ExpertMixture
from .base import Objective
from .trace_checks import IWAEError

__all__ = ["ComponentAverageELBO"]


def _unexpanded(fn):
    """``fn`` without the ``ExpandedDistribution`` wrappers a plate puts around it (the batch shape it had)."""
    while isinstance(fn, dist.ExpandedDistribution):
        fn = fn.base_dist
    return fn


class ComponentAverageELBO(Objective):
    """``loss = −[Σ_obs log p(x | z) − Σ_i s_i Σ_c w_ic KL(q_ic ‖ p_i)]``, z from the guide's mixture (module
    docstring); s_i the data plate's scale (N/B). Usable with ``pyro.infer.SVI``."""

    def _get_trace(self, model, guide, args, kwargs):
        guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(*args, **kwargs))
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return prune_subsample_sites(model_trace), guide_trace

    def loss_and_surrogate(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        elbo = torch.zeros(())
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                model_trace.compute_log_prob(lambda n, _, name=name: n == name)
                elbo = elbo + site["log_prob_sum"]
                continue
            q = _unexpanded(guide_trace.nodes[name]["fn"]) if name in guide_trace.nodes else None
            prior = _unexpanded(site["fn"])
            if not isinstance(q, ExpertMixture):
                raise IWAEError(
                    f"ComponentAverageELBO: the guide's site {name!r} must be an ExpertMixture, got {type(q).__name__}"
                )
            base = prior.base_dist if isinstance(prior, dist.Independent) else prior
            if not isinstance(base, dist.Normal) or prior.event_shape != q.event_shape:
                raise IWAEError(
                    f"ComponentAverageELBO: the model's site {name!r} must be a diagonal Normal prior with event "
                    f"shape {tuple(q.event_shape)}, got {type(prior).__name__}"
                )
            p_loc, p_scale = (t.expand(q.batch_shape + q.event_shape).unsqueeze(-2) for t in (base.loc, base.scale))
            kl = kl_divergence(dist.Normal(q.locs, q.scales), dist.Normal(p_loc, p_scale)).sum(-1)  # (B, C)
            kl = (q.weights.to(kl) * kl).sum(-1)  # (B,)
            scale = site["scale"]
            if site["mask"] is not None:
                kl = kl * site["mask"]
            elbo = elbo - (scale * kl).sum()
        loss = -elbo
        warn_if_nan(loss, "loss")
        return loss, loss.detach()
