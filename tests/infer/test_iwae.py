"""TraceIWAE (ppl_vae/infer/iwae.py) against exact oracles.

Oracles: the linear-Gaussian VAE (log p(x), the exact posterior and the closed-form ELBO), Pyro's Trace_ELBO
(K = 1, same seed, same draws) and an independent plain-torch DReG computation on replayed draws. Statistical
tolerances are stated next to each assertion; every test uses fixed seeds, so the outcome is deterministic.
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.optim import Adam
from torch import nn

import ppl_vae
from ppl_vae.distributions.likelihoods import BernoulliLikelihood
from ppl_vae.infer.importance import LogWeights, importance_log_weights
from ppl_vae.infer.iwae import TraceIWAE
from ppl_vae.infer.trace_checks import (
    PARTICLE_PLATE,
    GlobalLatentError,
    IWAEError,
    NoDataPlateError,
    NonReparameterizedError,
)
from ppl_vae.models import VAE2
from ppl_vae.models.linear_gaussian import LinearGaussianVAE

D, d = 5, 2


def make_lg(guide_type="exact", shift=0.0, scale=1.0, num_data=None, n=4, double=True, seed=0):
    """A small linear-Gaussian VAE (W scaled so the posterior sd is ≈ 0.7) and n datapoints drawn from it."""
    W = 0.7 * torch.randn(D, d, generator=torch.Generator().manual_seed(seed))
    m = LinearGaussianVAE(
        D, d, 1.0, W=W, guide_type=guide_type, guide_shift=shift, guide_scale=scale, num_data=num_data, seed=seed
    )
    x = m.simulate(n, torch.Generator().manual_seed(seed + 1))
    if double:
        m, x = m.double(), x.double()
    return m, x


def set_near_optimal_encoder(m, noise=0.1, seed=0):
    """Amortized guide ≈ the best diagonal Gaussian (mean map of the exact posterior, sd from the precision)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        prec = torch.eye(d, dtype=m.W.dtype) + m.W.T @ m.W / m.sigma**2
        A = torch.linalg.inv(prec) @ m.W.T / m.sigma**2
        m.enc_A.copy_(A + noise * torch.randn(A.shape, generator=g, dtype=A.dtype))
        m.enc_c.copy_(-A @ m.b + noise * torch.randn(d, generator=g, dtype=A.dtype))
        m.enc_s.copy_(torch.log(torch.expm1(1.2 * prec.diagonal().rsqrt())))


def enc_params(m):
    return [m.enc_A, m.enc_c, m.enc_s]


def flat_grads(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


# ---------------------------------------------------------------------------------------------------------
# (a) exact posterior as guide: every log-weight equals log p(x_i), so the bound is Σ log p(x) for every K
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 5, 50])
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_exact_guide_bound_equals_log_marginal(K, vectorize, estimator):
    m, x = make_lg()
    log_px = m.log_marginal(x).sum().item()
    elbo = TraceIWAE(num_particles=K, vectorize_particles=vectorize, estimator=estimator)
    # float64, |log p| ≈ 50: rounding error ≈ 1e-13, so 1e-9 is "float tolerance".
    assert -elbo.loss(m.model, m.guide, x) == pytest.approx(log_px, rel=1e-10, abs=1e-9)
    loss = elbo.differentiable_loss(m.model, m.guide, x)
    assert -loss.item() == pytest.approx(log_px, rel=1e-10, abs=1e-9)


@pytest.mark.parametrize("K", [1, 5, 50])
def test_exact_guide_subsampled_plate_scales_outside(K):
    N, B = 12, 4
    m, x = make_lg(num_data=N, n=B)
    expected = (N / B) * m.log_marginal(x).sum().item()
    assert -TraceIWAE(num_particles=K).loss(m.model, m.guide, x) == pytest.approx(expected, rel=1e-10)


def test_log_weights_shape_and_unscaled():
    m, x = make_lg(num_data=1000, n=3)
    lw = TraceIWAE(num_particles=7).log_weights(m.model, m.guide, x)
    assert isinstance(lw, LogWeights)
    assert lw.log_w.shape == (7, 3) and lw.scale == pytest.approx(1000 / 3) and lw.num_data == 1000
    # unscaled: each column equals log p(x_i) (exact guide), whatever num_data is
    torch.testing.assert_close(lw.log_w, m.log_marginal(x).expand(7, 3), rtol=1e-10, atol=1e-10)
    assert set(lw.model_terms) == {"z", "x"} and set(lw.guide_terms) == {"z"}
    assert lw.observed_sites == ("x",)


