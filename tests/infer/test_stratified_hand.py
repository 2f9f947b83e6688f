"""StratifiedIWAE on MMVAE equals a hand-written stratified IWAE (bench/mmvae_cost.py's ``hand_loss``, the
reference its timing compares against): the same loss and gradients at the same weights and draws, with the
experts shared across the strata or not."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pyro
import pytest
import torch

from ppl_vae.distributions.experts import ExpertMixture
from ppl_vae.infer.stratified import StratifiedIWAE
from ppl_vae.infer.trace_checks import IWAEError

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def mc():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("mmvae_cost")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _small(mc):
    torch.manual_seed(0)
    model = mc.build(hidden=(8,), latent_dim=3, num_data=50, shape=(1, 2, 3))
    x = torch.rand(5, 3 * 6).bernoulli()
    return model, x


@pytest.mark.parametrize("vectorize_strata", [True, False])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
@pytest.mark.parametrize("K", [1, 3])
def test_library_equals_hand_written(mc, float64, estimator, K, vectorize_strata):
    """Both library paths — the strata in one pass (the plan's) and one pass per stratum — against the hand loss
    with the same draws."""
    model, x = _small(mc)
    out = mc.check(model, x, K, estimator, seed=3, vectorize_strata=vectorize_strata)
    assert out["loss_rel_diff"] < 1e-12 and out["grad_rel_diff"] < 1e-10, out


def test_one_pass_skips_strata_without_weight_and_matches_the_loop(mc, float64):
    """A batch where modality 2 is missing for every datapoint: its stratum has weight 0 and is not drawn, in
    both paths; the partly observed rows weigh their strata 1/|S|. Same loss and gradients with the draws made
    alike (K·B·D a multiple of 16, so one randn of S·K particles equals S consecutive ones on the CPU)."""
    torch.manual_seed(0)
    model = mc.build(hidden=(8,), latent_dim=4, num_data=50, shape=(1, 2, 3))
    x = torch.rand(4, 18).bernoulli()
    mask = torch.tensor([[True, True, False], [True, False, False], [False, True, False], [True, True, False]])
    out = []
    for vec in (True, False):
        elbo = mc.library_objective(model, 2, "dreg", vectorize_strata=vec)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with pyro.validation_enabled(False):
            loss = elbo.loss_and_grads(model.model, model.guide, x, mask)
        out.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = out
    assert a == pytest.approx(b, rel=1e-12)
    assert len(ga) == len(gb) > 0
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_vectorize_strata_needs_vectorized_particles(mc):
    model, _ = _small(mc)
    with pytest.raises(IWAEError, match="vectorize_particles"):
        StratifiedIWAE(model.strata, vectorize_strata=True, vectorize_particles=False)


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_shared_experts_change_nothing(mc, float64, estimator):
    model, x = _small(mc)
    results = []
    for shared in (None, model.sharing_experts):
        elbo = StratifiedIWAE(model.strata, num_particles=3, estimator=estimator, shared=shared)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with pyro.validation_enabled(False):
            loss = elbo.loss_and_grads(model.model, model.guide, x)
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = results
    assert a == pytest.approx(b, rel=1e-13)
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    assert model._expert_cache is None  # the block is closed


def test_stratum_expands_as_itself_and_dreg_takes_one_pass(mc):
    model, x = _small(mc)
    q = model.posterior([x[:, :6].reshape(5, 1, 2, 3)] * 3, model.layout.full_mask(5), stratum=1)
    big = q.expand((4, 5))
    assert type(big) is ExpertMixture and big.batch_shape == (4, 5) and big.component == 1
    torch.manual_seed(0)
    a = big.rsample()
    torch.manual_seed(0)
    b = q.rsample((4,))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(big.log_prob(a), q.log_prob(a), rtol=0, atol=0)
    elbo = mc.library_objective(model, 3, "dreg")
    lw = elbo.iwae.log_weights(model.model, model.guide, x, None, stratum=0, _grad=True)
    assert lw.dreg_mode == "one_pass"
