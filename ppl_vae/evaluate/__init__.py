"""Evaluation: importance-sampled log-likelihood and ArviZ diagnostics of the guide.

``log_likelihood``, ``log_likelihood_summary``, ``bits_per_dim`` and ``mc_std_error`` import without ArviZ;
the diagnostics (``posterior_diagnostics``, ``psis_diagnostics``, ``plot_khat``) load ArviZ on first use.
"""

from .likelihood import bits_per_dim, log_likelihood, log_likelihood_summary, mc_std_error

_DIAGNOSTICS = ("posterior_diagnostics", "psis_diagnostics", "plot_khat")

__all__ = ["log_likelihood", "log_likelihood_summary", "bits_per_dim", "mc_std_error", *_DIAGNOSTICS]


def __getattr__(name):
    if name in _DIAGNOSTICS:
        from . import diagnostics

        return getattr(diagnostics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
