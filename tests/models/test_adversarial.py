"""The PatchGAN discriminator and its second optimiser through the training plan, and the ResNet networks."""

import pyro
import pytest
import torch
from _interrupt import train_killed_after

from ppl_vae import train
from ppl_vae.config import ModelConfig, TrainConfig
from ppl_vae.data import DataBundle
from ppl_vae.errors import CheckpointError
from ppl_vae.models import build_model
from ppl_vae.nn.networks import build_encoder_decoder
from ppl_vae.nn.patchgan import PatchGAN
from ppl_vae.training.loop import CHECKPOINT
from ppl_vae.training.optim import ParamOptimizer
from ppl_vae.training.plan import plan_for


@pytest.mark.parametrize(
    "shape,patches", [((1, 28, 28), (7, 7)), ((3, 64, 64), (8, 8)), ((1, 8, 8), (4, 4)), ((3, 256, 256), (32, 32))]
)
def test_patchgan_gives_one_logit_per_patch(shape, patches):
    d = PatchGAN(shape, width=0.125)
    assert d(torch.rand(2, *shape)).shape == (2, 1, *patches)
    assert [m.out_channels for m in d.net if isinstance(m, torch.nn.Conv2d)] == [16, 16, 16, 8, 8, 1]


def _data(n=48, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return DataBundle.from_tensors(torch.rand(n, *shape, generator=g), None, torch.rand(16, *shape, generator=g))


def _gan(arch="conv", seed=0):
    pyro.set_rng_seed(seed)
    cfg = ModelConfig(
        name="gamix",
        arch=arch,
        likelihood="laplace",
        link="identity",
        latent_dim=4,
        hidden=[16],
        channels=8,
        options={
            "num_components": 1,
            "kl": "aggregate",
            "adversarial": 1.0,
            "disc_weight": 1.0,
            "disc_width": 0.125,
            "disc_lr": 1e-3,
        },
    )
    return build_model(cfg, (1, 8, 8), num_data=48)


def test_generator_and_discriminator_steps_change_only_their_own_parameters():
    data = _data()
    model = _gan()
    plan = plan_for(model)
    x = data.train_x[:16]
    disc = {k for k, _ in model.named_parameters() if k.startswith("discriminator.")}
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    # one generator step: the plan's objective and the loop's optimiser
    pyro.clear_param_store()
    optim = ParamOptimizer(model, 1e-2)
    plan.objective(TrainConfig()).loss_and_grads(model.model, model.guide, x, None)
    optim.step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and not (changed & disc)
    # one discriminator step
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    plan.on_step_end(x, None)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and changed <= disc and len(changed) == len(disc)


def test_the_adversarial_term_reaches_the_decoder():
    model = _gan()
    obj = plan_for(model).objective(TrainConfig())
    x = _data().train_x[:8]
    pyro.set_rng_seed(0)
    obj.adversarial(x).backward()
    grads = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in model.discriminator.parameters())


def test_a_killed_gan_run_resumes_both_optimisers_exactly(tmp_path):
    data = _data()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-3, patience=None)
    whole = _gan()
    res = train(whole, data, cfg, run_dir=tmp_path / "whole", progress=False)
    assert {"d_loss", "g_adv", "d_real", "d_fake"} <= set(res.history[-1])

    train_killed_after(2, _gan(), data, cfg, run_dir=tmp_path / "killed", progress=False)
    assert torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=False)["plan_state"]["optim"]["state"]
    resumed = _gan(seed=1)  # other initial weights: everything must come from the checkpoint
    res2 = train(resumed, data, cfg, run_dir=tmp_path / "killed", resume=True, progress=False)
    assert [r["d_loss"] for r in res2.history] == [r["d_loss"] for r in res.history]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=False):
        assert torch.equal(a, b), k
    # the discriminator optimiser's state after the last epoch
    ck_a = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=False)["plan_state"]["optim"]["state"]
    ck_b = torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=False)["plan_state"]["optim"]["state"]
    for i in ck_a:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ck_a[i][key], ck_b[i][key])


