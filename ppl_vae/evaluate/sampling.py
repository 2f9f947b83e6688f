"""Images drawn from a trained run (``ppl-vae sample``): from the model's prior — by its own ``sample`` method or
by running its Pyro program forwards — or from a mixture fitted to its aggregate posterior. ``run`` is a
:class:`~ppl_vae.experiment.Run` (read here by its fields: cfg, data, model, device)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..errors import PplVaeError, ProgramError, spell
from ..infer.signature import adapt
from ..viz.grids import draw_prior_samples, plot_sample_grid, sample_title
from .aggregate import sample_aggregate

__all__ = ["sample_run", "SAMPLE_SOURCES"]

SAMPLE_SOURCES = ("prior", "aggregate")


def sample_run(
    run,
    n: int = 64,
    *,
    seed: int = 0,
    source: str = "prior",
    num_components: int = 32,
    path: str | Path | None = None,
) -> torch.Tensor:
    """``n`` images drawn from a trained run (``ppl-vae sample``), reproducible from ``seed``; with ``path`` also
    written there as a PNG grid. ``source="prior"``: z from the model's prior — a model with ``sample(n, y)``
    (every built-in method) draws itself (a conditional one, ``conditional = True``, gets the labels 0, 1, ...
    cycled); any other Pyro program (a method defined outside the package, a multimodal model) is run forwards:
    its latents drawn from its prior, the images the means of its observed image sites (several, e.g. modalities:
    side by side). ``"aggregate"``: z from a ``num_components``-Gaussian mixture fitted to the encodings of the
    training set (a model with ``encode`` and ``decode``). A method this cannot serve is refused by name
    (:class:`~ppl_vae.errors.ProgramError`). The grid is titled with what it shows (decoder means), the seed and
    the run's checkpoint; a model with ``sample`` is drawn by the call that draws a run's ``prior_samples.png``
    (:func:`ppl_vae.viz.plot_prior_samples`), so with the run's seed and n=64 the two files are the same."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PplVaeError(f"n must be a positive integer, got {n!r}")
    if source not in SAMPLE_SOURCES:
        raise PplVaeError(f"source must be one of {list(SAMPLE_SOURCES)}, got {source!r}")
    model = run.model
    what = f"the method {run.cfg.model.name!r} ({type(model).__name__})"
    per_row = max(1, int(n**0.5))
    with torch.no_grad(), torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(seed)
        if source == "aggregate":
            lacks = [name for name in ("encode", "decode") if not callable(getattr(model, name, None))]
            if lacks:
                how = spell("source=", "--from ")
                raise ProgramError(
                    f"{how}aggregate decodes draws of the aggregate posterior: it needs a model with encode(x, y) -> "
                    f"(loc, scale) and decode(z); {what} has no {' or '.join(lacks)}. Sample its prior ({how}prior)"
                )
            images = sample_aggregate(run, n, seed=seed, num_components=num_components)
        elif callable(getattr(model, "sample", None)):
            if getattr(model, "conditional", False) is True and not getattr(model, "num_classes", None):
                raise ProgramError(
                    f"{what} is conditional (conditional = True) but has no num_classes: the labels to sample "
                    "with are unknown; give the model a num_classes attribute"
                )
            # the draw of the run's prior_samples.png: the same seed gives the same images and grid
            images, per_row = draw_prior_samples(model, n, seed)
        else:
            images, per_row = _forward_samples(run, n, what)
    if path is not None:
        title = sample_title(seed, checkpoint=getattr(run, "checkpoint", None), source=source)
        plot_sample_grid(images.cpu(), path, per_row, title)
    return images


def _forward_samples(run, n: int, what: str) -> tuple[torch.Tensor, int]:
    """(images, images per row of the grid): the model's program run forwards on placeholder data (training images:
    only the observed sites read them), its latents drawn from its prior, the means of its observed image sites."""
    if getattr(run.model, "has_joint_likelihood", True) is False:
        raise ProgramError(
            f"{what} has no prior to sample: its prior depends on the data (has_joint_likelihood = False), so "
            "there is no p(z) to draw from without images"
        )
    program = adapt(run.model.model, "model")
    pool = run.data.train_x
    chunk = min(n, len(pool))
    latents: set[str] = set()
    means: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        x = pool[:b].to(run.device)
        with poutine.block():
            trace = poutine.trace(program).get_trace(x, None)
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if not site["is_observed"]:
                latents.add(name)
                continue
            try:
                mean = site["fn"].mean
            except NotImplementedError:  # a likelihood without a mean (e.g. autoregressive): a draw
                mean = site["fn"].sample()
            means.setdefault(name, []).append(mean.reshape(b, *site["value"].shape[1:]))
    if not latents:
        raise ProgramError(f"{what}: its model has no latent sample site, so there is nothing to draw from a prior")
    shape = tuple(run.data.train_x.shape[1:])
    images = []
    for parts in means.values():
        m = torch.cat(parts)
        if m[0].numel() == math.prod(shape) and m.shape[1:] != shape:
            m = m.reshape(n, *shape)  # one observed site holding the whole datapoint, flattened by the program
        if m.dim() == 3 or (m.dim() == 4 and m.shape[1] in (1, 3)):
            images.append(m if m.dim() == 4 else m.unsqueeze(1))
    if not images or any(i.shape[1:] != images[0].shape[1:] for i in images):
        raise ProgramError(
            f"{what}: none of its observed sites {sorted(means)} holds images of one shape (C, H, W) or (H, W) per "
            "datapoint, so there is no image to show"
        )
    if len(images) == 1:
        return images[0], max(1, int(n**0.5))
    return torch.stack(images, 1).reshape(-1, *images[0].shape[1:]), len(images) * max(1, int(n**0.5))
