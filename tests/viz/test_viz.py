"""Tests for ppl_vae.viz with a tiny fake model (no dependency on the library's real models)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ppl_vae import viz

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeVAE(nn.Module):
    """Linear encoder / linear+sigmoid decoder following the duck-typed model API."""

    def __init__(self, latent_dim=2, shape=(1, 8, 8), num_classes=None, conditional=False):
        super().__init__()
        self.latent_dim = latent_dim
        self.shape = shape
        self.num_classes = num_classes
        self.conditional = conditional
        d = math.prod(shape)
        c = num_classes if conditional else 0
        self.enc = nn.Linear(d + c, 2 * latent_dim)
        self.dec = nn.Linear(latent_dim + c, d)
        self.decoded: list[torch.Tensor] = []  # every z passed to decode
        self.decoded_y: list[torch.Tensor | None] = []

    def _cond(self, h, y):
        if not self.conditional:
            assert y is None
            return h
        assert y is not None and y.dtype == torch.int64 and y.shape == (h.shape[0],)
        return torch.cat([h, nn.functional.one_hot(y, self.num_classes).to(h.dtype)], dim=-1)

    def encode(self, x, y=None):
        loc, s = self.enc(self._cond(x.flatten(1), y)).chunk(2, -1)
        return loc, nn.functional.softplus(s)

    def decode(self, z, y=None):
        self.decoded.append(z.detach().clone())
        self.decoded_y.append(None if y is None else y.detach().clone())
        return torch.sigmoid(self.dec(self._cond(z, y))).view(-1, *self.shape)

    def sample(self, n, y=None):
        return self.decode(torch.randn(n, self.latent_dim, device=self.dec.weight.device), y)

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x, y)[0], y)


def check_png(path, min_w=32, min_h=32):
    path = Path(path)
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.load()
        w, h = im.size
    assert w >= min_w and h >= min_h, (w, h)
    return w, h


def data(n=40, shape=(1, 8, 8), num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.arange(n) % num_classes


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FakeVAE()


@pytest.fixture
def cmodel():
    torch.manual_seed(0)
    return FakeVAE(num_classes=3, conditional=True)


def test_save_image_grid_upscales_small_images(tmp_path):
    x, _ = data(10)
    out = viz.save_image_grid(x, tmp_path / "sub" / "grid.png", nrow=5, pad=2)
    assert out == str(tmp_path / "sub" / "grid.png")
    w, h = check_png(out)
    # 8x8 tiles upscaled x4 -> 32 px tiles, 5 per row, 2 rows, 2 px padding
    assert (w, h) == (5 * 34 + 2, 2 * 34 + 2)
    w1, _ = check_png(viz.save_image_grid(x, tmp_path / "g1.png", nrow=5, upscale=1), min_w=8, min_h=8)
    assert w1 == 5 * 10 + 2
    rgb = torch.rand(4, 3, 40, 40)
    assert check_png(viz.save_image_grid(rgb, tmp_path / "rgb.png", nrow=2)) == (2 * 42 + 2,) * 2


def test_reconstructions(tmp_path, model, cmodel):
    x, y = data(20)
    check_png(viz.plot_reconstructions(model, x, tmp_path / "r.png", n=6), 200, 100)
    assert model.decoded[-1].shape == (6, 2)
    check_png(viz.plot_reconstructions(cmodel, x, tmp_path / "rc.png", y=y, n=8))
    assert torch.equal(cmodel.decoded_y[-1], y[:8])
    with pytest.raises(ValueError, match="conditional"):
        viz.plot_reconstructions(cmodel, x, tmp_path / "bad.png")


def test_prior_samples_reproducible_and_rng_untouched(tmp_path, model):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = viz.plot_prior_samples(model, tmp_path / "a.png", n=16, seed=7)
    z_a = model.decoded[-1]
    assert torch.equal(torch.get_rng_state(), state)
    b = viz.plot_prior_samples(model, tmp_path / "b.png", n=16, seed=7)
    z_b = model.decoded[-1]
    viz.plot_prior_samples(model, tmp_path / "c.png", n=16, seed=8)
    z_c = model.decoded[-1]
    assert torch.equal(torch.get_rng_state(), state)
    check_png(a, 100, 100)
    assert torch.equal(z_a, z_b) and not torch.equal(z_a, z_c)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    g = torch.Generator().manual_seed(7)
    assert torch.equal(z_a, torch.randn(16, 2, generator=g))


def test_prior_samples_conditional_cycles_labels(tmp_path, cmodel):
    check_png(viz.plot_prior_samples(cmodel, tmp_path / "p.png", n=9))
    assert torch.equal(cmodel.decoded_y[-1], torch.tensor([0, 1, 2] * 3))


def test_class_conditional(tmp_path, cmodel, model):
    state = torch.get_rng_state()
    check_png(viz.plot_class_conditional(cmodel, tmp_path / "cc.png", per_class=5), 150, 100)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(cmodel.decoded_y[-1], torch.arange(3).repeat_interleave(5))
    with pytest.raises(ValueError, match="conditional"):
        viz.plot_class_conditional(model, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_manifold_decodes_inverse_cdf_grid(tmp_path, model):
    n, lo, hi = 7, 0.1, 0.9
    out = viz.plot_latent_manifold(model, tmp_path / "m.png", n=n, quantile_range=(lo, hi))
    check_png(out, 200, 200)
    z = model.decoded[-1]
    assert z.shape == (n * n, 2)
    q = torch.linspace(lo, hi, n, dtype=torch.float64)
    icdf = torch.distributions.Normal(0.0, 1.0).icdf(q).float()
    torch.testing.assert_close(z.view(n, n, 2)[0, :, 0], icdf)  # z1 left -> right
    torch.testing.assert_close(z.view(n, n, 2)[:, 0, 1], icdf.flip(0))  # z2 top -> bottom
    expected = torch.stack(torch.meshgrid(icdf, icdf.flip(0), indexing="xy"), -1).reshape(-1, 2)
    torch.testing.assert_close(z, expected)
    assert abs(float(icdf[0]) - (-1.2815515655446004)) < 1e-5  # Phi^-1(0.1)
    torch.testing.assert_close(viz.manifold_grid(n, (lo, hi)).reshape(-1, 2), expected)


def test_manifold_conditional_and_errors(tmp_path, cmodel):
    viz.plot_latent_manifold(cmodel, tmp_path / "m.png", n=4, y=2)
    assert torch.equal(cmodel.decoded_y[-1], torch.full((16,), 2))
    with pytest.raises(ValueError, match="latent_dim == 2"):
        viz.plot_latent_manifold(FakeVAE(latent_dim=3), tmp_path / "bad.png")
    with pytest.raises(ValueError):
        viz.manifold_grid(5, (0.0, 0.9))


def test_latent_scatter_2d(tmp_path, model, cmodel):
    x, y = data(50)
    check_png(viz.plot_latent_scatter(model, x, y, tmp_path / "s.png"), 300, 300)
    check_png(viz.plot_latent_scatter(model, x, None, tmp_path / "s_none.png"), 300, 300)
    check_png(viz.plot_latent_scatter(model, x, np.linspace(0, 1, 50), tmp_path / "s_cont.png"))
    check_png(viz.plot_latent_scatter(cmodel, x, y, tmp_path / "sc.png", max_points=20))


def test_latent_scatter_tsne(tmp_path):
    torch.manual_seed(0)
    m5 = FakeVAE(latent_dim=5)
    x, y = data(25)
    check_png(viz.plot_latent_scatter(m5, x, y, tmp_path / "t.png", max_points=20), 300, 300)
    with pytest.raises(ValueError, match="latent_dim == 2"):
        viz.plot_latent_scatter(m5, x, y, tmp_path / "bad.png", method="latent")


def test_training_curves(tmp_path):
    history = [
        {"epoch": 1, "train_elbo": -200.0, "val_elbo": None},
        {"epoch": 2, "train_elbo": -150.0, "val_elbo": -160.0},
        {"epoch": 3, "train_elbo": -120.0, "val_elbo": float("nan")},
        {"epoch": 4, "train_elbo": -110.0},
    ]
    check_png(viz.plot_training_curves(history, tmp_path / "c" / "curves.png"), 300, 200)
    check_png(viz.plot_training_curves([{"epoch": 1, "train_elbo": -3.0}], tmp_path / "one.png"))
    with pytest.raises(ValueError):
        viz.plot_training_curves([], tmp_path / "empty.png")


def test_make_figures_conditional_2d(tmp_path, cmodel):
    x, y = data(30)
    history = [{"epoch": 1, "train_elbo": -90.0, "val_elbo": -95.0}]
    paths = viz.make_figures(cmodel, x, y, history, tmp_path / "run")
    names = {Path(p).name for p in paths}
    assert names == {
        "reconstructions.png",
        "prior_samples.png",
        "class_conditional.png",
        "latent_manifold.png",
        "latent_scatter.png",
        "training_curves.png",
    }
    assert len(paths) == len(names)
    assert {p.name for p in (tmp_path / "run").iterdir()} == names
    for p in paths:
        assert Path(p).parent == tmp_path / "run"
        check_png(p)


def test_make_figures_unconditional_5d(tmp_path):
    torch.manual_seed(0)
    m5 = FakeVAE(latent_dim=5)
    x, y = data(30)
    paths = viz.make_figures(m5, x, y, [], tmp_path / "run", n_scatter=25)
    names = {Path(p).name for p in paths}
    assert names == {"reconstructions.png", "prior_samples.png", "latent_tsne.png"}
    assert {p.name for p in (tmp_path / "run").iterdir()} == names
    for p in paths:
        check_png(p)
    # unlabeled data also works
    paths = viz.make_figures(m5, x, None, None, tmp_path / "run2", n_scatter=25)
    assert {Path(p).name for p in paths} == names


def test_eval_mode_restored(tmp_path, model):
    model.train()
    viz.plot_reconstructions(model, data(4)[0], tmp_path / "r.png")
    assert model.training


def test_does_not_import_pyplot(tmp_path):
    if "matplotlib.pyplot" in sys.modules:
        pytest.skip("pyplot already imported by another module")
    viz.save_image_grid(torch.rand(4, 1, 8, 8), tmp_path / "g.png")
    viz.plot_training_curves([{"epoch": 1, "train_elbo": -1.0}], tmp_path / "c.png")
    assert "matplotlib.pyplot" not in sys.modules


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model(tmp_path):
    torch.manual_seed(0)
    m = FakeVAE(num_classes=3, conditional=True).cuda()
    x, y = data(30)
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    paths = viz.make_figures(m, x, y, [{"epoch": 1, "train_elbo": -1.0}], tmp_path / "run")
    assert len(paths) == 6
    for p in paths:
        check_png(p)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)


def test_plot_latent_space_draws_what_fits_the_latent_size(tmp_path, model):
    x, y = data(25)
    two = viz.plot_latent_space(model, x, y, tmp_path / "two", n=5, max_points=20)
    assert [Path(p).name for p in two] == ["latent_manifold.png", "latent_scatter.png"]
    assert model.decoded[-1].shape == (25, 2)  # the 5 × 5 manifold was decoded
    torch.manual_seed(0)
    wide = viz.plot_latent_space(FakeVAE(latent_dim=8), x, y, tmp_path / "eight", max_points=20)
    assert [Path(p).name for p in wide] == ["latent_tsne.png"]  # no manifold of an 8-D latent, no error
    for p in two + wide:
        check_png(p)