def test_a_gan_checkpoint_without_its_discriminator_state_is_refused_on_resume(tmp_path):
    """Resuming would restart the discriminator's optimiser: not the uninterrupted run, so it is refused by name
    (before: exit 0, the optimiser silently started afresh)."""
    data = _data()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-3, patience=None)
    train_killed_after(2, _gan(), data, cfg, run_dir=tmp_path / "killed", progress=False)
    path = tmp_path / "killed" / CHECKPOINT
    ck = torch.load(path, weights_only=False)
    ck["plan_state"] = {}  # as an older release (or a hand-edited file) left it
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="no state of the discriminator's optimiser"):
        train(_gan(), data, cfg, run_dir=tmp_path / "killed", resume=True, progress=False)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 64, 64), (1, 8, 8)])
def test_resnet_networks_keep_shapes_and_each_datapoint_to_itself(shape):
    enc, dec = build_encoder_decoder("resnet", shape, 6, (32,), channels=8)
    x = torch.rand(5, *shape)
    loc, scale = enc(x)
    assert loc.shape == (5, 6) and (scale > 0).all()
    z = torch.randn(3, 5, 6)
    assert dec(z).shape == (3, 5, *shape)
    # GroupNorm, not BatchNorm: a datapoint's code does not depend on the rest of its batch (also in training mode)
    assert torch.allclose(enc(x[:1])[0], loc[:1], atol=1e-5)
    assert torch.allclose(dec(z[:, :1]), dec(z)[:, :1], atol=1e-5)


def test_resnet_is_available_to_plain_models():
    model = build_model(
        ModelConfig(name="vae", arch="resnet", latent_dim=3, hidden=[16], channels=8), (1, 8, 8), num_data=10
    )
    assert type(model.encoder).__name__ == "ResNetEncoder"


class _Identity(torch.nn.Module):
    """A 'model' whose code is the image itself: reconstructions are exact, σ fixed per dimension."""

    def __init__(self, x, scales):
        super().__init__()
        self.x, self.scales = x, scales

    def encode(self, x, y=None):
        return x.flatten(1), self.scales.expand(len(x), -1)

    def decode(self, z, y=None):
        return z.reshape(len(z), *self.x.shape[1:])

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x)[0])

    def sample(self, n):
        return self.x[:n]


def test_generation_report_oracles(tmp_path):
    from ppl_vae.evaluate import FrechetDistance, generation_report, midpoints
    from ppl_vae.evaluate.fid import ClassifierFeatures, SmallClassifier
    from ppl_vae.viz import plot_interpolations, plot_perturbations

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g)
    scales = torch.tensor([0.05] * 16 + [1.0] * 48)  # 16 of 64 variances (0.0025) below 0.01
    model = _Identity(x, scales)
    torch.manual_seed(0)
    fid = FrechetDistance(ClassifierFeatures(SmallClassifier((1, 8, 8), 10), "test"), x)
    out = generation_report(model, x, fid)
    assert out["recon_fid"] < 1e-3 and out["prior_fid"] < 1e-3  # the real images themselves
    assert out["collapsed_fraction"] == 0.25
    assert torch.allclose(midpoints(model, x), 0.5 * (x[0::2] + x[1::2]))
    assert out["sharpness"]["recon"] == pytest.approx(out["sharpness"]["data"])
    assert out["sharpness"]["midpoint"] < out["sharpness"]["data"]  # averaging two noise images smooths
    assert plot_interpolations(model, x[:2], x[2:4], tmp_path / "i.png").endswith(".png")
    assert plot_perturbations(model, x[:1], tmp_path / "p.png", dims=3).endswith(".png")


def test_the_gan_validates_without_its_critic():
    plan = plan_for(_gan())
    assert type(plan.objective(TrainConfig())).__name__ == "AdversarialELBO"
    assert type(plan.validation_objective(TrainConfig())).__name__ == "AggregateKLObjective"
