"""Share a trained model as a folder, without pickle: :func:`save` and :func:`load`.

The folder is flat — three plain files, no links, nothing pickled — so the Hugging Face Hub's ``upload_folder`` and
``snapshot_download`` carry it unchanged::

    model.safetensors   every weight: the module's ``state_dict`` and the Pyro param-store entries that are not
                        the module's parameters (unconstrained, under ``pyro_param:<name>``)
    config.json         the method, its ModelConfig, the data's shape, num_data, num_classes, the library versions,
                        the parameter names and each param-store entry's constraint (by name)
    README.md           a model card (Hugging Face front matter, ``library_name: ppl-vae``): method, data, metrics

:func:`load` reads JSON and safetensors only. It never unpickles and never imports code that the folder names: a
method defined outside the package must be registered in this process first (import its module), or the weights
go into an instance passed as ``model=``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pyro
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributions import constraints

from .config.sections import config_from_dict
from .data.atomic import temporary_beside
from .data.multimodal import Layout
from .data.user import write_safetensors
from .errors import CheckpointError, ConfigError
from .experiment import SUMMARY_FILE, Run
from .models import build_model, model_names
from .models.registry import BuildRecipe, recipe_of, resolve_name
from .nn.device import device_of

__all__ = ["save", "load", "WEIGHTS_FILE", "CONFIG_JSON", "CARD_FILE"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_JSON = "config.json"
CARD_FILE = "README.md"
FORMAT_VERSION = 1
PARAM_PREFIX = "pyro_param:"  # the safetensors key of a param-store entry outside the module
EVALUATION_FILE = "evaluation.json"  # written by ppl_vae.evaluate_run into the run folder

# constraints a param-store entry may have, by name: the instances of torch's and Pyro's constraint modules, and
# the classes whose instances are defined by their bounds (interval(a, b), greater_than(a), ...)
_NAMED = {
    name: c
    for module in (pyro.distributions.constraints, constraints)
    for name, c in vars(module).items()
    if isinstance(c, constraints.Constraint) and not name.startswith("_")
}
_BOUNDED = {
    "greater_than": (constraints.greater_than, ("lower_bound",)),
    "greater_than_eq": (constraints.greater_than_eq, ("lower_bound",)),
    "less_than": (constraints.less_than, ("upper_bound",)),
    "interval": (constraints.interval, ("lower_bound", "upper_bound")),
    "half_open_interval": (constraints.half_open_interval, ("lower_bound", "upper_bound")),
}


def save(
    model_or_run,
    folder: str | Path,
    *,
    metrics: Mapping[str, float] | None = None,
    data_name: str | None = None,
    param_store: bool | Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model into ``folder`` as ``model.safetensors``, ``config.json`` and a model card ``README.md`` (see
    the module docstring); returns the folder.

    :param model_or_run: a model built by :func:`~ppl_vae.models.build_model` (it keeps its build recipe), a
        :class:`~ppl_vae.experiment.Run` (:func:`ppl_vae.load_run`: its metrics come from the run folder's
        ``metrics.json`` and ``evaluation.json``), or any ``torch.nn.Module`` — such a model (a Pyro program of your
        own) loads only into an instance: ``load(folder, model=...)``.
    :param metrics: numbers for the model card and ``config.json`` (they take precedence over the run's).
    :param data_name: the data set's name on the card (a run's is ``cfg.data.name``).
    :param param_store: the entries of Pyro's (global) param store outside the model's module to save too — its
        ``pyro.param`` sites: by default all of them for a model that ``build_model`` did not build, none for a
        registered method's (it keeps every parameter in its module, as multi-device training requires);
        ``True``: all, ``False``: none, or a list of names.
    :param overwrite: replace a model saved in ``folder`` before; otherwise that is a
        :class:`~ppl_vae.errors.CheckpointError`. Other files in the folder are left alone."""
    model, recipe, found, data_name = _unpack(model_or_run, data_name)
    found.update(_check_metrics(metrics))
    folder = Path(folder)
    ours = [folder / n for n in (WEIGHTS_FILE, CONFIG_JSON, CARD_FILE)]
    if not overwrite and any(p.exists() for p in ours):
        raise CheckpointError(
            f"{str(folder)!r} holds a saved model already ({', '.join(p.name for p in ours if p.exists())}): "
            "pass overwrite=True to replace it, or choose another folder"
        )
    tensors, store = _weights(model, param_store, registered=recipe is not None)
    info = {
        "library": "ppl-vae",
        "format_version": FORMAT_VERSION,
        "method": recipe.method if recipe else None,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",  # for people: never imported
        "model_config": dataclasses.asdict(recipe.config) if recipe else None,
        "data_shape": _shape_to_json(recipe.data_shape) if recipe else None,
        "num_data": recipe.num_data if recipe else None,
        "num_classes": recipe.num_classes if recipe else None,
        "data_name": data_name,
        "versions": _versions(),
        "parameters": sorted(k for k in tensors if not k.startswith(PARAM_PREFIX)),
        "param_store": store,
        "metrics": found,
        "weights": WEIGHTS_FILE,
    }
    _atomic(folder / WEIGHTS_FILE, lambda p: write_safetensors(tensors, p, {"format": "pt", "library": "ppl-vae"}))
    _atomic(folder / CONFIG_JSON, lambda p: Path(p).write_text(json.dumps(info, indent=2) + "\n"))
    _atomic(folder / CARD_FILE, lambda p: Path(p).write_text(model_card(info)))
    return folder


