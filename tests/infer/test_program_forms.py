"""Every signature a Pyro user writes — ``model(x)`` (Pyro's tutorial), a dict of the batch, keyword-only data —
goes through every public call: train, log_likelihood, posterior_diagnostics, gap_report with a NUTS reference,
nuts_posterior, latent_summary, and the CLI (a config whose ``imports:`` registers the tutorial VAE)."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import ppl_vae
from ppl_vae.cli import main
from ppl_vae.config import TrainConfig
from ppl_vae.evaluate import gap_report, latent_summary, log_likelihood, nuts_posterior, posterior_diagnostics
from tests.infer.test_signature import TutorialVAE


class BatchDictVAE(TutorialVAE):
    """The same program reading a dict of the batch."""

    def model(self, batch):
        return super().model(batch["x"])

    def guide(self, batch):
        return super().guide(batch["x"])


class KeywordVAE(TutorialVAE):
    """The same program with keyword-only data."""

    def model(self, *, x, y=None):
        return super().model(x)

    def guide(self, *, x, y=None):
        return super().guide(x)


@pytest.fixture(scope="module")
def digits():
    return ppl_vae.load_data("digits", pixels="binary_static", seed=0)


@pytest.mark.parametrize("cls", [TutorialVAE, BatchDictVAE, KeywordVAE])
def test_each_form_goes_through_every_public_call(cls, digits):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = cls()
    res = ppl_vae.train(vae, digits, TrainConfig(epochs=2, batch_size=100, logger="none"), progress=False)
    assert all(math.isfinite(h["train_elbo"]) for h in res.history)
    x, y = digits.test_x[:6], digits.test_y[:6]

    ll = log_likelihood(vae.model, vae.guide, x, y=y, num_samples=32, seed=0)
    assert ll.shape == (6,) and torch.isfinite(ll).all()
    diag = posterior_diagnostics(vae.model, vae.guide, x, num_samples=32, y=y)
    assert diag["posterior"]["latent"].shape[:3] == (1, 32, 6)
    gaps = gap_report(
        vae.model,
        vae.guide,
        x[:2],
        y=y[:2],
        num_samples=32,
        steps=3,
        num_particles=2,
        elbo_particles=16,
        nuts_images=1,
        nuts={"num_chains": 2, "num_samples": 6, "warmup_steps": 4},
    )
    assert math.isfinite(gaps["amortisation"]["mean"]) and len(gaps["nuts"]["images"]) == 1
    ref = nuts_posterior(vae.model, x[:1], y=y[:1], guide=vae.guide, num_chains=2, num_samples=6, warmup_steps=4)
    assert ref["draws"]["latent"].shape == (2, 6, 2)
    summary = latent_summary(vae.model, vae.guide, x, y=y, seed=0)
    assert summary["latent_dims"] == {"latent": 2}


def test_the_tutorial_vae_through_the_cli(tmp_path):
    method = tmp_path / "tutorial_method.py"
    method.write_text(
        "from ppl_vae import register_model\n"
        "from tests.infer.test_signature import TutorialVAE\n\n"
        "@register_model('tutorial_vae')\n"
        "def build(cfg, options, data_shape, num_data, num_classes):\n"
        "    return TutorialVAE(pixels=64, z_dim=cfg.latent_dim, hidden=32)\n"
    )
    run = tmp_path / "run"
    common = [f"imports=[{method}]", "model.name=tutorial_vae", "data.pixels=binary_static", "train.epochs=2"]
    assert main(["train", "--run-dir", str(run), "--no-progress", *common, "train.logger=none"]) == 0
    assert main(["evaluate", str(run), "--num-samples", "16", "--max-test", "20"]) == 0
    assert main(["diagnose", str(run), "--num-images", "5", "--num-samples", "32"]) == 0
    gaps = ["--num-images", "2", "--num-samples", "16", "--steps", "2", "--elbo-particles", "8", "--nuts", "0"]
    assert main(["gaps", str(run), *gaps]) == 0
    assert (run / "diagnostics.json").is_file() and (run / "gaps.json").is_file()
