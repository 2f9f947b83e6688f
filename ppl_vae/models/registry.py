"""Methods by name: a method's file registers its builder with ``@register_model("name", options=Options)`` and
the configuration's ``model.name`` picks it.

A builder takes ``(cfg: ModelConfig, options, data_shape, num_data, num_classes)`` and returns the model, a
``PyroModule`` with ``model(x, y=None)`` and ``guide(x, y=None)`` (``data_shape`` is a tuple, or for multimodal
data its :class:`~ppl_vae.data.multimodal.Layout`, and y the modalities' mask); ``options`` is the method's options
dataclass
(:class:`ppl_vae.config.options.Options`), already validated from ``cfg.options``. Old names stay loadable as
``aliases`` (a ``DeprecationWarning`` names the new one).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config.options import NoOptions, Options
from ..errors import ConfigError, PplVaeError, ProgramError, did_you_mean

__all__ = [
    "register_model",
    "model_names",
    "get_method",
    "Method",
    "resolve_name",
    "import_methods",
    "describe_imports",
    "BuildRecipe",
    "RECIPE_ATTR",
    "recipe_of",
]


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable
    options: type[Options]
    multimodal: bool = False  # its builder takes a multimodal Layout as data_shape


@dataclass(frozen=True)
class BuildRecipe:
    """What :func:`~ppl_vae.models.build_model` built a model from, kept on the model as ``ppl_vae_recipe``: the
    method's registered name, its :class:`~ppl_vae.config.sections.ModelConfig` (a copy), the data shape (a tuple,
    or a multimodal :class:`~ppl_vae.data.multimodal.Layout`), ``num_data`` and ``num_classes``. Enough to build
    the same model again (:func:`ppl_vae.load`)."""

    method: str
    config: object  # a ModelConfig (config.sections imports the data layer: kept untyped here)
    data_shape: tuple | object
    num_data: int | None
    num_classes: int | None


RECIPE_ATTR = "ppl_vae_recipe"


def recipe_of(model) -> BuildRecipe | None:
    """The :class:`BuildRecipe` a model was built from, or ``None`` (a model that ``build_model`` did not build)."""
    recipe = getattr(model, RECIPE_ATTR, None)
    return recipe if isinstance(recipe, BuildRecipe) else None


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register_model(
    name: str, options: type[Options] = NoOptions, aliases: tuple[str, ...] = (), multimodal: bool = False
):
    """Register ``fn`` as the builder of method ``name`` (see the module docstring); ``multimodal=True``: it models
    multimodal data (its builder receives their :class:`~ppl_vae.data.multimodal.Layout`), else one array per
    datapoint (a shape tuple)."""
    if not (isinstance(options, type) and issubclass(options, Options)):
        raise TypeError(f"register_model({name!r}): options must be an Options dataclass, got {options!r}")

    def deco(fn: Callable) -> Callable:
        try:
            inspect.signature(fn).bind(*range(5))
        except TypeError:
            raise ProgramError(
                f"register_model({name!r}): the builder {getattr(fn, '__qualname__', fn)!r} must take "
                f"(cfg, options, data_shape, num_data, num_classes), got {inspect.signature(fn)}"
            ) from None
        except ValueError:  # a builtin without a signature: called as it is
            pass
        for key in (name, *aliases):
            taken = _METHODS.get(key) or (_METHODS.get(_ALIASES[key]) if key in _ALIASES else None)
            if taken is not None and taken.build is not fn and not _redefinition(taken.build, fn):
                raise ValueError(f"a model named {key!r} is registered already")
        _METHODS[name] = Method(name, fn, options, multimodal)
        for old in aliases:
            _ALIASES[old] = name
        return fn

    return deco


def _redefinition(old: Callable, new: Callable) -> bool:
    """The same builder defined again — a notebook cell run twice, or a run folder's copy of a method file
    (imports/) loaded in the process that imported the original: it replaces the old one."""
    code_old, code_new = getattr(old, "__code__", None), getattr(new, "__code__", None)
    return (
        code_old is not None
        and code_new is not None
        and old.__qualname__ == new.__qualname__
        and Path(code_old.co_filename).name == Path(code_new.co_filename).name
    )


def model_names() -> list[str]:
    """The registered method names (without deprecated aliases)."""
    return sorted(_METHODS)


def resolve_name(name: str) -> str:
    """The current name of a method (an alias gives a DeprecationWarning and its new name)."""
    if name in _ALIASES:
        new = _ALIASES[name]
        warnings.warn(f"model.name={name!r} is deprecated; it is now called {new!r}", DeprecationWarning, stacklevel=3)
        return new
    if name not in _METHODS:
        raise ConfigError(f"model.name must be one of {model_names()}, got {name!r}{did_you_mean(name, model_names())}")
    return name


def get_method(name: str) -> Method:
    """The registered method ``name`` (its builder and options dataclass); an old name resolves with a
    DeprecationWarning, an unknown one raises :class:`~ppl_vae.errors.ConfigError` listing the known ones."""
    return _METHODS[resolve_name(name)]


def describe_imports(names) -> list[str]:
    """What :func:`import_methods` will run: each file's absolute path, each module by name."""
    return [f"the file {Path(n).expanduser().resolve()}" if _is_file(n) else f"the module {n}" for n in names]


def import_methods(names) -> None:
    """Import modules (``my_package.my_methods``) or files (``path/to/methods.py``) so that the methods they
    define register themselves — what a configuration's top-level ``imports:`` list does before the model is
    built. A file is imported once per process under a name derived from its absolute path."""
    for name in names:
        imported_module(name)


def _is_file(name: str) -> bool:
    return name.endswith(".py") or "/" in name


def imported_module(name: str):
    """The module of one ``imports:`` entry (a module name or a ``.py`` file), imported on first use."""
    if not _is_file(name):
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"imports: could not import {name!r} ({e})") from None
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"imports: {name!r} is not a Python file")
    module = "ppl_vae_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if module in sys.modules:
        return sys.modules[module]
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the user's file failed: name it, where and why (--debug shows the traceback)
        del sys.modules[module]
        raise ConfigError(f"imports: {str(path)!r} {_failure(e, path)}") from e
    except BaseException:
        del sys.modules[module]
        raise
    return mod


def _failure(e: Exception, path: Path) -> str:
    """``failed at line 3: SyntaxError: invalid syntax`` — the last line of ``path`` in the error's traceback."""
    line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else None
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename) == path:
            line = frame.lineno
    where = f" at line {line}" if line else ""
    text = e.msg if isinstance(e, SyntaxError) else str(e)
    return f"failed{where}: {text if isinstance(e, PplVaeError) else f'{type(e).__name__}: {text}'}"


def data_function(name: str, imports: list[str]):
    """The function ``module:function`` names (``data.name``), from a module or file listed under ``imports:``
    (a file by its stem): code runs only from what the configuration lists."""
    module, _, fn = name.partition(":")
    listed = [n for n in imports if (Path(n).stem if _is_file(n) else n) == module]
    if not listed:
        raise ConfigError(
            f"data.name = {name!r} names the module {module!r}, which is not listed under imports: "
            f"({imports or 'nothing is'}): add the module or its .py file there"
        )
    found = getattr(imported_module(listed[0]), fn, None)
    if not callable(found):
        raise ConfigError(f"data.name = {name!r}: {listed[0]!r} has no function {fn!r}")
    return found
