"""Exceptions that speak the user's language (a named field, the value, what was expected)."""

import contextlib
import contextvars
import difflib


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


class LoggerError(PplVaeError, RuntimeError):
    """An experiment logger (``train.logger``: MLflow, W&B, TensorBoard) failed during a run: its server went away or
    refused a request. The message names the logger and what it was doing; the last checkpoint is kept."""


def did_you_mean(value: object, names, prefix: str = "") -> str:
    """`` (did you mean 'vae'?)`` when ``value`` is close to one of ``names`` (difflib), else ``""``: the
    suffix every refusal of a name adds to its message (``prefix``: shown before each name, ``'train.'``)."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [str(n) for n in names], n=2, cutoff=0.6)
    if not close:
        lowered = {str(n).lower(): str(n) for n in names}
        close = [lowered[value.lower()]] if value.lower() in lowered else []
    return f" (did you mean {' or '.join(repr(prefix + c) for c in close)}?)" if close else ""


_INTERFACE = contextvars.ContextVar("ppl_vae_interface", default="api")


@contextlib.contextmanager
def interface(name: str):
    """Within this block, hints in messages name options as the interface ``name`` spells them: ``"cli"`` (the
    ``ppl-vae`` command sets it: flags and dotted overrides) or ``"api"`` (the default: Python keyword arguments)."""
    token = _INTERFACE.set(name)
    try:
        yield
    finally:
        _INTERFACE.reset(token)


def spell(api: str, cli: str) -> str:
    """How a hint names what to do: ``api`` in Python (``family='diag'``), ``cli`` on the command line
    (``--family diag``), chosen by the :func:`interface` the message is made under."""
    return cli if _INTERFACE.get() == "cli" else api
