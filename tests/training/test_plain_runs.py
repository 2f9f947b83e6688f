"""Plain runs without surprises (issue 33, item 6): a plan that trains other than train.epochs says so in the run's
first line, a run that scores no epoch says so and is evaluated under the name of the checkpoint it read, a model that
cannot be allocated or a unimodal model on multimodal data is one named line. Each case failed before."""

import json

from ppl_vae.cli import main

FAST = ["data.limit=300", "--no-progress", "--no-figures"]


def test_a_stage_of_its_own_length_is_stated_in_the_first_line(tmp_path, capsys):
    run = tmp_path / "sigma"
    args = ["model.name=sigma_vae", "model.likelihood=gaussian", "model.options.sigma2_mode=per_pixel"]
    assert main(["train", "--run-dir", str(run), *args, "train.epochs=1", "model.options.stage2_epochs=2", *FAST]) == 0
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first == (
        "ppl-vae: this plan trains 3 epochs in 2 stages: stage1 1 (train.epochs), stage2 2 "
        "(model.options.stage2_epochs)"
    ), err


def test_a_run_that_scores_no_epoch_says_so_and_evaluate_names_the_checkpoint_it_read(tmp_path, capsys):
    run = tmp_path / "ladder"
    assert (
        main(["train", "--run-dir", str(run), "model.name=ladder", "train.epochs=1", "model.hidden=[16]", *FAST]) == 0
    )
    out = capsys.readouterr()
    assert "no epoch can become best.pt: epochs are scored from epoch 11" in out.err
    assert "last epoch 1: no epoch was scored for best.pt" in out.out
    assert not (run / "best.pt").exists()
    assert main(["evaluate", str(run), "--num-samples", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == "last"  # it read checkpoint.pt, and says so
    assert json.loads((run / "evaluation.json").read_text())["checkpoint"] == "last"


def test_unallocatable_sizes_and_a_unimodal_model_on_multimodal_data_are_named(tmp_path, capsys):
    cases = [
        (["model.latent_dim=100000000000"], "needs more memory than there is"),
        (["model.hidden=[100000000000]"], "model.hidden=[100000000000]"),
        (["model.name=vae", "data.multimodal=poly"], "choose a multimodal method (mmvae, mmvm, mopoe, mvae, sumpool)"),
    ]
    for i, (args, needle) in enumerate(cases):
        assert main(["train", "--run-dir", str(tmp_path / f"r{i}"), "train.epochs=1", *args, *FAST]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "unexpected" not in err, err
