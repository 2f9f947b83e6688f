"""`ppl-vae configs`: list the shipped configs, show one, copy one to edit (never over a file); `ppl-vae train NAME`."""

import json

import pytest

from ppl_vae.cli import main
from ppl_vae.config.sections import load_config, shipped_configs


@pytest.mark.parametrize("argv", [["configs"], ["configs", "list"]])
def test_list_gives_one_line_per_shipped_config_with_its_method_and_data(argv, capsys):
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "METHOD", "DATA"] and lines[-1].startswith("train one: ppl-vae train NAME")
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert list(rows) == list(shipped_configs())
    assert rows["vae_digits"].split()[1:3] == ["vae", "digits,"]
    assert "mmvae  " in rows["mmvae_polyfashion"] and "poly multimodal (3 modalities)" in rows["mmvae_polyfashion"]
    assert "fashion_mnist 14x14, binary_dynamic pixels" in rows["mae_fashion14"]


def test_show_prints_the_file_as_shipped(capsys):
    assert main(["configs", "show", "vae_fashion"]) == 0
    assert capsys.readouterr().out == shipped_configs()["vae_fashion"].read_text()


def test_copy_writes_an_editable_file_and_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["configs", "copy", "vae_digits.yaml"]) == 0
    assert (
        "copied vae_digits to vae_digits.yaml; train it with: ppl-vae train vae_digits.yaml" in capsys.readouterr().out
    )
    assert (tmp_path / "vae_digits.yaml").read_text() == shipped_configs()["vae_digits"].read_text()
    (tmp_path / "vae_digits.yaml").write_text("name: edited\n")
    assert main(["configs", "copy", "vae_digits"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "ppl-vae: error: PplVaeError: 'vae_digits.yaml' exists already: not overwritten "
        "(give another DEST, or remove it first)\n"
    )
    assert (tmp_path / "vae_digits.yaml").read_text() == "name: edited\n"
    assert load_config("vae_digits.yaml").name == "edited"  # the copy, not the shipped one, once it is there
    (tmp_path / "mine").mkdir()
    assert main(["configs", "copy", "vlae_fashion", "mine"]) == 0  # into a folder
    assert main(["configs", "copy", "vlae_fashion", "mine/other.yaml"]) == 0
    assert {p.name for p in (tmp_path / "mine").iterdir()} == {"vlae_fashion.yaml", "other.yaml"}


def test_an_unknown_name_is_one_line_with_the_shipped_names(capsys):
    for argv in (["configs", "show", "nope"], ["configs", "copy", "nope"], ["train", "nope", "train.epochs=1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ppl-vae: error: ConfigError: ") and err.count("\n") == 1, err
        assert "no shipped config is called 'nope'; shipped configs: cvae_digits, " in err


def test_train_takes_a_shipped_config_by_name(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "vae_digits", "--run-dir", str(run), "train.epochs=1", "model.hidden=[16]", "--no-progress"]
    assert main([*argv, "--no-figures"]) == 0
    assert f"run folder: {run}" in capsys.readouterr().out
    saved = load_config(run / "config.yaml")
    assert saved.name == "vae_digits" and saved.model.hidden == [16] and saved.train.epochs == 1
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 1
