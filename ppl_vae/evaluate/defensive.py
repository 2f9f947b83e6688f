r"""Defensive importance sampling for guides of bounded support.

Importance sampling with a proposal q of compact support (an Epanechnikov guide) estimates
∫_{supp q} p(x, z) dz, not p(x): it is biased low by log P(z ∈ supp q | x) without any warning sign, since the
weights it does see are bounded (PSIS k̂ can look fine). :func:`defended` swaps such guide sites for the
:class:`~ppl_vae.distributions.DefensiveMixture` (1 − α) q + α N(mean q, c · Var q), whose support is the whole
real line, so that the estimate is consistent again; ``log_likelihood(..., defensive=...)`` uses it.

Which sites: ``"auto"`` — those whose distribution (under ``Independent``/expand wrappers) is a
:class:`~ppl_vae.distributions.CompactSupport` (a user's distribution opts in by inheriting the marker);
``True`` — every unobserved site with real support; ``False`` — none.
"""

from __future__ import annotations

from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from ..distributions.families import CompactSupport, DefensiveMixture

__all__ = ["DefensiveMessenger", "defended", "has_compact_support"]


def _unwrapped(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def has_compact_support(fn) -> bool:
    """True when ``fn`` (or the distribution it wraps) is marked :class:`CompactSupport`."""
    return isinstance(_unwrapped(fn), CompactSupport)


def _is_real(fn) -> bool:
    support = getattr(fn, "support", None)
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real or type(support) is type(constraints.real)


class DefensiveMessenger(Messenger):
    """Replaces the chosen guide sites' distributions by their :class:`DefensiveMixture`; ``sites`` records the
    names it replaced."""

    def __init__(self, mode="auto", weight: float = 0.1, inflation: float = 4.0):
        if mode not in ("auto", True, False):
            raise ValueError(f"defensive must be 'auto', True or False, got {mode!r}")
        super().__init__()
        self.mode, self.weight, self.inflation = mode, float(weight), float(inflation)
        self.sites: set[str] = set()

    def _pyro_sample(self, msg):
        if (
            msg["is_observed"]
            or self.mode is False
            or site_is_subsample(msg)
            or isinstance(msg["fn"], DefensiveMixture)
        ):
            return
        fn = msg["fn"]
        if has_compact_support(fn) or (self.mode is True and _is_real(fn)):
            msg["fn"] = DefensiveMixture(fn, self.weight, self.inflation)
            self.sites.add(msg["name"])


def defended(guide, mode="auto", weight: float = 0.1, inflation: float = 4.0):
    """``(wrapped guide, messenger)``: ``guide`` with its compact-support sites (``mode``, see the module) drawn
    from the defensive mixture; ``messenger.sites`` names them once the guide has run."""
    m = DefensiveMessenger(mode, weight, inflation)
    if mode is False or not callable(guide):  # nothing to replace (a non-callable guide fails where it is run)
        return guide, m
    return m(guide), m
