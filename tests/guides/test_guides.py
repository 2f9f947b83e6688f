"""Richer guides (ppl_vae.guides): exact oracles on the linear-Gaussian model.

* Laplace guide (VLAE): one undamped Newton step on a linear decoder is the exact posterior, so its ELBO equals
  log p(x) for every draw; the damped iterations follow μ_T = μ* + Π(1 − η_t)(μ₀ − μ*) exactly; for Bernoulli
  output the iterations are Newton steps whose precision is the exact negative Hessian of log p(x, z).
* Mixture guides (the reparameterised mixture, GAMIX, the recursive mixture): ELBO and IWAE bound stay below
  log p(x) and reach it when components equal the posterior (a model with a diagonal posterior, W = Q diag(s)
  with orthonormal Q, so that a diagonal component *can* equal it).
* Every guide parameter gets a non-zero gradient; the implicit reparameterisation gradient is unbiased.
Statistical tolerances are k standard errors of the estimator, computed from the draws themselves.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.distributions.plate import data_plate
from ppl_vae.errors import ConfigError
from ppl_vae.evaluate.likelihood import log_likelihood
from ppl_vae.guides import (
    DiagNormalMixture,
    LaplaceGuide,
    MixtureEncoder,
    RecursiveMixtureEncoder,
    batch_jacobian,
    laplace_posterior,
    log_joint,
    recursive_log_weights,
    recursive_mixture_distribution,
    recursive_mixture_terms,
    variance_collapse_penalty,
)
from ppl_vae.guides.laplace import relu_mlp_layers
from ppl_vae.infer import AggregateKLObjective, PenalisedELBO, TraceIWAE
from ppl_vae.infer.aggregate_kl import batch_moment_kl
from ppl_vae.models import LinearGaussianVAE, build_model
from ppl_vae.training import plan_for

D, d = 6, 3


def linear_model(diagonal_posterior: bool = False, sigma: float = 0.7, num_data=None):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(D, d, generator=g)
    if diagonal_posterior:  # WᵀW diagonal ⇒ p(z|x) has a diagonal covariance
        Q, _ = torch.linalg.qr(torch.randn(D, d, generator=g))
        W = Q * torch.tensor([2.0, 1.0, 0.5])
    return LinearGaussianVAE(D, d, sigma=sigma, W=W, b=torch.randn(D, generator=g), num_data=num_data)


def data(m, n=8, seed=0):
    return m.simulate(n, torch.Generator().manual_seed(seed))


def exact_posterior_linear(m):
    """(A, c, σ*): the posterior mean A x + c and the posterior std of the (diagonal-posterior) model."""
    W, s2 = m.W.detach(), float(m.sigma) ** 2
    cov = torch.linalg.inv(torch.eye(d) + W.T @ W / s2)
    assert torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-6)
    A = cov @ W.T / s2
    return A, -A @ m.b.detach(), cov.diagonal().sqrt()


def _raw_for(scale):  # softplus(raw) + 1e-4 = scale
    return torch.log(torch.expm1(scale - 1e-4))


# ------------------------------------------------------------------------------------------------- Laplace guide


def laplace_guide(m, **kw):
    return LaplaceGuide(
        nn.Linear(D, d),
        lambda z: z @ m.W.T + m.b,
        d,
        likelihood="gaussian",
        sigma2=float(m.sigma) ** 2,
        num_data=m.num_data,
        **kw,
    )


def test_laplace_guide_recovers_the_exact_posterior_and_its_elbo_is_log_evidence():
    m = linear_model()
    x = data(m)
    guide = laplace_guide(m, num_steps=1, damping=1.0)  # one undamped Newton step: exact for a linear decoder
    mu, tril = guide.posterior(x)
    mu_star, cov_star = m.posterior(x)
    torch.testing.assert_close(mu, mu_star, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tril @ tril.mT, cov_star.expand(8, d, d), rtol=1e-5, atol=1e-6)
    log_px = m.log_marginal(x).sum().item()
    # q = p(z|x) ⇒ log p(x,z) − log q(z|x) = log p(x) for every draw: exact up to float error
    assert -Trace_ELBO(num_particles=5, vectorize_particles=True).loss(m.model, guide, x) == pytest.approx(
        log_px, abs=2e-3
    )
    assert -TraceIWAE(num_particles=7).loss(m.model, guide, x) == pytest.approx(log_px, abs=2e-3)
    lp = log_likelihood(m.model, guide, x, num_samples=50)
    torch.testing.assert_close(lp, m.log_marginal(x).detach(), rtol=0, atol=1e-3)


def test_damped_vlae_iterations_follow_the_closed_form():
    """Linear decoder ⇒ every μ̂ is μ*, so μ_T = μ* + Π_t (1 − η_t)(μ₀ − μ*), η_t = 0.5/(t+1), T = 4."""
    m = linear_model()
    x = data(m)
    guide = laplace_guide(m)  # VLAE defaults
    mu, tril = guide.posterior(x)
    mu_star, cov_star = m.posterior(x)
    keep = math.prod(1 - 0.5 / (t + 1) for t in range(4))
    torch.testing.assert_close(mu, mu_star + keep * (guide.init(x) - mu_star), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tril @ tril.mT, cov_star.expand(8, d, d), rtol=1e-5, atol=1e-6)
    # the ELBO then is the closed form for N(μ_T, Σ*), below log p(x)
    elbo = -Trace_ELBO(num_particles=2000, vectorize_particles=True).loss(m.model, guide, x)
    assert elbo < m.log_marginal(x).sum().item()


def test_laplace_guide_parameters_get_gradients_through_the_iterations():
    m = linear_model()
    x = data(m)
    guide = laplace_guide(m)
    loss = Trace_ELBO().differentiable_loss(m.model, guide, x)
    loss.backward()
    for name, p in guide.init.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.W.grad.abs().sum() > 0  # the model's W, through the guide's Jacobian and the likelihood


def test_bernoulli_newton_step_and_precision_are_exact_for_linear_logits():
    """log p(x,z) = Σ [x f − softplus(f)] − |z|²/2 with f = Wz + b: each undamped step is Newton's method, and
    Λ at the mode is −∇²_z log p(x, z) (exact: the logits are linear)."""
    torch.manual_seed(0)
    W, b = torch.randn(D, d), torch.randn(D)
    x = torch.bernoulli(torch.full((4, D), 0.5))
    fn = lambda z: z @ W.T + b  # noqa: E731

    def log_joint(z, xi):
        f = fn(z)
        return (xi * f - torch.nn.functional.softplus(f)).sum() - 0.5 * z.pow(2).sum()

    mu0 = 0.3 * torch.randn(4, d)
    one, _ = laplace_posterior(x, mu0, fn, likelihood="bernoulli", num_steps=1, damping=1.0)
    for i in range(4):
        g = torch.autograd.functional.jacobian(lambda z, i=i: log_joint(z, x[i]), mu0[i])
        H = torch.autograd.functional.hessian(lambda z, i=i: log_joint(z, x[i]), mu0[i])
        torch.testing.assert_close(one[i], mu0[i] - torch.linalg.solve(H, g), rtol=1e-4, atol=1e-5)
    mode, prec = laplace_posterior(x, mu0, fn, likelihood="bernoulli", num_steps=30, damping=1.0)
    for i in range(4):
        g = torch.autograd.functional.jacobian(lambda z, i=i: log_joint(z, x[i]), mode[i])
        H = torch.autograd.functional.hessian(lambda z, i=i: log_joint(z, x[i]), mode[i])
        assert g.abs().max() < 1e-4
        torch.testing.assert_close(prec[i], -H, rtol=1e-4, atol=1e-5)


def test_line_search_is_exact_on_a_linear_decoder_and_never_lowers_the_log_joint():
    """Linear-Gaussian: the full Newton step lands on μ* and has the largest log joint, so one line-searched step
    is exact. ReLU decoder (Bernoulli): log p(x, μ_t) is non-decreasing in t by construction, per data point,
    and gradients reach the decoder and the starting point through the chosen candidates."""
    m = linear_model()
    x = data(m)
    mu, tril = laplace_guide(m, num_steps=1, damping="line_search").posterior(x)
    mu_star, cov_star = m.posterior(x)
    torch.testing.assert_close(mu, mu_star, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tril @ tril.mT, cov_star.expand(8, d, d), rtol=1e-5, atol=1e-6)

    torch.manual_seed(1)
    dec = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, D))
    for p in dec[-1].parameters():
        p.data.mul_(4.0)  # sharp posteriors: full Newton steps overshoot
    x = torch.bernoulli(torch.sigmoid(dec(torch.randn(16, d))).detach())
    mu0 = (3 * torch.randn(16, d)).requires_grad_()
    layers = relu_mlp_layers(dec)

    def joint(z):
        return log_joint(x, dec(z), z, "bernoulli")

    path = [joint(mu0)]
    for T in range(1, 7):
        mu_T, _ = laplace_posterior(
            x, mu0, dec, likelihood="bernoulli", num_steps=T, damping="line_search", layers=layers
        )
        path.append(joint(mu_T))
    path = torch.stack(path).detach()
    assert (path[1:] >= path[:-1] - 1e-4).all()
    assert (path[-1] > path[0] + 1e-3).float().mean() > 0.5  # and it does move most points uphill
    full, _ = laplace_posterior(x, mu0, dec, likelihood="bernoulli", num_steps=6, damping=1.0, layers=layers)
    assert (joint(full).detach() < path[-1] - 1e-3).any()  # plain Newton steps go downhill somewhere here
    joint(mu_T).sum().backward()
    assert mu0.grad.abs().sum() > 0 and dec[0].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="damping"):
        laplace_posterior(x, mu0, dec, likelihood="bernoulli", damping="armijo")
    m2 = build_model(
        ModelConfig(name="vlae", latent_dim=2, hidden=[8], options={"damping": "line_search"}), (1, 4, 4), num_data=10
    )
    assert m2.damping == "line_search"
    loss = Trace_ELBO().differentiable_loss(m2.model, m2.guide, torch.bernoulli(torch.full((3, 1, 4, 4), 0.5)))
    loss.backward()
    assert all(p.grad is not None for p in m2.parameters())


@pytest.mark.parametrize("link", [None, "sigmoid"])
def test_relu_mask_jacobian_equals_jacfwd(link):
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, D))
    z = torch.randn(5, d)
    J1, o1 = batch_jacobian(dec, z, relu_mlp_layers(dec), link)
    J2, o2 = batch_jacobian(lambda v: dec(v), z, None, link)
    torch.testing.assert_close(J1, J2)
    torch.testing.assert_close(o1, o2)
    assert relu_mlp_layers(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2))) is None


def test_vae_laplace_model_trains_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((10, 1, 4, 4), 0.4))
    m = build_model(ModelConfig(name="vlae", latent_dim=2, hidden=[8]), (1, 4, 4), num_data=10)
    for elbo in (Trace_ELBO(), TraceIWAE(num_particles=3), TraceIWAE(num_particles=3, estimator="dreg")):
        m.zero_grad()
        elbo.differentiable_loss(m.model, m.guide, x).backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    loc, scale = m.encode(x)
    assert loc.shape == scale.shape == (10, 2) and (scale > 0).all()
    gm = build_model(
        ModelConfig(name="vlae", likelihood="gaussian", sigma2=0.1, latent_dim=2, hidden=[8]), (1, 4, 4), num_data=10
    )
    assert torch.isfinite(torch.tensor(Trace_ELBO().loss(gm.model, gm.guide, x)))


# ------------------------------------------------------------------------------------------- mixture machinery


def test_implicit_reparameterisation_is_the_standard_one_for_one_component():
    loc = torch.randn(4, 1, d, requires_grad=True)
    scale = (torch.rand(4, 1, d) + 0.5).requires_grad_()
    z = DiagNormalMixture(torch.zeros(4, 1), loc, scale).rsample()
    g = torch.randn_like(z)
    (z * g).sum().backward()
    eps = (z.detach() - loc.detach()[:, 0]) / scale.detach()[:, 0]
    torch.testing.assert_close(loc.grad[:, 0], g)
    torch.testing.assert_close(scale.grad[:, 0], g * eps, rtol=1e-5, atol=1e-6)


def test_implicit_reparameterisation_gradient_is_unbiased():
    """∇ E_q[exp(aᵀz)] has the closed form ∇ Σ_k π_k exp(aᵀμ_k + ½ Σ_j a_j² σ_kj²); the pathwise estimate over
    R = 20 independent batches of 1000 draws must agree within 4 standard errors (the batches' spread / √R)."""
    torch.manual_seed(0)
    K = 3
    logits = torch.randn(K, requires_grad=True)
    locs = torch.randn(K, d, requires_grad=True)
    scales = (0.3 + torch.rand(K, d)).requires_grad_()
    a = 0.5 * torch.randn(d)
    params = [logits, locs, scales]
    exact = torch.autograd.grad(
        (torch.softmax(logits, -1) * torch.exp(locs @ a + 0.5 * scales.pow(2) @ a.pow(2))).sum(), params
    )
    q = DiagNormalMixture(logits, locs, scales)
    R = 20
    grads = [torch.autograd.grad(torch.exp(q.rsample((1000,)) @ a).mean(), params) for _ in range(R)]
    for i, e in enumerate(exact):
        g = torch.stack([gr[i] for gr in grads])
        se = g.std(0) / math.sqrt(R)
        assert ((g.mean(0) - e).abs() <= 4 * se + 1e-6).all(), (i, g.mean(0), e, se)


def test_mixture_log_prob_is_the_marginal_density_and_shapes_broadcast():
    torch.manual_seed(0)
    logits, locs, scales = torch.randn(5, 2), torch.randn(5, 2, d), torch.rand(5, 2, d) + 0.3
    q = DiagNormalMixture(logits, locs, scales)
    z = q.rsample((7,))
    assert z.shape == (7, 5, d) and q.batch_shape == (5,) and q.event_shape == (d,)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(locs, scales), 1),
    )
    torch.testing.assert_close(q.log_prob(z), ref.log_prob(z))
    qe = q.expand((3, 5))
    assert qe.rsample().shape == (3, 5, d) and qe.log_prob(z[:3]).shape == (3, 5)


