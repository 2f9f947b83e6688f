r"""Unsupervised cluster quality and label-efficiency probes of latent codes.

* :func:`cluster_accuracy` — the accuracy of the best one-to-one map of clusters to classes (the Hungarian
  algorithm, ``scipy.optimize.linear_sum_assignment`` on the contingency table), as in VaDE / MFCVAE; clusters
  without a class (more clusters than classes) count as errors.
* :func:`cluster_scores` — that accuracy with scikit-learn's NMI and ARI.
* :func:`probe_accuracy` — a logistic-regression (standardised codes) or k-NN classifier trained on the codes of
  the first n labelled training points, scored on held-out codes.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["cluster_accuracy", "cluster_scores", "probe_accuracy"]


def _labels(a, name: str) -> np.ndarray:
    arr = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be a non-empty 1-d array of integer labels, got shape {arr.shape} and dtype {arr.dtype}"
        )
    return arr


def cluster_accuracy(y_true, y_pred) -> float:
    """max over one-to-one maps m of mean(m(y_pred) == y_true)."""
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred must have the same length, got {len(t)} and {len(p)}")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((pi.max() + 1, ti.max() + 1), dtype=np.int64)
    np.add.at(table, (pi, ti), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(t))


def cluster_scores(y_true, y_pred) -> dict:
    """{"accuracy", "nmi", "ari"} of a clustering against class labels."""
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    return {
        "accuracy": cluster_accuracy(t, p),
        "nmi": float(normalized_mutual_info_score(t, p)),
        "ari": float(adjusted_rand_score(t, p)),
    }


def probe_accuracy(
    train_codes, train_labels, test_codes, test_labels, num_labels=(200, 1000, 5000), kind: str = "logistic", k: int = 5
) -> dict[int, float]:
    """{n: accuracy on the test codes of a ``kind`` ("logistic" or "knn") classifier fitted on the first n
    training codes}; n larger than the training set is skipped."""
    if kind not in ("logistic", "knn"):
        raise ValueError(f"kind must be 'logistic' or 'knn', got {kind!r}")

    def arr(a):
        return np.asarray(a.detach().cpu() if hasattr(a, "detach") else a)

    ztr, ytr, zte, yte = arr(train_codes), arr(train_labels), arr(test_codes), arr(test_labels)
    out = {}
    for n in num_labels:
        if n > len(ztr):
            continue
        clf = (
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
            if kind == "logistic"
            else KNeighborsClassifier(min(k, n))
        )
        out[int(n)] = float(clf.fit(ztr[:n], ytr[:n]).score(zte, yte))
    return out
