"""MoPoE's two objectives side by side: the stratified ELBO of the mixture guide (the default: one pass of the
decoders per non-empty subset of the modalities) and the paper's mean of the subsets' ELBOs with one subset drawn
per datapoint (``model.options.objective: sampled_subset``: one pass).

Rows (medians over interleaved rounds, one torch thread, the library's step without its bookkeeping:
``elbo.loss_and_grads`` + Adam, Pyro's checks off as after the loop's first step):

  step_seconds              per objective, seconds per step
  sampled_over_stratified   the sampled-subset step ÷ the stratified step (3 modalities: 7 subsets)
  stratified_over_vae       the stratified step ÷ a one-modality VAE step on the same MLP sizes (what one pass costs)

Model: ``mopoe`` on PolyFashion's layout (3 Fashion-MNIST images of one class, 784 Bernoulli pixels each), MLP
experts and decoders with one hidden layer of 256, 16 latents, batch 100, K = 1 (``train.estimator: iwae``); data:
random binary images of that layout (timing does not depend on pixel values).

    python bench/mopoe_cost.py            # full: 15 rounds of 20 steps
    python bench/mopoe_cost.py --quick    # 5 rounds
The last line of stdout is the JSON summary (full mode also writes bench/results/mopoe_cost.json).
"""

from __future__ import annotations

import pyro
import torch
from _common import finish, interleaved, library_step, parser, start

from ppl_vae import ModelConfig, build_model, plan_for
from ppl_vae.config import TrainConfig
from ppl_vae.data.multimodal import Layout

STEPS, BATCH, M = 20, 100, 3
COMMON = dict(latent_dim=16, hidden=[256], arch="mlp", likelihood="bernoulli")


def mopoe_step(objective: str):
    pyro.clear_param_store()
    layout = Layout(tuple(f"m{i}" for i in range(M)), ((1, 28, 28),) * M, ("image",) * M)
    model = build_model(ModelConfig(name="mopoe", options={"objective": objective}, **COMMON), layout, num_data=60000)
    elbo = plan_for(model).objective(TrainConfig(estimator="iwae"))
    return library_step(model, elbo)


def vae_step():
    pyro.clear_param_store()
    model = build_model(ModelConfig(name="vae", **COMMON), (1, 28, 28), num_data=60000)
    return library_step(model, plan_for(model).objective(TrainConfig()))


def main(argv=None) -> dict:
    args = start(parser(__doc__, seeds=None, threads=1), argv)
    rounds = 5 if args.quick else 15
    torch.manual_seed(0)
    batches = [torch.rand(BATCH, M * 784).bernoulli() for _ in range(STEPS)]
    single = [b[:, :784].reshape(BATCH, 1, 28, 28) for b in batches]
    stratified, sampled, vae = mopoe_step("stratified"), mopoe_step("sampled_subset"), vae_step()
    for step, items in ((stratified, batches), (sampled, batches), (vae, single)):  # warm-up
        for x in items[:3]:
            step(x)
    ratio, t_sampled, t_stratified, ratios = interleaved(sampled, stratified, batches, rounds)
    # the VAE side takes its own images: interleave by steps over aligned batch lists
    pairs = list(zip(batches, single, strict=True))
    ratio_vae, _, t_vae, ratios_vae = interleaved(lambda p: stratified(p[0]), lambda p: vae(p[1]), pairs, rounds)
    result = {
        "settings": {"rounds": rounds, "steps": STEPS, "batch": BATCH, "modalities": M, **COMMON},
        "step_seconds": {"stratified": t_stratified, "sampled_subset": t_sampled, "vae": t_vae},
        "sampled_over_stratified": round(ratio, 4),
        "stratified_over_vae": round(ratio_vae, 4),
        "rounds": {"sampled_over_stratified": [round(r, 4) for r in ratios], "stratified_over_vae": ratios_vae},
    }
    return finish("mopoe_cost", result, args)


if __name__ == "__main__":
    main()