def load(folder: str | Path, *, model: torch.nn.Module | None = None, device: str | torch.device | None = None):
    """The model saved in ``folder`` by :func:`save`, in eval mode.

    :param model: load the weights into this instance (a Pyro program of your own, or one whose method is not
        registered in this process) instead of rebuilding the model with
        :func:`~ppl_vae.models.build_model` from ``config.json``.
    :param device: where the model goes (default: the CPU for a rebuilt model, the instance's own device).

    Reads only JSON and safetensors: nothing is unpickled and no code named by the folder is imported. Pyro's
    param store is cleared (as :func:`ppl_vae.load_run` does) and receives the saved entries outside the module.
    Names or shapes that differ from the model's are one :class:`~ppl_vae.errors.CheckpointError` naming them."""
    folder = Path(folder)
    info = _read_info(folder)
    if model is None:
        model = _rebuild(info, folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {WEIGHTS_FILE}: the weights are missing")
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is damaged or truncated and cannot be read ({e})") from None
    state = {k: v for k, v in tensors.items() if not k.startswith(PARAM_PREFIX)}
    entries = {k[len(PARAM_PREFIX) :]: v for k, v in tensors.items() if k.startswith(PARAM_PREFIX)}
    _check_fit(model, state, folder)
    stored = info.get("param_store") or {}
    if set(entries) != set(stored):
        raise CheckpointError(
            f"{str(folder)!r}: {WEIGHTS_FILE} holds the param-store entries {sorted(entries)}, {CONFIG_JSON} "
            f"names {sorted(stored)}: the two files do not belong together"
        )
    model.load_state_dict(state)
    if device is not None:
        model.to(torch.device(device))
    dev = torch.device(device) if device is not None else device_of(model)
    pyro.clear_param_store()
    if entries:
        pyro.get_param_store().set_state(
            {
                "params": {k: v.to(dev).requires_grad_() for k, v in entries.items()},
                "constraints": {k: _constraint_from_json(stored[k]["constraint"], k) for k in entries},
            }
        )
    return model.eval()


# -- what save writes --------------------------------------------------------------------------------------------


def _unpack(obj, data_name: str | None) -> tuple[torch.nn.Module, BuildRecipe | None, dict, str | None]:
    """(model, build recipe, metrics found, data name) of a model or a Run."""
    if isinstance(obj, Run):
        data = obj.data
        recipe = recipe_of(obj.model) or BuildRecipe(
            resolve_name(obj.cfg.model.name),
            dataclasses.replace(obj.cfg.model, name=resolve_name(obj.cfg.model.name)),
            data.shape if isinstance(data.shape, Layout) else tuple(data.shape),
            len(data.train_x),
            data.num_classes,
        )
        return obj.model, recipe, _run_metrics(Path(obj.run_dir)), data_name or obj.cfg.data.name
    if isinstance(obj, torch.nn.Module):
        return obj, recipe_of(obj), {}, data_name
    raise TypeError(f"ppl_vae.save takes a model (a torch.nn.Module) or a Run (ppl_vae.load_run), got {obj!r}")


def _run_metrics(run_dir: Path) -> dict:
    """The numbers of a run folder's ``metrics.json`` and ``evaluation.json`` (the latter's win)."""
    out = {}
    for name in (SUMMARY_FILE, EVALUATION_FILE):
        try:
            values = json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(values, dict):
            out.update({k: v for k, v in values.items() if _is_number(v)})
    return out


def _check_metrics(metrics) -> dict:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) and _is_number(v) for k, v in metrics.items()):
        raise ConfigError(f"metrics must map names to numbers, got {metrics!r}")
    return {k: float(v) if isinstance(v, float) else v for k, v in metrics.items()}


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _weights(model: torch.nn.Module, which, *, registered: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors to write (each a CPU copy: safetensors refuses shared memory) and the param-store entries
    outside the module that ``which`` picks (see :func:`save`), ``{name: {"constraint": ...}}``."""
    state = model.state_dict()
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    if which is None:
        which = not registered
    if which is False:
        return tensors, {}
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    # a store entry named after one of the module's tensors (``encoder$$$net.0.weight``, ``likelihood.sigma2`` of
    # ``likelihood.sigma2_unconstrained``) is that tensor, registered earlier: not an entry of its own
    names = set(state) | {k.removesuffix("_unconstrained") for k in state}
    store_state = pyro.get_param_store().get_state()
    outside = {
        name: value
        for name, value in store_state["params"].items()
        if not (id(value) in own or name.replace("$$$", ".") in names or name.partition("$$$")[2] in names)
    }
    if which is not True:
        wanted = [which] if isinstance(which, str) else list(which)
        absent = [n for n in wanted if n not in outside]
        if absent:
            raise CheckpointError(
                f"param_store names {absent}, which are not entries of Pyro's param store outside the model's "
                f"module (those are {sorted(outside)})"
            )
        outside = {n: outside[n] for n in wanted}
    store = {}
    for name, value in outside.items():
        tensors[PARAM_PREFIX + name] = value.detach().to("cpu", copy=True).contiguous()
        store[name] = {"constraint": _constraint_to_json(store_state["constraints"].get(name, constraints.real), name)}
    return tensors, store


def _constraint_to_json(c, param: str):
    for name, named in _NAMED.items():
        if c is named:
            return name
    if type(c) is constraints.independent:
        return {
            "name": "independent",
            "base": _constraint_to_json(c.base_constraint, param),
            "reinterpreted_batch_ndims": c.reinterpreted_batch_ndims,
        }
    for name, (cls, bounds) in _BOUNDED.items():
        values = [getattr(c, b, None) for b in bounds]
        if type(c) is cls and all(isinstance(v, int | float) for v in values):
            return {"name": name, **{b: float(v) for b, v in zip(bounds, values, strict=True)}}
    raise CheckpointError(
        f"the param-store entry {param!r} has the constraint {c!r}, which cannot be written by name: give it "
        "a named one of torch.distributions.constraints (real, positive, simplex, unit_interval, ...) or "
        "interval(a, b), greater_than(a), less_than(b), independent(...) of those"
    )


def _constraint_from_json(spec, param: str):
    if isinstance(spec, str) and spec in _NAMED:
        return _NAMED[spec]
    if isinstance(spec, dict) and spec.get("name") == "independent":
        return constraints.independent(
            _constraint_from_json(spec.get("base"), param), int(spec.get("reinterpreted_batch_ndims", 0))
        )
    if isinstance(spec, dict) and spec.get("name") in _BOUNDED:
        cls, bounds = _BOUNDED[spec["name"]]
        if all(_is_number(spec.get(b)) for b in bounds):
            return cls(*(float(spec[b]) for b in bounds))
    raise CheckpointError(f"{CONFIG_JSON}: the param-store entry {param!r} has an unknown constraint {spec!r}")


def _shape_to_json(shape):
    if isinstance(shape, Layout):
        return {
            "layout": {
                "names": list(shape.names),
                "shapes": [list(s) for s in shape.shapes],
                "kinds": list(shape.kinds),
            }
        }
    return list(shape)


def _shape_from_json(value):
    if isinstance(value, dict) and isinstance(value.get("layout"), dict):
        lay = value["layout"]
        return Layout(tuple(lay["names"]), tuple(tuple(s) for s in lay["shapes"]), tuple(lay["kinds"]))
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise CheckpointError(f"{CONFIG_JSON}: data_shape must be a list of integers or a layout, got {value!r}")


def _versions() -> dict:
    own = getattr(sys.modules.get("ppl_vae"), "__version__", None)  # set by the package's __init__
    return {"ppl_vae": own, "torch": torch.__version__, "pyro": pyro.__version__}


def _atomic(path: Path, write: Callable[[str], object]) -> None:
    """``write(temporary path)`` in ``path``'s folder, then an atomic rename onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(path.with_name(f".{path.name}."))  # a hidden name while it is written
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def model_card(info: dict) -> str:
    """The ``README.md`` of a saved model: Hugging Face front matter, then method, data, metrics and how to load."""
    method = info["method"] or info["model_class"]
    tags = ["ppl-vae", "pyro", "variational-autoencoder", *(v for v in (info["method"], info["data_name"]) if v)]
    front = ["---", "library_name: ppl-vae", "tags:", *(f"- {json.dumps(t)}" for t in tags)]
    shape = info["data_shape"]
    shape_text = (
        " + ".join(f"{n} {tuple(s)}" for n, s in zip(shape["layout"]["names"], shape["layout"]["shapes"], strict=True))
        if isinstance(shape, dict)
        else str(tuple(shape))
        if shape is not None
        else "not recorded"
    )
    data = [
        f"- data set: {info['data_name'] or 'not recorded'}",
        f"- datapoint shape: {shape_text}",
        f"- training points (num_data): {info['num_data'] if info['num_data'] is not None else 'not recorded'}",
    ]
    if info["num_classes"]:
        data.append(f"- classes: {info['num_classes']}")
    metrics = info["metrics"]
    table = (
        ["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items()))]
        if metrics
        else ["No metrics were recorded."]
    )
    how = (
        "model = ppl_vae.load(folder)  # rebuilds the model from config.json"
        if info["method"]
        else "model = ppl_vae.load(folder, model=MyModel(...))  # a model of your own: build it, then load"
    )
    cfg = info["model_config"] or {}
    lines = [
        *front,
        "---",
        "",
        f"# {method} (ppl-vae)",
        "",
        f"A `{method}` variational autoencoder written as a Pyro program (model and guide) with "
        f"ppl-vae {info['versions']['ppl_vae']} (torch {info['versions']['torch']}, pyro {info['versions']['pyro']})"
        + (f": latent_dim {cfg['latent_dim']}, arch {cfg['arch']}, likelihood {cfg['likelihood']}." if cfg else "."),
        "",
        "## Data",
        "",
        *data,
        "",
        "## Metrics",
        "",
        *table,
        "",
        "## Use",
        "",
        "```python",
        "import ppl_vae",
        "",
        "folder = 'path/to/this/folder'  # or huggingface_hub.snapshot_download(repo_id)",
        how,
        "```",
        "",
        f"`{WEIGHTS_FILE}` holds the weights, `{CONFIG_JSON}` the configuration. Loading reads only these two "
        "(safetensors and JSON): it unpickles nothing and runs no code from the folder.",
        "",
    ]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)


# -- what load reads ---------------------------------------------------------------------------------------------


def _read_info(folder: Path) -> dict:
    path = folder / CONFIG_JSON
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a saved ppl-vae model: it has no {CONFIG_JSON}")
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("library") != "ppl-vae":
        raise CheckpointError(f'{str(path)!r} was not written by ppl_vae.save (no "library": "ppl-vae")')
    if not isinstance(info.get("format_version"), int) or info["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has format_version {info.get('format_version')!r}; this ppl-vae reads up to "
            f"{FORMAT_VERSION}: upgrade ppl-vae (it was saved by {info.get('versions', {}).get('ppl_vae')})"
        )
    return info


def _rebuild(info: dict, folder: Path) -> torch.nn.Module:
    """The model ``config.json`` describes, built by the registered method (never code from the folder)."""
    method = info.get("method")
    if not method:
        raise CheckpointError(
            f"{str(folder)!r} holds the weights of a {info.get('model_class')} that build_model did not build, so "
            "it cannot be rebuilt from the folder: build the model yourself and pass it, "
            "ppl_vae.load(folder, model=my_model)"
        )
    try:
        resolve_name(method)
    except ConfigError:
        raise CheckpointError(
            f"{str(folder)!r} holds a model of the method {method!r}, which is not registered in this process "
            f"(registered: {', '.join(model_names())}). Import the module that registers it "
            "(@ppl_vae.register_model) first, or pass model= an instance to load the weights into; loading never "
            "imports code named by the folder"
        ) from None
    try:
        cfg = config_from_dict({"model": info.get("model_config") or {}}).model
    except ConfigError as e:
        raise CheckpointError(
            f"{str(folder / CONFIG_JSON)!r}: its model_config does not fit this ppl-vae ({e}); it was saved by "
            f"ppl-vae {info.get('versions', {}).get('ppl_vae')}"
        ) from None
    with torch.random.fork_rng(devices=[]):  # the initial weights are replaced: leave the caller's RNG alone
        return build_model(
            cfg,
            _shape_from_json(info.get("data_shape")),
            num_data=info.get("num_data"),
            num_classes=info.get("num_classes"),
        )


def _check_fit(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """One :class:`CheckpointError` naming every tensor whose name or shape differs from the model's."""
    own = model.state_dict()
    shapes = [
        f"{k!r} has shape {tuple(v.shape)} in the folder, {tuple(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if not (shapes or missing or unexpected):
        return
    parts = []
    if shapes:
        parts.append(
            "parameter " + "; ".join(shapes[:4]) + (f" (and {len(shapes) - 4} more)" if len(shapes) > 4 else "")
        )
    if missing:
        parts.append(f"the model's {_few(missing)} are not in the folder")
    if unexpected:
        parts.append(f"the folder's {_few(unexpected)} are not in the model")
    raise CheckpointError(
        f"the weights in {str(folder)!r} do not fit the model: {'; '.join(parts)}. Was it built with another "
        "configuration?"
    )


def _few(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
