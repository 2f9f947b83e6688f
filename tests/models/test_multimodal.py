"""Multimodal VAEs: data, the product and mixture of experts, the stratified bound on an exact linear-Gaussian
multimodal model, masking, MMVM's prior, coherence oracles and the run end to end."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn
from torch.distributions import kl_divergence

from ppl_vae import evaluate_run, load_config, run_experiment
from ppl_vae.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from ppl_vae.data import DataBundle, load_data
from ppl_vae.data.multimodal import Layout, make_multimodal
from ppl_vae.distributions.experts import (
    ExpertMixture,
    ExpertPrior,
    nonempty_subsets,
    product_of_experts,
    random_subsets,
    uniform_weights,
)
from ppl_vae.distributions.likelihoods import GaussianLikelihood
from ppl_vae.errors import DataError
from ppl_vae.evaluate import coherence, conditional_log_likelihood, imputation_error, latent_probe
from ppl_vae.infer.analytic_kl import AnalyticKLELBO
from ppl_vae.infer.stratified import StratifiedIWAE
from ppl_vae.models import MMVAE, MVAE, build_model
from ppl_vae.training.plan import plan_for

MULTI = ["mvae", "mmvae", "mopoe", "sumpool", "mmvm"]
SHARED = ["mvae", "mmvae", "mopoe", "sumpool"]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


def _model(name, data, **opts):
    pyro.set_rng_seed(0)
    return build_model(
        ModelConfig(name=name, latent_dim=3, hidden=[16], options=opts), data.shape, num_data=len(data.train_x)
    )


# ------------------------------------------------------------------------------------------------------ data


def test_polyfashion_pairs_different_images_of_one_class_and_is_reproducible(digits):
    d = make_multimodal(digits, "poly", num_modalities=3, seed=3)
    parts = d.layout.split(d.train_x)
    base = digits.train_x.reshape(len(digits.train_x), -1)
    assert torch.equal(d.train_labels, digits.train_y)
    # modality 0 is the image itself on a texture: where the image is 1 the composite is 1
    assert torch.allclose(parts["m0"][digits.train_x == 1], torch.ones(()))
    # modality 1 is an inverted *other* image of the same class: invert it and look it up
    partner = (1 - parts["m1"]).reshape(len(base), -1)
    idx = torch.cdist(partner, base).argmin(1)
    assert torch.allclose(base[idx], partner, atol=1e-6)
    assert torch.equal(digits.train_y[idx], digits.train_y)
    assert (idx != torch.arange(len(idx))).float().mean() > 0.99
    again = make_multimodal(digits, "poly", num_modalities=3, seed=3)
    other = make_multimodal(digits, "poly", num_modalities=3, seed=4)
    assert torch.equal(again.train_x, d.train_x) and not torch.equal(other.train_x, d.train_x)
    assert d.train_x.min() >= 0 and d.train_x.max() <= 1


def test_missing_masks_follow_the_rate_keep_one_modality_and_zero_the_slot(digits):
    rate = 0.4
    d = make_multimodal(digits, "poly", num_modalities=3, missing_rate=rate, seed=0)
    mask = d.train_y
    n = mask.numel()
    # P(missing) = rate, conditioned on "not all missing" for the whole row: the expected observed share
    p_obs = (1 - rate) / (1 - rate**3)
    assert abs(mask.float().mean() - p_obs) < 4 * math.sqrt(p_obs * (1 - p_obs) / n)
    assert mask.any(1).all() and d.test_y.all()
    parts = d.layout.split(d.train_x)
    for m, name in enumerate(d.layout.names):
        assert (parts[name][~mask[:, m]] == 0).all()


def test_image_label_layout_and_bad_arguments(digits):
    d = make_multimodal(digits, "image_label", seed=0)
    assert d.layout.names == ("image", "label") and d.layout.shapes[1] == (10,)
    assert torch.equal(d.layout.split(d.test_x)["label"].argmax(-1), digits.test_y)
    with pytest.raises(DataError, match="missing_rate"):
        make_multimodal(digits, "poly", missing_rate=1.0)
    with pytest.raises(DataError, match="one class label"):
        make_multimodal(DataBundle.from_tensors(torch.rand(8, 1, 4, 4)), "poly")
    with pytest.raises(DataError, match="last dimension 74"):
        d.layout.split(torch.zeros(2, 5))
    with pytest.raises(ConfigError, match="data.multimodal"):
        DataConfig(multimodal="triple").validate()
    with pytest.raises(ConfigError, match="needs multimodal data"):
        build_model(ModelConfig(name="mmvae"), (1, 8, 8))


# ------------------------------------------------------------------------------------------- experts


def test_product_of_experts_equals_the_normalised_product_by_quadrature():
    g = torch.Generator().manual_seed(0)
    locs, scales = (
        torch.randn(1, 3, 2, generator=g, dtype=torch.float64),
        0.5 + torch.rand(1, 3, 2, generator=g, dtype=torch.float64),
    )
    present = torch.tensor([[True, False, True]])
    loc, scale = product_of_experts(locs, scales, present, prior=True)
    grid = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    logp = dist.Normal(0.0, 1.0).log_prob(zz).sum(-1)
    for m in (0, 2):
        logp = logp + dist.Normal(locs[0, m], scales[0, m]).log_prob(zz).sum(-1)
    w = torch.softmax(logp, 0)
    mean = (w[:, None] * zz).sum(0)
    var = (w[:, None] * (zz - mean) ** 2).sum(0)
    assert torch.allclose(mean, loc[0], atol=1e-6) and torch.allclose(var.sqrt(), scale[0], atol=1e-6)
    # the normalised density itself, at a few points
    h = (grid[1] - grid[0]) ** 2
    dens = torch.exp(logp - torch.logsumexp(logp, 0)) / h
    exact = dist.Normal(loc[0], scale[0]).log_prob(zz).sum(-1).exp()
    assert torch.allclose(dens[::5000], exact[::5000], rtol=1e-4, atol=1e-8)


def test_identical_experts_reduce_to_one_expert():
    loc1, sc1 = torch.randn(4, 1, 3), torch.rand(4, 1, 3) + 0.3
    m = 3
    locs, scales = loc1.expand(4, m, 3), sc1.expand(4, m, 3)
    allm = torch.ones(4, m, dtype=torch.bool)
    loc, scale = product_of_experts(locs, scales, allm, prior=False)  # Π of M copies: σ²/M
    assert torch.allclose(loc, loc1[:, 0]) and torch.allclose(scale, sc1[:, 0] / math.sqrt(m))
    loc, scale = product_of_experts(locs, scales, allm, prior=True)  # with the prior: T = 1 + M/σ²
    t = 1 + m / sc1[:, 0] ** 2
    assert torch.allclose(scale, t.rsqrt()) and torch.allclose(loc, m / sc1[:, 0] ** 2 * loc1[:, 0] / t)
    mix = ExpertMixture(locs, scales, torch.full((4, m), 1 / m))
    z = torch.randn(7, 4, 3)
    assert torch.allclose(mix.log_prob(z), dist.Normal(loc1[:, 0], sc1[:, 0]).log_prob(z).sum(-1), atol=1e-5)
    assert nonempty_subsets(3).sum(1).tolist() == [1, 1, 1, 2, 2, 2, 3]


def test_mixture_components_and_masked_weights():
    locs, scales = torch.randn(5, 3, 2), torch.rand(5, 3, 2) + 0.2
    w = torch.tensor([[0.5, 0.0, 0.5]]).expand(5, 3)
    mix = ExpertMixture(locs, scales, w, component=2)
    torch.manual_seed(0)
    z = mix.rsample((4000,))
    assert torch.allclose(z.mean(0), locs[:, 2], atol=4 * scales[:, 2].max() / math.sqrt(4000))
    manual = torch.logsumexp(
        torch.stack([dist.Normal(locs[:, c], scales[:, c]).log_prob(z[:3]).sum(-1) + math.log(0.5) for c in (0, 2)]), 0
    )
    assert torch.allclose(mix.log_prob(z[:3]), manual, atol=1e-5)
    mask = torch.rand(50, 3) < 0.6
    mask[~mask.any(1), 0] = True
    keep = random_subsets(mask)
    assert keep.any(1).all() and not (keep & ~mask).any()


# ---------------------------------------------------------------------- linear-Gaussian multimodal model


class _Linear(nn.Module):
    def __init__(self, a, c, s):
        super().__init__()
        self.a, self.c, self.s = nn.Parameter(a), nn.Parameter(c), nn.Parameter(s)

    def forward(self, x):
        return x @ self.a.T + self.c, self.s.expand(len(x), -1)


class _Decoder(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, z):
        return z @ self.w.T + self.b


def _linear_mmvae(m=2, dx=3, dz=2, sigma2=0.5, exact=False, seed=0, cls=MMVAE, **kwargs):
    """x_m = W z + b + ε, ε ~ N(0, σ² I), the same W, b for every modality (W with orthogonal columns)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dx, dz, generator=g))
    w = q * torch.tensor([1.5, 0.7])
    b = 0.3 * torch.randn(dx, generator=g)
    lam = torch.eye(dz) + m * w.T @ w / sigma2  # posterior precision given M identical copies (diagonal)
    if exact:  # the exact posterior of X = (x, …, x) from one copy x
        a, c = torch.linalg.solve(lam, m * w.T / sigma2), -torch.linalg.solve(lam, m * w.T @ b / sigma2)
        s = torch.diagonal(torch.linalg.inv(lam)).sqrt()
    else:
        a, c, s = 0.3 * torch.randn(dz, dx, generator=g), torch.zeros(dz), torch.full((dz,), 0.8)
    layout = Layout(tuple(f"m{i}" for i in range(m)), ((dx,),) * m, ("image",) * m)
    enc = nn.ModuleList(_Linear(a.clone(), c.clone(), s.clone()) for _ in range(m))
    dec = nn.ModuleList(_Decoder(w.clone(), b.clone()) for _ in range(m))
    lik = nn.ModuleList(GaussianLikelihood(sigma2=sigma2, link="identity") for _ in range(m))
    model = cls(layout, enc, dec, lik, dz, **kwargs)
    cov = torch.kron(torch.ones(m, m), w @ w.T) + sigma2 * torch.eye(m * dx)
    evidence = dist.MultivariateNormal(b.repeat(m), cov)
    return model, evidence


