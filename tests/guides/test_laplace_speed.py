"""The Laplace guide's fast Gauss–Newton terms give the numbers of the plain autograd formulation.

``ppl_vae.guides.laplace`` keeps Wᵀ (B, d, D) contiguous and computes (WᵀDW, Wᵀr) with a hand-written backward
(``_WeightedGram``); before, it built W (B, D, d) and let autograd differentiate ``Wᵀ @ (W * D)`` and ``Wᵀ @ r``.
Measured on a 2-core CPU shared with other work (one torch thread, 784-200-200-16 ReLU MLP, Bernoulli, batch 100,
both formulations timed in one process in interleaved rounds): the ``vlae`` step takes 0.65–0.70 of the previous
time. These tests pin the values: μ_T, Λ, the loss and every gradient equal the old formulation's to rounding.
"""

import pytest
import torch
from torch import nn

from ppl_vae.guides import laplace
from ppl_vae.guides.laplace import GRADIENTS, laplace_posterior, precision_to_scale_tril, relu_mlp_layers


def _old_jacobian_t(fn, z, layers, link):
    """The previous formulation: W (B, D, d) from the same ReLU-mask products (or jacfwd), returned as Wᵀ."""
    Jt, out = laplace._raw_jacobian_t(fn, z, layers)
    J = Jt.transpose(-1, -2)
    if link == "sigmoid":
        out = torch.sigmoid(out)
        J = J * (out * (1 - out)).unsqueeze(-1)
    return J.transpose(-1, -2), out


def _old_precision_terms(x_flat, out, Jt, likelihood, sigma2):
    """The previous (WᵀDW, Wᵀr), differentiated by autograd."""
    J = Jt.transpose(-1, -2)
    if likelihood == "gaussian":
        r = (x_flat - out) / sigma2
        WtDW = J.transpose(-1, -2) @ J / sigma2
    else:
        p = torch.sigmoid(out)
        r = x_flat - p
        WtDW = J.transpose(-1, -2) @ (J * (p * (1 - p)).unsqueeze(-1))
    return WtDW, (J.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)


def _posterior_and_grads(x, mu0, net, likelihood, link, gradient, damping, use_layers):
    mu, prec = laplace_posterior(
        x,
        mu0,
        net,
        likelihood=likelihood,
        sigma2=0.5,
        damping=damping,
        layers=relu_mlp_layers(net) if use_layers else None,
        link=link,
        gradient=gradient,
    )
    tril = precision_to_scale_tril(prec)
    # a loss that reads μ, Λ and its Cholesky factor, like the ELBO's entropy and log p(x, z)
    loss = (mu.sin() * x[:, : mu.shape[1]]).sum() + tril.diagonal(dim1=-2, dim2=-1).log().sum() + prec.pow(2).sum()
    grads = torch.autograd.grad(loss, [mu0, *net.parameters()])
    return [mu.detach(), prec.detach(), loss.detach(), *grads]


CASES = [
    ("bernoulli", None, gradient, damping, use_layers)
    for gradient in GRADIENTS
    for damping in ("vlae", "line_search")
    for use_layers in (True, False)
] + [("gaussian", link, "unrolled", "vlae", use_layers) for link in (None, "sigmoid") for use_layers in (True, False)]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("likelihood, link, gradient, damping, use_layers", CASES)
def test_fast_gauss_newton_terms_equal_the_autograd_formulation(
    monkeypatch, dtype, rtol, likelihood, link, gradient, damping, use_layers
):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 50)).to(dtype)
    x = torch.rand(7, 50, dtype=dtype)
    x = x.bernoulli() if likelihood == "bernoulli" else x
    mu0 = torch.randn(7, 4, dtype=dtype, requires_grad=True)
    sched = laplace.vlae_damping if damping == "vlae" else damping
    new = _posterior_and_grads(x, mu0, net, likelihood, link, gradient, sched, use_layers)
    monkeypatch.setattr(laplace, "_jacobian_t", _old_jacobian_t)
    monkeypatch.setattr(laplace, "_precision_terms", _old_precision_terms)
    old = _posterior_and_grads(x, mu0, net, likelihood, link, gradient, sched, use_layers)
    for a, b in zip(new, old, strict=True):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max().item()), (a - b).abs().max()


def test_weighted_gram_backward_is_the_derivative():
    g = torch.Generator().manual_seed(3)
    Jt = torch.randn(3, 4, 9, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(3, 9, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(3, 9, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(laplace._WeightedGram.apply, (Jt, w, r))
    prec, _ = laplace._WeightedGram.apply(Jt, w, r)  # one output unused: its gradient arrives as None
    (gJt,) = torch.autograd.grad(prec.sum(), [Jt])
    assert torch.allclose(gJt, 2 * (prec.new_ones(3, 4, 4) @ (Jt * w.unsqueeze(-2))).detach())
