"""Neural networks (plain ``torch.nn``; nothing here is probabilistic).

* :mod:`.networks` — MLP, convolutional and ResNet encoders/decoders, :func:`build_encoder_decoder`;
* :mod:`.ladder_nets` — bottom-up and top-down steps of ladder hierarchies;
* :mod:`.pixelcnn` — gated and local-window PixelCNNs (autoregressive decoders);
* :mod:`.patchgan` — the PatchGAN discriminator;
* :mod:`.modality` — per-modality pieces of multimodal VAEs.
"""

from .networks import (
    ConvDecoder,
    ConvEncoder,
    GaussianHead,
    MLPDecoder,
    MLPEncoder,
    ResNetDecoder,
    ResNetEncoder,
    build_encoder_decoder,
    mlp,
)
from .patchgan import PatchGAN

__all__ = [
    "mlp",
    "GaussianHead",
    "MLPEncoder",
    "MLPDecoder",
    "ConvEncoder",
    "ConvDecoder",
    "ResNetEncoder",
    "ResNetDecoder",
    "build_encoder_decoder",
    "PatchGAN",
]
