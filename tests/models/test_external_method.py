"""Adding a method from outside the package (the README's "Adding a method"): this file defines one — its model and
guide, its options, its own objective and an end-of-epoch hook — registers it, and trains it through the public
API and through ``ppl-vae train`` with a config, without a line of library code changing.

The method: a VAE whose prior has a learned scale, z ~ N(0, s² I), trained with a KL-tempered ELBO
E_q[log p(x|z)] − τ·KL(q ‖ p) (a sampled KL) whose temperature τ the plan anneals to 1 after every epoch.
"""

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch import nn

import ppl_vae
from ppl_vae import Options, TrainingPlan, data_plate, option, register_model, training_plan

REPO = Path(__file__).resolve().parents[2]
NAME = "tempered_scale_vae"


class TemperedScaleVAE(PyroModule):
    def __init__(self, data_shape, latent_dim, hidden, num_data, temperature):
        super().__init__()
        self.data_shape, self.latent_dim, self.num_data = tuple(data_shape), latent_dim, num_data
        d = math.prod(self.data_shape)
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.prior_scale = PyroParam(torch.tensor(1.0), constraint=dist.constraints.positive)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @pyro_method
    def model(self, x, y=None):
        with data_plate(x, self.num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), self.latent_dim), self.prior_scale).to_event(1))
            logits = self.dec(z).reshape(*z.shape[:-1], *self.data_shape)
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(len(self.data_shape)), obs=x)

    @pyro_method
    def guide(self, x, y=None):
        with data_plate(x, self.num_data):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # the figure API of ppl_vae.viz
    def encode(self, x, y=None):
        loc, raw = self.enc(x).chunk(2, -1)
        return loc, nn.functional.softplus(raw) + 1e-4

    def decode(self, z, y=None):
        return torch.sigmoid(self.dec(z)).reshape(len(z), *self.data_shape)

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x)[0])

    def sample(self, n, y=None):
        return self.decode(self.prior_scale.detach() * torch.randn(n, self.latent_dim))


class TemperedELBO(ELBO):
    """−(E_q[log p(x|z)] − τ (log q(z|x) − log p(z))), one sample; observed sites scaled as the data plate says."""

    def __init__(self, owner):
        super().__init__(num_particles=1, max_plate_nesting=1)
        self.owner = owner

    def _get_trace(self, model, guide, args, kwargs):
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        gt = poutine.trace(guide).get_trace(*args, **kwargs)
        mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(*args, **kwargs)
        mt.compute_log_prob()
        gt.compute_log_prob()
        rec = sum(s["log_prob_sum"] for s in mt.nodes.values() if s["type"] == "sample" and s["is_observed"])
        kl = gt.nodes["z"]["log_prob_sum"] - mt.nodes["z"]["log_prob_sum"]
        return -(rec - self.owner.temperature * kl)

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


@training_plan(TemperedScaleVAE)
class TemperedPlan(TrainingPlan):
    def objective(self, train):
        return TemperedELBO(self.model)

    def on_epoch_end(self, epoch, record, data):
        t = self.model.temperature
        t.fill_(min(1.0, float(t) + 0.25))
        record["temperature"] = float(t)
        record["prior_scale"] = float(self.model.prior_scale.detach())


@dataclass
class TemperedOptions(Options):
    temperature: float = option(0.5, gt=0.0, le=1.0, doc="initial KL temperature")


@register_model(NAME, options=TemperedOptions)
def build_tempered(cfg, options, data_shape, num_data, num_classes):
    return TemperedScaleVAE(data_shape, cfg.latent_dim, cfg.hidden[0], num_data, options.temperature)


def test_the_new_method_trains_through_the_public_api(tmp_path):
    data = ppl_vae.load_data("digits", pixels="binary_static", limit=300, seed=0)
    model = ppl_vae.build_model(
        ppl_vae.ModelConfig(name=NAME, latent_dim=2, hidden=[32], options={"temperature": 0.25}),
        data.shape,
        num_data=len(data.train_x),
    )
    res = ppl_vae.train(model, data, ppl_vae.TrainConfig(epochs=3, batch_size=50), run_dir=tmp_path, progress=False)
    assert [h["temperature"] for h in res.history] == [0.5, 0.75, 1.0]  # the plan's hook ran
    assert all(math.isfinite(h["val_elbo"]) for h in res.history)
    assert res.history[-1]["prior_scale"] != 1.0  # the prior's scale was learned
    assert float(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["module"]["temperature"]) == 1.0
    with pytest.raises(ppl_vae.ConfigError, match=r"model.options.temperature must be a number in \(0.0, 1.0\]"):
        ppl_vae.build_model(ppl_vae.ModelConfig(name=NAME, options={"temperature": 2}), data.shape, num_data=10)
    # evaluation and diagnosis go through the same public calls as the library's own methods
    run = ppl_vae.run_experiment(
        ppl_vae.load_config(
            None, [f"model.name={NAME}", "model.hidden=[32]", "train.epochs=2", "data.limit=300", "device=cpu"]
        ),
        tmp_path / "run",
        progress=False,
        figures=False,
    )
    ev = ppl_vae.evaluate_run(run, num_samples=20, max_test=30)
    assert ev["test_log_likelihood"] > ev["test_elbo"] - 5
    assert ppl_vae.diagnose_run(run, num_images=5, num_samples=50)["num_images"] == 5


def test_the_new_method_trains_through_ppl_vae_train_with_a_config(tmp_path):
    cfg = tmp_path / "tempered.yaml"
    cfg.write_text(
        f"name: tempered\nimports: [{Path(__file__).resolve()}]\ndevice: cpu\n"
        f"data: {{name: digits, pixels: binary_static, limit: 300}}\n"
        f"model: {{name: {NAME}, latent_dim: 2, hidden: [32], options: {{temperature: 0.5}}}}\n"
        "train: {epochs: 2, batch_size: 50}\n"
    )
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "ppl_vae", "train", str(cfg), "--run-dir", str(run), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"this configuration imports code: the file {Path(__file__).resolve()}" in out.stderr  # said, then run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["temperature"] for r in records] == [0.75, 1.0]
    assert (run / "latent_manifold.png").is_file() and (run / "training_curves.png").is_file()
    out = subprocess.run(
        [sys.executable, "-m", "ppl_vae", "evaluate", str(run), "--num-samples", "10", "--max-test", "20"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "this configuration imports code: the file" in out.stderr  # evaluate says so too, before running it
    assert json.loads((run / "evaluation.json").read_text())["num_test"] == 20