def test_two_identical_posterior_components_are_exact_where_an_enumerated_index_overshoots_by_log_2():
    m = linear_model(diagonal_posterior=True)
    x = data(m)
    A, c, sd = exact_posterior_linear(m)
    mu = x @ A.T + c

    def guide(x, y=None):
        with data_plate(x):
            locs = torch.stack([mu, mu], 1)
            pyro.sample("z", DiagNormalMixture(torch.zeros(8, 2), locs, sd.expand(8, 2, d)))

    log_px = m.log_marginal(x).detach()
    assert -Trace_ELBO(num_particles=10, vectorize_particles=True).loss(m.model, guide, x) == pytest.approx(
        log_px.sum().item(), abs=2e-3
    )
    # the invalid construction: component index c ~ q(c) in the guide only, log q(z|c) + log q(c) in place of
    # log q(z): E[log p(x,z) − log q(z|c) − log q(c)] = log p(x) + log 2
    z = mu + sd * torch.randn(8, d)
    log_joint = dist.Normal(0, 1).log_prob(z).sum(-1) + dist.Normal(z @ m.W.T + m.b, m.sigma).log_prob(x).sum(-1)
    wrong = log_joint - dist.Normal(mu, sd).log_prob(z).sum(-1) - math.log(0.5)
    torch.testing.assert_close(wrong.detach(), log_px + math.log(2), rtol=0, atol=1e-4)


