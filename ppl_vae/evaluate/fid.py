r"""Fréchet distance between generated and real images in a feature space ("FID"; Heusel et al., "GANs Trained
by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017):

    FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2}),

with (μ, Σ) the mean and covariance of the features of real (r) and generated (g) images. The distance itself is
torchmetrics' ``FrechetInceptionDistance`` (given our feature module; it accumulates in float64); this module
chooses and builds the feature extractor:

* ``"classifier"`` (the offline default): a small CNN trained by :func:`train_feature_classifier` on the
  labelled training set of the same dataset; features = its penultimate layer (128 ReLU units). Scores are
  comparable only with scores made by the same extractor, never with published Inception FIDs.
* ``"inception"``: Inception-v3 pool features (2048-d) from weights that are already on this machine
  (``$PPL_VAE_INCEPTION_WEIGHTS`` or torch hub's checkpoint folder; see :func:`find_inception_weights`).
  Nothing is ever downloaded: a missing file is an error that says where to put it.
* ``"auto"``: Inception when its weights are present, else the classifier.

Every result is a :class:`FIDResult` that carries the extractor's name (e.g. ``classifier:fashion_mnist``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, PplVaeError
from ..nn.device import device_of

__all__ = [
    "FIDResult",
    "FrechetDistance",
    "frechet_distance",
    "SmallClassifier",
    "ClassifierFeatures",
    "InceptionFeatures",
    "train_feature_classifier",
    "find_inception_weights",
    "get_feature_extractor",
    "EXTRACTORS",
]

EXTRACTORS = ("classifier", "inception", "auto")
INCEPTION_ENV = "PPL_VAE_INCEPTION_WEIGHTS"
INCEPTION_FILES = ("inception_v3_google-0cc3c7bd.pth", "inception_v3_google-1a9a5a14.pth")


class FIDError(PplVaeError, ValueError):
    """A feature extractor that cannot be built, or images that cannot be scored."""


@dataclass
class FIDResult:
    """One Fréchet distance and what made it."""

    value: float
    extractor: str
    num_real: int
    num_fake: int

    def __float__(self) -> float:
        return float(self.value)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"FID {self.value:.3f} (features: {self.extractor}; {self.num_real} real vs {self.num_fake} "
            f"generated images)"
        )


# --------------------------------------------------------------------------- the classifier extractor


class SmallClassifier(nn.Module):
    """conv3×3(16) → ReLU → maxpool2 → conv3×3(32) → ReLU → adaptive avg-pool 4×4 → linear(128) → ReLU → linear(K)."""

    def __init__(self, data_shape, num_classes: int, channels=(16, 32), feature_dim: int = 128):
        super().__init__()
        c = data_shape[0]
        self.data_shape = tuple(data_shape)
        self.body = nn.Sequential(
            nn.Conv2d(c, channels[0], 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(channels[1] * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ClassifierFeatures(nn.Module):
    """Penultimate-layer features of a :class:`SmallClassifier`; always in eval mode, no gradients."""

    def __init__(self, classifier: SmallClassifier, name: str, info: dict | None = None):
        super().__init__()
        self.classifier = classifier.eval()
        self.name = name
        self.num_features = classifier.feature_dim
        self.info = dict(info or {})

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(next(self.classifier.parameters()).device, torch.float32)
        return self.classifier.features(x.reshape(x.shape[0], *self.classifier.data_shape))

    def save(self, path) -> None:
        torch.save(
            {
                "state": self.classifier.state_dict(),
                "data_shape": self.classifier.data_shape,
                "num_classes": self.classifier.head.out_features,
                "name": self.name,
                "info": self.info,
            },
            path,
        )

    @classmethod
    def load(cls, path, map_location=None) -> ClassifierFeatures:
        ck = torch.load(path, map_location=map_location or "cpu", weights_only=True)
        clf = SmallClassifier(ck["data_shape"], ck["num_classes"])
        clf.load_state_dict(ck["state"])
        return cls(clf, ck["name"], ck.get("info"))


def train_feature_classifier(
    data,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    limit: int | None = None,
    device=None,
    cache_dir: str | os.PathLike | None = None,
) -> ClassifierFeatures:
    """Train :class:`SmallClassifier` on ``data``'s labelled training split (the first ``limit`` images) with
    Adam and cross-entropy; its test accuracy is in ``.info["test_accuracy"]``. Seeded (the global RNG is left
    as it was). ``cache_dir`` keeps the trained network in a file keyed by the dataset and these settings."""
    if data.train_y is None or data.num_classes is None or data.train_y.dim() != 1:
        raise FIDError(
            f"the classifier feature extractor needs class labels, but dataset {data.name!r} has none; "
            f"use extractor='inception' with local weights (${INCEPTION_ENV})"
        )
    x, y = data.train_x, data.train_y
    if limit is not None:
        x, y = x[:limit], y[:limit]
    key = {
        "dataset": data.name,
        "pixels": data.pixels,
        "n": len(x),
        "shape": list(data.shape),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "digest": hashlib.sha1(x[:: max(1, len(x) // 256)].numpy().tobytes()).hexdigest()[:12],
    }
    path = None
    if cache_dir is not None:
        tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"fid_classifier_{data.name}_{tag}.pt"
        if path.is_file():
            return ClassifierFeatures.load(path).to(device or "cpu")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = SmallClassifier(data.shape, data.num_classes).to(dev)
        opt = torch.optim.Adam(clf.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        clf.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), batch_size):
                idx = order[s : s + batch_size]
                loss = F.cross_entropy(clf(x[idx].to(dev)), y[idx].to(dev))
                opt.zero_grad()
                loss.backward()
                opt.step()
    clf.eval()
    acc = None
    if data.test_y is not None and len(data.test_x):
        with torch.no_grad():
            pred = torch.cat(
                [clf(data.test_x[s : s + 1000].to(dev)).argmax(-1).cpu() for s in range(0, len(data.test_x), 1000)]
            )
        acc = float((pred == data.test_y).float().mean())
    feats = ClassifierFeatures(clf, f"classifier:{data.name}", {**key, "test_accuracy": acc})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        feats.save(path)
    return feats


# --------------------------------------------------------------------------- Inception-v3 (local weights only)


def find_inception_weights() -> Path | None:
    """A local Inception-v3 state dict: ``$PPL_VAE_INCEPTION_WEIGHTS``, else torchvision's file in torch hub's
    checkpoint folder (``torch.hub.get_dir()/checkpoints``). None when there is none; never downloads."""
    env = os.environ.get(INCEPTION_ENV)
    if env:
        return Path(env) if Path(env).is_file() else None
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


class InceptionFeatures(nn.Module):
    """torchvision's Inception-v3 (ImageNet weights from a local file) pool3 features, 2048-d: grey images are
    repeated to RGB, resized bilinearly to 299×299 and normalised with the ImageNet statistics. These are
    torchvision's weights, not the TF-ported ones of the original FID code, so scores are close to, not equal
    to, published FIDs."""

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        from torchvision.models import inception_v3

        path = Path(weights_path) if weights_path is not None else find_inception_weights()
        if path is None or not path.is_file():
            raise FIDError(
                f"no local Inception-v3 weights (looked at ${INCEPTION_ENV} and "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}); put torchvision's "
                f"{INCEPTION_FILES[0]} there or use extractor='classifier'. Nothing is downloaded."
            )
        net = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.fc = nn.Identity()
        self.net = net.eval()
        self.name = f"inception_v3:{path.name}"
        self.num_features = 2048
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


def get_feature_extractor(
    kind: str = "classifier", data=None, *, weights_path=None, device=None, cache_dir=None, **classifier_kwargs
) -> nn.Module:
    """The extractor named ``kind`` (see :data:`EXTRACTORS`); ``data`` is needed to train the classifier."""
    if kind not in EXTRACTORS:
        raise ConfigError(f"FID extractor must be one of {list(EXTRACTORS)}, got {kind!r}")
    if kind == "inception" or (kind == "auto" and (weights_path is not None or find_inception_weights())):
        return InceptionFeatures(weights_path).to(device or "cpu")
    if data is None:
        raise FIDError("the classifier feature extractor is trained on a dataset: pass data=")
    return train_feature_classifier(data, device=device, cache_dir=cache_dir, **classifier_kwargs)


# --------------------------------------------------------------------------- the distance


def _check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise FIDError(f"{what} must be a float tensor of at least 2 images (N, C, H, W), got {got}")
    if not torch.isfinite(x).all():
        raise FIDError(f"{what} contain NaN or inf values")
    return x.float().clamp(0, 1)


class FrechetDistance:
    """FID against a fixed set of real images: their feature statistics are computed once, then
    :meth:`score` scores any number of generated sets (torchmetrics ``FrechetInceptionDistance`` with
    ``reset_real_features=False``)."""

    def __init__(self, extractor: nn.Module, real: torch.Tensor, batch_size: int = 500):
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as e:  # pragma: no cover
            raise FIDError("FID needs torchmetrics (pip install torchmetrics)") from e
        if not hasattr(extractor, "num_features"):
            raise FIDError("the feature extractor needs a num_features attribute")
        self.extractor = extractor.eval()
        self.name = getattr(extractor, "name", type(extractor).__name__)
        self.batch_size = int(batch_size)
        dev = device_of(extractor)
        self.metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False, normalize=True).to(dev)
        real = _check_images(real, "real images")
        self.num_real = real.shape[0]
        self._update(real, True)

    def _update(self, images: torch.Tensor, real: bool) -> None:
        with torch.no_grad():
            for s in range(0, images.shape[0], self.batch_size):
                self.metric.update(images[s : s + self.batch_size], real=real)

    def score(self, fake: torch.Tensor) -> FIDResult:
        fake = _check_images(fake, "generated images")
        self.metric.reset()  # keeps the real statistics
        self._update(fake, False)
        value = float(self.metric.compute())
        if not math.isfinite(value):
            raise FIDError(f"the Fréchet distance came out as {value}")
        return FIDResult(max(value, 0.0), self.name, self.num_real, fake.shape[0])


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, extractor: nn.Module, batch_size: int = 500) -> FIDResult:
    """FID between two image sets (N, C, H, W) in [0, 1] with the given feature extractor."""
    return FrechetDistance(extractor, real, batch_size).score(fake)
