r"""The default ELBO (``train.objective: auto``): the KL term in closed form wherever it has one, sampled elsewhere.

For a latent site with guide q and prior p the ELBO's per-datapoint term E_q[log p(z) − log q(z|x)] = −KL(q ‖ p) is
computed exactly when ``torch.distributions.kl_divergence(q, p)`` is registered (diagonal Gaussians: Kingma &
Welling 2014, appendix B) instead of from the one draw; the reconstruction term is sampled either way. The
estimator has the same expectation as ``Trace_ELBO`` and a smaller variance. Pyro's ``TraceMeanField_ELBO`` does
this, but it is only correct when the guide's latent sites are in the model's order (a guide that samples z1
before z2 while the model draws z2 before z1 — a hierarchical VAE, LaDDer — would be evaluated at the wrong
conditionals); this ELBO checks that per trace and uses the sampled estimator of ``Trace_ELBO`` when it does not
hold, so it is safe as a default for every model. Sites without a closed-form KL (a mixture guide, a
full-covariance guide against a diagonal prior) are sampled, exactly as in ``Trace_ELBO``.

Where ``TraceMeanField_ELBO`` differs from ``Trace_ELBO``'s expectation, this ELBO follows ``Trace_ELBO``:

* a ``poutine.scale`` or ``poutine.mask`` on the model's latent site only (Pyro scales the KL by the *guide* site's
  factors): the KL gets the model site's scale and mask and the guide's entropy the difference (the class's text);
* a guide site without a pathwise gradient (a Bernoulli or Categorical latent): the closed form would drop the
  score-function term of the reconstruction, so such a trace uses ``Trace_ELBO``'s estimator (``analytic`` is
  False);
* a guide site marked for enumeration (``config_enumerate``) is refused with :class:`AnalyticKLError` (Pyro's
  ``Trace_ELBO`` warns and samples it): use ``TraceEnum_ELBO``.
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_identically_zero, is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from ..errors import PplVaeError

__all__ = ["AnalyticKLELBO", "AnalyticKLError", "mean_field_order"]


class AnalyticKLError(PplVaeError, ValueError):
    """A program that :class:`AnalyticKLELBO` refuses (a guide site marked for enumeration); the message says why."""


def mean_field_order(model_trace, guide_trace) -> bool:
    """True when the guide samples its latent sites in the model's order (the condition under which the
    closed-form KL of each site is the right term)."""
    model_order = [
        n
        for n, s in model_trace.nodes.items()
        if s["type"] == "sample" and n in guide_trace.nodes and not s["is_observed"]
    ]
    guide_order = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and n in model_trace.nodes]
    return model_order == guide_order


def _reparameterised(guide_trace) -> bool:
    """True when every guide sample site is fully reparameterised (no score-function term)."""
    for site in guide_trace.nodes.values():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if not site["fn"].has_rsample:
            return False
        if "score_parts" not in site:  # a lazy trace: Pyro's default score parts have no score-function term
            if type(site["fn"]).score_parts is TorchDistributionMixin.score_parts:
                continue
            _score_parts(site)
        if not is_identically_zero(site["score_parts"].score_function):
            return False
    return True


def _same(a, b) -> bool:
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return False  # two tensors (masks, scales) are not compared elementwise: the general form is right for both
    return a == b


class AnalyticKLELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` where the guide's order matches the model's and every guide site is reparameterised,
    ``Trace_ELBO`` where not (see the module docstring). ``analytic`` records what the last particle used (``None``
    before the first call).

    The KL term of a latent site carries the *model* site's scale and mask (as ``Trace_ELBO``'s log p term does);
    where the guide site's differ (a ``poutine.scale`` or ``poutine.mask`` on the model's site only) the entropy
    term makes up the difference: s_p·m_p·E_q[log p] − s_q·m_q·E_q[log q] = −s_p·m_p·KL(q‖p) − (s_q·m_q −
    s_p·m_p)·E_q[log q], with −E_q[log q] the closed-form entropy where it exists (else the sampled log q).
    """

    analytic: bool | None = None

    def _get_trace(self, model, guide, args, kwargs):
        # Trace_ELBO's traces (the guide's order is checked per particle below), enumeration refused by name. Without
        # validation only the observed sites' log densities are computed here: the closed-form path needs no other,
        # and the rest are computed where a term needs them (Trace.compute_log_prob memoises; the same numbers)
        if is_validation_enabled() or isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)
        else:
            guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
            replayed = poutine.replay(model, trace=guide_trace)
            model_trace = poutine.trace(replayed, graph_type="flat").get_trace(*args, **kwargs)
            guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
            model_trace.compute_log_prob(lambda _, site: site["is_observed"])
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and site["infer"].get("enumerate"):
                raise AnalyticKLError(
                    f"guide site '{name}' is marked for enumeration (infer={{'enumerate': "
                    f"{site['infer']['enumerate']!r}}}, config_enumerate): AnalyticKLELBO samples every guide "
                    "site and does not enumerate; use pyro.infer.TraceEnum_ELBO, or remove the enumerate flag"
                )
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        self.analytic = mean_field_order(model_trace, guide_trace) and _reparameterised(guide_trace)
        if not self.analytic:
            model_trace.compute_log_prob()  # what the lazy traces left out (memoised: nothing twice)
            guide_trace.compute_score_parts()
            return Trace_ELBO._differentiable_loss_particle(self, model_trace, guide_trace)
        elbo = 0.0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = elbo + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            q, p = guide_site["fn"], model_site["fn"]
            try:
                kl = kl_divergence(q, p)
            except NotImplementedError:  # sampled, as in Trace_ELBO
                _log_probs(model_trace, guide_trace, name)
                elbo = elbo + model_site["log_prob_sum"] - guide_site["log_prob_sum"]
                continue
            sp, mp = model_site["scale"], model_site["mask"]
            sq, mq = guide_site["scale"], guide_site["mask"]
            elbo = elbo - _sum(scale_and_mask(kl, sp, mp), q)
            if not (_same(sp, sq) and _same(mp, mq)):
                try:
                    log_q = -q.entropy()  # E_q[log q], the closed form
                except NotImplementedError:
                    _log_probs(model_trace, guide_trace, name)
                    log_q = guide_site["unscaled_log_prob"]
                elbo = elbo + _sum(scale_and_mask(log_q, sp, mp), q) - _sum(scale_and_mask(log_q, sq, mq), q)
        for name, guide_site in guide_trace.nodes.items():  # auxiliary guide sites, as in TraceMeanField_ELBO
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                _log_probs(model_trace, guide_trace, name)
                elbo = elbo - guide_site["log_prob_sum"]
        elbo = torch.as_tensor(elbo)
        loss = -(elbo.detach() if torch._C._get_tracing_state() else torch_item(elbo))
        return loss, -elbo


def _log_probs(model_trace, guide_trace, name: str) -> None:
    """The scaled log densities of site ``name`` in both traces, where the lazy traces have not computed them."""
    model_trace.compute_log_prob(lambda n, _: n == name)
    site = guide_trace.nodes.get(name)
    if site is not None and "score_parts" not in site:
        _score_parts(site)


def _score_parts(site) -> None:
    """What ``Trace.compute_score_parts`` stores for one guide site."""
    parts = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
    site["unscaled_log_prob"] = parts.log_prob
    parts = parts.scale_and_mask(site["scale"], site["mask"])
    site["score_parts"], site["log_prob"], site["log_prob_sum"] = parts, parts.log_prob, parts.log_prob.sum()


def _sum(term, q) -> torch.Tensor:
    """Σ of a per-site term over the guide's batch shape (a number broadcasts over it)."""
    if torch.is_tensor(term):
        return term.sum()
    return torch.as_tensor(term * torch.Size(q.batch_shape).numel())
