"""Every notebook in notebooks/ runs top to bottom with tiny settings (PPL_VAE_SMOKE=1)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("PPL_VAE_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def _run(nb, tmp_path):
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


def test_notebook_01_survives_the_edit_it_invites_an_8d_latent(monkeypatch, tmp_path):
    """ "Edit the model and re-run": with latent_dim=8 its figure cell draws a t-SNE instead of the 2-D manifold."""
    monkeypatch.setenv("PPL_VAE_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    path = next(p for p in NOTEBOOKS if p.name.startswith("01_"))
    nb = nbformat.read(path, as_version=4)
    edited = [c for c in nb.cells if "def __init__(self, data_shape, latent_dim=2," in c.source]
    assert len(edited) == 1, "notebook 01 no longer defines MyVAE(data_shape, latent_dim=2, ...)"
    edited[0].source = edited[0].source.replace("latent_dim=2,", "latent_dim=8,")
    assert not _run(nb, tmp_path)
    figure_cell = next(c for c in nb.cells if c.cell_type == "code" and "plot_latent_space" in c.source)
    images = [o for o in figure_cell.outputs if o.output_type == "display_data" and "image/png" in o["data"]]
    assert len(images) == 3  # reconstructions, the t-SNE of the 8-D means (no manifold), the training curve


def test_every_notebook_says_how_to_run_it_in_a_fresh_environment():
    import tomllib

    pyproject = tomllib.loads((NOTEBOOKS[0].parents[1] / "pyproject.toml").read_text())
    repo = pyproject["project"]["urls"]["Source"]  # https://github.com/OWNER/NAME
    for path in NOTEBOOKS:
        first = nbformat.read(path, as_version=4).cells[0]
        assert first.cell_type == "markdown" and "Open in Colab" in first.source, path.name
        assert f'%pip install "ppl-vae @ git+{repo}"' in first.source, path.name
        colab = repo.replace("https://github.com/", "https://colab.research.google.com/github/")
        assert f"{colab}/blob/main/notebooks/{path.name}" in first.source, path.name
