"""Scores of a labeling: clustering accuracy (Hungarian matching), ARI, NMI; aligning and ensembling labelings; and
HUME's label-free generalisation score (the CV score). Labels may be any integers; cluster and class counts may differ.
"""
import math
import warnings

import numpy as np

def contingency(y_pred, y_true):
    """Counts C[i, j] = #points with predicted cluster i and class j, for arbitrary integer values."""
    pred_ids, pred = np.unique(y_pred, return_inverse=True)
    true_ids, true = np.unique(y_true, return_inverse=True)
    C = np.zeros((len(pred_ids), len(true_ids)), dtype=np.int64)
    np.add.at(C, (pred, true), 1)
    return C, pred_ids, true_ids


def cluster_acc(y_true, y_pred):
    """Clustering accuracy under the best one-to-one cluster-to-class matching (Hungarian algorithm).

    Clusters left without a class (more clusters than classes) count as wrong.
    """
    from scipy.optimize import linear_sum_assignment
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    C, _, _ = contingency(y_pred, y_true)
    rows, cols = linear_sum_assignment(C, maximize=True)
    return float(C[rows, cols].sum() / len(y_true))


def all_metrics(y_true, y_pred):
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    return {"acc": cluster_acc(y_true, y_pred),
            "ari": float(adjusted_rand_score(y_true, y_pred)),
            "nmi": float(normalized_mutual_info_score(y_true, y_pred))}


def align_to(y_pred, y_ref):
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


def majority_vote(labelings):
    """Per-point most frequent label across rows of labelings (n_tasks x n); ties go to the smaller label."""
    labelings = np.asarray(labelings)
    ids, inv = np.unique(labelings, return_inverse=True)
    inv = inv.reshape(labelings.shape)
    counts = np.zeros((len(ids), labelings.shape[1]), dtype=np.int64)
    for row in inv:
        counts[row, np.arange(labelings.shape[1])] += 1
    return ids[counts.argmax(0)]


def cv_score(features, y_pred, folds=10, seed=1):
    """HUME's label-free generalisation score: 10-fold CV accuracy of an unregularised multinomial logistic
    regression that predicts the task's labels from phi2 (KFold, shuffled, fixed seed).

    Always a number in [0, 1], never NaN: a constant labeling (or fewer than 2 points) scores 0.0; with fewer
    points than folds each point is its own fold (k = n included); a fold whose training part holds a single
    class (a class too small for the folds) is scored as predicting that class for its held-out points."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    y_pred = np.asarray(y_pred)
    if len(y_pred) < 2 or len(np.unique(y_pred)) < 2:
        return 0.0  # a constant labeling carries no information: score it as worst
    features = np.asarray(features)
    cv = KFold(n_splits=min(folds, len(y_pred)), shuffle=True, random_state=seed)
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # folds missing a rare class
        for tr, te in cv.split(features):
            if len(np.unique(y_pred[tr])) < 2:
                scores.append(float(np.mean(y_pred[te] == y_pred[tr][0])))
                continue
            clf = LogisticRegression(C=np.inf, max_iter=1000).fit(features[tr], y_pred[tr])
            scores.append(float(np.mean(clf.predict(features[te]) == y_pred[te])))
    return float(np.mean(scores))


def align_tasks(preds, cv):
    """Every task's predictions ({seed: labels}) aligned to the best-CV task's with the Hungarian algorithm.
    Returns (best seed, {seed: aligned labels})."""
    best = max(cv, key=lambda s: (math.isfinite(cv[s]), cv[s] if math.isfinite(cv[s]) else 0.0))  # never NaN/inf
    return best, {s: align_to(preds[s], preds[best]) for s in preds}


def ensemble(preds, cv):
    """The paper's ensemble: every task aligned to the best-CV task (align_tasks), then the per-point majority
    vote. Returns (best seed, ensemble labels)."""
    best, aligned = align_tasks(preds, cv)
    return best, majority_vote(list(aligned.values()))
