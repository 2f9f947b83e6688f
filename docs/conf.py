"""Sphinx configuration of the ppl-vae documentation site.

Build (warnings are errors):  python -m sphinx -W -b html docs docs/_build/html

The tutorials are the notebooks of ``notebooks/`` (through the link ``docs/tutorials/notebooks``), executed at build
time in their quick mode (``PPL_VAE_SMOKE=1``) and cached by myst-nb in ``docs/_build/.jupyter_cache``; set
``PPL_VAE_DOCS_EXECUTE=off`` to render them without executing (a fast build while writing prose). The pages of the
methods, the configuration reference and the benchmark verdicts are generated from the code and from
``bench/results/`` by the extension in ``docs/_ext/ppl_vae_docs.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the package of this checkout, installed or not
sys.path.insert(0, str(DOCS / "_ext"))

# the notebooks read these when myst-nb executes them: the quick settings, a figure backend without a display
os.environ.setdefault("PPL_VAE_SMOKE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import ppl_vae  # noqa: E402

project = "ppl-vae"
author = "the ppl-vae developers"
copyright = "the ppl-vae developers"  # noqa: A001
release = version = ppl_vae.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_copybutton",
    "ppl_vae_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "browser_check.py"]

# -- MyST and the notebooks ----------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "attrs_inline"]
myst_heading_anchors = 3
nb_execution_mode = "off" if os.environ.get("PPL_VAE_DOCS_EXECUTE") == "off" else "cache"
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_execution_timeout = 600  # one cell; the quick mode of the slowest notebook takes well under a minute per cell
nb_execution_in_temp = True  # runs/ and figures land in a temporary folder, not in the source tree
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True
nb_output_stderr = "remove"  # progress-bar and kernel noise; tests/test_notebooks.py fails on real errors

# -- API reference ---------------------------------------------------------------------------------------------
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_class_signature = "separated"
autosummary_generate = False  # the reference pages list every name themselves (tests/test_docs.py checks them)
napoleon_google_docstring = True
napoleon_numpy_docstring = False
add_module_names = False
python_display_short_literal_types = True
smartquotes = False  # keep "--resume" and quotes in option texts as they are typed
# no internet on the CI machines: no intersphinx; cross-references outside the package stay plain text
nitpicky = False

# -- HTML ----------------------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"ppl-vae {release}"
html_static_path = ["_static"]
html_css_files = ["ppl_vae.css"]
html_theme_options = {
    "source_repository": "https://github.com/ppl-vae/ppl-vae",
    "source_branch": "main",
    "source_directory": "docs/",
}
html_show_sourcelink = False
copybutton_prompt_text = r"\$ |>>> "
copybutton_prompt_is_regexp = True
suppress_warnings = ["mystnb.unknown_mime_type"]