# ---------------------------------------------------------------------------------------------------------
# (b) a poor guide: the bound increases with K and stays below log p(x)
# ---------------------------------------------------------------------------------------------------------


def test_poor_guide_bound_increases_with_K_and_stays_below_log_px():
    # guide N(μ + 0.7, 1.3² Σ): worse than the posterior but wider, so the weights have finite variance
    m, x = make_lg(shift=0.7, scale=1.3, double=False)
    R = 200
    log_px = m.log_marginal(x).sum().item()
    exact_elbo = m.exact_elbo(x).sum().item()
    stats = {}
    for K in (1, 5, 50):
        elbo = TraceIWAE(num_particles=K)
        vals = torch.tensor([-elbo.loss(m.model, m.guide, x) for _ in range(R)], dtype=torch.float64)
        stats[K] = (vals.mean().item(), vals.std().item() / math.sqrt(R))  # mean and its standard error
    (m1, s1), (m5, s5), (m50, s50) = stats[1], stats[5], stats[50]
    # K = 1 is the ELBO: the MC mean is within 4 standard errors of the closed form
    assert abs(m1 - exact_elbo) < 4 * s1
    # monotone in K: each gap (≈ 10 and ≈ 3 nats here) exceeds 4 standard errors of the difference
    assert m5 - m1 > 4 * math.hypot(s1, s5)
    assert m50 - m5 > 4 * math.hypot(s5, s50)
    # still a lower bound: E[L_50] + 3 SE < log p(x) (the gap is ≈ 0.4 nats, ≈ 6 SE)
    assert m50 + 3 * s50 < log_px


# ---------------------------------------------------------------------------------------------------------
# (c) subsampling: the minibatch loss is unbiased for the full-data bound; RenyiELBO(alpha=0) is not
# ---------------------------------------------------------------------------------------------------------


def _replayed_guide(m, z):
    """m.guide with its draw of z fixed (common random numbers for the full data and each minibatch).

    A replayed site is not broadcast by the particle plate (its fn keeps batch shape (B,), its value is
    (K, B, d)), so log q still has shape (K, B) but Pyro's model/guide shape validation would object: the
    caller disables validation.
    """
    trace = poutine.Trace()
    trace.add_node("z", type="sample", is_observed=False, value=z, infer={})
    return poutine.replay(m.guide, trace=trace)


def test_subsampled_minibatch_loss_is_unbiased_and_renyi_is_not():
    N, B, K = 6, 2, 5
    m, x = make_lg(shift=0.7, scale=1.3, num_data=N, n=N)
    torch.manual_seed(0)
    with torch.no_grad():
        z = m.guide_dist(x).expand((K, N)).rsample()  # (K, N, d): the same draws for every minibatch
    ours = TraceIWAE(num_particles=K, max_plate_nesting=1)
    renyi = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    with pyro.validation_enabled(False):
        _subsampling_checks(m, x, z, ours, renyi, N, B)


def _subsampling_checks(m, x, z, ours, renyi, N, B):
    full = -ours.loss(m.model, _replayed_guide(m, z), x)  # N/B = 1: the full-data bound
    full_renyi = -renyi.loss(m.model, _replayed_guide(m, z), x)
    assert full_renyi == pytest.approx(full, rel=1e-10)  # the two agree without subsampling

    def minibatch(elbo, idx):
        idx = torch.tensor(idx)
        return -elbo.loss(m.model, _replayed_guide(m, z[:, idx]), x[idx])

    subsets = list(itertools.combinations(range(N), B))  # a uniformly random minibatch: E = mean
    ours_mean = sum(minibatch(ours, s) for s in subsets) / len(subsets)
    renyi_mean = sum(minibatch(renyi, s) for s in subsets) / len(subsets)
    partition = [(0, 1), (2, 3), (4, 5)]
    ours_partition = sum(B / N * minibatch(ours, s) for s in partition)
    tol = 1e-9 * abs(full)  # exact identity: float64 rounding only
    assert abs(ours_mean - full) < tol and abs(ours_partition - full) < tol
    # Renyi puts N/B = 3 inside the logsumexp: LME(3a) ≥ 3 LME(a), an over-estimate by whole nats
    assert renyi_mean - full > 1.0 and abs(renyi_mean - full) > 1e6 * tol


