"""The probabilistic parts a model is assembled from.

* :mod:`.families` — latent distributions Pyro and torch do not ship (:class:`Epanechnikov`,
  :class:`RelaxedPoisson`, :class:`DefensiveMixture`);
* :mod:`.likelihoods` — p(x | z) heads (Bernoulli, Gaussian with a fixed or learned σ², Laplace, PixelCNN);
* :mod:`.priors` — p(z): standard normal, learned and fitted Gaussian mixtures, an autoregressive flow;
* :mod:`.hyperpriors` — priors over a mixture prior's weights (Dirichlet-process stick breaking, BGM);
* :mod:`.experts` — products and mixtures of Gaussian experts (multimodal posteriors);
* :mod:`.plate` — :func:`data_plate`, the plate over datapoints every model writes.
"""

from .families import (
    EPANECHNIKOV_ENTROPY,
    CompactSupport,
    DefensiveMixture,
    Epanechnikov,
    RelaxedPoisson,
    poisson_truncation,
)
from .plate import DATA_PLATE, data_plate

__all__ = [
    "Epanechnikov",
    "RelaxedPoisson",
    "CompactSupport",
    "DefensiveMixture",
    "EPANECHNIKOV_ENTROPY",
    "poisson_truncation",
    "DATA_PLATE",
    "data_plate",
]
