"""The `ppl-vae` command end to end on the embedded digits: train, evaluate, sample, errors."""

import json
import math

import pytest
from PIL import Image

from ppl_vae.cli import main

FAST = ["train.epochs=2", "model.hidden=[32]", "--no-progress"]


def test_train_evaluate_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *FAST]) == 0
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out
    for name in [
        "config.yaml",
        "checkpoint.pt",
        "best.pt",
        "metrics.jsonl",
        "metrics.json",
        "reconstructions.png",
        "prior_samples.png",
        "latent_manifold.png",
        "latent_scatter.png",
        "training_curves.png",
    ]:
        assert (run / name).exists(), name
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["epochs_run"] == 2 and summary["test_elbo"] < 0

    assert main(["evaluate", str(run)]) == 0
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["test_elbo"] == pytest.approx(summary["test_elbo"], rel=1e-6)  # same checkpoint, same seed

    assert main(["sample", str(run), "--n", "16", "--seed", "3"]) == 0
    with Image.open(run / "samples.png") as img:
        assert img.size[0] >= 4 * 8 and img.format == "PNG"
    agg = tmp_path / "aggregate.png"
    assert (
        main(["sample", str(run), "--from", "aggregate", "--num-components", "3", "--n", "9", "--out", str(agg)]) == 0
    )
    with Image.open(agg) as img:
        assert img.format == "PNG"


def test_evaluate_with_importance_sampling(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--no-figures", *FAST]) == 0
    assert main(["evaluate", str(run), "--num-samples", "50", "--max-test", "40"]) == 0
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["num_test"] == 40 and ev["num_samples"] == 50
    lat = ev["latents"]  # what the code carries (2 latents on the digits default)
    assert lat["latent_dims"] == {"z": 2} and 0 <= lat["active_units"]["z"] <= 2 and lat["kl_total"] > 0
    # I(x; z) lies in [0, log N] up to Monte Carlo noise (a barely trained code: near 0, either side)
    assert -0.05 < lat["mutual_information"] <= math.log(40) and 0.0 <= lat["probe_accuracy"] <= 1.0
    assert main(["diagnose", str(run), "--num-images", "12", "--num-samples", "200"]) == 0
    diag = json.loads((run / "diagnostics.json").read_text())
    assert diag["num_images"] == 12 and 0 < diag["ess_median"] <= 200
    assert 0 <= diag["fraction_khat_above_0.7"] <= diag["fraction_khat_above_0.5"] <= 1
    assert len(diag["worst_images"]) == 8 and diag["worst_khat"] == sorted(diag["worst_khat"], reverse=True)
    from ppl_vae.evaluate import azcompat

    idata = azcompat.from_netcdf(run / "diagnostics.nc")
    assert idata["posterior"]["z"].shape[:3] == (1, 200, 12)
    for png in ("khat.png", "worst_khat.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # log p(x) ≥ ELBO in expectation: with 50 samples the estimate sits above the one-sample bound
    assert ev["test_log_likelihood"] > ev["test_elbo"]


def test_conditional_run_writes_the_class_grid(tmp_path):
    run = tmp_path / "cvae"
    assert main(["train", "--run-dir", str(run), "model.name=cvae", *FAST]) == 0
    assert (run / "class_conditional.png").exists()


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: mine\nmodel:\n  latent_dim: 3\ntrain:\n  epochs: 1\n")
    run = tmp_path / "run"
    assert main(["train", str(cfg), "model.hidden=[16]", "--run-dir", str(run), "--no-progress", "--no-figures"]) == 0
    text = (run / "config.yaml").read_text()
    assert "name: mine" in text and "latent_dim: 3" in text and "- 16" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "model.latent_dim=-3"], "ConfigError: model.latent_dim must be a positive integer, got -3"),
        (["train", "--resume", "/nonexistent/run"], "is not a run folder"),
        (["evaluate", "/nonexistent/run"], "is not a run folder"),
        (["train", "data.name=mnist", "data.root=/nonexistent/mnist"], "DataError"),
    ],
)
def test_errors_are_one_clear_line(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--run-dir", str(tmp_path / "r")] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_configs_fields_prints_every_field_with_type_default_allowed_values_and_doc(capsys):
    from ppl_vae.config.field_docs import config_fields, fields_of
    from ppl_vae.models.registry import get_method

    assert main(["configs", "fields"]) == 0
    out = capsys.readouterr().out
    sections = config_fields()
    assert set(sections) == {"", "data", "model", "train", "eval"}
    for section, rows in sections.items():
        assert rows
        for r in rows:
            name = f"{section}.{r.name}" if section else r.name
            assert f"\n{name}  ({r.type}, default: {r.default})\n" in f"\n{out}", name
            assert r.doc and " ".join(r.doc.split()[:4]) in " ".join(out.split()), name  # the doc text, wrapped
    assert "allowed: one of ['continuous', 'dequantized', 'binary_static', 'binary_dynamic']" in " ".join(out.split())
    assert main(["configs", "fields", "ladder"]) == 0
    out = capsys.readouterr().out
    rows = fields_of(get_method("ladder").options)
    assert out.startswith("# model.options of ladder\n") and len(rows) > 3
    for r in rows:
        assert f"model.options.{r.name}  ({r.type}, default: {r.default})" in out
    assert "model.options.t_dim" in out and "data.name" not in out


def test_configs_fields_is_what_the_documentation_site_renders():
    import sys
    from pathlib import Path

    from ppl_vae.config import field_docs

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "_ext"))
    import ppl_vae_docs_data

    assert ppl_vae_docs_data.config_fields is field_docs.config_fields  # one function: they cannot drift apart
    assert ppl_vae_docs_data.fields_of is field_docs.fields_of


def test_configs_fields_of_an_unknown_method_is_one_line_naming_the_known_ones(capsys):
    assert main(["configs", "fields", "vea"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "got 'vea'" in err and "'vae'" in err and "unexpected" not in err


def test_every_option_of_every_subcommand_has_help_that_shows_its_default():
    from ppl_vae.cli import _HelpFormatter, _parser

    parser = _parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    commands = dict(sub.choices)
    (configs_sub,) = [a for a in commands["configs"]._actions if a.__class__.__name__ == "_SubParsersAction"]
    commands.update({f"configs {k}": v for k, v in configs_sub.choices.items()})
    missing = []
    for name, p in commands.items():
        formatter = _HelpFormatter(prog=name)
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._get_help_string(action) or ""
            if not text.strip():
                missing.append(f"{name} {action.option_strings[0]}: no help")
            elif action.default is not False and "default" not in text:  # a flag that is off says nothing
                missing.append(f"{name} {action.option_strings[0]}: no default in {text!r}")
    assert not missing, missing
    text = commands["gaps"].format_help()
    assert "(default: 300)" in " ".join(text.split()) and "(default: best)" in " ".join(text.split())
