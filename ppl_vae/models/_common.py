"""Small pieces shared by the model files."""

from __future__ import annotations

import pyro
import torch
import torch.nn.functional as F

DATA_PLATE = "data"


def data_plate(x: torch.Tensor, num_data: int | None = None) -> pyro.plate:
    """``pyro.plate("data", N, subsample=...)`` for a minibatch ``x`` of a dataset of size ``num_data``.

    Sites inside are scaled by N/B, so one minibatch gives an unbiased estimate of the full-data ELBO.
    With ``num_data=None`` the plate is the batch itself (scale 1).
    """
    batch = x.shape[0]
    size = batch if num_data is None else int(num_data)
    if size < batch:
        raise ValueError(f"num_data ({size}) is smaller than the minibatch ({batch}); set the model's num_data "
                         "to the size of the training set")
    return pyro.plate(DATA_PLATE, size, subsample=torch.arange(batch, device=x.device))


def one_hot(y: torch.Tensor | None, num_classes: int | None, who: str) -> torch.Tensor | None:
    """One-hot float labels, or None for an unconditional model; a clear error for a missing or bad label."""
    if num_classes is None:
        return None
    if y is None:
        raise ValueError(f"{who} is conditional: call it with labels y (int64 tensor of shape (batch,))")
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dim() != 1:
        raise ValueError(f"{who}: y must be an int64 tensor of shape (batch,), got dtype {y.dtype} shape "
                         f"{tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{who}: labels must lie in [0, {num_classes - 1}], got min {int(y.min())} max "
                         f"{int(y.max())}")
    return F.one_hot(y.long(), num_classes).float()


def module_device(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
