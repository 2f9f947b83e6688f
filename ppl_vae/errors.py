"""Exceptions that speak the user's language (a named field, the value, what was expected)."""


class PplVaeError(Exception):
    """Base class of the library's own errors."""


class ConfigError(PplVaeError, ValueError):
    """A configuration field has a bad value: ``ConfigError: model.latent_dim must be ..., got -3``."""


class TrainingDiverged(PplVaeError, RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


class DataError(PplVaeError, ValueError):
    """Bad argument, missing, unreadable or unusable data (the message names the split, the value and the fix)."""


class CheckpointError(PplVaeError, RuntimeError):
    """A checkpoint is damaged, truncated, unwritable, or was made by another configuration."""


class RunFolderError(PplVaeError, RuntimeError):
    """A run folder is taken: another process is writing it, or it holds a finished run."""


class ProgramError(PplVaeError, TypeError):
    """A model or guide cannot be called the way its data come (its signature takes no data argument, say)."""
