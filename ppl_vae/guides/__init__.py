"""Richer amortised posteriors as Pyro guides.

* :mod:`.laplace`: the Laplace guide of Variational Laplace Autoencoders (Park, Kim & Kim, ICML 2019): damped
  Newton iterations from the encoder's mean on the locally linearised decoder, then q = N(μ, Λ⁻¹) with a full
  covariance (:class:`LaplaceGuide`, :func:`laplace_posterior`).
* :mod:`.mixture`: :class:`DiagNormalMixture`, a diagonal-Gaussian mixture with the exact marginal density and a
  pathwise (implicitly reparameterised) ``rsample``; the GAMIX encoder and variance-collapse penalty (Rivera, "How
  to train your VAE", 2023).
* :mod:`.recursive`: the recursive mixture guide and its component-selection terms (Kim & Pavlovic, "Recursive
  Inference for Variational Autoencoders", NeurIPS 2020).

Their objectives live in :mod:`ppl_vae.infer`; the models that use them are registered in :mod:`ppl_vae.models`
as ``vlae``, ``rme`` and ``gamix``.
"""

from .laplace import (
    LaplaceGuide,
    MeanEncoder,
    batch_jacobian,
    laplace_posterior,
    log_joint,
    precision_to_scale_tril,
    relu_mlp_layers,
    vlae_damping,
)
from .mixture import (
    DiagNormalMixture,
    MixtureEncoder,
    MixtureGuideMixin,
    implicit_mixture_rsample,
    mixture_moments,
    variance_collapse_penalty,
)
from .recursive import (
    RecursiveMixtureEncoder,
    recursive_log_weights,
    recursive_mixture_distribution,
    recursive_mixture_terms,
)

__all__ = [
    "LaplaceGuide",
    "MeanEncoder",
    "laplace_posterior",
    "batch_jacobian",
    "precision_to_scale_tril",
    "relu_mlp_layers",
    "vlae_damping",
    "log_joint",
    "DiagNormalMixture",
    "MixtureEncoder",
    "MixtureGuideMixin",
    "implicit_mixture_rsample",
    "mixture_moments",
    "variance_collapse_penalty",
    "RecursiveMixtureEncoder",
    "recursive_log_weights",
    "recursive_mixture_distribution",
    "recursive_mixture_terms",
]