def _bound_checks(m, guide, x, exact_tol: float | None = None):
    """ELBO and IWAE-20 ≤ log p(x) per datapoint within 4 standard errors; with exact_tol, both equal it."""
    log_px = m.log_marginal(x).detach()
    from ppl_vae.infer.importance import importance_log_weights

    with torch.no_grad():
        lw = importance_log_weights(m.model, guide, (x,), num_particles=4000).log_w  # (S, B)
    elbo, se = lw.mean(0), lw.std(0) / math.sqrt(lw.shape[0])
    assert (elbo <= log_px + 4 * se + 1e-5).all(), (elbo, log_px, se)
    iw = torch.logsumexp(lw.reshape(200, 20, -1), 1) - math.log(20)  # 200 IWAE-20 draws
    assert (iw.mean(0) <= log_px + 4 * iw.std(0) / math.sqrt(200) + 1e-5).all()
    if exact_tol is not None:
        torch.testing.assert_close(elbo, log_px, rtol=0, atol=exact_tol)
        torch.testing.assert_close(iw.mean(0), log_px, rtol=0, atol=exact_tol)
    return elbo, iw.mean(0)


def gamix_guide(m, enc):
    def guide(x, y=None):
        with data_plate(x, m.num_data):
            pyro.sample("z", DiagNormalMixture(*enc(x)))

    return guide


