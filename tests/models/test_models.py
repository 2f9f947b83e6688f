"""Models as Pyro programs: the exact linear-Gaussian oracle, plate scaling, SVI/Predictive compatibility."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO

from ppl_vae.config import ModelConfig
from ppl_vae.distributions.likelihoods import (
    BernoulliLikelihood,
    GaussianLikelihood,
    LaplaceLikelihood,
    build_likelihood,
)
from ppl_vae.errors import ConfigError
from ppl_vae.models import VAE2, LinearGaussianVAE, build_model
from ppl_vae.nn.networks import build_encoder_decoder


def lg(num_data=None, **kw):
    return LinearGaussianVAE(6, 3, sigma=0.7, num_data=num_data, seed=1, **kw)


def test_linear_gaussian_closed_forms_match_brute_force():
    m = lg()
    x = m.simulate(5, torch.Generator().manual_seed(0))
    # log p(x) against Bayes' rule at an arbitrary z: log p(x) = log p(z) + log p(x|z) - log p(z|x)
    mu, cov = m.posterior(x)
    z = torch.randn(5, 3)
    log_prior = dist.Normal(0, 1).log_prob(z).sum(-1)
    log_lik = dist.Normal(z @ m.W.T + m.b, m.sigma).log_prob(x).sum(-1)
    log_post = dist.MultivariateNormal(mu, cov).log_prob(z)
    torch.testing.assert_close(m.log_marginal(x), log_prior + log_lik - log_post, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("num_data", [None, 50])
def test_exact_guide_makes_elbo_equal_log_evidence(num_data):
    """With q = p(z|x), log p(x,z) - log q(z|x) = log p(x) for every z: one particle is exact."""
    m = lg(num_data=num_data)
    x = m.simulate(10, torch.Generator().manual_seed(0))
    scale = (num_data or 10) / 10
    expected = scale * m.log_marginal(x).sum()
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO(), Trace_ELBO(num_particles=7, vectorize_particles=True)):
        torch.testing.assert_close(
            torch.tensor(-elbo.loss(m.model, m.guide, x)), expected.detach(), rtol=1e-5, atol=1e-3
        )


def test_plate_scaling_is_unbiased_for_the_full_data_elbo():
    """Averaging the minibatch loss over a partition of the data gives the full-data loss (N/B scaling)."""
    m = lg(num_data=40, guide_type="exact", guide_shift=0.5, guide_scale=1.3)
    x = m.simulate(40, torch.Generator().manual_seed(3))
    full = m.exact_elbo(x).sum()
    minibatch = torch.stack([m.exact_elbo(x[i : i + 8]).sum() * 40 / 8 for i in range(0, 40, 8)]).mean()
    torch.testing.assert_close(minibatch, full)
    # and the Pyro trace applies exactly that scale to every site in the data plate
    tr = poutine.trace(m.model).get_trace(x[:8])
    assert tr.nodes["z"]["scale"] == pytest.approx(5.0) and tr.nodes["x"]["scale"] == pytest.approx(5.0)


def test_monte_carlo_elbo_matches_closed_form_for_a_poor_guide():
    m = lg(num_data=10, guide_shift=0.4, guide_scale=1.5)
    x = m.simulate(10, torch.Generator().manual_seed(0))
    S = 20000
    exact = m.exact_elbo(x).sum().item()
    est = -Trace_ELBO(num_particles=S, vectorize_particles=True).loss(m.model, m.guide, x)
    # std of a single-particle ELBO estimate from the data, divided by sqrt(S); 5 sigma
    with torch.no_grad():
        q = m.guide_dist(x)
        z = q.sample((200,))
        logw = (
            dist.Normal(0, 1).log_prob(z).sum(-1)
            + dist.Normal(z @ m.W.T + m.b, m.sigma).log_prob(x).sum(-1)
            - q.log_prob(z)
        ).sum(-1)
    tol = 5 * logw.std().item() / math.sqrt(S)
    assert abs(est - exact) < tol
    assert exact < m.log_marginal(x).sum().item()


CONFIGS = [
    ("vae", "mlp", (1, 8, 8)),
    ("vae", "conv", (1, 28, 28)),
    ("cvae", "mlp", (1, 8, 8)),
    ("cvae", "conv", (3, 16, 16)),
    ("vae2", "burda2", (1, 8, 8)),
    ("vae", "burda1", (1, 8, 8)),
]


@pytest.mark.parametrize("name,arch,shape", CONFIGS)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "laplace"])
def test_models_work_with_plain_svi_and_predictive(name, arch, shape, likelihood):
    m = build_model(
        ModelConfig(name=name, arch=arch, likelihood=likelihood, latent_dim=4, hidden=[32, 32]),
        shape,
        num_data=100,
        num_classes=10,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, *shape, generator=g).bernoulli(generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    elbos = [Trace_ELBO(), Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)]
    elbos += [TraceMeanField_ELBO()] if name != "vae2" else []
    for elbo in elbos:
        svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
        before = {k: v.detach().clone() for k, v in m.named_parameters()}
        loss = svi.step(x, y)
        assert math.isfinite(loss)
        changed = [k for k, v in m.named_parameters() if not torch.equal(before[k], v.detach())]
        assert len(changed) == len(before), "every network weight takes an SVI step"
    pred = Predictive(m.model, guide=m.guide, num_samples=3)(x, y)
    assert pred["x"].shape == (3, 6, *shape)
    latent = "z2" if name == "vae2" else "z"
    assert pred[latent].shape[:2] == (3, 6)
    assert m.sample(6, y if m.conditional else None).shape == (6, *shape)
    assert m.reconstruct(x, y if m.conditional else None).shape == (6, *shape)
    loc, scale = m.encode(x, y if m.conditional else None)
    assert loc.shape == (6, m.latent_dim) and bool((scale > 0).all())


def test_model_sites_are_inside_the_data_plate_with_the_right_event_shapes():
    m = build_model(ModelConfig(name="vae", latent_dim=3, hidden=[16]), (1, 8, 8), num_data=30)
    x = torch.rand(5, 1, 8, 8)
    tr = poutine.trace(m.model).get_trace(x)
    for site in ("z", "x"):
        frames = tr.nodes[site]["cond_indep_stack"]
        assert [f.name for f in frames] == ["data"] and frames[0].full_size == 30 and frames[0].size == 5
    assert tr.nodes["z"]["fn"].event_shape == (3,) and tr.nodes["x"]["fn"].event_shape == (1, 8, 8)
    assert tr.nodes["x"]["is_observed"]


def test_conditional_model_needs_labels():
    m = build_model(ModelConfig(name="cvae", latent_dim=2, hidden=[8]), (1, 8, 8), num_data=10, num_classes=3)
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="call it with labels y"):
        m.model(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        m.model(x, torch.tensor([0, 1, 2, 3]))


def test_labels_change_the_conditional_decoder_output():
    m = build_model(ModelConfig(name="cvae", latent_dim=2, hidden=[8]), (1, 8, 8), num_data=10, num_classes=3)
    z = torch.zeros(2, 2)
    a, b = m.decode(z, torch.tensor([0, 0])), m.decode(z, torch.tensor([1, 2]))
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], b[0]) and not torch.equal(b[0], b[1])


def test_two_layer_model_has_burda_sizes():
    m = build_model(ModelConfig(name="vae2", arch="burda2"), (1, 28, 28), num_data=10)
    assert isinstance(m, VAE2) and (m.latent_dim1, m.latent_dim) == (100, 50)
    m1 = build_model(ModelConfig(name="vae", arch="burda1"), (1, 28, 28), num_data=10)
    assert m1.latent_dim == 50
    hidden = [mod.out_features for mod in m1.encoder.modules() if isinstance(mod, torch.nn.Linear)]
    assert hidden == [200, 200, 100] and all(isinstance(a, torch.nn.Tanh) for a in m1.encoder.head.net[1:4:2])


def test_likelihood_log_probs():
    out = torch.tensor([[[[0.3, -1.0]]]])
    x = torch.tensor([[[[1.0, 0.0]]]])
    p = torch.sigmoid(out)
    bern = BernoulliLikelihood()(out).log_prob(x)
    torch.testing.assert_close(bern, (x * p.log() + (1 - x) * (1 - p).log()).sum().reshape(1))
    gauss = GaussianLikelihood(sigma2=0.25)(out).log_prob(x)
    ref = (-0.5 * math.log(2 * math.pi * 0.25) - (x - p) ** 2 / (2 * 0.25)).sum().reshape(1)
    torch.testing.assert_close(gauss, ref)
    lap = LaplaceLikelihood(scale=0.2)(out).log_prob(x)
    torch.testing.assert_close(lap, (-math.log(2 * 0.2) - (x - p).abs() / 0.2).sum().reshape(1))
    with pytest.raises(ConfigError, match="model.likelihood"):
        build_likelihood("poisson")
    with pytest.raises(ConfigError, match=r"model.sigma2 must be a positive number, got -1"):
        GaussianLikelihood(sigma2=-1)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 64, 64), (1, 7, 9)])
def test_conv_networks_are_sized_from_the_data_shape(shape):
    enc, dec = build_encoder_decoder("conv", shape, 5, (32,), "relu")
    x = torch.rand(2, *shape)
    loc, scale = enc(x)
    assert loc.shape == (2, 5) and dec(loc).shape == (2, *shape)
    assert dec(torch.zeros(3, 2, 5)).shape == (3, 2, *shape)


def test_models_follow_the_device_of_their_parameters():
    m = build_model(ModelConfig(latent_dim=2, hidden=[8]), (1, 8, 8), num_data=10).to("cpu")
    tr = poutine.trace(m.model).get_trace(torch.rand(2, 1, 8, 8))
    assert tr.nodes["z"]["value"].device.type == "cpu"
    if torch.cuda.is_available():
        m = m.to("cuda")
        tr = poutine.trace(m.model).get_trace(torch.rand(2, 1, 8, 8, device="cuda"))
        assert tr.nodes["z"]["value"].is_cuda and m.sample(2).is_cuda