# ---------------------------------------------------------------------------------------------------------
# (e) K = 1 is Trace_ELBO: same seed, same draws, same value and gradient
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guide_type", ["exact", "amortized"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_k1_equals_trace_elbo(guide_type, vectorize):
    m, x = make_lg(guide_type=guide_type, shift=0.5, scale=1.3, num_data=20, n=5)
    params = list(m.parameters())
    for seed in range(3):
        pyro.set_rng_seed(seed)
        ours = TraceIWAE(num_particles=1, vectorize_particles=vectorize).loss(m.model, m.guide, x)
        pyro.set_rng_seed(seed)
        ref = Trace_ELBO().loss(m.model, m.guide, x)
        assert ours == pytest.approx(ref, rel=1e-12)  # float64: equal up to summation order
        pyro.set_rng_seed(seed)
        g_ours = flat_grads(TraceIWAE(num_particles=1).differentiable_loss(m.model, m.guide, x), params)
        pyro.set_rng_seed(seed)
        g_ref = flat_grads(Trace_ELBO().differentiable_loss(m.model, m.guide, x), params)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10)


def test_k1_equals_trace_elbo_two_layer_vae():
    torch.manual_seed(0)
    vae = VAE2((8, 8), BernoulliLikelihood(), latent_dim1=6, latent_dim=3, hidden1=(16,), hidden2=(8,), num_data=32)
    x = (torch.rand(8, 8, 8) < 0.3).float()
    pyro.set_rng_seed(1)
    ours = TraceIWAE(num_particles=1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    ref = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert ours == pytest.approx(ref, rel=1e-5)  # float32 sums in another order


# ---------------------------------------------------------------------------------------------------------
# (d) DReG
# ---------------------------------------------------------------------------------------------------------


def _grads_over_seeds(m, x, estimator, K, R, params):
    elbo = TraceIWAE(num_particles=K, estimator=estimator)
    out = []
    for r in range(R):
        torch.manual_seed(r)
        out.append(flat_grads(elbo.differentiable_loss(m.model, m.guide, x), params))
    return torch.stack(out)


def test_dreg_model_gradient_and_value_equal_iwae_per_draw():
    # amortized guide: the model parameters (W, b) are not in the guide, so with the same draws DReG's θ-gradient
    # Σ w̃ ∇θ log p(x, z) is IWAE's exactly; the loss value is the IWAE bound under both estimators
    m, x = make_lg(guide_type="amortized")
    set_near_optimal_encoder(m)
    for K in (1, 5):
        for r in range(3):
            torch.manual_seed(r)
            li = TraceIWAE(num_particles=K).differentiable_loss(m.model, m.guide, x)
            gi = flat_grads(li, [m.W, m.b])
            torch.manual_seed(r)
            ld = TraceIWAE(num_particles=K, estimator="dreg").differentiable_loss(m.model, m.guide, x)
            gd = flat_grads(ld, [m.W, m.b])
            assert ld.item() == pytest.approx(li.item(), rel=1e-12)
            torch.testing.assert_close(gd, gi, rtol=1e-9, atol=1e-9)


def test_dreg_mean_encoder_gradient_matches_iwae_and_snr_is_higher_at_K50():
    m, x = make_lg(guide_type="amortized")
    set_near_optimal_encoder(m)
    params = enc_params(m)
    R = 200
    for K in (5, 50):
        gi = _grads_over_seeds(m, x, "iwae", K, R, params)
        gd = _grads_over_seeds(m, x, "dreg", K, R, params)
        # Same expectation: paired differences (same seeds) have mean 0; with 14 components, |z| < 4.5 fails
        # by chance with probability < 1e-4.
        diff = gd - gi
        z = diff.mean(0) / (diff.std(0) / math.sqrt(R))
        assert z.abs().max() < 4.5, z
        if K == 50:
            snr_i = gi.mean(0).abs() / gi.std(0)
            snr_d = gd.mean(0).abs() / gd.std(0)
            # Rainforth et al. (2018): the IWAE encoder SNR decays like 1/√K (here median ≈ 0.05), DReG's does
            # not (≈ 4.7). Component-wise the SNR estimate from R = 200 has sd ≈ 0.07, so a 5× median ratio and
            # a majority of components are safe margins.
            assert snr_d.median() > 5 * snr_i.median()
            assert (snr_d > snr_i).float().mean() > 0.8


def test_dreg_shared_parameters_have_the_iwae_expectation():
    # The exact-but-perturbed guide uses the model's W and b: each gets Σ w̃ A (model part) + Σ w̃² B (guide part)
    m, x = make_lg(shift=0.3, scale=1.2)
    R = 200
    gi = _grads_over_seeds(m, x, "iwae", 5, R, [m.W, m.b])
    gd = _grads_over_seeds(m, x, "dreg", 5, R, [m.W, m.b])
    diff = gd - gi
    z = diff.mean(0) / (diff.std(0) / math.sqrt(R))
    assert z.abs().max() < 4.5, z  # 15 components, paired z-test as above
    # ... and the gradients are far from zero (|mean|/SE ≈ 11 or more), so a dropped or doubled part would show
    assert (gi.mean(0).abs() / (gi.std(0) / math.sqrt(R))).min() > 8


def _hier_model(x):
    m = pyro.param("m", torch.tensor(0.8, dtype=torch.float64))
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z2", dist.Normal(torch.zeros_like(x), 1.0))
        z1 = pyro.sample("z1", dist.Normal(m * z2, 0.7))
        pyro.sample("x", dist.Normal(z1, 0.5), obs=x)


def _hier_params():
    return {
        n: pyro.param(n, torch.tensor(v, dtype=torch.float64))
        for n, v in [("a", 0.6), ("s1", 0.5), ("c", 0.4), ("s2", 0.8)]
    }


def _hier_guide(x):
    p = _hier_params()
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(p["a"] * x, p["s1"]))
        pyro.sample("z2", dist.Normal(p["c"] * z1, p["s2"]))