def recursive_guide(m, enc):
    def guide(x, y=None):
        with data_plate(x, m.num_data):
            pyro.sample("z", recursive_mixture_distribution(*enc(x)))

    return guide


def _set_component(linear: nn.Linear, loc_rows, raw_rows, A, c, sd):
    with torch.no_grad():
        linear.weight[loc_rows] = A
        linear.bias[loc_rows] = c
        linear.weight[raw_rows] = 0.0
        linear.bias[raw_rows] = _raw_for(sd)


@pytest.mark.parametrize("kind", ["gamix", "recursive"])
def test_mixture_guides_bound_log_evidence_and_reach_it_at_the_posterior(kind):
    torch.manual_seed(0)
    m = linear_model(diagonal_posterior=True)
    x = data(m)
    K = 3
    if kind == "gamix":
        enc = MixtureEncoder((D,), d, K, hidden=())
        guide = gamix_guide(m, enc)
    else:
        enc = RecursiveMixtureEncoder((D,), d, K, hidden=())
        guide = recursive_guide(m, enc)
    elbo0, iw0 = _bound_checks(m, guide, x)  # random encoder: strictly below
    assert (elbo0 < m.log_marginal(x) - 0.5).all()
    A, c, sd = exact_posterior_linear(m)
    # one component equal to the posterior: the IWAE bound approaches log p(x), the ELBO stays below
    lin = enc.net[0] if kind == "gamix" else enc.components[0].head
    base = K if kind == "gamix" else 0
    _set_component(lin, slice(base, base + d), slice(base + d, base + 2 * d), A, c, sd)
    elbo1, iw1 = _bound_checks(m, guide, x)
    assert (iw1 > m.log_marginal(x) - 1.0).all() and (iw1 > iw0).all()
    # every component equal to the posterior: exact
    for k in range(K):
        if kind == "gamix":
            b = K + 2 * d * k
            _set_component(enc.net[0], slice(b, b + d), slice(b + d, b + 2 * d), A, c, sd)
        else:
            _set_component(enc.components[k].head, slice(0, d), slice(d, 2 * d), A, c, sd)
    _bound_checks(m, guide, x, exact_tol=1e-3)


