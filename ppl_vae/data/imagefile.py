"""An image file of any PIL mode as 8-bit RGB, each mode at its own scale: the reader of ``image_folder``.

PIL's own ``convert("RGB")`` is exact for the 8-bit modes but clips the wide ones at 255 (a 16-bit greyscale PNG
becomes nearly white); here they are scaled, and a mode or value range that cannot be read faithfully is refused with
a :class:`~ppl_vae.errors.DataError` that names the file.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

__all__ = ["IMAGE_MODES", "read_rgb"]

_RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")  # PIL's convert("RGB") is exact
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")  # the colour is kept, the alpha dropped (as torchvision does)
_WIDE_MODES = {  # mode: (the value read as 1.0, the name of the range)
    "I;16": (65535, "16-bit 0..65535"),
    "I;16L": (65535, "16-bit 0..65535"),
    "I;16B": (65535, "16-bit 0..65535"),
    "I;16N": (65535, "16-bit 0..65535"),
    "I": (65535, "32-bit integers holding 16-bit values 0..65535"),
    "F": (1.0, "32-bit floats in [0, 1]"),
}
IMAGE_MODES = _RGB_MODES + _ALPHA_MODES + tuple(_WIDE_MODES)  # the PIL modes image_folder reads


def read_rgb(path: str):
    """The ``loader`` of ``image_folder``: the image file ``path`` as an 8-bit RGB PIL image, whatever its mode.
    8-bit modes (greyscale, 1-bit, palette, CMYK, YCbCr, LAB, HSV, with or without alpha) go through PIL's own
    conversion, the alpha channel dropped; 16-bit greyscale (``I;16``, ``I;16B``, ...) is scaled by 255/65535 and
    rounded (not clipped at 255, as PIL's ``convert("RGB")`` does); ``I`` must hold 0..65535 and ``F`` [0, 1], the
    same scales. Any other mode, or values outside a mode's range, is a :class:`DataError` naming the file, the mode
    and the modes read."""
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()  # decode now: a truncated file fails here, naming it (FileRows adds the name)
    return _as_rgb(image, path)


def _as_rgb(image, path: str):
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:  # PIL wants such palettes converted through RGBA
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _RGB_MODES or mode in _ALPHA_MODES:
        return (image.convert("LA") if mode == "La" else image).convert("RGB")
    if mode not in _WIDE_MODES:
        raise DataError(
            f"image_folder: {path} has the PIL image mode {mode!r}, which ppl-vae does not read; supported modes: "
            f"{', '.join(IMAGE_MODES)}. Convert the file (e.g. to an 8- or 16-bit PNG)"
        )
    full, what = _WIDE_MODES[mode]
    values = np.asarray(image).astype(np.float64)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= full):
        raise DataError(
            f"image_folder: {path} has the PIL image mode {mode!r} with values in [{values.min():g}, "
            f"{values.max():g}]; this mode is read as {what}, so it would be clipped. Rescale the file to that "
            "range, or save it as an 8- or 16-bit PNG"
        )
    grey = np.rint(values * (255.0 / full)).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
