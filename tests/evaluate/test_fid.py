"""FID: torchmetrics' Fréchet distance with our feature extractors; nothing is ever downloaded."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ppl_vae.data import load_data
from ppl_vae.evaluate import fid as fidmod
from ppl_vae.evaluate.fid import (
    ClassifierFeatures,
    FIDError,
    FrechetDistance,
    InceptionFeatures,
    SmallClassifier,
    frechet_distance,
    get_feature_extractor,
    train_feature_classifier,
)


class Flatten(nn.Module):
    """Identity features (the pixels): the Fréchet distance of the pixel distributions."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d
        self.name = "pixels"
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x.reshape(x.shape[0], -1)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", pixels="continuous", seed=0)


@pytest.fixture(scope="module")
def extractor(digits):
    return train_feature_classifier(digits, epochs=3, seed=0)


def test_distance_matches_the_formula():
    """‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) with scipy's sqrtm on 3×3 covariances (unbiased, N−1)."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(400, 1, 1, 3, generator=g)
    b = torch.rand(300, 1, 1, 3, generator=g) * 0.7 + 0.2
    r = frechet_distance(a, b, Flatten(3))
    fa, fb = a.reshape(400, 3).double().numpy(), b.reshape(300, 3).double().numpy()
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    ref = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert r.value == pytest.approx(ref, rel=1e-4)
    assert (r.extractor, r.num_real, r.num_fake) == ("pixels", 400, 300)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(digits, extractor):
    real = digits.test_x[:300]
    fd = FrechetDistance(extractor, real)
    same = fd.score(real.clone())
    assert same.value < 1e-3 * max(1.0, fd.score(digits.train_x[:300]).value)
    values = []
    g = torch.Generator().manual_seed(1)
    for s in (0.05, 0.1, 0.2, 0.4):
        values.append(fd.score((real + s * torch.randn(real.shape, generator=g)).clamp(0, 1)).value)
    assert values == sorted(values) and values[0] > same.value
    assert "classifier:digits" in str(same) and same.extractor == "classifier:digits"


def test_classifier_extractor_learns_and_is_cached(digits, extractor, tmp_path):
    assert extractor.info["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert extractor.num_features == 128 and extractor(digits.test_x[:4]).shape == (4, 128)
    extractor.train()
    assert not extractor.training and not extractor.classifier.training  # stays in eval mode
    a = train_feature_classifier(digits, epochs=1, seed=0, limit=200, cache_dir=tmp_path)
    files = list(tmp_path.glob("fid_classifier_digits_*.pt"))
    assert len(files) == 1
    b = train_feature_classifier(digits, epochs=1, seed=0, limit=200, cache_dir=tmp_path)
    torch.testing.assert_close(a(digits.test_x[:5]), b(digits.test_x[:5]))
    c = ClassifierFeatures.load(files[0])
    assert c.name == "classifier:digits"


def test_inception_is_never_downloaded(monkeypatch, tmp_path, digits):
    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv(fidmod.INCEPTION_ENV, str(tmp_path / "missing.pth"))
    assert fidmod.find_inception_weights() is None
    with pytest.raises(FIDError, match="Nothing is downloaded"):
        InceptionFeatures()
    with pytest.raises(FIDError, match="Nothing is downloaded"):
        get_feature_extractor("inception")
    auto = get_feature_extractor("auto", digits, epochs=1, limit=100)
    assert auto.name == "classifier:digits"


def test_errors_speak_plainly(extractor):
    with pytest.raises(FIDError, match="at least 2 images"):
        frechet_distance(torch.rand(1, 1, 8, 8), torch.rand(5, 1, 8, 8), extractor)
    bad = torch.rand(4, 1, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FIDError, match="NaN"):
        frechet_distance(torch.rand(4, 1, 8, 8), bad, extractor)
    from ppl_vae.data import DataBundle

    with pytest.raises(FIDError, match="needs class labels"):
        train_feature_classifier(DataBundle.from_tensors(torch.rand(10, 1, 8, 8)))
    with pytest.raises(Exception, match="extractor must be one of"):
        get_feature_extractor("vgg")
    assert SmallClassifier((1, 28, 28), 10)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
def test_inception_from_a_local_file(tmp_path, monkeypatch):
    """With a local state dict (random weights here: the point is the plumbing) Inception gives 2048-d features
    and FID results named after the file."""
    from torchvision.models import inception_v3

    path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    monkeypatch.setenv(fidmod.INCEPTION_ENV, str(path))
    ex = get_feature_extractor("auto")
    assert isinstance(ex, InceptionFeatures) and ex.name == f"inception_v3:{path.name}"
    x = torch.rand(6, 1, 28, 28)
    assert ex(x).shape == (6, 2048)
    assert frechet_distance(x, x, ex, batch_size=3).extractor.startswith("inception_v3")
