"""The rules of ARCHITECTURE.md, checked on the source: layers, no cycles, one name per module, sizes."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ppl_vae"

# bottom to top, as ARCHITECTURE.md draws them; a module imports only from its own layer or the ones below
LAYERS = [
    {"errors"},
    {"nn", "viz", "data"},
    {"config", "distributions"},
    {"guides"},
    {"infer"},
    {"training"},
    {"models"},
    {"evaluate"},
    {"experiment", "sharing", "compare"},
    {"cli", "__init__", "__main__", "_deprecated"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
MAX_MODULE_LINES = 500
MAX_TRAINING_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG).with_suffix("").parts
        name = ".".join(("ppl_vae", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("ppl_vae", *parts))
        out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every ppl_vae module ``name`` imports, at the top or inside a function."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("ppl_vae"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ppl_vae"))
    return out


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = _modules()
# a module's own parent packages are imported before it anyway: they are not edges of the graph
GRAPH = {
    m: {t for t in _imports(m, p) if t in MODULES and t != m and not m.startswith(t + ".")} for m, p in MODULES.items()
}


def test_every_import_goes_to_the_same_layer_or_below():
    bad = []
    for m, targets in GRAPH.items():
        for t in targets:
            if _group(t) == _group(m):
                continue
            if LEVEL[_group(t)] > LEVEL[_group(m)]:
                bad.append(f"{m} imports {t} (layer {_group(t)} is above {_group(m)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_not_even_through_function_level_imports():
    graph = {m: set(ts) for m, ts in GRAPH.items() if not m.endswith("_deprecated")}
    for targets in graph.values():  # a package's __init__ re-exports its modules: it is not their dependency
        targets.difference_update({t for t in targets if t.endswith("_deprecated")})
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t) :] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_two_modules_share_a_name():
    names = defaultdict(list)
    for m, p in MODULES.items():
        if p.name != "__init__.py":
            names[p.stem].append(m)
    assert not {k: v for k, v in names.items() if len(v) > 1}


def test_only_entry_points_at_the_top():
    top = {p.name for p in PKG.glob("*.py")}
    assert top == {
        "__init__.py",
        "__main__.py",
        "cli.py",
        "experiment.py",
        "sharing.py",
        "errors.py",
        "_deprecated.py",
    }
    assert (PKG / "compare" / "__init__.py").is_file()  # compare is a package: its core and its sweeps


def test_modules_are_short_or_say_why():
    long = [
        f"{p.relative_to(PKG)}: {n} lines"
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
        and "why this module is long:" not in p.read_text().lower()
    ]
    assert not long, long


def test_functions_of_the_training_package_read_in_one_sitting():
    long = []
    for path in (PKG / "training").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_TRAINING_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name}: {n} lines")
    assert not long, long


@pytest.mark.parametrize(
    "old", ["ppl_vae.nets", "ppl_vae.priors", "ppl_vae.infer.train", "ppl_vae.images", "ppl_vae.experts"]
)
def test_old_module_paths_still_import_with_a_deprecation_warning(old):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to ppl_vae\."):
        module = importlib.import_module(old)
    from ppl_vae._deprecated import MOVED

    homes = [importlib.import_module(h) for h in MOVED[old]]
    for new in homes:
        for k in (k for k in vars(new) if not k.startswith("_")):
            first = next(h for h in homes if k in vars(h))  # where two homes define a name, the first one's
            assert getattr(module, k) is vars(first)[k], (old, k)


def test_the_old_training_names_of_ppl_vae_infer_still_work_with_a_warning():
    import ppl_vae.infer
    import ppl_vae.training

    with pytest.warns(DeprecationWarning, match=r"ppl_vae.infer.TrainingPlan moved to ppl_vae.training"):
        assert ppl_vae.infer.TrainingPlan is ppl_vae.training.TrainingPlan
