r"""Importance-weighted bounds as a Pyro ELBO: :class:`TraceIWAE`, with the IWAE and the DReG gradient estimators.

The bound (Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016, eq. 14)
------------------------------------------------------------------------------------------------
For datapoint i and K draws z_ik ~ q_φ(z | x_i) from the guide,

    log w_ik = log p_θ(x_i, z_ik) − log q_φ(z_ik | x_i)
    L_K(x_i) = log (1/K) Σ_k w_ik = logmeanexp_k log w_ik.

L_1 is the ELBO, E[L_K] never decreases with K and tends to log p(x_i) (Burda et al., Theorem 1).
On a minibatch of B of the N datapoints (``pyro.plate("data", N, subsample=...)``, e.g.
:func:`ppl_vae.distributions.plate.data_plate`) the loss is

    loss = −[ (N/B) Σ_{i in minibatch} L_K(x_i)  +  (1/K) Σ_k g_k ].

Gradient estimators (``estimator=``)
------------------------------------
With normalised weights w̃_ik = w_ik / Σ_k' w_ik' (detached):

* ``"iwae"``: the exact gradient of the bound with reparameterised guide sites,
  ∇ L_K(x_i) = Σ_k w̃_ik ∇ log w_ik (autograd through the logsumexp).
* ``"dreg"``: the doubly reparameterised estimator (Tucker, Lawson, Gu & Maddison, "Doubly Reparameterized
  Gradient Estimators for Monte Carlo Objectives", arXiv:1810.04152, 2018; ICLR 2019). Split the total
  derivative of log w_ik(z_ik(ψ), ψ) with respect to any parameter ψ into
  A = ∂ log p(x_i, z; ψ)/∂ψ at fixed z (the model's direct dependence),
  B = ∂ log w/∂z · ∂z/∂ψ (the path through the reparameterised draw),
  C = −∂ log q(z | x_i; ψ)/∂ψ at fixed z (the guide's direct dependence, the score).
  IWAE uses Σ_k w̃ (A + B + C); DReG uses Σ_k w̃ A + Σ_k w̃² B, which has the same expectation and no score
  term. So model parameters θ get the IWAE gradient Σ_k w̃_k ∇θ log w_k, guide parameters φ get
  Σ_k w̃_k² ∂log w_k/∂z_k ∂z_k/∂φ, and a parameter used by both model and guide gets the sum of the two.
  It is implemented by the surrogate

      S_i = Σ_k sg(w̃_ik) log p(x_i, h(z_ik)) − Σ_k sg(w̃_ik²) log q(z_ik | x_i; sg ψ)

  (sg = stop-gradient, h the identity whose backward multiplies the gradient by w̃_ik), from one model pass and one
  guide pass; :mod:`ppl_vae.infer.dreg` builds it, and says when it falls back to replaying the guide or both
  passes at detached draws and what a model that couples the batch gets. The guide must be a deterministic
  function of its sample values (no dropout). With K = 1 it is the "sticking the landing" gradient (Roeder, Wu &
  Duvenaud 2017).

The value returned by ``loss``, ``differentiable_loss`` and ``loss_and_grads`` is always −(the IWAE bound).
With K = 1 and ``estimator="iwae"`` the value and the gradient equal ``Trace_ELBO``'s, with the same draws.

Particles are vectorised like Pyro's ELBOs (see :mod:`ppl_vae.infer.importance`, which computes the weights).

Parity (``bench/parity/iwae_pythae.py``, issue 36): pythae 0.1.2's IWAE (K = 5) trained around the same networks
and initial weights on binarised Fashion-MNIST gives a test log p(x) within the seed spread of ours.
"""

from __future__ import annotations

import torch
from pyro.infer.enum import get_importance_trace
from pyro.util import warn_if_nan

from ..config.sections import ESTIMATORS
from .base import Objective
from .importance import LogWeights, guess_max_plate_nesting, importance_log_weights
from .trace_checks import IWAEError

__all__ = ["TraceIWAE", "ESTIMATORS"]


