"""ppl-vae: variational autoencoders as Pyro programs (model + guide), trained with Pyro's SVI,
evaluated with importance-sampled likelihoods and diagnosed with ArviZ."""

from .errors import ConfigError, PplVaeError, TrainingDiverged

__version__ = "0.1.0"
__all__ = ["ConfigError", "PplVaeError", "TrainingDiverged", "__version__"]
