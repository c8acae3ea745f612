"""The label-free generalisation score of a labeling: k-fold cross-validated accuracy of a multinomial logistic
regression that predicts the labeling from a representation space. Two definitions, one solver:

- HUME's (cv_score, what every results_{seed}.pickle carries): the paper's code, scikit-learn's
  LogisticRegression(penalty=None) with its defaults (lbfgs, max_iter=100, tol=1e-4) in
  cross_val_score over KFold(10, shuffle=True, random_state=1), accuracy averaged over the folds.
- TURTLE's (turtle_cv_score, run_turtle.py --cross_val): its cross_val.py fits cuML's
  LogisticRegression(C=1.0, tol=1e-9, max_iter=1000) on folds from np.random.seed(42) and
  np.array_split(np.random.permutation(n), 10).

The solver is scikit-learn's own optimiser, scipy's L-BFGS-B from zero weights with the options scikit-learn passes
it, on the same objective (mean cross-entropy, binomial for two classes, plus the penalty), so the iterates are
scikit-learn's up to rounding. What differs is the arithmetic: torch computes the objective and its gradient with
float32 products (on the run's device) and float64 sums, and the folds run in parallel threads (the paper used
n_jobs=-1). On separable labelings the unpenalised fit never converges and every fold runs all its iterations, so
the products are the whole cost.

Rules shared by both: always a number in [0, 1], never NaN. A constant labeling (or fewer than 2 points) scores
0.0; with fewer points than folds each point is its own fold; a fold whose training part holds a single class (a
class too small for the folds) is scored as predicting that class for its held-out points.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import optimize

FTOL = 64 * np.finfo(float).eps  # scikit-learn's ftol for lbfgs


def cv_score(features, y_pred, device="cpu", folds=10, seed=1):
    """HUME's score (the paper's definition above) of labels y_pred (n,) from features (n x d)."""
    from sklearn.model_selection import KFold
    n = len(y_pred)
    splits = lambda: KFold(n_splits=min(folds, n), shuffle=True, random_state=seed).split(np.zeros((n, 1)))
    return fold_accuracy(features, y_pred, splits, device, l2=0.0, max_iter=100, tol=1e-4)


def turtle_cv_score(features, y_pred, device="cpu", folds=10, seed=42):
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
    return fold_accuracy(features, y_pred, splits, device, l2=1.0, max_iter=1000, tol=1e-9)


def fold_accuracy(features, y_pred, splits, device, l2, max_iter, tol):
    """Mean held-out accuracy over the folds of splits(), a fit per fold; l2 = 1/C (0: no penalty)."""
    y_pred = np.asarray(y_pred)
    if len(y_pred) < 2 or len(np.unique(y_pred)) < 2:
        return 0.0  # a constant labeling carries no information: score it as worst
    X = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=device)
    jobs = list(splits())

    def one_fold(fold):
        tr, te = fold
        classes, y_tr = np.unique(y_pred[tr], return_inverse=True)
        if len(classes) < 2:
            return float(np.mean(y_pred[te] == classes[0]))
        W = fit(X[torch.as_tensor(tr, device=X.device)], y_tr, l2 / len(tr), max_iter, tol)
        pred = classes[predict(X[torch.as_tensor(te, device=X.device)], W)]
        return float(np.mean(pred == y_pred[te]))

    def one_thread_fold(fold):
        torch.set_num_threads(1)
        return one_fold(fold)

    if X.device.type != "cpu":
        return float(np.mean([one_fold(fold) for fold in jobs]))
    # On a CPU the folds run side by side, one core each (the products release the GIL): a fold's products are
    # too thin to share cores well, and idle cores spinning in torch's thread pool cost more than the work itself
    # (a demo fold: 0.7 s of CPU with one thread, 6.9 s with two, on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(len(jobs), threads, os.cpu_count() or 1)) as pool:
            return float(np.mean(list(pool.map(one_thread_fold, jobs))))
    finally:
        torch.set_num_threads(threads)


def fit(X, y, l2, max_iter, tol):
    """Weights (d + 1, c) of the logistic regression of y (0..k-1, k >= 2) on X (n x d, float32), bias last:
    scipy's L-BFGS-B from zero with scikit-learn's options on mean CE + l2/2 ||W||^2 (bias not penalised).
    Two classes: one logit column against a fixed zero one, which is scikit-learn's binomial loss."""
    n, d = X.shape
    k = int(y.max()) + 1
    c = 1 if k == 2 else k
    y = torch.as_tensor(y, device=X.device)
    onehot = torch.nn.functional.one_hot(y, k).double()

    def objective(w):
        W = torch.from_numpy(w.reshape(d + 1, c)).to(X.device)
        z = logits(X, W)  # (n, k) float64
        loss = (torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]).mean() + l2 / 2 * (W[:d] ** 2).sum()
        r = (torch.softmax(z, 1) - onehot) / n  # d loss / d z
        r = r[:, 1:] if c == 1 else r
        grad_W = (r.float().T @ X).T.double() + l2 * W[:d]  # r^T X: the fast layout for a thin r
        return float(loss), torch.cat([grad_W, r.sum(0, keepdim=True)]).cpu().numpy().ravel()

    res = optimize.minimize(objective, np.zeros((d + 1) * c), method="L-BFGS-B", jac=True,
                            options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": FTOL})
    return torch.from_numpy(res.x.reshape(d + 1, c)).to(X.device)


def logits(X, W):
    """(n, k) float64 logits of X (n x d) under W (d + 1, c), a zero column first when c == 1 (two classes)."""
    z = (X @ W[:-1].float()).double() + W[-1]
    return torch.cat([torch.zeros_like(z), z], 1) if W.shape[1] == 1 else z


def predict(X, W):
    """Class indices of the rows of X: the first largest logit, as scikit-learn's predict (binary: logit > 0)."""
    return logits(X, W).argmax(1).cpu().numpy()
