"""The label-free generalisation score of a labeling: k-fold cross-validated accuracy of a multinomial logistic
regression that predicts the labeling from a representation space. Two definitions:

- HUME's (cv_score, what every results_{seed}.pickle carries): the paper's code, scikit-learn's
  LogisticRegression(penalty=None) with its defaults (lbfgs, max_iter=100, tol=1e-4) in
  cross_val_score over KFold(10, shuffle=True, random_state=1), accuracy averaged over the folds.
- TURTLE's (turtle_cv_score, run_turtle.py --cross_val): its cross_val.py fits cuML's
  LogisticRegression(C=1.0, tol=1e-9, max_iter=1000) on folds from np.random.seed(42) and
  np.array_split(np.random.permutation(n), 10).

The means: scikit-learn itself, the folds in parallel processes (the paper's n_jobs=-1). A torch float32 objective
under scipy's L-BFGS-B (scikit-learn's own optimiser and options) gave the same scores (within 0.0001 at
10,000 x 1,536) but was slower, timed side by side (bench.py --cv_score times ours beside the paper's).

Rules shared by both: always a number in [0, 1], never NaN. A constant labeling (or fewer than 2 points) scores
0.0; with fewer points than folds each point is its own fold; a fold whose training part holds a single class (a
class too small for the folds) is scored as predicting that class for its held-out points.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np
from threadpoolctl import threadpool_limits

SMALL = 2_000_000  # features (n x d values) scored in this process, one thread, folds one after another: below
# this, starting worker processes costs more than it saves (the demo's 360 x 480 is far below)


def cv_score(features: np.ndarray, y_pred: np.ndarray, folds: int = 10, seed: int = 1) -> float:
    """HUME's score (the paper's definition above) of labels y_pred (n,) from features (n x d)."""
    from sklearn.model_selection import KFold
    n = len(y_pred)
    splits = lambda: KFold(n_splits=min(folds, n), shuffle=True, random_state=seed).split(np.zeros((n, 1)))
    return fold_accuracy(features, y_pred, splits, C=np.inf, max_iter=100, tol=1e-4)


def turtle_cv_score(features: np.ndarray, y_pred: np.ndarray, folds: int = 10, seed: int = 42) -> float:
    """TURTLE's --cross_val score (its definition above) of labels y_pred (n,) from features (n x d).

    The penalty in scikit-learn's terms: cuML's LogisticRegression hands QN l2_strength = 1/C, and QN's default
    penalty_normalized=True divides it by the number of training points n; QN minimises the *mean* loss plus
    0.5 * l2 * ||W||^2 over the weights only (its Tikhonov regulariser skips the bias column). So cuML's objective
    is mean CE + ||W||^2 / (2 C n), which is scikit-learn's with the same C (l2_reg_strength = 1 / (C n), mean loss,
    intercept unpenalised): C=1.0 in both. tol=1e-9 there means: run to convergence (max_iter=1000)."""
    def splits():
        perm = np.random.RandomState(seed).permutation(len(y_pred))  # what np.random.seed(seed) then permutation draw
        parts = np.array_split(perm, min(folds, len(y_pred)))
        return [(np.concatenate(parts[:i] + parts[i + 1:]), parts[i]) for i in range(len(parts))]
    return fold_accuracy(features, y_pred, splits, C=1.0, max_iter=1000, tol=1e-9)


def fold_accuracy(features: np.ndarray, y_pred: np.ndarray,
                  splits: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], C: float, max_iter: int, tol: float
                  ) -> float:
    """Mean held-out accuracy of LogisticRegression(C, max_iter, tol) over the folds of splits(), in parallel."""
    from sklearn.utils.parallel import Parallel, delayed
    y_pred = np.asarray(y_pred)
    if len(y_pred) < 2 or len(np.unique(y_pred)) < 2:
        return 0.0  # a constant labeling carries no information: score it as worst
    X = np.asarray(features)
    if X.size <= SMALL:  # worker processes are slow to start: small problems stay here, one thread
        with threadpool_limits(1):  # (threadpoolctl comes with scikit-learn)
            accs = [fold_fit(X, y_pred, tr, te, C, max_iter, tol) for tr, te in splits()]
    else:
        accs = Parallel(n_jobs=-1)(delayed(fold_fit)(X, y_pred, tr, te, C, max_iter, tol) for tr, te in splits())
    return float(np.mean(accs))


def fold_fit(X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, C: float, max_iter: int, tol: float
             ) -> float:
    """Held-out accuracy of one fold; a training part holding one class predicts that class."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    if len(np.unique(y[tr])) < 2:
        return float(np.mean(y[te] == y[tr][0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separable labelings never converge unpenalised
        warnings.simplefilter("ignore", UserWarning)  # folds missing a rare class
        clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol).fit(X[tr], y[tr])
    return float(np.mean(clf.predict(X[te]) == y[te]))
