"""cvscore.py against independent references written here: scikit-learn's LogisticRegression with the paper's
settings over KFold (HUME's definition), and with TURTLE's penalty over TURTLE's folds (its definition, the folds
drawn as its cross_val.py draws them). Never against our own output."""
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from threadpoolctl import threadpool_limits

from humelib import cvscore
from humelib.arrays import DEMO


def sklearn_cv(X, y, folds, C, max_iter, tol):
    """Mean held-out accuracy of LogisticRegression(C, max_iter, tol) over folds [(train, test)]; a training part
    with one class predicts it. One BLAS thread (the same fits up to rounding): on a busy 2-core machine two threads
    make these small ones many times slower."""
    accs = []
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        for tr, te in folds:
            if len(np.unique(y[tr])) < 2:
                accs.append(np.mean(y[te] == y[tr][0]))
                continue
            clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol).fit(X[tr], y[tr])
            accs.append(np.mean(clf.predict(X[te]) == y[te]))
    return float(np.mean(accs))


def paper_cv(X, y):
    """The paper's score: LogisticRegression(penalty=None) with scikit-learn's defaults, KFold(10, shuffle, 1)."""
    folds = KFold(n_splits=min(10, len(y)), shuffle=True, random_state=1).split(X)
    return sklearn_cv(X, y, folds, C=np.inf, max_iter=100, tol=1e-4)


def turtle_cv(X, y):
    """TURTLE's cross_val.py: np.random.seed(42), 10 parts of a permutation; cuML's C=1.0 is scikit-learn's C=1.0
    (both: mean loss + ||W||^2 / (2 C n_train), intercept unpenalised), fitted to convergence."""
    np.random.seed(42)
    parts = np.array_split(np.random.permutation(len(y)), 10)
    folds = [(np.concatenate(parts[:i] + parts[i + 1:]), parts[i]) for i in range(10)]
    return sklearn_cv(X, y, folds, C=1.0, max_iter=10000, tol=1e-10)


def blobs(rng, n, k, dim, sep):
    centers = rng.normal(size=(k, dim)) * sep
    y = rng.integers(0, k, n)
    return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def linear_labels(rng, X, k):
    """A labeling separable in X: argmax of a random linear map (a task encoder's labeling seen in its space)."""
    return (X @ rng.normal(size=(X.shape[1], k))).argmax(1)