def test_stratified_bound_is_below_log_evidence_and_rises_with_k():
    model, evidence = _linear_mmvae(exact=False)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))  # four distinct pairs (x_1, x_2)
    log_px = evidence.log_prob(x)
    for k, reps in ((1, 400), (16, 200)):
        obj = StratifiedIWAE(model.strata, num_particles=k, estimator="iwae")
        pyro.set_rng_seed(0)
        vals = torch.stack(
            [
                torch.stack([-torch.tensor(obj.loss(model.model, model.guide, x[i : i + 1])) for i in range(4)])
                for _ in range(reps)
            ]
        )
        mean, se = vals.mean(0), vals.std(0) / math.sqrt(reps)
        assert (mean - 4 * se <= log_px).all(), (k, mean, log_px)
        if k == 1:
            first = mean
    assert (mean > first).all()  # L_16 > L_1 on every datapoint (the gap is several nats here)


def test_stratified_bound_reaches_log_evidence_with_exact_experts_and_dreg_gradient_vanishes():
    model, evidence = _linear_mmvae(exact=True)
    one = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    x = torch.cat([one, one], 1)  # X = (x, x): every expert sees the whole evidence
    obj = StratifiedIWAE(model.strata, num_particles=3, estimator="dreg")
    pyro.set_rng_seed(0)
    loss = obj.differentiable_loss(model.model, model.guide, x)
    assert torch.allclose(-loss, evidence.log_prob(x).sum(), atol=1e-4)
    loss.backward()
    for p in model.encoders.parameters():  # log w is constant in z: the DReG path gradient is exactly 0
        assert p.grad is None or p.grad.abs().max() < 1e-4


