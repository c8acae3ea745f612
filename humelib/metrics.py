"""Scores of a labeling against ground truth: clustering accuracy (Hungarian matching), ARI, NMI; aligning and
ensembling labelings. Labels may be any integers; cluster and class counts may differ. (The label-free CV score lives
in cvscore.)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def contingency(y_pred: ArrayLike, y_true: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts C[i, j] = #points with predicted cluster i and class j, for arbitrary integer values."""
    pred_ids, pred = np.unique(y_pred, return_inverse=True)
    true_ids, true = np.unique(y_true, return_inverse=True)
    C = np.zeros((len(pred_ids), len(true_ids)), dtype=np.int64)
    np.add.at(C, (pred, true), 1)
    return C, pred_ids, true_ids


def cluster_acc(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Clustering accuracy under the best one-to-one cluster-to-class matching (Hungarian algorithm).

    Clusters left without a class (more clusters than classes) count as wrong.
    """
    from scipy.optimize import linear_sum_assignment
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    C, _, _ = contingency(y_pred, y_true)
    rows, cols = linear_sum_assignment(C, maximize=True)
    return float(C[rows, cols].sum() / len(y_true))


def all_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    return {"acc": cluster_acc(y_true, y_pred),
            "ari": float(adjusted_rand_score(y_true, y_pred)),
            "nmi": float(normalized_mutual_info_score(y_true, y_pred))}


def align_to(y_pred: np.ndarray, y_ref: np.ndarray) -> np.ndarray:
    """Relabel y_pred so its clusters carry the labels of the y_ref clusters they overlap most (Hungarian).

    Clusters of y_pred that find no partner keep fresh labels not used by y_ref.
    """
    from scipy.optimize import linear_sum_assignment
    C, pred_ids, ref_ids = contingency(y_pred, y_ref)
    rows, cols = linear_sum_assignment(C, maximize=True)
    mapping = {pred_ids[r]: ref_ids[c] for r, c in zip(rows, cols)}
    fresh = int(max(np.max(y_ref), np.max(y_pred))) + 1
    for p in pred_ids:
        if p not in mapping:
            mapping[p], fresh = fresh, fresh + 1
    return np.array([mapping[p] for p in y_pred], dtype=np.int64)


def majority_vote(labelings: ArrayLike) -> np.ndarray:
    """Per-point most frequent label across rows of labelings (n_tasks x n); ties go to the smaller label."""
    labelings = np.asarray(labelings)
    ids, inv = np.unique(labelings, return_inverse=True)
    inv = inv.reshape(labelings.shape)
    counts = np.zeros((len(ids), labelings.shape[1]), dtype=np.int64)
    for row in inv:
        counts[row, np.arange(labelings.shape[1])] += 1
    return ids[counts.argmax(0)]


def align_tasks(preds: Mapping[int, np.ndarray], cv: Mapping[int, float]) -> tuple[int, dict[int, np.ndarray]]:
    """Every task's predictions ({seed: labels}) aligned to the best-CV task's with the Hungarian algorithm.
    Returns (best seed, {seed: aligned labels})."""
    best = max(cv, key=lambda s: (math.isfinite(cv[s]), cv[s] if math.isfinite(cv[s]) else 0.0))  # never NaN/inf
    return best, {s: align_to(preds[s], preds[best]) for s in preds}


def ensemble(preds: Mapping[int, np.ndarray], cv: Mapping[int, float]) -> tuple[int, np.ndarray]:
    """The paper's ensemble: every task aligned to the best-CV task (align_tasks), then the per-point majority
    vote. Returns (best seed, ensemble labels)."""
    best, aligned = align_tasks(preds, cv)
    return best, majority_vote(list(aligned.values()))
