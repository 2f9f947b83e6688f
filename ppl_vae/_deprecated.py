"""The module paths of releases before the package was grouped by role, kept importable for one release.

``import ppl_vae.nets`` (or ``from ppl_vae.priors import StandardNormalPrior``) still works: a finder on
``sys.meta_path`` answers the old name with a module holding the names of its new home(s) and a
``DeprecationWarning`` that says where to import from. The table is the whole list of moves (see CHANGELOG.md).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED: dict[str, tuple[str, ...]] = {
    "ppl_vae.options": ("ppl_vae.config.options",),
    "ppl_vae.images": ("ppl_vae.data.storage",),
    "ppl_vae.multimodal": ("ppl_vae.data.multimodal",),
    "ppl_vae.nets": ("ppl_vae.nn.networks", "ppl_vae.nn.ladder_nets", "ppl_vae.nn.patchgan"),
    "ppl_vae.pixelcnn": ("ppl_vae.nn.pixelcnn",),
    "ppl_vae.likelihoods": ("ppl_vae.distributions.likelihoods",),
    "ppl_vae.priors": ("ppl_vae.distributions.priors", "ppl_vae.evaluate.aggregate"),
    "ppl_vae.hyperpriors": ("ppl_vae.distributions.hyperpriors",),
    "ppl_vae.plate": ("ppl_vae.distributions.plate",),
    "ppl_vae.experts": ("ppl_vae.distributions.experts", "ppl_vae.nn.modality", "ppl_vae.models.multimodal_base"),
    "ppl_vae.runlock": ("ppl_vae.training.runlock",),
    "ppl_vae.models.vae2": ("ppl_vae.models.hvae",),
    "ppl_vae.viz_variance": ("ppl_vae.viz.variance",),
    "ppl_vae.interpolate": ("ppl_vae.evaluate.interpolation",),
    "ppl_vae.evaluate.images": ("ppl_vae.evaluate.sharpness",),
    "ppl_vae.evaluate.multimodal": ("ppl_vae.evaluate.cross_modal",),
    "ppl_vae.infer.train": ("ppl_vae.training.loop", "ppl_vae.training.probe"),
    "ppl_vae.infer.plan": ("ppl_vae.training.plan",),
    "ppl_vae.infer.checkpoint": ("ppl_vae.training.checkpoint",),
    "ppl_vae.infer.optim": ("ppl_vae.training.optim",),
    "ppl_vae.infer.distributed": ("ppl_vae.training.distributed",),
    "ppl_vae.infer.loggers": ("ppl_vae.training.loggers",),
    "ppl_vae.infer.wise_ale": ("ppl_vae.infer.wise_ale_elbo",),
    "ppl_vae.infer.mae": ("ppl_vae.infer.mae_elbo",),
}


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module) -> None:
        homes = MOVED[module.__name__]
        warnings.warn(
            f"{module.__name__} moved to {' and '.join(homes)}; import from there (the old path goes in "
            "the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        for home in reversed(homes):  # the first home wins where two define a name
            new = importlib.import_module(home)
            module.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})
        module.__doc__ = f"Deprecated alias of {', '.join(homes)}."


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _MovedLoader())
        return None


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
