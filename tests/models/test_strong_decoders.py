"""Strong decoders (ppl_vae/pixelcnn.py), the autoregressive-flow prior (priors.AutoregressiveFlowPrior), the
Variational Lossy Autoencoder (models/vlossy.py), the MAE regulariser (infer/mae.py, models/mae.py) and
I(x; z) (evaluate.mutual_information), each against an exact answer."""

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO

from ppl_vae import ModelConfig, build_model
from ppl_vae.distributions.priors import AutoregressiveFlowPrior
from ppl_vae.errors import ConfigError
from ppl_vae.evaluate import mutual_information
from ppl_vae.infer.mae_elbo import MAERegularisedELBO, mae_terms, pairwise_kl
from ppl_vae.nn.pixelcnn import GatedPixelCNN, LocalPixelCNN, PixelCNNBernoulli

H = W = 6


def dependencies(net, H=H, W=W):
    """dep[i, j]: the logit of pixel i (raster order) changes when pixel j is flipped (exact, one flip each)."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((1, 1, H, W), 0.5))
    c = torch.randn(1, 1, H, W)
    base = net(x, c).reshape(-1)
    dep = torch.zeros(H * W, H * W, dtype=torch.bool)
    for j in range(H * W):
        x2 = x.clone()
        x2.view(-1)[j] = 1 - x2.view(-1)[j]
        dep[:, j] = (net(x2, c).reshape(-1) - base).abs() > 0
    return dep


@pytest.mark.parametrize(
    "net",
    [
        GatedPixelCNN(1, 1, 8, layers=4),
        LocalPixelCNN(1, 1, 8, layers=2, window=3),
        LocalPixelCNN(1, 1, 8, layers=1, window=5),
    ],
)
def test_masked_convolutions_are_causal(net):
    dep = dependencies(net)
    assert not torch.triu(dep).any()  # no logit sees its own pixel or a later one
    assert torch.tril(dep, -1).any()


def test_the_full_receptive_field_reaches_every_preceding_pixel_and_the_local_one_only_its_window():
    full = dependencies(GatedPixelCNN(1, 1, 8, layers=6), 5, 5)
    assert full[-1, :-1].all()  # the last pixel depends on all 24 before it: no blind spot
    local = dependencies(LocalPixelCNN(1, 1, 8, layers=2, window=3))
    for i in range(H * W):
        r, c = divmod(i, W)
        window = {(r - 1, c - 1), (r - 1, c), (r - 1, c + 1), (r, c - 1)}
        expected = {rr * W + cc for rr, cc in window if 0 <= rr < H and 0 <= cc < W}
        assert set(torch.nonzero(local[i]).reshape(-1).tolist()) == expected


def test_the_pixelcnn_distribution_is_normalised_and_the_sampler_draws_from_it():
    """A 2×2 binary image: the 16 probabilities exp(log_prob) sum to one, and the raster-order sampler's
    frequencies match them within binomial error (4.5 s.e. per cell, 16 cells)."""
    torch.manual_seed(1)
    net = GatedPixelCNN(1, 1, 8, layers=2)
    cond = torch.randn(1, 1, 2, 2)
    d = PixelCNNBernoulli(net, cond)
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).reshape(16, 1, 2, 2)
    with torch.no_grad():
        p = d.log_prob(images).exp()  # (16,): cond broadcasts against the 16 images
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    n = 20000
    with torch.no_grad():
        s = d.sample((n,)).reshape(n, 4)
    codes = (s * torch.tensor([8.0, 4.0, 2.0, 1.0])).sum(-1).long()
    freq = torch.bincount(codes, minlength=16).double() / n
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() < 4.5 * se + 1e-4).all(), (freq, p)


def test_flow_prior_density_is_the_change_of_variables_formula_and_integrates_to_one():
    torch.manual_seed(2)
    prior = AutoregressiveFlowPrior(2, num_flows=2, hidden=(16,))
    with torch.no_grad():  # non-trivial flows: perturb the MADEs' output layers away from the identity
        for f in prior.flows:
            for p in f.parameters():
                p.add_(0.3 * torch.randn_like(p))
    z = torch.randn(5, 2)
    with torch.no_grad():
        lp = prior(5).log_prob(z)

    def f(v):  # z ↦ ε: the generative transforms undone in reverse order (each
        for t in reversed(prior.transforms()):  # flow's parallel forward pass)
            v = t.inv(v)
        return v

    for i in range(5):
        J = torch.autograd.functional.jacobian(f, z[i])
        eps = f(z[i])
        exact = (dist.Normal(0.0, 1.0).log_prob(eps).sum() + torch.linalg.slogdet(J)[1]).detach()
        assert float(lp[i]) == pytest.approx(float(exact), abs=1e-4)
    g = torch.linspace(-25, 25, 1501)  # the perturbed flows have heavy tails: a wide grid
    zz = torch.cartesian_prod(g, g)
    with torch.no_grad():
        mass = prior(len(zz)).log_prob(zz).exp().sum() * (g[1] - g[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-3)
    with torch.no_grad():  # and the sequential direction samples it: sample → ε is N(0, I)
        eps = f(prior(4000).sample())
    assert eps.mean(0).abs().max() < 4 / math.sqrt(4000) and (eps.std(0) - 1).abs().max() < 0.07


def test_mae_terms_equal_a_double_loop_over_pairs():
    torch.manual_seed(3)
    B, D = 6, 3
    loc, scale = torch.randn(B, D), torch.rand(B, D) + 0.3
    mean, sd = mae_terms(loc, scale)
    pair_kl = np.zeros((B, B, D))
    for i in range(B):
        for j in range(B):
            for d in range(D):
                qi = torch.distributions.Normal(loc[i, d], scale[i, d])
                qj = torch.distributions.Normal(loc[j, d], scale[j, d])
                pair_kl[i, j, d] = float(torch.distributions.kl_divergence(qi, qj))
    np.testing.assert_allclose(pairwise_kl(loc, scale).numpy(), pair_kl, rtol=1e-5, atol=1e-6)
    offdiag = [(i, j) for i in range(B) for j in range(B) if i != j]
    np.testing.assert_allclose(mean.numpy(), np.mean([pair_kl[i, j] for i, j in offdiag], 0), rtol=1e-5)
    totals = [pair_kl[i, j].sum() for i, j in offdiag]
    assert float(sd) == pytest.approx(float(np.std(totals, ddof=1)), rel=1e-5)
    # the official code's form: std over all B² entries with the diagonal set to the mean, times its correction
    full = pair_kl.sum(-1)
    full[np.diag_indices(B)] = np.mean(totals)
    official = np.std(full, ddof=1) * math.sqrt((B * B - 1) / (B * B - B - 1))
    assert float(sd) == pytest.approx(official, rel=1e-5)


def _model(name, **kw):
    pyro.clear_param_store()
    torch.manual_seed(0)
    kw = {"likelihood": "pixelcnn", "pixelcnn_layers": 2, **kw}
    cfg = ModelConfig(name=name, latent_dim=4, hidden=[16], channels=8, **kw)
    return build_model(cfg, (1, 6, 6), num_data=200)


def test_the_mae_regulariser_enters_the_loss_multiplied_by_the_training_set_size():
    m = _model("mae", options={"eta": 1.0, "gamma": 0.5})
    x = torch.bernoulli(torch.full((10, 1, 6, 6), 0.4))
    obj = MAERegularisedELBO(Trace_ELBO(), m.posterior_params, 1.0, 0.5, lambda: 200)
    loc, scale = m.encoder(x)
    mean, sd = mae_terms(loc, scale)
    R = -1.0 * torch.nn.functional.logsigmoid(mean / 1.0).sum() + 0.5 * sd
    torch.manual_seed(5)
    total = obj.differentiable_loss(m.model, m.guide, x)
    torch.manual_seed(5)
    base = Trace_ELBO().differentiable_loss(m.model, m.guide, x)
    assert float((total - base).detach()) == pytest.approx(200 * float(R.detach()), rel=1e-4)
    assert obj.regulariser(loc[:1], scale[:1]) == 0.0  # no pairs in a minibatch of one


@pytest.mark.parametrize("name,kw", [("vlossy", {"pixelcnn_window": 3}), ("mae", {"pixelcnn_window": 0})])
def test_gradients_reach_every_parameter(name, kw):
    from ppl_vae import plan_for
    from ppl_vae.config import TrainConfig

    m = _model(name, **kw)
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.4))
    elbo = plan_for(m).objective(TrainConfig(objective="elbo"))
    with poutine.trace(param_only=True) as tr:
        loss = elbo.differentiable_loss(m.model, m.guide, x)
    loss.backward()
    params = {n: p for n, p in m.named_parameters()}
    assert params and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params.values()), [
        n for n, p in params.items() if p.grad is None or float(p.grad.abs().sum()) == 0
    ]
    if name == "vlossy":
        assert any("prior.flows" in n for n in params)  # the flow prior's MADEs train too
        assert any(n.startswith("prior") for n in tr.trace.nodes)  # ... registered with Pyro's param store


def test_vlossy_generates_by_the_sequential_sampler_and_refuses_a_full_decoder():
    m = _model("vlossy", pixelcnn_window=3)
    x = torch.bernoulli(torch.full((3, 1, 6, 6), 0.4))
    draws = Predictive(poutine.uncondition(m.model), num_samples=2)(x)
    assert draws["x"].shape == (2, 3, 1, 6, 6) and set(draws["x"].unique().tolist()) <= {0.0, 1.0}
    assert m.lossy_reconstructions(x, repeats=2).shape == (3, 2, 1, 6, 6)
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert math.isfinite(svi.step(x))
    with pytest.raises(ConfigError, match="pixelcnn_window"):
        _model("vlossy", likelihood="bernoulli")
    # a gated decoder is local while its L layers reach fewer rows than the image has above its last row
    with pytest.raises(ConfigError, match="fewer than 5 pixelcnn_layers"):
        _model("vlossy", pixelcnn_window=0, pixelcnn_layers=5)
    gated = _model("vlossy", pixelcnn_window=0, pixelcnn_layers=2)
    x = torch.bernoulli(torch.full((1, 1, 6, 6), 0.4)).requires_grad_(True)
    net = gated.likelihood.net
    net(x, torch.zeros(1, 1, 6, 6))[0, 0, 5, 5].backward()
    seen = x.grad[0, 0].abs().sum(-1) > 0
    assert seen.tolist() == [False, False, False, True, True, True]  # rows 3-5: two rows up and its own


def test_mutual_information_of_a_gaussian_channel():
    """x ~ N(0, 1), q(z | x) = N(a x, s²): I(x; z) = ½ log(1 + a²/s²). The estimator's bias (the finite mixture
    for q(z)) is O(1/N); its Monte Carlo s.e. comes from the per-datapoint terms."""
    torch.manual_seed(6)
    a, s, N = 1.5, 1.0, 2000
    x = torch.randn(N)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(a * x, s))

    est = mutual_information(guide, x, num_samples=4)
    exact = 0.5 * math.log(1 + a * a / (s * s))
    # s.e. of the mean over N datapoints of log q(z|x) − log q̂(z): its per-datapoint sd is ≈ 1 nat here
    assert est == pytest.approx(exact, abs=4 * 1.0 / math.sqrt(4 * N))
