"""A Pyro program that indexes the whole data set itself (Pyro's subsampling idiom) evaluates: probabilistic PCA,
whose evidence is exact, p(x) = N(0, W Wᵀ + σ² I), written as Pyro users write it, with a guide a little wider
than the exact posterior so the importance-sampled estimate has variance and converges as S grows."""

from __future__ import annotations

import json

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import ppl_vae
from ppl_vae.cli import main
from ppl_vae.config import TrainConfig
from ppl_vae.errors import ProgramError
from ppl_vae.evaluate import gap_report, log_likelihood, mc_std_error, posterior_diagnostics

D, K, N, B, SIGMA = 5, 2, 60, 16, 0.5


class PPCA:
    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, K, generator=g)
        M = self.W.T @ self.W + SIGMA**2 * torch.eye(K)
        self.post_map = torch.linalg.solve(M, self.W.T)  # E[z | x] = M⁻¹ Wᵀ x
        self.post_scale = (SIGMA**2 * torch.linalg.inv(M)).diagonal().sqrt() * 1.3  # wider than the posterior
        self.x = (self.W @ torch.randn(K, N, generator=g) + SIGMA * torch.randn(D, N, generator=g)).T

    def model(self, x):
        with pyro.plate("data", len(x), subsample_size=B) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([len(idx), K]).to_event(1))
            pyro.sample("obs", dist.Normal(z @ self.W.T, SIGMA).to_event(1), obs=x[idx])

    def guide(self, x):
        with pyro.plate("data", len(x), subsample_size=B) as idx:
            pyro.sample("z", dist.Normal(x[idx] @ self.post_map.T, self.post_scale).to_event(1))

    def exact(self) -> torch.Tensor:
        cov = self.W @ self.W.T + SIGMA**2 * torch.eye(D)
        return dist.MultivariateNormal(torch.zeros(D), cov).log_prob(self.x)


def test_the_estimate_converges_to_the_exact_evidence():
    p = PPCA()
    exact = p.exact()
    errors = []
    for S in (16, 1024):
        est, ess = log_likelihood(p.model, p.guide, p.x, num_samples=S, seed=1, return_ess=True, max_bytes=64 * 1024)
        assert est.shape == (N,) and torch.isfinite(est).all()
        se = mc_std_error(ess, S)
        # each datapoint within 5 Monte Carlo standard errors (plus the O(1/S) bias of the log of a mean)
        assert ((est - exact).abs() <= 5 * se + 2.0 / S).all()
        errors.append(float((est - exact).abs().mean()))
    assert errors[1] < errors[0] / 3  # converges: the error shrinks like 1/√S (×8 here), at least ×3
    # the same numbers from a chunking that does not divide N (the last chunk of indices wraps around, is cut)
    again = log_likelihood(p.model, p.guide, p.x, num_samples=16, seed=1, max_bytes=64 * 1024)
    assert torch.allclose(again, log_likelihood(p.model, p.guide, p.x, num_samples=16, seed=1, max_bytes=64 * 1024))


class LearnedPPCA(PPCA):
    """W, σ and the guide's map learned; the data plate indexes the whole data set."""

    def model(self, x):
        W = pyro.param("W", lambda: 0.1 * torch.randn(D, K, generator=torch.Generator().manual_seed(1)))
        sigma = pyro.param("sigma", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x), subsample_size=B) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([len(idx), K]).to_event(1))
            pyro.sample("obs", dist.Normal(z @ W.T, sigma).to_event(1), obs=x[idx])

    def guide(self, x):
        A = pyro.param("A", torch.zeros(K, D))
        s = pyro.param("s", torch.ones(K), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x), subsample_size=B) as idx:
            pyro.sample("z", dist.Normal(x[idx] @ A.T, s).to_event(1))


def test_a_full_data_model_trains_resumes_evaluates_and_is_diagnosed(tmp_path):
    p = LearnedPPCA()
    data = ppl_vae.as_data(p.x, val_fraction=0, test_fraction=0)
    # the whole data set in every call (batch_size = N): the model draws its own minibatch of B indices
    cfg = TrainConfig(epochs=60, batch_size=N, lr=0.05, logger="none")
    pyro.clear_param_store()
    res = ppl_vae.train((p.model, p.guide), data, cfg, seed=0, run_dir=tmp_path / "whole", progress=False)
    elbos = [h["train_elbo"] for h in res.history]
    assert sum(elbos[-10:]) / 10 > sum(elbos[:10]) / 10 + 1.0  # it learns
    pyro.clear_param_store()
    short = TrainConfig(epochs=30, batch_size=N, lr=0.05, logger="none")
    ppl_vae.train((p.model, p.guide), data, short, seed=0, run_dir=tmp_path / "killed", progress=False)
    pyro.clear_param_store()
    again = ppl_vae.train(
        (p.model, p.guide), data, cfg, seed=0, run_dir=tmp_path / "killed", resume=True, progress=False
    )
    assert [h["train_elbo"] for h in again.history] == elbos

    ll = log_likelihood(p.model, p.guide, p.x, num_samples=64, seed=0)
    assert ll.shape == (N,) and torch.isfinite(ll).all()
    diag = posterior_diagnostics(p.model, p.guide, p.x, num_samples=32)
    # every datapoint, each with its own observed values (not B random ones)
    assert diag["posterior"]["z"].shape == (1, 32, N, K)
    assert torch.allclose(torch.as_tensor(diag["observed_data"]["obs"].values), p.x)
    gaps = gap_report(p.model, p.guide, p.x, num_samples=8, steps=2, elbo_particles=4)
    assert gaps["num_images"] == N and len(gaps["per_image"]["amortisation"]) == N


