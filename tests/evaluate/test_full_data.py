"""A Pyro program that indexes the whole data set itself (Pyro's subsampling idiom) evaluates: probabilistic PCA,
whose evidence is exact, p(x) = N(0, W Wᵀ + σ² I), written as Pyro users write it, with a guide a little wider
than the exact posterior so the importance-sampled estimate has variance and converges as S grows."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_vae
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
    with pytest.raises(ProgramError, match="indexes the whole data set itself"):
        gap_report(p.model, p.guide, p.x, num_samples=8)


def test_a_program_that_fails_for_its_own_reasons_keeps_its_error():
    p = PPCA()

    def broken(x):
        raise IndexError("my own bug")

    with pytest.raises(IndexError, match="my own bug"):
        log_likelihood(broken, p.guide, p.x, num_samples=4)