def test_recursive_weights_are_the_recursion():
    eps_logits = torch.randn(4, 3)
    la = recursive_log_weights(eps_logits)
    e = torch.sigmoid(eps_logits)
    for m, w in enumerate(la):
        torch.testing.assert_close(w.exp().sum(-1), torch.ones(4))
        if m:  # α^(m) = [(1 − ε_m) α^(m−1), ε_m]
            torch.testing.assert_close(
                w.exp(), torch.cat([(1 - e[:, m - 1 : m]) * la[m - 1].exp(), e[:, m - 1 : m]], -1)
            )
    init = RecursiveMixtureEncoder((D,), d, 4, hidden=(5,))
    _, _, el = init(torch.randn(2, D))
    torch.testing.assert_close(recursive_log_weights(el)[-1].exp(), torch.full((2, 4), 0.25))  # uniform at init


def _linear_log_joint(m, x):
    def f(z):  # (B, n, d) → (B, n)
        return dist.Normal(0, 1).log_prob(z).sum(-1) + dist.Normal(z @ m.W.T + m.b, m.sigma).log_prob(
            x.unsqueeze(1)
        ).sum(-1)

    return f


def test_recursive_objective_reports_the_mixture_elbo_and_is_exact_at_the_posterior():
    torch.manual_seed(0)
    m = linear_model(diagonal_posterior=True)
    x = data(m)
    enc = RecursiveMixtureEncoder((D,), d, 3, hidden=())
    lj = _linear_log_joint(m, x)
    # the stratified estimate has the expectation of the mixture ELBO estimated by plain Monte Carlo
    R = 1000
    xr = x.repeat(R, 1)  # R independent draws per datapoint, one call
    ljr = _linear_log_joint(m, xr)
    with torch.no_grad():
        strat = recursive_mixture_terms(*enc(xr), ljr, ljr)[1].reshape(R, -1)
        q = recursive_mixture_distribution(*enc(xr))
        z = q.sample()
        plain = (ljr(z.unsqueeze(1)).squeeze(1) - q.log_prob(z)).reshape(R, -1)
    se = (strat.var(0) / R + plain.var(0) / R).sqrt()
    assert ((strat.mean(0) - plain.mean(0)).abs() <= 4 * se).all()
    A, c, sd = exact_posterior_linear(m)
    for k in range(3):
        _set_component(enc.components[k].head, slice(0, d), slice(d, 2 * d), A, c, sd)
    _, elbo = recursive_mixture_terms(*enc(x), lj, lj)
    torch.testing.assert_close(elbo, m.log_marginal(x).detach(), rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "name,opts",
    [
        ("rme", {"num_components": 3}),
        ("rme", {"num_components": 1}),
        ("gamix", {"num_components": 3}),
        ("gamix", {"num_components": 3, "kl": "aggregate"}),
        ("gamix", {"num_components": 1, "kl": "aggregate"}),
    ],
)
def test_mixture_models_every_parameter_gets_a_gradient(name, opts):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((10, 1, 4, 4), 0.4))
    m = build_model(ModelConfig(name=name, latent_dim=2, hidden=[8], options=opts), (1, 4, 4), num_data=100)
    objectives = [plan_for(m).objective(TrainConfig())]
    if name == "gamix" and opts.get("kl", "elbo") == "elbo":
        objectives += [
            plan_for(m).objective(TrainConfig(objective="iwae", num_particles=3)),
            plan_for(m).objective(TrainConfig(objective="iwae", num_particles=3, estimator="dreg")),
        ]
    for obj in objectives:
        m.zero_grad()
        value = obj.loss_and_grads(m.model, m.guide, x)
        assert math.isfinite(value)
        for pname, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
    # the guide is an ordinary reparameterised site: Trace_ELBO, TraceIWAE and SVI accept it as is
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-3}), TraceIWAE(num_particles=4))
    assert math.isfinite(svi.step(x))
    loc, scale = m.encode(x)
    assert loc.shape == scale.shape == (10, 2)


