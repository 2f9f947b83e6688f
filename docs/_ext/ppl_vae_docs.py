"""Sphinx extension of the ppl-vae site: the pages that are generated from the code and from the committed
benchmark results at build time, so that they cannot drift from either.

Directives (used in the MyST pages of ``docs/``):

``{config-reference} [section ...]``
    One table per configuration section (``data``, ``model``, ``train``, ``eval`` and the top level): every field
    with its type, default, allowed values and ``doc=`` text, read from the dataclasses of
    :mod:`ppl_vae.config.sections`.
``{method-options} NAME``
    The same table for the ``model.options`` of the registered method ``NAME`` (its options dataclass).
``{method-configs} NAME``
    The shipped configs (``ppl_vae/configs/*.yaml``) whose ``model.name`` is ``NAME``, each with its YAML.
``{bench-verdict}`` with ``:match: REGEX``
    The rows of the summary table of ``bench/README.md`` (method, claim, verdict, study, date) whose first cell
    matches ``REGEX``; fails when none does.
``{bench-numbers} STUDY``
    A table of numbers read from ``bench/results/STUDY.json``; one line of content per row,
    ``label = path [± path] [; format]``, a path being the keys joined by ``/`` (a key that itself contains ``/``
    or ``.`` is matched whole). Fails on a missing file or key. The caption names the file, the command and the
    date of the result (its ``environment`` record, where it has one).
``{bench-figure} PATH``
    A figure whose path is relative to the repository root (``bench/results/x.png``); Sphinx copies it into the
    build (``_images/``). Fails when the file is missing or empty.
``{method-docstring} MODULE``
    The docstring of a method's file (the model in equations, in plain text), line breaks kept.
``{cli-help}``
    The ``--help`` of ``ppl-vae`` and of every subcommand, printed by the parser of :mod:`ppl_vae.cli`.

What the directives read (rows of the tables, the summary of bench/README.md, keys of the result files) is computed
in ``ppl_vae_docs_data.py``, without Sphinx, so that ``tests/test_docs.py`` checks the same things.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from ppl_vae_docs_data import (
    BENCH,
    RESULTS,
    ROOT,
    SECTIONS,
    FieldDoc,
    _result,
    config_fields,
    option_fields,
    resolve,
    shipped_configs_of,
    summary_rows,
)
from sphinx.directives.patches import Figure
from sphinx.util.docutils import SphinxDirective

# ---------------------------------------------------------------------------------------------------------------
# what the tables show: one row per dataclass field


def _text_cell(text: str, literal: bool = False) -> nodes.entry:
    entry = nodes.entry()
    para = nodes.paragraph()
    if text:
        para += nodes.literal(text, text) if literal else nodes.Text(text)
    entry += para
    return entry


def field_table(rows: list[FieldDoc], prefix: str, ids: str) -> nodes.table:
    table = nodes.table(classes=["ppl-vae-fields"])
    group = nodes.tgroup(cols=4)
    table += group
    for width in (22, 18, 26, 34):
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    row = nodes.row()
    for title in ("field", "default", "allowed values (type)", "what it does"):
        row += _text_cell(title)
    head += row
    group += head
    body = nodes.tbody()
    for r in rows:
        row = nodes.row()
        name = f"{prefix}.{r.name}" if prefix else r.name
        first = _text_cell(name, literal=True)
        first["ids"].append(nodes.make_id(f"{ids}-{r.name}"))
        row += first
        row += _text_cell(r.default, literal=True)
        row += _text_cell(f"{r.allowed} ({r.type})" if r.allowed else r.type)
        row += _text_cell(r.doc)
        body += row
    group += body
    return table


class ConfigReference(SphinxDirective):
    optional_arguments = 5
    has_content = False

    def run(self):
        wanted = self.arguments or ["", *SECTIONS]
        found = config_fields()
        out = []
        for name in wanted:
            key = "" if name in ("", "top") else name
            if key not in found:
                raise self.error(f"config-reference: no section {name!r}; sections: {sorted(found)}")
            out.append(field_table(found[key], key, f"config-{key or 'top'}"))
        return out


class MethodOptions(SphinxDirective):
    required_arguments = 1

    def run(self):
        name = self.arguments[0]
        options = option_fields()
        if name not in options:
            raise self.error(f"method-options: no registered method {name!r}; methods: {sorted(options)}")
        rows = options[name]
        if not rows:
            para = nodes.paragraph()
            para += nodes.Text("This method has no options of its own: ")
            para += nodes.literal("model.options", "model.options")
            para += nodes.Text(" stays empty.")
            return [para]
        return [field_table(rows, "model.options", f"options-{name}")]


class MethodConfigs(SphinxDirective):
    required_arguments = 1

    def run(self):
        method = self.arguments[0]
        found = shipped_configs_of(method)
        if not found:
            raise self.error(f"method-configs: no shipped config has model.name = {method!r}")
        out = []
        for name, path in found.items():
            self.env.note_dependency(str(path))
            para = nodes.paragraph()
            cmd = f"ppl-vae train {name}"
            para += nodes.literal(cmd, cmd)
            para += nodes.Text(f" (the file ppl_vae/configs/{name}.yaml):")
            out.append(para)
            text = path.read_text()
            block = nodes.literal_block(text, text, language="yaml")
            out.append(block)
        return out


# ---------------------------------------------------------------------------------------------------------------
# the benchmark results


class BenchVerdict(SphinxDirective):
    option_spec = {"match": directives.unchanged_required}

    def run(self):
        self.env.note_dependency(str(BENCH / "README.md"))
        header, *rows = summary_rows()
        pattern = re.compile(self.options["match"])
        chosen = [r for r in rows if pattern.search(r[0])]
        if not chosen:
            raise self.error(f"bench-verdict: no row of bench/README.md's summary matches {pattern.pattern!r}")
        md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in chosen]
        container = nodes.container(classes=["ppl-vae-verdict"])
        self.state.nested_parse(StringList(md, source="bench/README.md"), self.content_offset, container)
        return [container]


def _fmt(value, fmt: str | None) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and fmt:
        return format(value, fmt)
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        digits = max(0, 3 - int(math.floor(math.log10(abs(value)))))
        return f"{value:.{min(digits, 4)}f}"
    return str(value)


class BenchNumbers(SphinxDirective):
    required_arguments = 1
    has_content = True
    option_spec = {"caption": directives.unchanged}

    def run(self):
        study = self.arguments[0]
        path = RESULTS / f"{study}.json"
        try:
            data = _result(study)
        except FileNotFoundError:
            raise self.error(f"bench-numbers: no result file {path.relative_to(ROOT)}") from None
        self.env.note_dependency(str(path))
        table = nodes.table(classes=["ppl-vae-bench"])
        group = nodes.tgroup(cols=2)
        table += group
        group += nodes.colspec(colwidth=70)
        group += nodes.colspec(colwidth=30)
        head = nodes.thead()
        row = nodes.row()
        row += _text_cell("measured")
        row += _text_cell("value")
        head += row
        group += head
        body = nodes.tbody()
        for line in self.content:
            if not line.strip():
                continue
            label, sep, spec = line.rpartition(" = ")
            if not sep:
                raise self.error(f"bench-numbers: a row must read 'label = path [± path] [; format]', got {line!r}")
            spec, _, fmt = spec.partition(";")
            value_path, _, err_path = spec.partition("±")
            try:
                value = _fmt(resolve(data, value_path.strip()), fmt.strip() or None)
                if err_path.strip():
                    value += " ± " + _fmt(resolve(data, err_path.strip()), fmt.strip() or None)
            except (KeyError, IndexError, ValueError) as e:
                raise self.error(f"bench-numbers: bench/results/{study}.json has no key {e}") from None
            row = nodes.row()
            row += _text_cell(label.strip())
            row += _text_cell(value)
            body += row
        group += body
        caption_text = self.options.get("caption") or f"bench/results/{study}.json"
        title = nodes.title(caption_text, caption_text)
        table.insert(0, title)
        out = [table]
        env = data.get("environment") if isinstance(data, dict) else None
        if not isinstance(env, dict) and isinstance(data, dict):  # results written before the shared harness
            env = {k: data[k] for k in ("date", "command") if isinstance(data.get(k), str)}
        para = nodes.paragraph(classes=["ppl-vae-bench-source"])
        para += nodes.Text(f"Read at build time from bench/results/{study}.json")
        if isinstance(env, dict):
            bits = [str(env[k]) for k in ("date", "mode") if env.get(k)]
            if env.get("git_commit"):
                bits.append(
                    f"commit {str(env['git_commit'])[:8]}" + (" with local changes" if env.get("git_dirty") else "")
                )
            if env.get("command"):
                bits.append(str(env["command"]))
            if bits:
                para += nodes.Text(" (" + ", ".join(bits) + ")")
        para += nodes.Text(f"; python bench/{study}.py recomputes it (bench/README.md has the settings).")
        out.append(para)
        return out


class BenchFigure(Figure):
    """A figure whose path is relative to the repository root; Sphinx copies the file into ``_images/``."""

    def run(self):
        rel = self.arguments[0]
        target = ROOT / rel
        if not target.is_file() or target.stat().st_size == 0:
            raise self.error(f"bench-figure: {rel} is missing or empty")
        env = self.state.document.settings.env
        docdir = Path(env.doc2path(env.docname)).parent
        self.arguments[0] = os.path.relpath(target, docdir)
        env.note_dependency(str(target))
        return super().run()


class MethodDocstring(SphinxDirective):
    """The docstring of a module (a method's file), its equations as plain text: line breaks kept."""

    required_arguments = 1

    def run(self):
        import importlib
        import inspect

        name = self.arguments[0]
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise self.error(f"method-docstring: cannot import {name}: {e}") from None
        text = inspect.cleandoc(module.__doc__ or "")
        if not text:
            raise self.error(f"method-docstring: {name} has no docstring")
        text = text.replace("``", "")
        text = re.sub(r":(?:class|func|meth|mod|attr|data|exc):`~?([^`]+)`", r"\1", text)
        self.env.note_dependency(str(Path(module.__file__)))
        caption = nodes.paragraph()
        caption += nodes.Text("From the docstring of ")
        caption += nodes.literal(name, name)
        caption += nodes.Text(f" (ppl_vae/{Path(module.__file__).relative_to(ROOT / 'ppl_vae')}):")
        block = nodes.literal_block(text, text, classes=["ppl-vae-docstring"])
        block["language"] = "text"
        return [caption, block]


class CliHelp(SphinxDirective):
    """The ``--help`` text of ``ppl-vae`` and of each subcommand, from the parser itself."""

    def run(self):
        import argparse

        from ppl_vae import cli

        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "110"
        try:
            parser = cli._parser()
            out = []
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            texts = [("ppl-vae", parser.format_help())]
            for action in subs:
                for name, sub in action.choices.items():
                    texts.append((f"ppl-vae {name}", sub.format_help()))
        finally:
            if old is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = old
        for title, text in texts:
            section = nodes.section(ids=[nodes.make_id(f"cli-{title}")])
            section += nodes.title(title, title)
            section += nodes.literal_block(text, text, language="text")
            out.append(section)
        return out


def setup(app):
    app.add_directive("method-docstring", MethodDocstring)
    app.add_directive("cli-help", CliHelp)
    app.add_directive("config-reference", ConfigReference)
    app.add_directive("method-options", MethodOptions)
    app.add_directive("method-configs", MethodConfigs)
    app.add_directive("bench-verdict", BenchVerdict)
    app.add_directive("bench-numbers", BenchNumbers)
    app.add_directive("bench-figure", BenchFigure)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
