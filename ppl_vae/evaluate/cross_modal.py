r"""Evaluation of multimodal VAEs: cross-modal coherence, latent probes, imputation, joint and conditional
importance-sampled log-likelihoods (the cross-generation figure is
:func:`ppl_vae.viz.plot_cross_generation`).

What a model provides (every model of :mod:`ppl_vae.distributions.experts` does; a user's own can too):
``layout`` (:class:`~ppl_vae.data.multimodal.Layout`), ``conditional(x, given) -> q(z | x_given)`` (a distribution
with batch shape (B,), ``given`` a (B, M) bool mask), ``decode(z, m) -> E[x_m | z]``, ``model``/``guide`` called
``(x, mask)`` and ``has_joint_likelihood`` (False where the program is not a normalised density of X, as MMVM's
data-dependent prior).

* **Coherence** (Shi et al. 2019; Sutter et al. 2021): generate modality j from the modalities ``given``
  (z ~ q(z | x_given), x̂_j = E[x_j | z]); a classifier trained on *real* modality-j data labels x̂_j; the
  accuracy against the datapoint's class. ``matrix[i][j]``: from modality i alone; ``rest_to[j]``: from all
  modalities but j. A label modality is classified by its most probable class.
* **Probe**: a logistic regression of the class on E[z | x_given] (training codes from the training split):
  from all modalities (``joint``) and from each one alone (``unimodal``).
* **Imputation**: modality j predicted from all the others, E[x_j | z] at the mean of q(z | x_{−j}): mean squared
  error per value for images, error rate for labels.
* **Log-likelihoods**: log p̂(X) by importance sampling from the guide (:func:`~ppl_vae.evaluate.log_likelihood`
  with the full mask) and log p̂(x_j | x_i) = log p̂(x_i, x_j) − log p̂(x_i) (masks {i, j} and {i}).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..data.multimodal import Layout
from ..nn.device import device_of
from .clustering import probe_accuracy
from .likelihood import log_likelihood

__all__ = [
    "fit_classifiers",
    "model_generator",
    "coherence",
    "latent_probe",
    "imputation_error",
    "joint_log_likelihood",
    "conditional_log_likelihood",
    "multimodal_summary",
]


def _chunks(n: int, size: int):
    for a in range(0, n, size):
        yield slice(a, min(a + size, n))


class _Argmax:
    def __call__(self, values: torch.Tensor) -> np.ndarray:
        return values.reshape(len(values), -1).argmax(-1).cpu().numpy()


class _Pixels:
    """A standardised logistic regression on the flattened values of one image modality."""

    def __init__(self, clf):
        self.clf = clf

    def __call__(self, values: torch.Tensor) -> np.ndarray:
        return self.clf.predict(values.reshape(len(values), -1).detach().cpu().numpy())


def fit_classifiers(
    layout: Layout, x: torch.Tensor, labels: torch.Tensor, max_train: int = 5000, seed: int = 0
) -> list:
    """One classifier per modality, fitted on real data ``x`` (packed) with class ``labels``: a logistic
    regression on the values of each image modality, the argmax for a label modality. Each maps a ``(B, *shape)``
    tensor to predicted classes; ``.accuracy`` holds its accuracy on the (held-in) fitting data."""
    x, labels = x[:max_train], labels[:max_train]
    parts = layout.split(x)
    y = labels.cpu().numpy()
    out = []
    for name, kind in zip(layout.names, layout.kinds, strict=False):
        if kind == "label":
            out.append(_Argmax())
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
        clf.fit(parts[name].reshape(len(x), -1).cpu().numpy(), y)
        out.append(_Pixels(clf))
    return out


def model_generator(model, sample: bool = True):
    """``generate(x, given, j)``: E[x_j | z] with z drawn from (``sample``) or at the mean of q(z | x_given)."""

    def generate(x, given, j):
        q = model.conditional(x, given)
        z = q.sample() if sample else q.mean
        return model.decode(z, j)

    return generate


@torch.no_grad()
def coherence(
    generate,
    layout: Layout,
    x: torch.Tensor,
    labels: torch.Tensor,
    classifiers,
    *,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Cross-modal coherence (module docstring) of ``generate(x, given, j) -> x̂_j`` on packed ``x``."""
    m_count = layout.num_modalities
    y = labels.cpu().numpy()
    hits = np.zeros((m_count, m_count))
    rest = np.zeros(m_count)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for sl in _chunks(len(x), batch_size):
            xb, b = x[sl], sl.stop - sl.start
            for j in range(m_count):
                for i in range(m_count):
                    hits[i, j] += (classifiers[j](generate(xb, layout.only(i, b, x.device), j)) == y[sl]).sum()
                if m_count > 1:
                    rest[j] += (classifiers[j](generate(xb, layout.all_but(j, b, x.device), j)) == y[sl]).sum()
    matrix = hits / len(x)
    off = matrix[~np.eye(m_count, dtype=bool)]
    return {
        "matrix": matrix.tolist(),
        "rest_to": (rest / len(x)).tolist(),
        "cross_mean": float(off.mean()),
        "rest_mean": float((rest / len(x)).mean()),
        "modalities": list(layout.names),
    }


