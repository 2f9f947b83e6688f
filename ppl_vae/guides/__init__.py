"""Richer amortised posteriors as Pyro guides.

* :mod:`.laplace`: the Laplace guide of Variational Laplace Autoencoders (Park, Kim & Kim, ICML 2019): damped
  Newton iterations from the encoder's mean on the locally linearised decoder, then q = N(μ, Λ⁻¹) with a full
  covariance (:class:`LaplaceGuide`, :func:`laplace_posterior`).
* :mod:`.mixture`: :class:`DiagNormalMixture`, a diagonal-Gaussian mixture with the exact marginal density and a
  pathwise (implicitly reparameterised) ``rsample``; the GAMIX encoder, variance-collapse penalty and Rivera's
  aggregate-KL objective (Rivera, "How to train your VAE", 2023).
* :mod:`.recursive`: the recursive mixture guide and its component-selection objective (Kim & Pavlovic,
  "Recursive Inference for Variational Autoencoders", NeurIPS 2020).

The models that use them are registered in :mod:`ppl_vae.models` as ``vae_laplace``, ``vae_recursive`` and
``vae_gamix``.
"""

from .laplace import (LaplaceGuide, MeanEncoder, batch_jacobian, laplace_posterior, log_joint,
                      precision_to_scale_tril, vlae_damping)
from .mixture import (AggregateKLObjective, DiagNormalMixture, MixtureEncoder, PenalisedELBO, aggregate_kl,
                      implicit_mixture_rsample, mixture_moments, variance_collapse_penalty)
from .recursive import (RecursiveMixtureELBO, RecursiveMixtureEncoder, recursive_log_weights,
                        recursive_mixture_distribution, recursive_mixture_terms)

__all__ = ["LaplaceGuide", "MeanEncoder", "laplace_posterior", "batch_jacobian", "precision_to_scale_tril",
           "vlae_damping", "log_joint", "DiagNormalMixture", "MixtureEncoder", "PenalisedELBO",
           "implicit_mixture_rsample", "mixture_moments", "variance_collapse_penalty", "AggregateKLObjective",
           "aggregate_kl", "RecursiveMixtureELBO",
           "RecursiveMixtureEncoder", "recursive_log_weights", "recursive_mixture_distribution",
           "recursive_mixture_terms"]