def test_mopoe_sampled_subset_is_unbiased_for_the_mean_of_the_subsets_elbos_and_below_the_mixture_elbo():
    """On the linear-Gaussian model every subset's ELBO is closed form: E_q[log N(x; Wz + b, σ²)] = log N(x; Wμ + b,
    σ²) − tr(W diag(s²) Wᵀ)/(2σ²), KL(q ‖ N(0, I)) exact. The sampled-subset loss (one subset and one draw per
    datapoint) averages to −Σ_A w_A ELBO(q_A), value and gradient, within 5 standard errors of R = 1000 draws; the
    mixture's own ELBO is above it by Σ_A w_A KL(q_A ‖ q) (the convexity of the KL)."""
    from ppl_vae.infer.component_average import ComponentAverageELBO
    from ppl_vae.models.mopoe import MoPoE

    sigma2 = 0.5
    model, _ = _linear_mmvae(exact=False, cls=MoPoE, sigma2=sigma2, objective="sampled_subset")
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[True, True], [True, True], [True, False]])  # the last: one modality, one subset
    params = list(model.parameters())

    def exact_bound():
        xs, _, m = model.inputs(x, mask)
        locs, scales = model.components(xs, m)  # (B, C, D)
        w = model.weights(m)  # (B, C)
        total = 0.0
        for j, (dec, xm) in enumerate(zip(model.decoders, xs, strict=True)):
            W = dec.w
            mean = locs @ W.T + dec.b  # (B, C, dx)
            rec = dist.Normal(mean, math.sqrt(sigma2)).log_prob(xm.unsqueeze(1)).sum(-1)
            rec = rec - ((scales.pow(2).unsqueeze(-2) * W.pow(2)).sum((-1, -2))) / (2 * sigma2)
            total = total + rec * m[:, j : j + 1]
        kl = 0.5 * (locs.pow(2) + scales.pow(2) - 1 - 2 * scales.log()).sum(-1)
        return (w * (total - kl)).sum()

    exact = exact_bound()
    exact_grad = torch.autograd.grad(exact, params)
    objective = ComponentAverageELBO()
    assert isinstance(plan_for(model).objective(TrainConfig()), ComponentAverageELBO)
    pyro.set_rng_seed(0)
    R, values, grads = 1000, [], []
    for _ in range(R):
        loss = objective.differentiable_loss(model.model, model.guide, x, mask)
        values.append(-loss.detach())
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(-loss, params)]))
    values, grads = torch.stack(values), torch.stack(grads)
    assert abs(values.mean() - exact) <= 5 * values.std() / math.sqrt(R)
    flat = torch.cat([g.flatten() for g in exact_grad])
    assert ((grads.mean(0) - flat).abs() <= 5 * grads.std(0) / math.sqrt(R) + 1e-6).all()
    # the mixture's ELBO minus this bound is Σ_A w_A KL(q_A ‖ q): positive with two subsets, 0 with one
    with torch.no_grad():
        xs, _, m = model.inputs(x, mask)
        q, (locs, scales), w = model.posterior(xs, m), model.components(xs, m), model.weights(m)
        gap = torch.zeros(len(x))
        for c in range(locs.shape[1]):
            qc = dist.Normal(locs[:, c], scales[:, c])
            z = qc.sample((4000,))
            gap += w[:, c] * (qc.log_prob(z).sum(-1) - q.log_prob(z)).mean(0)
    assert (gap[:2] > 0.01).all() and gap[2].abs() < 1e-5, gap


