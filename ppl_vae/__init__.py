"""ppl-vae: variational autoencoders as Pyro programs (model + guide), trained with Pyro's SVI, evaluated with
importance-sampled likelihoods and diagnosed with ArviZ.

The public entry points::

    ppl_vae.train(model, data, config)      # any model/guide pair, by its training plan (ppl_vae.training)
    ppl_vae.build_model(model_config, data.shape, num_data=...)
    ppl_vae.load_data("digits")
    ppl_vae.as_data((x, y))                 # your tensors, arrays or Dataset as a DataBundle (train does it)
    ppl_vae.make_multimodal(data, "poly")   # PolyFashion-style or image + label multimodal data (with masks)
    ppl_vae.run_experiment(config)          # what `ppl-vae train` does: data, model, train, figures, run folder
    ppl_vae.load_run(run_dir)               # a trained run back
    ppl_vae.evaluate_run(run)               # `ppl-vae evaluate`: test ELBO, importance-sampled log p(x)
    ppl_vae.diagnose_run(run)               # `ppl-vae diagnose`: PSIS k-hat / ESS of the guide (ArviZ)
    ppl_vae.save(model_or_run, folder)      # safetensors + config.json + model card, no pickle
    ppl_vae.load(folder)                    # the model back, rebuilt from config.json (never runs code from it)

the latent distributions (``Epanechnikov``, ``RelaxedPoisson``, ``DefensiveMixture``), the objectives
(``TraceIWAE``, ``WiseAleELBO``, ...), the plan protocol (``TrainingPlan``, ``training_plan``;
:mod:`ppl_vae.training`) and ``register_model`` for methods defined outside the package.
"""

import importlib

from . import _deprecated

# the public names and the module each comes from: imported on first use (PEP 562), so that `import ppl_vae` and
# `ppl-vae --help` do not pay for torch, Pyro and matplotlib before they are needed
_HOMES = {
    ".config": ("Config", "DataConfig", "EvalConfig", "ModelConfig", "Options", "TrainConfig", "load_config", "option"),
    ".data": ("DataBundle", "Layout", "MultimodalData", "as_data", "load_data", "make_multimodal"),
    ".distributions": ("DefensiveMixture", "Epanechnikov", "RelaxedPoisson", "data_plate"),
    ".errors": ("ConfigError", "PplVaeError", "TrainingDiverged"),
    ".experiment": ("Run", "diagnose_run", "evaluate_run", "load_run", "run_experiment"),
    ".infer": (
        "AggregateKLObjective",
        "PenalisedELBO",
        "RecursiveMixtureELBO",
        "StratifiedIWAE",
        "SubsetELBO",
        "TraceIWAE",
        "WiseAleELBO",
    ),
    ".models": ("build_model", "model_names", "register_model"),
    ".sharing": ("load", "save"),
    ".training": (
        "Stage",
        "TrainingPlan",
        "TrainResult",
        "build_objective",
        "fit",
        "plan_for",
        "train",
        "training_plan",
    ),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
_SUBPACKAGES = {
    "cli",
    "compare",
    "config",
    "data",
    "distributions",
    "errors",
    "evaluate",
    "experiment",
    "guides",
    "infer",
    "models",
    "nn",
    "sharing",
    "training",
    "viz",
}


def __getattr__(name: str):
    if name in _HOME_OF:
        value = getattr(importlib.import_module(_HOME_OF[name], __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'ppl_vae' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME_OF, *_SUBPACKAGES})


_deprecated.install()

__version__ = "0.1.0"
__all__ = [
    "train",
    "fit",
    "build_model",
    "load_data",
    "run_experiment",
    "load_run",
    "evaluate_run",
    "diagnose_run",
    "save",
    "load",
    "Run",
    "TrainResult",
    "TrainingPlan",
    "Stage",
    "training_plan",
    "plan_for",
    "build_objective",
    "register_model",
    "model_names",
    "Options",
    "option",
    "data_plate",
    "TraceIWAE",
    "WiseAleELBO",
    "AggregateKLObjective",
    "RecursiveMixtureELBO",
    "PenalisedELBO",
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "load_config",
    "DataBundle",
    "as_data",
    "ConfigError",
    "PplVaeError",
    "TrainingDiverged",
    "Epanechnikov",
    "RelaxedPoisson",
    "DefensiveMixture",
    "StratifiedIWAE",
    "SubsetELBO",
    "Layout",
    "MultimodalData",
    "make_multimodal",
    "__version__",
]
