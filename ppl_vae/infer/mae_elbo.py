r"""The MAE regulariser (Ma, Zhou & Hovy, "MAE: Mutual Posterior-Divergence Regularization for Variational
AutoEncoders", ICLR 2019; official code XuezheMax/mae) as a Pyro objective around any base ELBO.

For a minibatch of diagonal-Gaussian posteriors q_i = N(μ_i, diag σ_i²), i = 1..B:

    D_{ij,d} = KL(q_{i,d} ‖ q_{j,d}) = ½ (σ²_{i,d}/σ²_{j,d} + (μ_{i,d} − μ_{j,d})²/σ²_{j,d} − log(σ²_{i,d}/σ²_{j,d}) −
    1)
    D̄_d      = mean over the B(B − 1) ordered pairs i ≠ j of D_{ij,d}     (the mutual posterior divergence of
                                                                          dimension d, E_{x,x'} KL(q_d(·|x) ‖
                                                                          q_d(·|x')))
    SD       = standard deviation (ddof = 1) over the pairs i ≠ j of Σ_d D_{ij,d}
    R        = −η Σ_d log σ(D̄_d / η) + γ · SD

(``form="code"``: −η Σ_d log σ(D̄_d), the official code since its commit 127693d). R rewards diverse posteriors
(the saturating log-sigmoid) and evenly spread ones (SD). The official code's SD — the standard deviation over all
B² entries with the diagonal set to the mean, times √((B² − 1)/(B² − B − 1)) — is algebraically this ddof = 1
standard deviation over the off-diagonal pairs.

**Scale.** R is a property of the whole posterior family estimated on the minibatch, not a sum over datapoints.
The official loss is the per-datapoint *mean* of −ELBO plus R once. Pyro's ELBO under the data plate estimates the
*sum* over the N training points (N/B × the minibatch sum), so here R enters multiplied by N:
loss = −ELBO_sum + N · R, i.e. loss / N = the paper's per-datapoint loss. Like
:class:`~ppl_vae.infer.penalised.PenalisedELBO`, the *value* reported (training curves, validation, early stopping)
is the base ELBO's alone; the gradient includes R. A minibatch of one has no pairs: R = 0 there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .penalised import PenalisedELBO

__all__ = ["pairwise_kl", "mae_terms", "MAERegularisedELBO", "FORMS"]

FORMS = ("paper", "code")


def pairwise_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """D_{ij,d} = KL(N(loc_i,d, scale_i,d²) ‖ N(loc_j,d, scale_j,d²)), shape (B, B, D)."""
    var = scale.pow(2)
    vi, vj = var[:, None], var[None, :]
    return 0.5 * (vi / vj + (loc[:, None] - loc[None, :]).pow(2) / vj - (vi / vj).log() - 1.0)


def mae_terms(loc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D̄ per dimension, shape (D,); SD, a scalar) of a minibatch of posteriors (B, D); B ≥ 2."""
    B = loc.shape[0]
    D = pairwise_kl(loc, scale)
    off = ~torch.eye(B, dtype=torch.bool, device=loc.device)
    pairs = D[off]  # (B(B−1), D)
    return pairs.mean(0), pairs.sum(-1).std(unbiased=True) if pairs.shape[0] > 1 else pairs.new_zeros(())


class MAERegularisedELBO(PenalisedELBO):
    """``base`` ELBO + N · R (module docstring); ``posterior(x, y) -> (loc, scale)`` of the batch's q (read inside
    a Pyro context, e.g. a ``@pyro_method``, so SVI sees the encoder's parameters)."""

    def __init__(self, base, posterior, eta: float, gamma: float, num_data_fn, form: str = "paper"):
        if form not in FORMS:
            raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
        super().__init__(base, posterior, 1.0, num_data_fn)
        self.eta, self.gamma, self.form = float(eta), float(gamma), form
        self.weight = 1.0 if (self.eta > 0 or self.gamma > 0) else 0.0

    def regulariser(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """R of a minibatch (a scalar; 0 for a minibatch of one)."""
        if loc.shape[0] < 2:
            return loc.new_zeros(())
        mean, sd = mae_terms(loc, scale)
        inner = mean / self.eta if (self.form == "paper" and self.eta > 0) else mean
        return -self.eta * F.logsigmoid(inner).sum() + self.gamma * sd

    def _scaled_penalty(self, args, kwargs):
        x = args[0]
        y = args[1] if len(args) > 1 else kwargs.get("y")
        n = self.num_data_fn() or x.shape[0]
        loc, scale = self.penalty(x, y)
        return n * self.regulariser(loc, scale)