def test_mopoe_sampled_subset_needs_one_particle():
    from ppl_vae.models.mopoe import MoPoE

    model, _ = _linear_mmvae(cls=MoPoE, objective="sampled_subset")
    with pytest.raises(ConfigError, match="num_particles must be 1 with model.options.objective='sampled_subset'"):
        plan_for(model).objective(TrainConfig(num_particles=4))


# ----------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("name", SHARED)
def test_masking_a_modality_removes_exactly_its_likelihood_and_the_guide_never_reads_it(name, digits):
    data = make_multimodal(digits, "poly", num_modalities=3, seed=0)
    model = _model(name, data)
    x = data.train_x[:6]
    full = torch.ones(6, 3, dtype=torch.bool)
    part = full.clone()
    part[:, 1] = False
    z = torch.randn(6, 3)
    cond = poutine.condition(model.model, {"z": z})
    t_full = poutine.trace(cond).get_trace(x, full)
    t_part = poutine.trace(cond).get_trace(x, part)
    t_full.compute_log_prob(), t_part.compute_log_prob()
    removed = t_full.nodes["x_m1"]["log_prob"].sum()
    assert torch.allclose(t_full.log_prob_sum() - t_part.log_prob_sum(), removed, atol=1e-3)
    assert t_part.nodes["x_m1"]["log_prob"].abs().sum() == 0
    # change the missing modality's values: q(z | X_S) does not move
    poked = x.clone()
    poked[:, 64:128] = torch.rand(6, 64)
    q1, q2 = model.conditional(x, part), model.conditional(poked, part)
    assert torch.allclose(q1.mean, q2.mean) and torch.allclose(q1.log_prob(z), q2.log_prob(z))


