r"""The recursive-mixture objective (Kim & Pavlovic, "Recursive Inference for Variational Autoencoders", NeurIPS
2020) as a Pyro ELBO: the functional-gradient component criterion

    J_m(h_m) = E_{h_m}[ log p(x, z) − log h_m(z) + λ · min(log h_m(z) − log q_{m−1}(z), κ) ]

for every component, ELBO(q_m) for every mixing proportion and ELBO(q_M) for the decoder, in one surrogate whose
gradient updates every part (the exact terms and our two deviations, λ and κ, are in
:mod:`ppl_vae.guides.recursive`, which computes them). The reported value is −(N/B) Σ_i ELBO(q_M)(x_i).
"""

from __future__ import annotations

from .direct import DirectObjective

__all__ = ["RecursiveMixtureELBO"]


class RecursiveMixtureELBO(DirectObjective):
    """The recursive-mixture objective as a Pyro ELBO for ``SVI``/``fit``.

    ``owner.recursive_terms(x, y) -> (surrogate, elbo)`` (per datapoint, a ``@pyro_method`` of the model so that
    ``SVI`` sees its parameters). Minibatch scaling N/B as the data plate; the loss value is −(N/B) Σ ELBO(q_M)
    and its gradient is that of the surrogate. ``model``/``guide`` arguments are not called.
    """

    def terms(self, x, y, grad: bool):
        scale = (self.owner.num_data or x.shape[0]) / x.shape[0]
        surrogate, elbo = self.owner.recursive_terms(x, y)
        s, e = scale * surrogate.sum(), scale * elbo.sum()
        return -(e + s - s.detach()), -e
