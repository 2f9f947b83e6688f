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
"""

from __future__ import annotations

from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

__all__ = ["AnalyticKLELBO", "mean_field_order"]


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


class AnalyticKLELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` where the guide's order matches the model's, ``Trace_ELBO`` where it does not (see
    the module docstring). ``analytic`` records what the last particle used (``None`` before the first call)."""

    analytic: bool | None = None

    def _get_trace(self, model, guide, args, kwargs):
        return Trace_ELBO._get_trace(self, model, guide, args, kwargs)  # no mean-field warning: checked below

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        self.analytic = mean_field_order(model_trace, guide_trace)
        if self.analytic:
            return super()._differentiable_loss_particle(model_trace, guide_trace)
        return Trace_ELBO._differentiable_loss_particle(self, model_trace, guide_trace)
