"""A Pyro program written as Pyro's own VAE tutorial writes it — ``model(self, x)`` and ``guide(self, x)``, networks
registered with ``pyro.module``, a plate over the minibatch — trains and evaluates through the public calls."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import ppl_vae
from ppl_vae.config import TrainConfig
from ppl_vae.errors import ProgramError
from ppl_vae.evaluate import log_likelihood
from ppl_vae.infer.signature import adapt, data_arguments
from ppl_vae.training import evaluate_elbo, fit


class Encoder(nn.Module):
    def __init__(self, pixels: int, z_dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(pixels, hidden), nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)
        self.pixels = pixels

    def forward(self, x):
        hidden = nn.functional.softplus(self.fc1(x.reshape(-1, self.pixels)))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, pixels: int, z_dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(z_dim, hidden), nn.Linear(hidden, pixels)

    def forward(self, z):
        return torch.sigmoid(self.fc21(nn.functional.softplus(self.fc1(z))))


class TutorialVAE(nn.Module):
    """The structure of Pyro's examples/vae/vae.py: one-argument model and guide, the plate over the minibatch."""

    def __init__(self, pixels: int = 64, z_dim: int = 2, hidden: int = 32):
        super().__init__()
        self.encoder, self.decoder = Encoder(pixels, z_dim, hidden), Decoder(pixels, z_dim, hidden)
        self.z_dim, self.pixels = z_dim, pixels

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img).to_event(1), obs=x.reshape(-1, self.pixels))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


@pytest.fixture(scope="module")
def digits():
    return ppl_vae.load_data("digits", pixels="binary_static", seed=0)


def test_the_signature_is_read_once():
    vae = TutorialVAE()

    def both(x, y=None):
        return x

    def star(*args):
        return args

    assert [data_arguments(f) for f in (vae.model, both, star, lambda: None)] == [1, 2, 2, 0]
    assert adapt(both) is both and adapt(star) is star
    x = torch.ones(3)
    assert adapt(lambda x: x + 1)(x, torch.zeros(3)).tolist() == [2.0, 2.0, 2.0]  # labels not passed on
    once = adapt(vae.model)
    assert adapt(once) is once  # adapting twice wraps once
    with pytest.raises(ProgramError, match=r"the guide .*\(\) takes no data argument.*guide\(x\)"):
        adapt(lambda: None, "guide")


def test_the_tutorial_vae_trains_resumes_and_evaluates_through_the_public_calls(digits, tmp_path):
    pyro.set_rng_seed(0)
    vae = TutorialVAE()
    cfg = TrainConfig(epochs=4, batch_size=100, logger="none")
    res = ppl_vae.train(vae, digits, cfg, seed=0, run_dir=tmp_path / "run", progress=False)
    elbos = [h["train_elbo"] for h in res.history]
    assert all(map(math.isfinite, elbos)) and elbos[-1] > elbos[0]
    assert res.data_plate["convention"] == "over the minibatch only"

    # the same run killed after 2 epochs and resumed reproduces it
    pyro.set_rng_seed(0)
    again = TutorialVAE()
    ppl_vae.train(
        again,
        digits,
        TrainConfig(epochs=2, batch_size=100, logger="none"),
        seed=0,
        run_dir=tmp_path / "killed",
        progress=False,
    )
    resumed = ppl_vae.train(again, digits, cfg, seed=0, run_dir=tmp_path / "killed", resume=True, progress=False)
    assert [h["train_elbo"] for h in resumed.history] == elbos

    # evaluation with labelled data: the labels are not passed to a model that does not take them
    x, y = digits.test_x[:20], digits.test_y[:20]
    ll = log_likelihood(vae.model, vae.guide, x, y=y, num_samples=64, seed=0)
    elbo = evaluate_elbo(vae.model, vae.guide, digits, pyro.infer.Trace_ELBO(), "test", 100, "cpu")
    assert ll.shape == (20,) and torch.isfinite(ll).all()
    assert float(ll.mean()) > elbo - 5.0  # log p(x) ≥ ELBO up to the noise of 20 images


def test_fit_takes_the_pair_too(digits):
    vae = TutorialVAE()
    res = fit((vae.model, vae.guide), digits, TrainConfig(epochs=1, batch_size=100, logger="none"), progress=False)
    assert math.isfinite(res.history[0]["train_elbo"])
