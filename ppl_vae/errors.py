"""Exceptions that speak the user's language (a named field, the value, what was expected)."""


class PplVaeError(Exception):
    """Base class of the library's own errors."""


class ConfigError(PplVaeError, ValueError):
    """A configuration field has a bad value: ``ConfigError: model.latent_dim must be ..., got -3``."""


class TrainingDiverged(PplVaeError, RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""