class TraceIWAE(Objective):
    r"""The importance-weighted bound (IWAE) as a Pyro ELBO, with IWAE or DReG gradients.

    ``loss = −[(N/B) Σ_i logmeanexp_{k≤K} log w_ik + mean_k g_k]`` with unscaled per-datapoint log-weights
    ``log w_ik = log p(x_i, z_ik) − log q(z_ik | x_i)``; see the module docstring for the exact rules
    (global sites, scales, masks) and the DReG surrogate.

    :param int num_particles: K, the number of importance samples per datapoint.
    :param bool vectorize_particles: draw the K particles in one vectorised pass (an outermost plate) or in a
        Python loop (for models whose shapes do not broadcast over an extra batch dim; every particle weighs the
        minibatch that the first drew, where the data plate draws one with ``subsample_size``).
    :param str estimator: ``"iwae"`` (the exact gradient of the bound, Burda et al. 2016) or ``"dreg"``
        (doubly reparameterised, Tucker et al. 2018); both need reparameterised guide sites.
    :param str data_plate: name of the plate over datapoints (``"data"`` in all ppl_vae models).
    :param max_plate_nesting: the model's number of plate dims (without the particle plate); guessed by running
        the model once if left at infinity, like Pyro's ELBOs.
    :param retain_graph: passed to ``backward`` in :meth:`loss_and_grads`.

    Usable wherever Pyro expects an ELBO: ``SVI(model, guide, optim, TraceIWAE(num_particles=5))``.
    """

    def __init__(
        self,
        num_particles: int = 5,
        vectorize_particles: bool = True,
        estimator: str = "iwae",
        data_plate: str = "data",
        max_plate_nesting: float = float("inf"),
        retain_graph=None,
    ):
        if estimator not in ESTIMATORS:
            raise IWAEError(f"TraceIWAE estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
        if (
            isinstance(num_particles, bool)
            or not isinstance(num_particles, (int, float))
            or int(num_particles) != num_particles
            or num_particles < 1
        ):
            raise IWAEError(f"TraceIWAE num_particles must be a positive integer, got {num_particles!r}")
        if not isinstance(data_plate, str) or not data_plate:
            raise IWAEError(f"TraceIWAE data_plate must be a plate name (str), got {data_plate!r}")
        super().__init__(
            num_particles=int(num_particles),
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
        )
        self.estimator = estimator
        self.data_plate = data_plate
        self._nesting = None if max_plate_nesting == float("inf") else int(max_plate_nesting)
        self._dreg_replay = False  # private: force the two-pass DReG surrogate (tests, batch-coupled models)

    def __repr__(self) -> str:
        return (
            f"TraceIWAE(num_particles={self.num_particles}, estimator={self.estimator!r}, "
            f"vectorize_particles={self.vectorize_particles}, data_plate={self.data_plate!r})"
        )

    def _get_trace(self, model, guide, args, kwargs):
        """One (model_trace, guide_trace) pair, as Pyro's ELBO interface expects (not used by the loss)."""
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def log_weights(self, model, guide, *args, _grad: bool = False, **kwargs) -> LogWeights:
        """The :class:`LogWeights` of one call: ``log_w`` has shape (num_particles, batch)."""
        if self.vectorize_particles and self.num_particles > 1 and self._nesting is None:
            self._nesting = guess_max_plate_nesting(model, guide, args, kwargs)
            self.max_plate_nesting = self._nesting + 1
        return importance_log_weights(
            model,
            guide,
            args,
            kwargs,
            num_particles=self.num_particles,
            vectorize_particles=self.vectorize_particles,
            max_plate_nesting=self._nesting,
            data_plate=self.data_plate,
            dreg=_grad and self.estimator == "dreg",
            require_reparam=_grad,
            _dreg_replay=self._dreg_replay,
        )

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        """−(IWAE bound) of one minibatch as a float (no gradients; non-reparameterised guide sites are fine)."""
        loss = -self.log_weights(model, guide, *args, **kwargs).bound().item()
        warn_if_nan(loss, "loss")  # type: ignore[call-overload]
        return loss

    def loss_and_surrogate(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """−(IWAE bound) as a tensor whose gradient is the chosen estimator's, and its value."""
        lw = self.log_weights(model, guide, *args, _grad=True, **kwargs)
        bound = lw.bound()
        if self.estimator == "iwae":
            loss = -bound
        else:
            surrogate = _dreg_surrogate(lw)
            loss = -(bound.detach() + surrogate - surrogate.detach())
        warn_if_nan(loss, "loss")
        return loss, loss.detach()


def _dreg_surrogate(lw: LogWeights) -> torch.Tensor:
    """S = (N/B) Σ_i [Σ_k sg(w̃) P + Σ_k sg(w̃²) Q] + mean_k g_k with P, Q = ``lw.dreg_w_term``, ``lw.dreg_w2_term``."""
    assert lw.dreg_w_term is not None and lw.dreg_w2_term is not None  # set by a pass with dreg=True
    w = torch.softmax(lw.log_w.detach(), dim=0)
    local = (w * lw.dreg_w_term).sum() + (w.pow(2) * lw.dreg_w2_term).sum()
    out = lw.scale * local
    if lw.global_terms:
        out = out + lw.global_log_w.mean()
    return out
