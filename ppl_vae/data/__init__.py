"""Data: image datasets by name or your own, as a :class:`DataBundle` of splits with reproducible batches.

* :mod:`.bundle` — :class:`DataBundle` and :func:`load_data` (splits, pixel modes, batches, a rank's share);
* :mod:`.sources` — one loader per dataset (scikit-learn digits, IDX files, Omniglot, CelebA, image folders);
* :mod:`.storage` — where pixels live between batches (float32, 8-bit, memory-mapped, decoded from files);
* :mod:`.user` — your own tensors, arrays or ``Dataset`` as a bundle (:func:`as_data`);
* :mod:`.multimodal` — several modalities of one datapoint, with masks (:func:`make_multimodal`).
"""

from ..errors import DataError
from .bundle import DATASETS, PIXEL_MODES, SPLITS, DataBundle, load_data, part_bounds
from .multimodal import Layout, MultimodalData, make_multimodal
from .sources import DEBIAN_FASHION_MNIST
from .storage import STORAGES, Images
from .user import as_data

__all__ = [
    "DATASETS",
    "PIXEL_MODES",
    "SPLITS",
    "STORAGES",
    "DataBundle",
    "as_data",
    "DataError",
    "Images",
    "load_data",
    "part_bounds",
    "DEBIAN_FASHION_MNIST",
    "Layout",
    "MultimodalData",
    "make_multimodal",
]
