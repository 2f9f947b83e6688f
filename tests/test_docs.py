"""The documentation site (docs/): every public name has a docstring and is in the API reference, every configuration
field and method option has its documentation, every registered method and every notebook has its page, and every
number, verdict and figure a method page reads from bench/ exists. The full build (-W) and the link check are
marked slow."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import ppl_vae
from ppl_vae.models.registry import get_method

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import ppl_vae_docs_data as docs_data  # noqa: E402  (docs/_ext: what the pages read, without Sphinx)

UNDOCUMENTED_MODULES = {"cli"}  # the command line: reference/cli.md prints its parser's help


def public_modules() -> list[str]:
    """ppl_vae, its subpackages and its public top-level modules (not the CLI, not the private ones)."""
    names = ["ppl_vae"]
    for m in pkgutil.iter_modules(ppl_vae.__path__):
        if not m.name.startswith("_") and m.name not in UNDOCUMENTED_MODULES:
            names.append(f"ppl_vae.{m.name}")
    return names


def public_names(module: str) -> list[str]:
    mod = importlib.import_module(module)
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    # a module without __all__ (ppl_vae.errors): the exception types it defines
    return [n for n, o in vars(mod).items() if inspect.isclass(o) and o.__module__ == module and not n.startswith("_")]


def _own_doc(obj) -> str:
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return ""  # the signature dataclasses write when a class has no docstring
        return doc
    return getattr(obj, "__doc__", None) or ""


def _is_constant(obj) -> bool:
    return isinstance(obj, (str, int, float, bool, tuple, frozenset, types.NoneType))


def api_page(module: str) -> Path:
    return DOCS / "api" / f"{'ppl_vae' if module == 'ppl_vae' else module.split('.')[-1]}.rst"


def test_every_public_name_has_a_docstring():
    missing = []
    for module in public_modules():
        mod = importlib.import_module(module)
        for name in public_names(module):
            obj = getattr(mod, name)
            if not _is_constant(obj) and not _own_doc(obj).strip():
                missing.append(f"{module}.{name}")
    assert not missing, f"public names without a docstring: {missing}"


def test_every_public_name_is_in_the_api_reference():
    index = (DOCS / "api" / "index.md").read_text()
    missing = []
    for module in public_modules():
        page = api_page(module)
        assert page.is_file(), f"{module} has no reference page {page.relative_to(ROOT)}"
        assert page.stem in index.split("```{toctree}")[1], f"{page.name} is not in docs/api/index.md's toctree"
        text = page.read_text()
        documented = set(re.findall(r"^\.\. auto(?:function|class|data|exception)::\s+(\w+)", text, re.M))
        aliased = set(re.findall(rf"^- ``{re.escape(module)}\.(\w+)``: :\w+:`[\w.]+`", text, re.M))
        for name in public_names(module):
            if name not in documented and name not in aliased:
                missing.append(f"{module}.{name} ({page.relative_to(ROOT)})")
    assert not missing, f"public names missing from the API reference: {missing}"


def test_the_reference_links_each_alias_to_where_it_is_documented():
    """A name two modules export is documented once; the other page's link names that place."""
    documented = set()
    for module in public_modules():
        text = api_page(module).read_text()
        names = re.findall(r"^\.\. auto(?:function|class|data|exception)::\s+(\w+)", text, re.M)
        documented |= {f"{module}.{n}" for n in names}
    for module in public_modules():
        for target in re.findall(r"^- ``[\w.]+``: :\w+:`([\w.]+)`", api_page(module).read_text(), re.M):
            assert target in documented, f"{api_page(module).name} links {target}, which no reference page documents"


def test_every_configuration_field_is_documented():
    rows = docs_data.config_fields()
    assert set(rows) == {"", "data", "model", "train", "eval"}
    missing = [f"{s + '.' if s else ''}{r.name}" for s, section in rows.items() for r in section if not r.doc.strip()]
    assert not missing, f"configuration fields without doc= text (ppl_vae/config/sections.py): {missing}"
    assert all(r.allowed for section in rows.values() for r in section), "a field without its allowed values"


def test_every_method_option_is_documented():
    options = docs_data.option_fields()
    assert set(options) == set(ppl_vae.model_names())
    missing = [f"{m}: model.options.{r.name}" for m, rows in options.items() for r in rows if not r.doc.strip()]
    assert not missing, f"method options without doc= text (the method's options dataclass): {missing}"


def _package_methods() -> list[str]:
    """The methods of the package (tests register methods of their own, which have no page)."""
    return [n for n in ppl_vae.model_names() if get_method(n).build.__module__.startswith("ppl_vae.")]


def test_the_configuration_reference_shows_every_section_and_method():
    text = (DOCS / "reference" / "configuration.md").read_text()
    for section in ("top", "data", "model", "train", "eval"):
        assert f"```{{config-reference}} {section}" in text
    for name in _package_methods():
        assert f"```{{method-options}} {name}\n" in text, f"{name}'s options are not in the configuration reference"


