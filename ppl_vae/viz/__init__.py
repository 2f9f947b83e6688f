"""Figures, saved as PNG: image grids (:mod:`.grids`), the latent space (:mod:`.latent_plots`), training curves and
a run's standard set (:mod:`.curves`), hierarchical and multimodal models (:mod:`.hierarchy`), learned variances
(:mod:`.variance`). Nothing here imports the rest of the library: models' plans draw their figures with it."""

from .curves import make_figures, plot_training_curves
from .grids import (
    figure_context,
    plot_class_conditional,
    plot_interpolations,
    plot_perturbations,
    plot_prior_samples,
    plot_reconstructions,
    save_image_grid,
)
from .hierarchy import plot_component_generation, plot_cross_generation, plot_layer_grids, plot_layer_traversal
from .latent_plots import manifold_grid, plot_latent_manifold, plot_latent_scatter, plot_latent_space

__all__ = [
    "save_image_grid",
    "plot_interpolations",
    "plot_perturbations",
    "plot_cross_generation",
    "plot_reconstructions",
    "plot_prior_samples",
    "plot_class_conditional",
    "manifold_grid",
    "plot_latent_manifold",
    "plot_latent_scatter",
    "plot_latent_space",
    "figure_context",
    "plot_training_curves",
    "make_figures",
    "plot_layer_traversal",
    "plot_layer_grids",
    "plot_component_generation",
]