def test_mmvm_masks_latent_and_likelihood_of_a_missing_modality_and_its_prior(digits):
    data = make_multimodal(digits, "poly", num_modalities=3, seed=0)
    model = _model("mmvm", data)
    x = data.train_x[:4]
    part = torch.ones(4, 3, dtype=torch.bool)
    part[:, 2] = False
    t = poutine.trace(model.model).get_trace(x, part)
    t.compute_log_prob()
    assert t.nodes["x_m2"]["log_prob"].abs().sum() == 0 and t.nodes["z_m2"]["log_prob"].abs().sum() == 0
    # the pairwise prior: E_q[log q_m − log r] = (1/|S|) Σ_m̃ KL(q_m ‖ q_m̃), exactly, term by term
    locs, scales = torch.randn(4, 3, 2), torch.rand(4, 3, 2) + 0.3
    w = torch.full((4, 3), 1 / 3)
    prior = ExpertPrior(locs, scales, w, kind="pairwise")
    z = torch.randn(9, 4, 2)
    manual = sum(dist.Normal(locs[:, m], scales[:, m]).log_prob(z).sum(-1) for m in range(3)) / 3
    assert torch.allclose(prior.log_prob(z), manual, atol=1e-5)
    half = ExpertPrior(locs, scales, w, alpha=0.25, kind="mixture")
    mix = ExpertMixture(locs, scales, w).log_prob(z)
    assert torch.allclose(half.log_prob(z), 0.25 * dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + 0.75 * mix, atol=1e-5)


def test_mmvm_pairwise_kl_is_closed_form_and_matches_its_monte_carlo_value():
    torch.manual_seed(0)
    locs, scales = torch.randn(5, 3, 4), torch.rand(5, 3, 4) + 0.3
    w = uniform_weights(torch.tensor([[1, 1, 1]] * 4 + [[1, 0, 1]], dtype=torch.bool))
    q = dist.Normal(locs[:, 0], scales[:, 0]).to_event(1)
    for alpha in (0.0, 0.3):
        r = ExpertPrior(locs, scales, w, alpha=alpha, kind="pairwise")
        exact = kl_divergence(q, r)
        by_hand = sum(w[:, m] * kl_divergence(q, dist.Normal(locs[:, m], scales[:, m]).to_event(1)) for m in range(3))
        std = kl_divergence(q, dist.Normal(torch.zeros(5, 4), torch.ones(5, 4)).to_event(1))
        assert torch.allclose(exact, alpha * std + (1 - alpha) * by_hand, atol=1e-5)
        z = q.sample((200_000,))
        mc = (q.log_prob(z) - r.log_prob(z)).mean(0)
        assert torch.allclose(exact, mc, atol=0.05), (exact, mc)  # s.e. of the mean ≈ 0.005 here
    assert exact[4] < by_hand[4] + 1  # the missing modality's weight is zero: no term for it
    with pytest.raises(NotImplementedError):  # the exact KL to the mixture has no closed form: sampled
        kl_divergence(q, ExpertPrior(locs, scales, w, kind="mixture"))


def test_mmvm_default_objective_uses_the_closed_form_pairwise_kl(digits):
    data = make_multimodal(digits, "poly", num_modalities=3, seed=0)
    model = _model("mmvm", data)
    x = data.train_x[:8]
    pyro.set_rng_seed(0)
    elbo = AnalyticKLELBO()
    loss = float(elbo.loss(model.model, model.guide, x))
    assert elbo.analytic
    # by hand at the same draws: the likelihood from the guide's z, minus Σ_m (1/3) Σ_m̃ KL(q_m ‖ q_m̃) exactly
    pyro.set_rng_seed(0)
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    sites = model_trace.nodes.values()
    rec = sum(float(s["log_prob_sum"].detach()) for s in sites if s["type"] == "sample" and s["is_observed"])
    with torch.no_grad():
        locs, scales = model.experts(model.inputs(x)[0])
        kl = sum(
            float(kl_divergence(dist.Normal(locs[:, m], scales[:, m]), dist.Normal(locs[:, k], scales[:, k])).sum()) / 3
            for m in range(3)
            for k in range(3)
        )
    scale = len(data.train_x) / len(x)  # the data plate's
    assert loss == pytest.approx(-(rec - scale * kl), rel=1e-5)