def test_dreg_hierarchical_guide_matches_independent_computation():
    """q(z1|x) q(z2|z1): DReG keeps the path of z1 through q(z2|z1)'s parameters, stopping only φ itself."""
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    K = 4
    names = ["a", "s1", "c", "s2", "m"]
    elbo = TraceIWAE(num_particles=K, estimator="dreg", max_plate_nesting=1)
    for seed in range(3):
        torch.manual_seed(seed)
        loss = elbo.differentiable_loss(_hier_model, _hier_guide, x)
        got = torch.stack(torch.autograd.grad(loss, [pyro.param(n) for n in names]))
        # the same draws, read off a trace of the vectorised guide after the same seed
        torch.manual_seed(seed)
        tr = poutine.trace(pyro.plate(PARTICLE_PLATE, K, dim=-2)(_hier_guide)).get_trace(x)
        z1v, z2v = tr.nodes["z1"]["value"].detach(), tr.nodes["z2"]["value"].detach()
        # independent plain-torch DReG: z(φ) by reparameterisation, log q with φ detached, log p with θ live
        P = {n: pyro.param(n) for n in names}
        a, s1, c, s2, mm = (P[n] for n in names)
        eps1 = (z1v - a.detach() * x) / s1.detach()
        z1 = a * x + s1 * eps1
        eps2 = (z2v - c.detach() * z1v) / s2.detach()
        z2 = c * z1 + s2 * eps2
        log_p = (
            dist.Normal(0.0, 1.0).log_prob(z2)
            + dist.Normal(mm * z2, 0.7).log_prob(z1)
            + dist.Normal(z1, 0.5).log_prob(x)
        )
        log_q_sg = dist.Normal(a.detach() * x, s1.detach()).log_prob(z1) + dist.Normal(
            c.detach() * z1, s2.detach()
        ).log_prob(z2)
        log_w = log_p - log_q_sg  # value = log w; ∇φ = path only; ∇θ = direct
        w = torch.softmax(log_w.detach(), 0)
        phi = [a, s1, c, s2]
        g_phi = torch.autograd.grad(-(w**2 * log_w).sum(), phi, retain_graph=True)
        g_theta = torch.autograd.grad(-(w * log_w).sum(), [mm])
        expected = torch.stack([*g_phi, *g_theta])
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# (d') DReG in one pass equals the two-pass surrogate, gradient by gradient, with the same draws
# ---------------------------------------------------------------------------------------------------------