def test_gaps_of_a_full_data_program_match_the_exact_kl():
    """pPCA's posterior is Gaussian, p(z|x) = N(M⁻¹Wᵀx, σ²M⁻¹): the guide's inference gap is exactly
    KL(q(z|x) ‖ p(z|x)) (the same for every x: equal means, fixed covariances), and q* of the full family reaches
    the posterior, so the approximation gap is 0. Per image the estimates differ from these only by Monte Carlo
    noise, so the tolerance is the standard error of their mean over the N images."""
    p = PPCA()
    M = p.W.T @ p.W + SIGMA**2 * torch.eye(K)
    post, q = SIGMA**2 * torch.linalg.inv(M), torch.diag(p.post_scale**2)
    kl = 0.5 * float(torch.trace(torch.linalg.solve(post, q)) - K + torch.logdet(post) - torch.logdet(q))
    r = gap_report(p.model, p.guide, p.x, num_samples=2000, family="full", steps=300, elbo_particles=2000)
    assert r["num_images"] == N
    assert r["inference"]["mean"] == pytest.approx(kl, abs=4 * r["inference"]["std_error"] + 2.0 / 2000)
    assert r["amortisation"]["mean"] == pytest.approx(kl, abs=4 * r["amortisation"]["std_error"] + 2.0 / 2000)
    assert abs(r["approximation"]["mean"]) <= 4 * r["approximation"]["std_error"] + 2.0 / 2000
    exact = p.exact()
    assert (torch.tensor(r["per_image"]["log_likelihood"]) - exact).abs().max() < 0.1
    # NUTS and AIS run per image: refused before any work, with the way out
    with pytest.raises(ProgramError, match="indexes the whole data set itself.*leave it out"):
        gap_report(p.model, p.guide, p.x, nuts_images=1)
    with pytest.raises(ProgramError, match="log_px_from='best'"):
        gap_report(p.model, p.guide, p.x, log_px_from="best")


class RegisteredPPCA(PyroModule):
    """pPCA with learned W, σ and guide map, its data plate indexing the whole data set it is given (a method
    registered from a file listed under a config's ``imports:``)."""

    def __init__(self, dim: int, latent: int, subsample: int):
        super().__init__()
        self.latent, self.subsample = latent, subsample
        self.W = torch.nn.Parameter(0.1 * torch.randn(dim, latent, generator=torch.Generator().manual_seed(0)))
        self.log_sigma = torch.nn.Parameter(torch.zeros(()))
        self.A = torch.nn.Parameter(torch.zeros(latent, dim))
        self.log_s = torch.nn.Parameter(torch.zeros(latent))

    def model(self, x):
        x = x.flatten(1)
        with pyro.plate("data", len(x), subsample_size=self.subsample) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([len(idx), self.latent]).to_event(1))
            pyro.sample("obs", dist.Normal(z @ self.W.T, self.log_sigma.exp()).to_event(1), obs=x[idx])

    def guide(self, x):
        x = x.flatten(1)
        with pyro.plate("data", len(x), subsample_size=self.subsample) as idx:
            pyro.sample("z", dist.Normal(x[idx] @ self.A.T, self.log_s.exp()).to_event(1))


def test_a_full_data_program_through_the_cli(tmp_path, capsys):
    method = tmp_path / "ppca_method.py"
    method.write_text(
        "from ppl_vae import register_model\n"
        "from tests.evaluate.test_full_data import RegisteredPPCA\n\n"
        "@register_model('full_data_ppca')\n"
        "def build(cfg, options, data_shape, num_data, num_classes):\n"
        "    return RegisteredPPCA(64, cfg.latent_dim, subsample=8)\n"
    )
    run = tmp_path / "run"
    common = [f"imports=[{method}]", "model.name=full_data_ppca", "data.pixels=continuous", "model.latent_dim=2"]
    common += ["model.likelihood=gaussian", "train.logger=none", "data.limit=300"]
    assert main(["train", "--run-dir", str(run), "--no-progress", *common, "train.epochs=2"]) == 0
    assert main(["train", "--resume", str(run), "--no-progress", "train.epochs=3"]) == 0
    assert main(["evaluate", str(run), "--num-samples", "16", "--max-test", "20"]) == 0
    assert main(["diagnose", str(run), "--num-images", "16", "--num-samples", "32"]) == 0
    gaps = ["--num-images", "16", "--num-samples", "16", "--steps", "2", "--elbo-particles", "8", "--nuts", "0"]
    assert main(["gaps", str(run), *gaps]) == 0
    report = json.loads((run / "gaps.json").read_text())
    assert report["num_images"] == 16 and len(report["per_image"]["amortisation"]) == 16
    assert all((run / f).is_file() for f in ("reconstructions.png", "prior_samples.png", "latent_scatter.png"))
    capsys.readouterr()
    assert main(["gaps", str(run), *gaps, "--log-px", "best"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--log-px best" in err[0] and "leave it out" in err[0], err


def test_a_program_that_fails_for_its_own_reasons_keeps_its_error():
    p = PPCA()

    def broken(x):
        raise IndexError("my own bug")

    with pytest.raises(IndexError, match="my own bug"):
        log_likelihood(broken, p.guide, p.x, num_samples=4)
