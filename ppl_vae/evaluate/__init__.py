"""Evaluation of trained models: importance-sampled log-likelihood, FID, inference gaps and ArviZ diagnostics.

``log_likelihood``, ``log_likelihood_summary``, ``bits_per_dim``, ``mc_std_error``, the FID (``FrechetDistance``,
``frechet_distance``, ``train_feature_classifier``, ``get_feature_extractor``) and the gaps
(``elbo_per_datapoint``, ``amortisation_gap``, ``inference_gaps``) and the per-site latent analysis
(``posterior_means``, ``active_units``, ``kl_per_site``), clustering and probes (``cluster_accuracy``,
``cluster_scores``, ``probe_accuracy``), ``sharpness``, the generation report (``generation_report``: FID of
reconstructions, midpoints and prior samples, collapsed variances) and the multimodal evaluation (``coherence``,
``latent_probe``, ``imputation_error``, ``joint_log_likelihood``, ``conditional_log_likelihood``,
``multimodal_summary``; :mod:`.multimodal`) import without ArviZ; the diagnostics
(``posterior_diagnostics``, ``psis_diagnostics``, ``plot_khat``), the NUTS reference posteriors
(``nuts_posterior``, ``compare_to_reference``), the gap report (``gap_report``, ``plot_gaps``) and the ArviZ
compatibility layer (``azcompat``) load ArviZ on first use.
"""

from .ais import ais_log_likelihood as ais_log_likelihood  # not in __all__ until docs/api/evaluate.rst lists it
from .clustering import cluster_accuracy, cluster_scores, probe_accuracy
from .cross_modal import (
    coherence,
    conditional_log_likelihood,
    fit_classifiers,
    imputation_error,
    joint_log_likelihood,
    latent_probe,
    model_generator,
    multimodal_summary,
)
from .defensive import defended, has_compact_support
from .fid import FIDResult, FrechetDistance, frechet_distance, get_feature_extractor, train_feature_classifier
from .gaps import amortisation_gap, elbo_per_datapoint, guide_latent_site, inference_gaps, optimised_guide
from .generation import collapsed_fraction, generation_report, midpoints
from .latents import active_units, kl_per_site, latent_summary, mutual_information, posterior_means
from .likelihood import bits_per_dim, log_likelihood, log_likelihood_summary, mc_std_error
from .sharpness import sharpness

_DIAGNOSTICS = ("posterior_diagnostics", "psis_diagnostics", "plot_khat", "KHAT_GOOD", "KHAT_BAD")
_REPORT = ("gap_report", "plot_gaps")
_REFERENCE = ("nuts_posterior", "compare_to_reference")
_LAZY_MODULES = ("azcompat", "diagnostics", "reference", "report")

__all__ = [
    "log_likelihood",
    "log_likelihood_summary",
    "bits_per_dim",
    "mc_std_error",
    "FrechetDistance",
    "frechet_distance",
    "FIDResult",
    "train_feature_classifier",
    "get_feature_extractor",
    "elbo_per_datapoint",
    "amortisation_gap",
    "inference_gaps",
    "optimised_guide",
    "defended",
    "has_compact_support",
    "posterior_means",
    "active_units",
    "kl_per_site",
    "mutual_information",
    "latent_summary",
    "cluster_accuracy",
    "cluster_scores",
    "probe_accuracy",
    "sharpness",
    "guide_latent_site",
    "generation_report",
    "collapsed_fraction",
    "midpoints",
    "coherence",
    "conditional_log_likelihood",
    "fit_classifiers",
    "imputation_error",
    "joint_log_likelihood",
    "latent_probe",
    "model_generator",
    "multimodal_summary",
    *_DIAGNOSTICS,
    *_REPORT,
    *_REFERENCE,
]


def __getattr__(name):
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name in _DIAGNOSTICS:
        from . import diagnostics  # ArviZ is imported on first use: it is slow to import, and optional here

        return getattr(diagnostics, name)
    if name in _REPORT:
        from . import report

        return getattr(report, name)
    if name in _REFERENCE:
        from . import reference

        return getattr(reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