def _reference_dreg_loss(model, guide, args, K):
    """The two-pass DReG loss of TraceIWAE before the one-pass rewrite (a copy): model and guide replayed at
    detached draws, S = Σ sg(w̃) log p(x, sg z) + Σ sg(w̃²)[log w + log q(sg z) − log p(x, sg z)] per datapoint,
    loss = −(bound + S − sg S). Vectorised particles at dim −2, the data plate at dim −1 (max_plate_nesting = 1)."""
    particles = pyro.plate(PARTICLE_PLATE, K, dim=-2)
    guide_trace = poutine.trace(particles(guide)).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(particles(model), trace=guide_trace)).get_trace(*args)
    sg = poutine.Trace()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            sg.add_node(name, **{**site, "value": site["value"].detach()})
    model_sg = poutine.trace(poutine.replay(particles(model), trace=sg)).get_trace(*args)
    guide_sg = poutine.trace(poutine.replay(particles(guide), trace=sg)).get_trace(*args)

    def total(trace):
        trace = poutine.util.prune_subsample_sites(trace)
        trace.compute_log_prob()
        out = 0.0
        for site in trace.nodes.values():
            if site["type"] == "sample":
                lp = site["unscaled_log_prob"]
                assert lp.shape[-1] == args[0].shape[0] and lp.dim() <= 2
                out = out + lp.expand(K, args[0].shape[0])
        return out

    x_site = next(s for s in model_trace.nodes.values() if s["type"] == "sample" and s["is_observed"])
    scale = float(x_site["scale"])  # N / B
    log_p, log_q = total(model_trace), total(guide_trace)
    log_p_sg, log_q_sg = total(model_sg), total(guide_sg)
    log_w = log_p - log_q
    bound = scale * (torch.logsumexp(log_w, 0) - math.log(K)).sum()
    w = torch.softmax(log_w.detach(), 0)
    S = scale * ((w * log_p_sg).sum() + (w.pow(2) * (log_w + log_q_sg - log_p_sg)).sum())
    return -(bound.detach() + S - S.detach())


class _Shift(dist.torch_transform.TransformModule):
    """y = x + shift with a learnable shift: a transform that is an nn.Module (cannot be detached generically)."""

    domain = dist.constraints.real
    codomain = dist.constraints.real
    bijective = True

    def __init__(self, d):
        super().__init__(cache_size=1)
        self.shift = nn.Parameter(0.1 * torch.ones(d, dtype=torch.float64))

    def _call(self, x):
        return x + self.shift

    def _inverse(self, y):
        return y - self.shift

    def log_abs_det_jacobian(self, x, y):
        return torch.zeros_like(x)


def _transformed_guide_pair(module_transform: bool):
    """The amortized linear-Gaussian model with a guide N(0, 1) pushed through an affine map (tensor parameters:
    detachable) or through an affine map and a learnable shift module (not detachable)."""
    m, x = make_lg(guide_type="amortized")
    set_near_optimal_encoder(m)
    m.shift = _Shift(d)

    def guide(x):
        loc = x @ m.enc_A.T + m.enc_c
        scale = torch.nn.functional.softplus(m.enc_s).expand_as(loc) + 1e-4
        ts = [dist.transforms.AffineTransform(loc, scale)] + ([m.shift] if module_transform else [])
        with ppl_vae.distributions.plate.data_plate(x, m.num_data):
            pyro.sample("z", dist.TransformedDistribution(dist.Normal(torch.zeros_like(loc), 1.0), ts).to_event(1))

    return m, m.model, guide, x


def _dreg_case(name):
    """(parameters, model, guide, x, expected dreg_mode) for the equality tests, in float64."""
    if name in ("lg_amortized", "lg_exact"):
        m, x = make_lg(guide_type=name[3:], shift=0.3, scale=1.2, num_data=20, n=6)
        if name == "lg_amortized":
            set_near_optimal_encoder(m)
        return list(m.parameters()), m.model, m.guide, x, "one_pass"
    if name in ("vae", "gamix"):
        torch.manual_seed(0)
        m = ppl_vae.build_model(ppl_vae.ModelConfig(name=name, latent_dim=2, hidden=[8]), (1, 4, 4), num_data=20)
        m = m.double()
        x = (torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.4).double()
        return list(m.parameters()), m.model, m.guide, x, "one_pass"
    if name == "vae2":
        torch.manual_seed(0)
        m = VAE2(
            (4, 4), BernoulliLikelihood(), latent_dim1=3, latent_dim=2, hidden1=(8,), hidden2=(4,), num_data=20
        ).double()
        x = (torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.4).double()
        return list(m.parameters()), m.model, m.guide, x, "guide_replay"  # q(z2 | z1): hierarchical
    m, model, guide, x = _transformed_guide_pair(module_transform=name == "transformed_module")
    return list(m.parameters()), model, guide, x, "guide_replay" if name == "transformed_module" else "one_pass"