def case(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "overlapping_k3":
        return blobs(rng, 300, 3, 5, sep=1.0)
    if name == "binary_overlapping":
        return blobs(rng, 400, 2, 8, sep=0.7)
    if name == "separable_k5":
        X = rng.normal(size=(500, 20)).astype(np.float32)
        return X, linear_labels(rng, X, 5)
    if name == "separable_binary":
        X = rng.normal(size=(300, 10)).astype(np.float32)
        return X, linear_labels(rng, X, 2)
    if name == "many_classes_k20":
        X, _ = blobs(rng, 1000, 20, 40, sep=0.5)
        return X, linear_labels(rng, X[:, :10], 20)  # separable in 10 of the 40 dims, noise in the rest
    if name == "labels_any_integers":
        X, y = blobs(rng, 200, 4, 6, sep=1.5)
        return X, np.array([-7, 3, 100, 42])[y]
    if name == "demo_phi2_kmeans":
        from sklearn.cluster import KMeans
        X = np.load(DEMO["phi2_test"])
        return X, KMeans(10, n_init=1, random_state=0).fit_predict(np.load(DEMO["phi1_test"]))
    if name == "tiny_n5":
        return rng.normal(size=(5, 3)).astype(np.float32), np.array([0, 1, 0, 1, 1])
    if name == "rare_class":  # a class of one point: 9 training parts hold it, one does not
        X, y = blobs(rng, 60, 2, 3, sep=2.0)
        y[0] = 2
        return X, y
    raise KeyError(name)


CASES = ["overlapping_k3", "binary_overlapping", "separable_k5", "separable_binary", "many_classes_k20",
         "labels_any_integers", "demo_phi2_kmeans", "tiny_n5", "rare_class"]


@pytest.mark.parametrize("name", CASES)
def test_cv_score_is_the_papers_sklearn_score_within_0_01(name):
    X, y = case(name)
    assert cvscore.cv_score(X, y) == pytest.approx(paper_cv(X, y), abs=0.01)


@pytest.mark.parametrize("name", ["overlapping_k3", "binary_overlapping", "separable_k5", "labels_any_integers"])
def test_turtle_cv_score_is_turtles_definition_in_sklearn_within_0_01(name):
    X, y = case(name)
    assert cvscore.turtle_cv_score(X, y) == pytest.approx(turtle_cv(X, y), abs=0.01)


def test_turtle_penalty_changes_the_score_where_it_matters():
    """On a separable labeling of few points in many dims the unpenalised and penalised fits differ: the two
    definitions are really two (so the test above is not passing by accident)."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(60, 40)).astype(np.float32) * 0.05
    y = linear_labels(rng, X, 3)
    assert abs(turtle_cv(X, y) - paper_cv(X, y)) > 0.05
    assert cvscore.turtle_cv_score(X, y) == pytest.approx(turtle_cv(X, y), abs=0.01)


# ---------------------------------------------------------------- the rules kept from the first scorer

def test_cv_score_is_one_for_labels_linear_in_well_separated_features():
    rng = np.random.default_rng(0)
    X, y = blobs(rng, 200, 3, 4, sep=20.0)
    assert cvscore.cv_score(X, y) >= 0.99
    X = rng.normal(size=(200, 3))
    X = X[np.abs(X @ [1.0, -2.0, 0.5]) > 0.5]  # a linear threshold with a margin
    y = (X @ [1.0, -2.0, 0.5] > 0).astype(int)
    assert cvscore.cv_score(X, y) >= 0.99


def test_cv_score_is_near_chance_for_random_labels():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 4))
    y = rng.integers(0, 4, 200)
    assert 0.10 <= cvscore.cv_score(X, y) <= 0.40  # chance is 0.25


@pytest.mark.parametrize("score", [cvscore.cv_score, cvscore.turtle_cv_score])
def test_a_constant_labeling_or_a_single_point_scores_zero(score):
    X = np.random.default_rng(3).normal(size=(30, 2))
    assert score(X, np.full(30, 4)) == 0.0
    assert score(X[:1], np.array([1])) == 0.0


@pytest.mark.parametrize("score", [cvscore.cv_score, cvscore.turtle_cv_score])
def test_fewer_points_than_folds_makes_each_point_a_fold_and_never_nan(score):
    X = np.array([[0.0], [0.1], [5.0], [5.1]])
    y = np.array([0, 0, 1, 1])
    got = score(X, y)
    assert np.isfinite(got) and 0.0 <= got <= 1.0
    # leave-one-out by hand: the held-out point's class has one training point left, on its side of the gap
    assert got == 1.0


@pytest.mark.parametrize("score", [cvscore.cv_score, cvscore.turtle_cv_score])
def test_a_training_part_with_one_class_predicts_that_class(score):
    X = np.array([[0.0], [0.5], [3.0]])
    y = np.array([0, 0, 1])
    # three folds of one point: leaving out x=0 or x=0.5, the other two points put the boundary between 0.5 and
    # 3, right; leaving out the only 1, the training part holds only 0s and predicts 0, wrong
    assert score(X, y) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- run_turtle.py --cross_val

@pytest.mark.parametrize("cross_val", [True, False])
def test_run_turtle_cross_val_is_turtles_score_on_the_training_points(tmp_path, cross_val):
    """With --cross_val: TURTLE's definition on the training points, mean over the spaces; without: the paper's on
    the evaluation points. Predictions rebuilt from the saved heads with plain torch (mean of the softmaxes)."""
    import torch
    import run_turtle
    from helpers import blobs as blob_problem, save_npy
    phi1, phi2, _ = blob_problem(n=160, k=3, d1=8, d2=6, seed=4)
    folder, out = str(tmp_path / "data"), str(tmp_path / "run")
    p = {name: save_npy(folder, name, a) for name, a in
         [("phi1", phi1[:120]), ("phi2", phi2[:120]), ("phi1_val", phi1[120:]), ("phi2_val", phi2[120:])]}
    res = run_turtle.main(["--phi_paths", p["phi1"], p["phi2"], "--phi_paths_val", p["phi1_val"], p["phi2_val"],
                           "--k", "3", "--T", "30", "--M", "2", "--eval_every", "10", "--outer_lr", "0.01",
                           "--device", "cpu", "--quiet", "--exp_path", out, "--seed", "0"] +
                          (["--cross_val"] if cross_val else []))
    state = torch.load(f"{out}/turtle_task_0.pt", weights_only=True)
    spaces = [phi1[:120], phi2[:120]] if cross_val else [phi1[120:], phi2[120:]]
    probs = []
    for key, z in zip(("phi1", "phi2"), spaces):
        head = torch.nn.Linear(z.shape[1], 3)
        head.load_state_dict(state[key])
        probs.append(torch.softmax(head(torch.from_numpy(z)), 1))
    preds = (sum(probs) / 2).argmax(1).numpy()
    reference = turtle_cv if cross_val else paper_cv
    assert len(np.unique(preds)) >= 2  # a labeling worth scoring
    assert res["CV_Score"] == pytest.approx(np.mean([reference(z, preds) for z in spaces]), abs=0.01)
    assert res["cv_seconds"] >= 0
