"""A training run killed at the end of an epoch, before that epoch's checkpoint: the first half of every
kill-and-resume test."""

import pytest

from ppl_vae import plan_for, train


def train_killed_after(epochs: int, model, data, cfg, **kwargs) -> None:
    """``ppl_vae.train(model, data, cfg, **kwargs)`` interrupted (KeyboardInterrupt) by its plan's epoch hook at the
    end of epoch ``epochs``, so the folder holds the checkpoint of the epoch before."""
    plan = plan_for(model)
    original, calls = plan.on_epoch_end, []

    def dies(epoch, record, d):
        original(epoch, record, d)
        calls.append(epoch)
        if len(calls) == epochs:
            raise KeyboardInterrupt

    plan.on_epoch_end = dies
    with pytest.raises(KeyboardInterrupt):
        train(model, data, cfg, plan=plan, **kwargs)
