r"""The stratified importance-weighted bound of a mixture guide (Shi, Siddharth, Paige & Torr, "Variational
Mixture-of-Experts Autoencoders for Multi-Modal Deep Generative Models", NeurIPS 2019, eq. 3 with the IWAE
bound inside):

    L(X) = Σ_s w_s(X) · E_{z^{1:K} ~ q_s}[ log (1/K) Σ_k p(z^k, X) / q(z^k | X) ],    q(z | X) = Σ_s w_s q_s(z | X)

with fixed stratum weights w_s (MMVAE: w_m = 1/|S| for each observed modality m; MoPoE: one weight per non-empty
subset of the observed modalities). Each stratum s is one importance-weighted pass of the model and the guide
called with ``stratum=s``: the guide draws from its component s and scores the draw with the *whole* mixture
density (:class:`ppl_vae.distributions.experts.ExpertMixture`), so the weights are those of q(z | X). Every term is
computed by
:class:`~ppl_vae.infer.iwae.TraceIWAE`'s machinery (:func:`~ppl_vae.infer.importance.importance_log_weights`),
with its IWAE or DReG gradient (Tucker et al. 2018; MMVAE trains with DReG). With K = 1 the bound is the
stratified Monte Carlo estimate of the ELBO of the mixture guide. With ``vectorize_strata=True`` the strata are
one pass: the particle plate holds S·K particles, K per stratum, and the model and guide are called once with
``stratum`` a LongTensor of shape (S·K, 1, …, 1) naming each particle's stratum along the particle dim
(:class:`~ppl_vae.distributions.experts.ExpertMixture` takes it), so Pyro's per-pass work is paid once, not S
times; the values are the same (tested). Caveat: Tucker et al.'s identity behind DReG
needs the score of the density the draws come from (q_s), while the weights carry the mixture's q(z | X); so for
K > 1 the DReG gradient of a stratum is not exactly unbiased for the stratified bound — the estimator MMVAE's
official code uses, kept for fidelity; ``estimator="iwae"`` is the exact gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from pyro.util import warn_if_nan

from .base import Objective
from .importance import guess_max_plate_nesting, importance_log_weights
from .iwae import TraceIWAE
from .trace_checks import IWAEError

__all__ = ["StratifiedIWAE"]


class StratifiedIWAE(Objective):
    """``loss = −(N/B) Σ_i Σ_s w_si L_K^s(x_i)`` (module docstring).

    :param strata: ``strata(x, mask) -> (S, B)`` tensor of stratum weights (columns sum to 1), e.g.
        ``MMVAE.strata``; the model and guide take the keyword ``stratum``.
    :param int num_particles: K per stratum.
    :param str estimator: ``"dreg"`` (default, as MMVAE) or ``"iwae"``.
    :param shared: optional ``shared() -> context manager`` entered around the strata of one bound, inside which
        the model may compute what the strata share once (e.g. ``MMVAE.sharing_experts``: the experts of the
        minibatch); it must not change the values.
    :param bool vectorize_strata: every stratum in one pass of the model and guide (module docstring); the model
        and guide must take ``stratum`` as a LongTensor of particle strata (needs ``vectorize_particles``).

    ``SVI(mmvae.model, mmvae.guide, optim, StratifiedIWAE(mmvae.strata, num_particles=8))``.
    """

    def __init__(
        self,
        strata: Callable,
        num_particles: int = 1,
        estimator: str = "dreg",
        data_plate: str = "data",
        vectorize_particles: bool = True,
        shared: Callable[[], AbstractContextManager] | None = None,
        vectorize_strata: bool = False,
    ):
        if not callable(strata):
            raise IWAEError(f"StratifiedIWAE strata must be a function (x, mask) -> (S, B) weights, got {strata!r}")
        if vectorize_strata and not vectorize_particles:
            raise IWAEError("StratifiedIWAE(vectorize_strata=True) needs vectorize_particles=True (one particle plate)")
        self.iwae = TraceIWAE(
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            estimator=estimator,
            data_plate=data_plate,
        )
        super().__init__(num_particles=self.iwae.num_particles, vectorize_particles=vectorize_particles)
        self.strata = strata
        self.estimator = estimator
        self.shared = shared
        self.vectorize_strata = vectorize_strata
        self._nesting: int | None = None

    def _get_trace(self, model, guide, args, kwargs):
        """Pyro's ELBO interface (not used by the loss): one importance trace pair."""
        return self.iwae._get_trace(model, guide, args, kwargs)

    def __repr__(self) -> str:
        return f"StratifiedIWAE(num_particles={self.num_particles}, estimator={self.estimator!r})"

    def bound(self, model, guide, x, mask=None, *args, _grad: bool = False, **kwargs) -> torch.Tensor:
        """The minibatch estimate of Σ_i L(x_i) (scaled by N/B); with ``_grad`` its gradient is the estimator's."""
        weights = torch.as_tensor(self.strata(x, mask))
        if weights.dim() != 2 or weights.shape[1] != len(x):
            raise IWAEError(
                f"StratifiedIWAE: strata(x, mask) must return (S, {len(x)}) weights, got {tuple(weights.shape)}"
            )
        strata_sum = self._strata_pass if self.vectorize_strata else self._strata_sum
        with self.shared() if self.shared is not None else nullcontext():
            total = strata_sum(model, guide, x, mask, weights, args, _grad, kwargs)
        if total is None:
            raise IWAEError("StratifiedIWAE: every stratum weight is zero")
        return total

    def _strata_sum(self, model, guide, x, mask, weights, args, _grad, kwargs):
        total = None
        for s in range(weights.shape[0]):
            w_s = weights[s]
            if not bool((w_s > 0).any()):
                continue
            lw = self.iwae.log_weights(model, guide, x, mask, *args, stratum=s, _grad=_grad, **kwargs)
            if lw.global_terms:
                raise IWAEError(
                    f"StratifiedIWAE does not take observed sites outside the data plate ({sorted(lw.global_terms)})"
                )
            w_s = w_s.to(lw.log_w)
            term = lw.scale * (w_s * lw.per_datapoint_bound()).sum()
            if _grad and self.estimator == "dreg":
                assert lw.dreg_w_term is not None and lw.dreg_w2_term is not None
                wt = torch.softmax(lw.log_w.detach(), dim=0)
                sur = lw.scale * (w_s * ((wt * lw.dreg_w_term).sum(0) + (wt.pow(2) * lw.dreg_w2_term).sum(0))).sum()
                term = term.detach() + sur - sur.detach()
            total = term if total is None else total + term
        return total

    def _strata_pass(self, model, guide, x, mask, weights, args, _grad, kwargs):
        active = (weights > 0).any(1).nonzero().flatten()  # strata with a datapoint of positive weight
        if not len(active):
            return None
        K, S = self.num_particles, len(active)
        if self._nesting is None:
            self._nesting = guess_max_plate_nesting(model, guide, (x, mask, *args), {**kwargs, "stratum": 0})
        if S * K == 1:
            stratum: int | torch.Tensor = int(active[0])
        else:
            stratum = active.repeat_interleave(K).reshape((S * K,) + (1,) * self._nesting).to(weights.device)
        lw = importance_log_weights(
            model,
            guide,
            (x, mask, *args),
            {**kwargs, "stratum": stratum},
            num_particles=S * K,
            max_plate_nesting=self._nesting,
            data_plate=self.iwae.data_plate,
            dreg=_grad and self.estimator == "dreg",
            require_reparam=_grad,
            particle_groups=S,
        )
        if lw.global_terms:
            raise IWAEError(
                f"StratifiedIWAE does not take observed sites outside the data plate ({sorted(lw.global_terms)})"
            )
        B = lw.batch_size
        w = weights[active].to(lw.log_w)  # (S, B)
        log_w = lw.log_w.reshape(S, K, B)
        total = lw.scale * (w * (torch.logsumexp(log_w, 1) - math.log(K))).sum()
        if _grad and self.estimator == "dreg":
            assert lw.dreg_w_term is not None and lw.dreg_w2_term is not None
            wt = torch.softmax(log_w.detach(), dim=1)
            p, q = lw.dreg_w_term.reshape(S, K, B), lw.dreg_w2_term.reshape(S, K, B)
            sur = lw.scale * (w * ((wt * p).sum(1) + (wt.pow(2) * q).sum(1))).sum()
            total = total.detach() + sur - sur.detach()
        return total

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        loss = -self.bound(model, guide, *args, **kwargs).item()
        warn_if_nan(loss, "loss")  # type: ignore[call-overload]
        return loss

    def loss_and_surrogate(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        loss = -self.bound(model, guide, *args, _grad=True, **kwargs)
        warn_if_nan(loss, "loss")
        return loss, loss.detach()
