"""What a user sees in the figures (issue 34, item 7), read from the matplotlib Figure each file was saved from:
sample grids say what they show, legends name classes, the k̂ plot has its labels and legend, worst_khat.png its
k̂ values, gaps.png its error bars, cross_generation.png its title and modality names, training curves whole
epochs; and the files of a run have the mode the umask gives (not mkstemp's 0600)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from matplotlib.figure import Figure

from ppl_vae import ModelConfig, load_data, make_multimodal, viz
from ppl_vae.config import load_config
from ppl_vae.evaluate import azcompat
from ppl_vae.experiment import diagnose_run, gaps_run, run_experiment
from ppl_vae.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "viz"))
from test_viz import FakeVAE  # noqa: E402  (the duck-typed fake model of the viz tests)

FAST = ["train.epochs=2", "model.hidden=[32]"]


@pytest.fixture
def drawn(monkeypatch):
    """{file name: the Figure saved to it}, for every Figure.savefig of the test (the real savefig still runs)."""
    figures: dict[str, Figure] = {}
    save = Figure.savefig

    def spy(self, fname, *args, **kwargs):
        figures[Path(fname).name] = self
        return save(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return figures


def _texts(fig: Figure) -> str:
    """Every title, suptitle, axis label, tick label and legend entry of the figure, joined."""
    out = [fig._suptitle.get_text() if fig._suptitle is not None else ""]
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        if ax.get_legend() is not None:
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    return "\n".join(out)


def _legend(fig: Figure) -> list[str]:
    (ax,) = [a for a in fig.axes if a.get_legend() is not None]
    return [t.get_text() for t in ax.get_legend().get_texts()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained run on the embedded digits (2 epochs), with its figures."""
    folder = tmp_path_factory.mktemp("polish") / "run"
    run_experiment(load_config(None, FAST), folder, progress=False)
    return folder


# ----------------------------------------------------------------------------------------------- sample grids


def test_sample_grids_say_they_show_decoder_means_with_seed_and_checkpoint(tmp_path, drawn):
    torch.manual_seed(0)
    model = FakeVAE()
    viz.plot_prior_samples(model, tmp_path / "a.png", n=10, seed=7)
    title = drawn["a.png"].axes[0].get_title()
    assert "decoder means" in title and "seed 7" in title and "checkpoint" not in title
    with viz.figure_context(checkpoint="best"):
        viz.plot_prior_samples(model, tmp_path / "b.png", n=10, seed=3)
    assert "seed 3" in drawn["b.png"].axes[0].get_title() and "best checkpoint" in drawn["b.png"].axes[0].get_title()
    conditional = FakeVAE(num_classes=3, conditional=True)
    viz.plot_class_conditional(conditional, tmp_path / "c.png", per_class=2)
    assert "decoder means" in drawn["c.png"].axes[0].get_title()


# ------------------------------------------------------------------------------------------------ class names


def test_legends_and_class_rows_show_the_fashion_mnist_names(tmp_path, drawn):
    fashion = load_data("fashion_mnist", limit=200, seed=0)  # Debian's dataset-fashion-mnist (found by itself)
    names = fashion.class_names
    assert names[0] == "T-shirt/top" and names[9] == "Ankle boot"
    torch.manual_seed(0)
    model = FakeVAE(shape=(1, 28, 28))
    x, y = fashion.test_x[:60], fashion.test_y[:60]
    viz.plot_latent_scatter(model, x, y, tmp_path / "s.png", class_names=names)
    assert _legend(drawn["s.png"]) == [names[int(c)] for c in torch.unique(y)]
    with viz.figure_context(class_names=names):  # what a run's figures are drawn inside
        viz.make_figures(FakeVAE(shape=(1, 28, 28), num_classes=10, conditional=True), x, y, [], tmp_path / "run")
    assert _legend(drawn["latent_scatter.png"]) == [names[int(c)] for c in torch.unique(y)]
    rows = [t.get_text() for t in drawn["class_conditional.png"].axes[0].get_yticklabels()]
    assert rows == list(names)
    viz.plot_latent_scatter(model, x, y, tmp_path / "plain.png")  # no names known: the indices
    assert _legend(drawn["plain.png"]) == [str(int(c)) for c in torch.unique(y)]


def test_a_run_on_an_image_folder_names_its_classes_by_folder(tmp_path, drawn):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for k in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / name / f"{k}.png"
            )
    cfg = load_config(
        None,
        ["data.name=image_folder", f"data.root={tmp_path / 'imgs'}", "data.image_size=8", "train.epochs=1"],
    )
    run_experiment(cfg, tmp_path / "run", progress=False)
    assert set(_legend(drawn["latent_scatter.png"])) <= {"cats", "dogs"} and _legend(drawn["latent_scatter.png"])


# --------------------------------------------------------------------------------------------- the run's files


def test_sample_with_its_default_seed_writes_the_training_figure_byte_for_byte(run, drawn, capsys):
    from ppl_vae.cli import main

    assert main(["sample", str(run)]) == 0
    assert f"wrote {run / 'samples.png'}" in capsys.readouterr().out
    assert (run / "samples.png").read_bytes() == (run / "prior_samples.png").read_bytes()
    title = drawn["samples.png"].axes[0].get_title()
    assert "decoder means" in title and "seed 0" in title and "best checkpoint" in title
    assert main(["sample", str(run), "--seed", "1", "--out", str(run / "other.png")]) == 0
    assert (run / "other.png").read_bytes() != (run / "prior_samples.png").read_bytes()


