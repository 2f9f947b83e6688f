"""No traps on the way: a sigmoid link refuses data it cannot fit, long evaluations say what they plan first."""

from __future__ import annotations

import re

import pytest
import torch

import ppl_vae
from ppl_vae import ModelConfig, TrainConfig
from ppl_vae.cli import main
from ppl_vae.errors import DataError

TABULAR = torch.randn(200, 5, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_a_sigmoid_link_refuses_data_outside_the_unit_interval(likelihood):
    cfg = ModelConfig(name="vae", likelihood=likelihood, latent_dim=2, hidden=[8])
    model = ppl_vae.build_model(cfg, (5,), num_data=160)
    with pytest.raises(DataError, match=r"model.link = 'sigmoid' keeps the means .* set model.link: identity"):
        ppl_vae.train(model, TABULAR, TrainConfig(epochs=1, batch_size=50, logger="none"), progress=False)
    cfg.link = "identity"
    model = ppl_vae.build_model(cfg, (5,), num_data=160)
    res = ppl_vae.train(model, TABULAR, TrainConfig(epochs=1, batch_size=50, logger="none"), progress=False)
    assert res.history[0]["train_elbo"] == res.history[0]["train_elbo"]  # trained (finite, not NaN)


def test_evaluate_diagnose_and_gaps_say_what_they_plan_first(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "train.epochs=1", "model.hidden=[16]", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "20", "--max-test", "30"]) == 0
    line = next(s for s in capsys.readouterr().err.splitlines() if "datapoint-draws" in s)
    assert re.match(
        r"ppl-vae: the importance-sampled log p\(x\): 30 images × 20 draws = 600 datapoint-draws, about \d+ s", line
    )
    assert main(["diagnose", str(run), "--num-images", "4", "--num-samples", "16"]) == 0
    assert "PSIS diagnostics: 4 images × 16 draws = 64 datapoint-draws" in capsys.readouterr().err
    gaps = ["--num-images", "2", "--num-samples", "8", "--steps", "2", "--num-particles", "2", "--elbo-particles", "4"]
    assert main(["gaps", str(run), *gaps, "--nuts", "0"]) == 0
    assert "inference gaps: 2 images × (8 + 3×2×2 + 2×4) draws = 56 datapoint-draws" in capsys.readouterr().err