def test_mmvm_anneals_alpha_from_one_to_zero(digits):
    data = make_multimodal(digits, "poly", num_modalities=3, seed=0)
    model = _model("mmvm", data, anneal_epochs=4)
    plan = plan_for(model)
    stage = plan.stages(TrainConfig(epochs=6))[0]
    assert stage.first_scored_epoch == 5
    plan.begin_stage(stage)
    seen = []
    for e in range(6):
        rec = {}
        plan.on_epoch_end(e, rec, data)
        seen.append(rec["alpha"])
    assert seen == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_mvae_subsets_are_all_singles_and_random():
    layout = Layout(("a", "b", "c"), ((2,),) * 3, ("image",) * 3)
    model = MVAE(layout, nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), 2, random_subsets=2)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    subs = model.subsets(mask)
    assert len(subs) == 1 + 3 + 2 and torch.equal(subs[0], mask)
    assert all(s.sum(1).eq(1).all() for s in subs[1:4])
    assert all(not (s & ~mask).any() for s in subs[4:])


# -------------------------------------------------------------------------------------------- evaluation


def test_coherence_is_one_for_identity_and_chance_for_a_constant_generator(digits):
    d = make_multimodal(digits, "image_label", seed=0)
    x, labels = d.test_x[:200], d.test_labels[:200]
    # an exact classifier of the image modality: look the image up among the real ones
    images = d.layout.split(x)["image"].reshape(len(x), -1)

    def exact(values):
        return labels[torch.cdist(values.reshape(len(values), -1), images).argmin(1)].numpy()

    classifiers = [exact, lambda v: v.argmax(-1).numpy()]

    def identity(xb, given, j):
        return d.layout.split(xb)[d.layout.names[j]]

    out = coherence(identity, d.layout, x, labels, classifiers)
    assert np.allclose(out["matrix"], 1.0) and np.allclose(out["rest_to"], 1.0)

    def constant(xb, given, j):
        return d.layout.split(x[:1].expand(len(xb), -1))[d.layout.names[j]]

    out = coherence(constant, d.layout, x, labels, classifiers)
    share = float((labels == labels[0]).float().mean())
    assert np.allclose(out["matrix"], share) and share < 0.2


def test_probe_and_imputation_run_on_a_model(digits):
    d = make_multimodal(digits, "image_label", seed=0)
    model = _model("mopoe", d).eval()
    probe = latent_probe(model, d.train_x[:300], d.train_labels[:300], d.test_x[:100], d.test_labels[:100])
    assert 0 <= probe["joint"] <= 1 and len(probe["unimodal"]) == 2
    imp = imputation_error(model, d.test_x[:50])
    assert set(imp["per_modality"]) == {"image", "label"} and 0 <= imp["per_modality"]["label"] <= 1


@pytest.mark.parametrize("name", ["mmvae", "mmvm"])
def test_a_multimodal_run_trains_evaluates_and_draws_its_grid(name, tmp_path):
    cfg = load_config(
        f"configs/{name}_polyfashion.yaml",
        [
            "data.name=digits",
            "train.epochs=2",
            "model.hidden=[32]",
            "model.latent_dim=4",
            "data.missing_rate=0.2",
            "eval.num_samples=8",
            "eval.max_test=40",
        ],
    )
    run = run_experiment(cfg, tmp_path / name, progress=False)
    assert (tmp_path / name / "cross_generation.png").stat().st_size > 1000
    out = evaluate_run(run)
    saved = json.loads((tmp_path / name / "evaluation.json").read_text())
    assert len(saved["coherence"]["matrix"]) == 3 and saved["probe_acc"]["joint"] > 0.1
    assert (out["test_ll"] is None) == (name == "mmvm")


