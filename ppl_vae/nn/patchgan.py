"""A PatchGAN discriminator (Isola et al., CVPR 2017): a convolutional critic scoring overlapping patches, used
by the adversarial objective of GAMIX's author operating point.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchGAN(nn.Module):
    """A fully convolutional patch discriminator (Isola et al. 2017's PatchGAN; Rivera 2023's widths
    128-128-128-64-64-1 with strides 2-2-2-1-1-1, BatchNorm and leaky ReLU): one logit per image patch, shape
    (B, 1, h, w). ``width`` scales the channel counts (1.0 = the author's); a stride-2 layer whose input is
    smaller than 8 pixels keeps stride 1, so 8×8 to 256×256 images all get a patch map of at least 2×2."""

    WIDTHS = (128, 128, 128, 64, 64)
    STRIDES = (2, 2, 2, 1, 1)

    def __init__(self, data_shape, width: float = 1.0):
        super().__init__()
        c, h, w = data_shape
        layers: list[nn.Module] = []
        ch, size = c, min(h, w)
        for i, (out, stride) in enumerate(zip(self.WIDTHS, self.STRIDES, strict=False)):
            out = max(4, int(round(out * width)))
            stride = stride if size >= 8 else 1
            layers.append(nn.Conv2d(ch, out, 4 if stride == 2 else 3, stride=stride, padding=1))
            if i > 0:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2))
            size = (size + 2 - (4 if stride == 2 else 3)) // stride + 1
            ch = out
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
