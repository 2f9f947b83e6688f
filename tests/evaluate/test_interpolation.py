"""Interpolation along the data distribution: endpoints kept, never less dense than the straight line, and
clearly denser when the line crosses a low-density gap."""

import pyro.distributions as dist
import torch

from ppl_vae.config import ModelConfig
from ppl_vae.data import DataBundle
from ppl_vae.evaluate.interpolation import (
    interpolate_images,
    likelihood_path,
    path_stats,
    plot_interpolation,
    straight_line,
)
from ppl_vae.models import build_model
from ppl_vae.training import plan_for


def _banana_density():
    """A ring of 8 Gaussians (radius 3): the straight line between opposite modes crosses the empty centre."""
    ang = torch.arange(8) * (2 * torch.pi / 8)
    means = 3.0 * torch.stack([ang.cos(), ang.sin()], 1)
    comp = dist.Normal(means, 0.5 * torch.ones(8, 2)).to_event(1)
    return dist.MixtureSameFamily(dist.Categorical(torch.ones(8)), comp), means


def test_endpoints_kept_and_path_denser_than_line():
    mix, means = _banana_density()
    a, b = means[0], means[4]
    res = likelihood_path(a, b, mix.log_prob, n_steps=8, iters=300)
    assert res.path.shape == (10, 2)
    assert torch.equal(res.path[0], a) and torch.equal(res.path[-1], b)
    assert torch.equal(res.line, straight_line(a, b, 8))
    assert not res.fallback
    assert res.path_stats["mean_log_density"] >= res.line_stats["mean_log_density"]
    # the line runs through the empty centre (log-density ≈ −18 there); the path goes round the ring
    assert res.path_stats["min_log_density"] > res.line_stats["min_log_density"] + 5
    assert res.path_stats["step_cv"] < 0.5
    assert res.path_stats["length"] > res.line_stats["length"]


def test_never_less_dense_than_line_even_when_density_is_flat_along_it():
    """Under N(0, I) with endpoints symmetric about the mode, the line is already the densest short path: the
    result must still keep the endpoints and be at least as dense as the line."""
    g = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    a, b = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 0.0])
    res = likelihood_path(a, b, g.log_prob, n_steps=6, iters=100)
    assert torch.equal(res.path[0], a) and torch.equal(res.path[-1], b)
    assert res.path_stats["mean_log_density"] >= res.line_stats["mean_log_density"] - 1e-6
    st = path_stats(res.line, g.log_prob)
    assert abs(st["length"] - 4.0) < 1e-5 and st["step_cv"] < 1e-5


def test_interpolate_images_with_a_ladder_and_png(tmp_path):
    x = torch.rand(40, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    data = DataBundle.from_tensors(x)
    cfg = ModelConfig(
        name="ladder",
        latent_dim=4,
        hidden=[16],
        options={"warmup_epochs": 0, "num_components": 3, "inner_hidden": [8], "bgm_max_iter": 30},
    )
    model = build_model(cfg, data.shape, num_data=40)
    plan_for(model).on_epoch_end(0, {}, data)  # fit the hyperprior to the (untrained) encodings
    res, path_imgs, line_imgs = interpolate_images(model, x[0], x[1], n_steps=5, iters=50)
    assert path_imgs.shape == line_imgs.shape == (7, 1, 6, 6)
    va = model.encode(x[:1])[0][0]
    assert torch.allclose(res.path[0], va)
    out = plot_interpolation(
        path_imgs, line_imgs, tmp_path / "strip.png", res=res, log_density=model.prior_log_density, title="test"
    )
    assert (tmp_path / "strip.png").stat().st_size > 0 and out.endswith("strip.png")