def test_conditional_log_likelihood_matches_the_exact_gaussian_conditional():
    model, evidence = _linear_mmvae(exact=True)
    one = torch.randn(3, 3, generator=torch.Generator().manual_seed(5))
    x = torch.cat([one, one], 1)  # the pair's proposal is then exact; x_1's alone is q(z | x_1, x_1)
    mean, cov = evidence.loc, evidence.covariance_matrix
    # exact log p(x_2 | x_1) = log p(x_1, x_2) − log p(x_1) with p(x_1) the first block's marginal
    p1 = dist.MultivariateNormal(mean[:3], cov[:3, :3])
    exact = evidence.log_prob(x) - p1.log_prob(x[:, :3])
    est = conditional_log_likelihood(model, x, given=0, target=1, num_samples=20000, seed=0)
    # log p̂(x_1, x_2) is exact; log p̂(x_1) draws from q(z | x_1, x_1), narrower than p(z | x_1) but with
    # variance ratio (1 + a)/(1 + 2a) > 1/2, so the weights have finite variance: 20000 draws, a few hundredths
    assert torch.allclose(est, exact, atol=0.05), (est, exact)


def test_subset_objectives_validate_with_the_full_elbo_and_empty_conditions_are_refused(digits):
    data = make_multimodal(digits, "poly", num_modalities=3, seed=0)
    for name in ("mvae", "sumpool"):
        plan = plan_for(_model(name, data))
        assert type(plan.objective(TrainConfig())).__name__ == "SubsetELBO"
        assert type(plan.validation_objective(TrainConfig())).__name__ != "SubsetELBO"
    model = _model("mmvae", data)
    with pytest.raises(ValueError, match="at least one modality"):
        model.conditional(data.test_x[:2], torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no joint likelihood"):
        conditional_log_likelihood(_model("mmvm", data), data.test_x[:2], 0, 1, num_samples=4)


def test_a_checkpoint_older_than_the_multimodal_fields_compares_them_at_their_defaults():
    from ppl_vae.config import Config
    from ppl_vae.errors import CheckpointError
    from ppl_vae.experiment import check_same_config

    old = Config().to_dict()
    for k in ("multimodal", "num_modalities", "missing_rate"):
        del old["data"][k]
    check_same_config({"config": old}, Config(), "old")  # the same run: fields at their defaults
    now = load_config(None, ["data.multimodal=poly"])
    with pytest.raises(CheckpointError, match=r"data.multimodal: None in the checkpoint, 'poly' now"):
        check_same_config({"config": old}, now, "old")


def test_joint_baselines_of_mmvm_as_options(digits):
    """The mmvmvae repository's joint VAEs: PoE without the prior expert, the average of the experts, the full set
    only; MoE with one expert per datapoint (``sampled_expert``)."""
    data = make_multimodal(digits, "poly", num_modalities=3, seed=0)
    x = data.train_x[:5]
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[0, 1] = False
    avg = _model("mvae", data, subsets="joint", aggregation="average")
    locs, scales = avg.experts(avg.inputs(x)[0])
    q = avg.posterior(avg.inputs(x)[0], mask)
    assert torch.allclose(q.mean[0], (locs[0, 0] + locs[0, 2]) / 2, atol=1e-6)
    assert torch.allclose(q.variance[1], scales[1].pow(2).mean(0), atol=1e-6)
    assert [s.tolist() for s in avg.subsets(mask)] == [mask.tolist()]
    poe = _model("mvae", data, aggregation="product_no_prior")
    q = poe.posterior(poe.inputs(x)[0], mask)
    loc, scale = product_of_experts(*poe.experts(poe.inputs(x)[0]), mask, prior=False)
    assert torch.allclose(q.mean, loc) and torch.allclose(q.stddev, scale)
    assert len(poe.subsets(mask)) == 5  # the default rule: all, each single modality, one random subset
    moe = _model("mmvae", data, objective="sampled_expert")
    assert type(plan_for(moe).objective(TrainConfig())).__name__ == "ComponentAverageELBO"
    assert type(plan_for(_model("mmvae", data)).objective(TrainConfig())).__name__ == "StratifiedIWAE"
    with pytest.raises(ConfigError, match="num_particles must be 1 with model.options.objective='sampled_expert'"):
        plan_for(moe).objective(TrainConfig(num_particles=4))