def test_gamix_penalty_enters_the_gradient_but_not_the_reported_value():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((10, 1, 4, 4), 0.4))
    m = build_model(
        ModelConfig(name="gamix", latent_dim=2, hidden=[8], options={"var_reg": 0.5}), (1, 4, 4), num_data=40
    )
    obj = plan_for(m).objective(TrainConfig())
    assert isinstance(obj, PenalisedELBO)
    grads = {}
    for w in (0.0, 0.5):
        obj.weight = w
        m.zero_grad()
        pyro.set_rng_seed(3)
        grads[w] = (obj.loss_and_grads(m.model, m.guide, x), [p.grad.clone() for p in m.encoder.parameters()])
    assert grads[0.0][0] == pytest.approx(grads[0.5][0])
    m.zero_grad()
    (0.5 * 40 / 10 * m.variance_penalty(x).sum()).backward()
    for g0, g1, p in zip(grads[0.0][1], grads[0.5][1], m.encoder.parameters(), strict=False):
        torch.testing.assert_close(g1 - g0, p.grad, rtol=1e-4, atol=1e-5)
    s = torch.tensor([[[1.0, 1.0]], [[0.1, 1.0]]])
    pen = variance_collapse_penalty(s)
    assert pen[0] == 0 and pen[1] > 3  # 0.01 − log 0.01 − 1 ≈ 3.6


def test_batch_moment_kl_is_the_kl_of_the_moment_matched_gaussian():
    torch.manual_seed(0)
    codes = 0.7 * torch.randn(50, 3) + torch.tensor([0.5, -1.0, 0.0])
    m, v = codes.mean(0), codes.var(0, unbiased=False)
    want = torch.distributions.kl_divergence(dist.Normal(m, v.sqrt()), dist.Normal(0.0, 1.0)).sum()
    torch.testing.assert_close(batch_moment_kl(codes), want)
    assert batch_moment_kl(torch.randn(200000, 2, generator=torch.Generator().manual_seed(1))) < 1e-4  # N(0, I) codes
    with pytest.raises(ValueError, match="batch >= 2"):
        batch_moment_kl(torch.zeros(1, 3))