def _all_grads(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=False)]


DREG_CASES = ["lg_amortized", "lg_exact", "vae", "vae2", "gamix", "transformed", "transformed_module"]


@pytest.mark.parametrize("case", DREG_CASES)
@pytest.mark.parametrize("K", [1, 5])
def test_one_pass_dreg_gradients_equal_the_two_pass_surrogate(case, K):
    """Every parameter (model, guide and, for lg_exact, shared W and b) gets the gradient of the old two-pass
    surrogate, with the same seed and therefore the same draws; the loss value is the same IWAE bound."""
    params, model, guide, x, mode = _dreg_case(case)
    elbo = TraceIWAE(num_particles=K, estimator="dreg", max_plate_nesting=1)
    for seed in range(3):
        torch.manual_seed(seed)
        lw = elbo.log_weights(model, guide, x, _grad=True)
        assert lw.dreg_mode == mode
        torch.manual_seed(seed)
        loss = elbo.differentiable_loss(model, guide, x)
        torch.manual_seed(seed)
        ref = _reference_dreg_loss(model, guide, (x,), K)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
        got, expected = _all_grads(loss, params), _all_grads(ref, params)
        assert any(e.abs().sum() > 0 for e in expected)
        for _p, g, e in zip(params, got, expected, strict=False):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)  # float64: rounding only