def _directives(text: str, name: str) -> list[tuple[str, dict, list[str]]]:
    """(argument, options, content lines) of every ```{name} block of a MyST page."""
    out = []
    for m in re.finditer(rf"^```\{{{name}\}}[ ]?([^\n]*)\n(.*?)^```", text, re.M | re.S):
        arg, body = m.group(1).strip(), m.group(2).splitlines()
        opts = dict(re.match(r":(\S+):\s*(.*)", line).groups() for line in body if re.match(r":\S+:", line))
        content = [line for line in body if line.strip() and not re.match(r":\S+:", line)]
        out.append((arg, opts, content))
    return out


def test_every_method_has_its_page():
    index = (DOCS / "methods" / "index.md").read_text()
    for name in _package_methods():
        page = DOCS / "methods" / f"{name}.md"
        assert page.is_file(), f"method {name!r} has no page docs/methods/{name}.md"
        text = page.read_text()
        assert f"\n{name}\n" in index, f"docs/methods/{name}.md is not in docs/methods/index.md's toctree"
        assert f"```{{method-options}} {name}\n" in text and f"```{{method-configs}} {name}\n" in text
        assert _directives(text, "method-docstring"), f"{name}'s page does not show its model's equations"
        assert docs_data.shipped_configs_of(name), f"no shipped config has model.name = {name!r}"
        assert _directives(text, "bench-verdict") or _directives(text, "bench-numbers") or "No benchmark" in text
        assert f"`{name}`" in (DOCS / "index.md").read_text(), f"{name} is missing from the landing page's table"


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts and "notebooks" not in p.parts)


def test_what_the_pages_read_from_bench_exists():
    """Every verdict row, number and figure a page names is in bench/README.md and bench/results/ — what the
    build would fail on, checked without building."""
    rows = docs_data.summary_rows()[1:]
    checked = 0
    for page in _pages():
        text = page.read_text()
        where = page.relative_to(ROOT)
        for _, opts, _ in _directives(text, "bench-verdict"):
            assert any(re.search(opts["match"], r[0]) for r in rows), f"{where}: no summary row matches {opts}"
            checked += 1
        for study, _, lines in _directives(text, "bench-numbers"):
            data = docs_data._result(study)
            for line in lines:
                _, sep, spec = line.rpartition(" = ")
                assert sep, f"{where}: {line!r} is not 'label = path'"
                for path in spec.partition(";")[0].split("±"):
                    try:
                        docs_data.resolve(data, path.strip())
                    except KeyError as e:
                        raise AssertionError(f"{where}: bench/results/{study}.json has no {e}") from None
                    checked += 1
        for fig, _, _ in _directives(text, "bench-figure"):
            assert (ROOT / fig).is_file() and (ROOT / fig).stat().st_size > 0, f"{where}: {fig} is missing"
    assert checked > 100  # the method pages read well over a hundred numbers


def test_resolve_reads_keys_that_hold_slashes_and_dots():
    data = {"fid": {"16d/global": {"prior": 1.5}}, "khat": {"fraction_above_0.7": 0.3}, "xs": [{"a": 2}]}
    assert docs_data.resolve(data, "fid/16d/global/prior") == 1.5
    assert docs_data.resolve(data, "khat/fraction_above_0.7") == 0.3
    assert docs_data.resolve(data, "xs/0/a") == 2
    with pytest.raises(KeyError, match="nothing matches '16d/local/prior' under 'fid'"):
        docs_data.resolve(data, "fid/16d/local/prior")


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_is_a_tutorial_page_with_what_it_teaches(path):
    index = (DOCS / "tutorials" / "index.md").read_text()
    assert (DOCS / "tutorials" / "notebooks").resolve() == (ROOT / "notebooks").resolve()
    assert f"notebooks/{path.stem}\n" in index, f"{path.name} is not in docs/tutorials/index.md's toctree"
    first = json.loads(path.read_text())["cells"][0]
    text = "".join(first["source"])
    assert first["cell_type"] == "markdown" and "What you will learn" in text, f"{path.name}: no 'What you will learn'"
    assert "API" in text and re.search(r"\]\(#ppl_vae\.", text), f"{path.name}: no link to the API it uses"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_site_builds_without_warnings_and_its_links_resolve(tmp_path):
    """python -m sphinx -W -b html docs <out> (the notebooks executed in their quick mode), then every internal
    link of the built site resolves; with Debian's chromium present, the three pages render (screenshots kept in
    the temporary folder)."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    out = tmp_path / "html"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees")]
    cmd += ["-D", f"nb_execution_cache_path={tmp_path / 'jupyter_cache'}", str(DOCS), str(out)]
    build = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1700, check=False)
    assert build.returncode == 0, build.stderr[-4000:]
    for page in ["index.html", "methods/ladder.html", "reference/configuration.html", "api/ppl_vae.html"]:
        assert (out / page).is_file()
    assert "confirmed" in (out / "methods" / "ladder.html").read_text()  # the verdict read from bench/README.md
    check = [sys.executable, str(DOCS / "browser_check.py"), "--html", str(out), "--screenshots", str(tmp_path)]
    if shutil.which("chromium") is None:
        check.append("--links-only")
    result = subprocess.run(check, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