def test_rivera_objective_is_minus_elbo_without_the_pull_of_codes_to_zero():
    """With γ = ½ and one component, Rivera's loss − (−ELBO with the analytic KL) = N Σ_j −½(log v_j + 1) exactly
    (same draw z): the aggregate KL keeps only the spread term of the per-datapoint mean KL."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((12, 1, 4, 4), 0.4))
    N = 60
    m = build_model(
        ModelConfig(
            name="gamix", latent_dim=3, hidden=[8], options={"num_components": 1, "var_reg": 0.5, "kl": "aggregate"}
        ),
        (1, 4, 4),
        num_data=N,
    )
    obj = plan_for(m).objective(TrainConfig())
    assert isinstance(obj, AggregateKLObjective)
    pyro.set_rng_seed(5)
    loss, elbo = m.aggregate_terms(x)
    pyro.set_rng_seed(5)
    q = m.guide_dist(x)
    z = q.rsample()
    mu, sd = q.locs[:, 0], q.scales[:, 0]
    log_px = m.likelihood(m.decoder(z), event_dim=3).log_prob(x)
    kl = 0.5 * (mu.pow(2) + sd.pow(2) - sd.pow(2).log() - 1).sum(-1)
    neg_elbo_analytic = N / 12 * (-log_px + kl).sum()
    v = mu.var(0, unbiased=False)
    torch.testing.assert_close(loss - neg_elbo_analytic, -N * 0.5 * (v.log() + 1).sum(), rtol=1e-4, atol=1e-3)
    # the reported value is the ELBO of the same draw (Monte Carlo KL): log p(x|z) + log p(z) − log q(z|x)
    lq = dist.Normal(mu, sd).log_prob(z).sum(-1)
    lp = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(elbo, N / 12 * (log_px + lp - lq).sum(), rtol=1e-5, atol=1e-3)
    # SVI reports −ELBO; the value used for validation needs no batch spread (a batch of one works)
    assert math.isfinite(pyro.infer.SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-3}), obj).step(x))
    assert math.isfinite(obj.loss(m.model, m.guide, x[:1]))
    # a batch of one image has no spread: the mean term of the ELBO's KL stands in (here γ = ½, so RIV = −ELBO)
    pyro.set_rng_seed(6)
    loss1, _ = m.aggregate_terms(x[:1])
    pyro.set_rng_seed(6)
    q1 = m.guide_dist(x[:1])  # (the SVI step above moved the parameters)
    z1 = q1.rsample()
    mu1, v1 = q1.locs[:, 0], q1.scales[:, 0].pow(2)
    kl1 = 0.5 * (mu1.pow(2) + v1 - v1.log() - 1).sum(-1)
    want = N * (-m.likelihood(m.decoder(z1), event_dim=3).log_prob(x[:1]) + kl1).sum()
    torch.testing.assert_close(loss1, want, rtol=1e-5, atol=1e-3)


def test_recursive_growth_schedule_and_config_errors():
    m = build_model(
        ModelConfig(name="rme", latent_dim=2, hidden=[8], options={"num_components": 3, "grow_every": 2}),
        (1, 4, 4),
        num_data=10,
    )
    seen = []
    for epoch in range(6):
        rec = {}
        plan_for(m).on_epoch_end(epoch, rec, None)
        seen.append(rec["num_components_active"])
    assert seen == [1, 2, 2, 3, 3, 3]
    assert "num_active" in m.state_dict()
    bad = [
        ("rme", {"num_components": 0}, "num_components"),
        ("rme", {"divergence_weight": 2.0}, "divergence_weight"),
        ("gamix", {"components": 2}, "unknown keys"),
        ("gamix", {"kl": "batch"}, "model.options.kl"),
        ("vlae", {"damping": 0.0}, "damping"),
        ("vlae", {"num_steps": -1}, "num_steps"),
    ]
    for name, opts, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            build_model(ModelConfig(name=name, options=opts), (1, 4, 4), num_data=10)
    with pytest.raises(ConfigError, match="likelihood"):
        build_model(ModelConfig(name="vlae", likelihood="laplace"), (1, 4, 4), num_data=10)
    with pytest.raises(ConfigError, match="kl_warmup_epochs"):
        plan_for(m).objective(TrainConfig(kl_warmup_epochs=3))
    riv = build_model(ModelConfig(name="gamix", options={"kl": "aggregate"}), (1, 4, 4), num_data=10)
    for tc, field in (
        (TrainConfig(objective="iwae", num_particles=2), "train.objective"),
        (TrainConfig(num_particles=2), "train.num_particles"),
        (TrainConfig(kl_warmup_epochs=2), "train.kl_warmup_epochs"),
    ):
        with pytest.raises(ConfigError, match=field):
            plan_for(riv).objective(tc)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_guides_run_on_cuda():
    x = torch.bernoulli(torch.full((6, 1, 4, 4), 0.4)).cuda()
    for name in ("vlae", "rme", "gamix"):
        m = build_model(ModelConfig(name=name, latent_dim=2, hidden=[8]), (1, 4, 4), num_data=6).cuda()
        assert math.isfinite(Trace_ELBO().loss(m.model, m.guide, x))