@pytest.mark.parametrize("case", ["lg_exact", "vae", "vae2"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_one_pass_dreg_equals_the_two_pass_fallback_for_looped_particles(case, vectorize):
    """The two-pass surrogate is kept as the fallback for draws a hook cannot be placed on (``_dreg_replay``
    forces it): looped and vectorised particles give the same gradients both ways."""
    params, model, guide, x, mode = _dreg_case(case)
    one = TraceIWAE(num_particles=4, estimator="dreg", vectorize_particles=vectorize)
    two = TraceIWAE(num_particles=4, estimator="dreg", vectorize_particles=vectorize)
    two._dreg_replay = True
    torch.manual_seed(0)
    assert two.log_weights(model, guide, x, _grad=True).dreg_mode == "replay"
    torch.manual_seed(0)
    assert one.log_weights(model, guide, x, _grad=True).dreg_mode == mode
    torch.manual_seed(1)
    g1 = _all_grads(one.differentiable_loss(model, guide, x), params)
    torch.manual_seed(1)
    g2 = _all_grads(two.differentiable_loss(model, guide, x), params)
    for a, b in zip(g1, g2, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def _count_calls(module):
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    return counter, module.register_forward_hook(hook)


def test_one_pass_dreg_runs_the_decoder_once():
    torch.manual_seed(0)
    vae = ppl_vae.build_model(ppl_vae.ModelConfig(name="vae", latent_dim=2, hidden=[8]), (1, 4, 4), num_data=20)
    x = (torch.rand(6, 1, 4, 4) < 0.4).float()
    dec, h1 = _count_calls(vae.decoder)
    enc, h2 = _count_calls(vae.encoder)
    for est, (n_dec, n_enc) in [("iwae", (1, 1)), ("dreg", (1, 1))]:
        dec["n"] = enc["n"] = 0
        TraceIWAE(num_particles=5, estimator=est, max_plate_nesting=1).loss_and_grads(vae.model, vae.guide, x)
        assert (dec["n"], enc["n"]) == (n_dec, n_enc), est
    h1.remove(), h2.remove()
    v2, x2 = _small_two_layer()
    dec1, h1 = _count_calls(v2.decoder)
    enc1, h2 = _count_calls(v2.encoder)
    TraceIWAE(num_particles=5, estimator="dreg", max_plate_nesting=1).loss_and_grads(v2.model, v2.guide, x2[:4])
    assert (dec1["n"], enc1["n"]) == (1, 2)  # hierarchical guide: the guide is replayed, the model is not
    h1.remove(), h2.remove()


# ---------------------------------------------------------------------------------------------------------
# training and gradients reach every parameter
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_svi_with_trace_iwae_improves_linear_gaussian(estimator):
    torch.manual_seed(0)
    target, _ = make_lg(double=False)
    x = target.simulate(64, torch.Generator().manual_seed(3))
    m = LinearGaussianVAE(D, d, 1.0, guide_type="amortized", num_data=64, seed=5)  # another W: must learn
    before = m.log_marginal(x).sum().item()
    svi = SVI(m.model, m.guide, Adam({"lr": 0.03}), TraceIWAE(num_particles=5, estimator=estimator))
    losses = [svi.step(x[i % 4 * 16 : (i % 4 + 1) * 16]) for i in range(200)]
    after = m.log_marginal(x).sum().item()
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 50.0  # noisy minibatch losses: compare averages
    assert after > before + 50.0  # exact log p(x) of the data improves


def _guide_params(fn, *args):
    tr = poutine.trace(fn, param_only=True).get_trace(*args)
    return {name: site["value"].unconstrained() for name, site in tr.nodes.items()}


def _small_two_layer(num_data=16):
    torch.manual_seed(0)
    vae = VAE2(
        (8, 8), BernoulliLikelihood(), latent_dim1=6, latent_dim=3, hidden1=(16,), hidden2=(8,), num_data=num_data
    )
    x = (torch.rand(num_data, 8, 8) < 0.3).float()
    return vae, x


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_two_layer_vae_trains_and_every_guide_param_gets_a_gradient(estimator, vectorize):
    vae, x = _small_two_layer()
    elbo = TraceIWAE(num_particles=3, estimator=estimator, vectorize_particles=vectorize)
    guide_params = _guide_params(vae.guide, x[:8])
    assert len(guide_params) == 8  # encoder and up.0 (q(z1|x), q(z2|z1)): 2 linear layers each
    loss = elbo.differentiable_loss(vae.model, vae.guide, x[:8])
    grads = torch.autograd.grad(loss, list(guide_params.values()))
    for name, g in zip(guide_params, grads, strict=False):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), elbo)
    losses = [svi.step(x[i % 2 * 8 : (i % 2 + 1) * 8]) for i in range(6)]
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_every_amortized_guide_param_gets_a_gradient(estimator):
    m, x = make_lg(guide_type="amortized")
    loss = TraceIWAE(num_particles=5, estimator=estimator).differentiable_loss(m.model, m.guide, x)
    for _p, g in zip(enc_params(m) + [m.W, m.b], torch.autograd.grad(loss, enc_params(m) + [m.W, m.b]), strict=False):
        assert g.abs().min() > 0


def test_loss_and_grads_backpropagates_and_returns_the_bound():
    m, x = make_lg(guide_type="amortized")
    torch.manual_seed(0)
    value = TraceIWAE(num_particles=5, estimator="dreg").loss_and_grads(m.model, m.guide, x)
    assert isinstance(value, float) and math.isfinite(value)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    torch.manual_seed(0)
    assert TraceIWAE(num_particles=5).loss(m.model, m.guide, x) == pytest.approx(value, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# global sites, custom plate names, clear errors
# ---------------------------------------------------------------------------------------------------------


def test_global_observed_site_is_counted_once():
    N, B = 10, 4
    m, x = make_lg(num_data=N, n=B)
    prior_w = dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)  # float64 like the model

    def model(x):
        pyro.sample("w_penalty", prior_w, obs=m.W.sum())  # a global observed site outside the data plate
        m.model(x)

    g = prior_w.log_prob(m.W.sum()).item()
    expected = N / B * m.log_marginal(x).sum().item() + g
    for K, vec in [(1, True), (5, True), (5, False)]:
        elbo = TraceIWAE(num_particles=K, vectorize_particles=vec)
        assert -elbo.loss(model, m.guide, x) == pytest.approx(expected, rel=1e-10)
        lw = elbo.log_weights(model, m.guide, x)
        assert set(lw.global_terms) == {"w_penalty"} and lw.global_terms["w_penalty"].shape == (K,)


def test_custom_plate_name():
    def model(x):
        with pyro.plate("batch", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))  # the exact posterior

    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    log_px = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum().item()
    assert -TraceIWAE(num_particles=5, data_plate="batch").loss(model, guide, x) == pytest.approx(log_px, rel=1e-6)
    with pytest.raises(NoDataPlateError, match=r"data_plate=") as info:
        TraceIWAE(num_particles=5).loss(model, guide, x)
    assert "ppl_vae.distributions.plate.data_plate" in str(info.value) and "'z'" in str(info.value)