def test_config_and_checkpoints_get_the_mode_of_the_umask_like_the_figures(tmp_path):
    old = os.umask(0o027)  # a mode the default (0644) would not give, so the umask is seen to be applied
    try:
        run_experiment(load_config(None, ["train.epochs=1", "model.hidden=[16]"]), tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir() if p.is_file()}
    for name in ("config.yaml", "checkpoint.pt", "best.pt", "prior_samples.png", "metrics.json"):
        assert modes[name] == 0o640, (name, oct(modes[name]))


def test_training_curves_have_whole_epoch_ticks(tmp_path, drawn):
    history = [{"epoch": 1, "train_elbo": -3.0, "val_elbo": -3.5}, {"epoch": 2, "train_elbo": -2.0}]
    viz.plot_training_curves(history, tmp_path / "c.png")
    ax = drawn["c.png"].axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


# ------------------------------------------------------------------------------------------------ diagnostics


def test_khat_plot_has_an_x_label_and_a_legend_of_its_three_thresholds(tmp_path, drawn):
    azcompat.plot_khat(np.linspace(0.1, 1.2, 12), tmp_path / "khat.png", xlabel="test image")
    fig = drawn["khat.png"]
    (ax,) = [a for a in fig.axes if a.get_legend() is not None]
    assert ax.get_xlabel() == "test image (index)"
    legend = _legend(fig)
    assert len(legend) == 3 and all(str(v) in t for v, t in zip((0.5, 0.7, 1.0), legend, strict=True))


def test_worst_khat_titles_each_image_with_its_khat(run, drawn):
    from ppl_vae.experiment import load_run

    loaded = load_run(run)
    out = diagnose_run(loaded, num_images=12, num_samples=50)
    title = drawn["worst_khat.png"].axes[0].get_title()
    for i, k in zip(out["worst_images"], out["worst_khat"], strict=True):
        assert f"#{i}: $\\hat{{k}}$ = {k:.2f}" in title
    assert "khat.png" in drawn and drawn["khat.png"].axes


def test_gaps_png_says_what_its_error_bars_are(run, drawn):
    from ppl_vae.experiment import load_run

    gaps_run(load_run(run), 4, num_samples=20, steps=3, num_particles=2, elbo_particles=10)
    text = _texts(drawn["gaps.png"])
    assert "± 2 standard errors" in text and "Inference gaps of vae" in text


# ----------------------------------------------------------------------------------------------- multimodal


@pytest.mark.parametrize(
    "kind,columns", [("poly", ["modality 0", "modality 1", "modality 2"]), ("image_label", ["image", "label"])]
)
def test_cross_generation_has_a_title_and_names_the_modalities(tmp_path, drawn, kind, columns):
    data = make_multimodal(load_data("digits", limit=100, seed=0), kind, seed=0)
    pyro.set_rng_seed(0)
    model = build_model(ModelConfig(name="mvae", latent_dim=3, hidden=[16]), data.shape, num_data=len(data.train_x))
    viz.plot_cross_generation(model.eval(), data.test_x[:3], tmp_path / "cross.png", n=3)
    fig = drawn["cross.png"]
    assert fig._suptitle is not None and "Cross-generation" in fig._suptitle.get_text()
    m = len(columns)
    assert [fig.axes[j].get_title() for j in range(m)] == columns  # the top row's column titles
    rows = [fig.axes[r * m].get_ylabel() for r in range(m + 1)]
    assert rows == ["data", *(f"from {c}" for c in columns)]
    assert not any(t.startswith("m") and t[1:].isdigit() for t in _texts(fig).split("\n"))


def test_the_evaluation_commands_name_the_files_they_wrote_and_keep_stdout_json(run, capsys):
    from ppl_vae.cli import main

    for argv, files in (
        (["evaluate", str(run), "--max-test", "20"], ["evaluation.json"]),
        (["diagnose", str(run), "--num-images", "6", "--num-samples", "20"], ["diagnostics.json", "khat.png"]),
        (
            ["gaps", str(run), "--num-images", "3", "--num-samples", "10", "--steps", "2", "--elbo-particles", "5"],
            ["gaps.json", "gaps.png"],
        ),
    ):
        assert main(argv) == 0
        captured = capsys.readouterr()
        json.loads(captured.out)  # stdout: the JSON report only
        (line,) = [ln for ln in captured.err.splitlines() if ln.startswith("wrote ")]
        for f in files:
            assert str(run / f) in line and (run / f).is_file()


def test_the_figures_of_a_plain_pyro_program_name_classes_and_say_what_the_samples_are(tmp_path, drawn):
    import pyro.distributions as dist
    from torch import nn

    from ppl_vae.viz.program import program_figures

    digits = load_data("digits", limit=120, seed=0)
    torch.manual_seed(0)
    dec, enc = nn.Linear(2, 64), nn.Linear(64, 4)

    def model(x, y=None):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z), validate_args=False).to_event(1), obs=x.flatten(1))

    def guide(x, y=None):
        loc, raw = enc(x.flatten(1)).chunk(2, -1)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw)).to_event(1))

    names = [f"digit {k}" for k in range(10)]
    with viz.figure_context(class_names=names, checkpoint="last"):
        program_figures(model, guide, digits.test_x, digits.test_y, [], tmp_path, seed=4)
    assert _legend(drawn["latent_scatter.png"]) == [names[int(k)] for k in torch.unique(digits.test_y)]
    title = drawn["prior_samples.png"].axes[0].get_title()
    assert "decoder means" in title and "seed 4" in title and "last checkpoint" in title
