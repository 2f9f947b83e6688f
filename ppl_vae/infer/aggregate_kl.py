r"""Rivera's aggregate-KL training objective (Rivera, "How to train your VAE", 2023, and the author's code
marianorivera/How2TrainUrVAE) as a Pyro ELBO.

In the author's code the "mixture of Gaussians" is the *aggregate* posterior of a minibatch, (1/B) Σ_i q(z|x_i),
whose means are moment-matched to one Gaussian N(m, diag v), m_j = mean_i μ_ij, v_j = var_i μ_ij, and the
per-datapoint KL(q(z|x_i) ‖ N(0, I)) is replaced by that Gaussian's KL plus the variance penalty:

    loss = Σ_i [ −log p(x_i | z_i) + γ · pen(σ_i) ] + N · ½ Σ_j (m_j² + v_j − log v_j − 1),   z_i ~ q(z|x_i)   (RIV)

(the minibatch sum scaled by N/B like the data plate; Rivera also adds a PatchGAN loss: ``gamix``'s
``adversarial``). Since (1/B) Σ_i ½‖μ_i‖² = ½ Σ_j (m_j² + v_j), (RIV) with γ = ½ is −ELBO plus N·Σ_j −½(log v_j + 1)
per minibatch: it drops the pull of every code towards 0 and keeps only the pull of the codes' *spread* towards 1 —
not a bound on log p(x). For a mixture guide μ_i is the mixture's mean. The value reported is the ELBO estimate from
the same draws (what validation and early stopping score); test log-likelihoods stay honest importance-sampling
estimates.
"""

from __future__ import annotations

import torch

from .direct import DirectObjective

__all__ = ["AggregateKLObjective", "batch_moment_kl"]


def batch_moment_kl(means: torch.Tensor, min_var: float = 1e-8) -> torch.Tensor:
    """KL(N(m, diag v) ‖ N(0, I)) = ½ Σ_j (m_j² + v_j − log v_j − 1) with m, v the mean and (population) variance
    of the codes ``means`` (B, d) over the minibatch (Rivera 2023). v is floored at ``min_var`` (identical codes)."""
    if means.dim() != 2 or means.shape[0] < 2:
        raise ValueError(
            f"batch_moment_kl needs codes of shape (batch >= 2, d), got {tuple(means.shape)}: the spread "
            "of one code is undefined"
        )
    m = means.mean(0)
    v = means.var(0, unbiased=False).clamp_min(min_var)
    return 0.5 * (m.pow(2) + v - v.log() - 1.0).sum()


class AggregateKLObjective(DirectObjective):
    """Rivera's training objective (RIV in the module docstring) as a Pyro ELBO for ``SVI``/``fit``: its gradient
    is that of (RIV); its value (``loss``) is −ELBO estimated from the same draws, so training curves, validation
    and early stopping see the ELBO. ``owner.aggregate_terms(x, y, objective) -> (RIV, elbo)``, summed over the
    minibatch and already scaled to N, must be a ``@pyro_method`` of the model so that ``SVI`` sees its parameters.
    """

    couples_datapoints = "kl='aggregate' (the KL of the minibatch's moments)"

    def terms(self, x, y, grad: bool):
        objective, elbo = self.owner.aggregate_terms(x, y, objective=grad)
        return objective, -elbo