@torch.no_grad()
def _codes(model, x, given_fn, batch_size=500):
    out = []
    for sl in _chunks(len(x), batch_size):
        xb = x[sl]
        out.append(model.conditional(xb, given_fn(len(xb), x.device)).mean)
    return torch.cat(out)


def latent_probe(model, train_x, train_labels, test_x, test_labels, num_train: int = 2000) -> dict:
    """Accuracy of a logistic probe of the class on E[z | x_given]: ``joint`` (all modalities) and ``unimodal``
    (each modality alone; their mean in ``unimodal_mean``)."""
    layout = model.layout
    n = min(num_train, len(train_x))
    tr_x, tr_y = train_x[:n], train_labels[:n]

    def acc(given_fn):
        ztr, zte = _codes(model, tr_x, given_fn), _codes(model, test_x, given_fn)
        return probe_accuracy(ztr, tr_y.cpu(), zte, test_labels.cpu(), num_labels=(n,))[n]

    joint = acc(lambda b, d: layout.full_mask(b, d))
    uni = [acc(lambda b, d, m=m: layout.only(m, b, d)) for m in range(layout.num_modalities)]
    return {"joint": joint, "unimodal": uni, "unimodal_mean": float(np.mean(uni))}


@torch.no_grad()
def imputation_error(model, x: torch.Tensor, batch_size: int = 500) -> dict:
    """Each modality predicted from all the others (module docstring): {name: error}, and their mean over images."""
    layout = model.layout
    parts = layout.split(x)
    out = {}
    for j, (name, kind) in enumerate(zip(layout.names, layout.kinds, strict=False)):
        total = 0.0
        for sl in _chunks(len(x), batch_size):
            xb = x[sl]
            z = model.conditional(xb, layout.all_but(j, len(xb), x.device)).mean
            pred, truth = model.decode(z, j), parts[name][sl]
            if kind == "label":
                total += float((pred.argmax(-1) != truth.argmax(-1)).float().sum())
            else:
                total += float((pred - truth).pow(2).reshape(len(xb), -1).mean(1).sum())
        out[name] = total / len(x)
    images = [out[n] for n, k in zip(layout.names, layout.kinds, strict=False) if k == "image"]
    return {"per_modality": out, "image_mse_mean": float(np.mean(images)) if images else None}


def joint_log_likelihood(model, x: torch.Tensor, num_samples: int = 1000, seed: int = 0, **kwargs) -> torch.Tensor:
    """log p̂(X) per datapoint, all modalities observed (importance sampling from the guide)."""
    mask = model.layout.full_mask(len(x), x.device)
    return log_likelihood(model.model, model.guide, x, num_samples, y=mask, seed=seed, **kwargs)


def conditional_log_likelihood(
    model, x: torch.Tensor, given: int, target: int, num_samples: int = 1000, seed: int = 0, **kwargs
) -> torch.Tensor:
    """log p̂(x_target | x_given) = log p̂(x_given, x_target) − log p̂(x_given) per datapoint (a model whose
    program is not a normalised density of X, ``has_joint_likelihood = False``, has none: ValueError)."""
    if not model.has_joint_likelihood:
        raise ValueError(
            f"{type(model).__name__} has no joint likelihood (its prior depends on the data), so no "
            "conditional log-likelihood either"
        )
    layout = model.layout
    pair = layout.only(given, len(x), x.device) | layout.only(target, len(x), x.device)
    both = log_likelihood(model.model, model.guide, x, num_samples, y=pair, seed=seed, **kwargs)
    one = log_likelihood(
        model.model, model.guide, x, num_samples, y=layout.only(given, len(x), x.device), seed=seed + 1, **kwargs
    )
    return both - one


def multimodal_summary(
    model,
    data,
    *,
    num_samples: int = 200,
    max_test: int = 1000,
    probe_train: int = 2000,
    classifiers=None,
    seed: int = 0,
) -> dict:
    """Coherence, probe accuracy, imputation and (where defined) the joint test log-likelihood of a model on a
    :class:`~ppl_vae.data.multimodal.MultimodalData` (test split, first ``max_test`` datapoints)."""
    layout = model.layout
    dev = device_of(model)
    x, lab = data.test_x[:max_test].to(dev), data.test_labels[:max_test]
    full = data.train_y.all(1)  # classifiers and probes are fitted on complete training datapoints
    tr_x, tr_lab = data.train_x[full].to(dev), data.train_labels[full]
    was = model.training
    model.eval()
    try:
        if classifiers is None:
            classifiers = fit_classifiers(layout, tr_x, tr_lab, seed=seed)
        out = {
            "num_test": len(x),
            "coherence": coherence(model_generator(model), layout, x, lab, classifiers, seed=seed),
            "probe_acc": latent_probe(model, tr_x, tr_lab, x, lab, num_train=probe_train),
            "imputation": imputation_error(model, x),
        }
        if model.has_joint_likelihood and num_samples > 0:
            ll = joint_log_likelihood(model, x, num_samples=num_samples, seed=seed)
            out["test_ll"] = float(ll.mean())
            out["test_ll_sem"] = float(ll.std() / len(ll) ** 0.5) if len(ll) > 1 else 0.0
        else:
            out["test_ll"] = None
    finally:
        model.train(was)
    return out
