r"""Image-quality measures that need no feature network.

* :func:`sharpness` — the variance of the Laplacian of an image (grey: the channel mean), averaged over images,
  with the 3×3 kernel [0 1 0; 1 −4 1; 0 1 0] on the valid interior: the sharpness measure of Qin & Huang's
  Epanechnikov VAE paper (higher is sharper; blurred reconstructions score low).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sharpness"]

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def sharpness(images: torch.Tensor) -> float:
    """Mean over images (N, C, H, W) of the (unbiased) variance of the Laplacian of each image's channel mean."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or min(images.shape[-2:]) < 3:
        raise ValueError(
            f"images must be a tensor (N, C, H, W) with H, W >= 3, got "
            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
        )
    grey = images.mean(1, keepdim=True)
    lap = F.conv2d(grey, _LAPLACIAN.to(grey.device, grey.dtype))
    return float(lap.flatten(1).var(1).mean())