def test_no_plate_at_all_is_a_clear_error():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(NoDataPlateError, match="no plate named 'data'"):
        TraceIWAE(num_particles=2).loss(model, guide, torch.tensor(0.3))


def test_global_latent_in_guide_is_rejected():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0))

    with pytest.raises(GlobalLatentError, match="guide site 'mu'.*outside the plate 'data'"):
        TraceIWAE(num_particles=3).loss(model, guide, torch.zeros(4))
    assert issubclass(GlobalLatentError, ValueError)


def _discrete_pair(enumerate_=False):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(p), infer={"enumerate": "parallel"} if enumerate_ else {})

    return model, guide


def test_non_reparameterised_guide_site_is_rejected_for_gradients_only():
    model, guide = _discrete_pair()
    x = torch.tensor([0.2, 1.1])
    # The loss (no gradient) is a valid importance-sampling estimate ...
    assert math.isfinite(TraceIWAE(num_particles=4).loss(model, guide, x))
    # ... but the pathwise gradients need rsample, for both estimators
    for est in ("iwae", "dreg"):
        with pytest.raises(NonReparameterizedError, match="guide site 'c'.*Bernoulli"):
            TraceIWAE(num_particles=4, estimator=est).differentiable_loss(model, guide, x)
        with pytest.raises(NonReparameterizedError):
            SVI(model, guide, Adam({"lr": 0.1}), TraceIWAE(num_particles=4, estimator=est)).step(x)


def test_enumerated_guide_site_is_rejected():
    model, guide = _discrete_pair(enumerate_=True)
    with pytest.raises(IWAEError, match="guide site 'c' is enumerated"):
        TraceIWAE(num_particles=4).loss(model, guide, torch.tensor([0.2, 1.1]))


def test_model_latent_missing_from_guide_is_rejected():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            z = pyro.sample("z", dist.Normal(u, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0))

    with pytest.raises(IWAEError, match="model latent site 'u' has no guide site"):
        TraceIWAE(num_particles=2, vectorize_particles=False).loss(model, guide, torch.zeros(3))


def test_extra_scale_factor_is_rejected():
    m, x = make_lg()
    with pytest.raises(IWAEError, match="site '.*' has scale 0.1"):
        TraceIWAE(num_particles=2).loss(poutine.scale(m.model, 0.1), m.guide, x)


def test_vectorisation_shape_error_points_to_the_fix():
    class BadLikelihood(nn.Module):  # the event dims counted from the tensor rank, particle dim included
        def forward(self, out):
            return dist.Normal(out, 1.0).to_event(out.dim() - 1)

    lik, W = BadLikelihood(), torch.randn(3, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", lik(z @ W.T), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))

    x = torch.randn(5, 3)
    with pytest.raises(IWAEError, match=r"vectorize_particles=False"):
        TraceIWAE(num_particles=4).loss(model, guide, x)
    assert math.isfinite(TraceIWAE(num_particles=4, vectorize_particles=False).loss(model, guide, x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"estimator": "vimco"}, "estimator must be one of"),
        ({"num_particles": 0}, "positive integer"),
        ({"num_particles": 2.5}, "positive integer"),
        ({"data_plate": ""}, "plate name"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(IWAEError, match=match):
        TraceIWAE(**kwargs)


def test_importance_log_weights_loop_and_vectorised_agree_on_exact_guide():
    m, x = make_lg(n=3)
    a = importance_log_weights(m.model, m.guide, (x,), num_particles=6, vectorize_particles=True, keep_values=True)
    b = importance_log_weights(m.model, m.guide, (x,), num_particles=6, vectorize_particles=False, keep_values=True)
    assert a.log_w.shape == b.log_w.shape == (6, 3)
    torch.testing.assert_close(a.log_w, b.log_w)
    assert a.values["z"].shape == b.values["z"].shape == (6, 3, d)
    assert a.observed["x"].shape == (3, D)
