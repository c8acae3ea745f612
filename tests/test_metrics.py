"""metrics.py against independent references: brute force over all matchings, pair counting, direct entropy sums,
collections.Counter. Never against our own output."""
import collections
import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from humelib import metrics


# ---------------------------------------------------------------- independent references

def brute_force_acc(y_true, y_pred):
    """Best one-to-one matching between the cluster ids and the class ids present, by trying every
    injective map from the smaller set into the larger; unmatched points count as wrong."""
    classes = sorted(set(y_true.tolist()))
    clusters = sorted(set(y_pred.tolist()))
    pairs = collections.Counter(zip(y_pred.tolist(), y_true.tolist()))
    best = 0
    if len(clusters) <= len(classes):
        for image in itertools.permutations(classes, len(clusters)):
            best = max(best, sum(pairs[(c, t)] for c, t in zip(clusters, image)))
    else:
        for image in itertools.permutations(clusters, len(classes)):
            best = max(best, sum(pairs[(c, t)] for c, t in zip(image, classes)))
    return best / len(y_true)


def pair_counting_ari(a, b):
    """Adjusted Rand index from its definition, counting agreeing pairs of points one by one."""
    n = len(a)
    same_a = same_b = same_both = 0
    for i in range(n):
        for j in range(i + 1, n):
            sa, sb = a[i] == a[j], b[i] == b[j]
            same_a += sa
            same_b += sb
            same_both += sa and sb
    total = n * (n - 1) / 2
    expected = same_a * same_b / total
    max_index = (same_a + same_b) / 2
    if max_index == expected:
        return 1.0
    return (same_both - expected) / (max_index - expected)


def direct_nmi(a, b):
    """Mutual information over the arithmetic mean of the two entropies, summed point-pair-free from
    frequencies (sklearn's default average_method='arithmetic')."""
    n = len(a)
    pa, pb = collections.Counter(a.tolist()), collections.Counter(b.tolist())
    pab = collections.Counter(zip(a.tolist(), b.tolist()))
    mi = sum(c / n * math.log((c / n) / (pa[x] / n * pb[y] / n)) for (x, y), c in pab.items())
    ha = -sum(c / n * math.log(c / n) for c in pa.values())
    hb = -sum(c / n * math.log(c / n) for c in pb.values())
    if ha == 0 and hb == 0:
        return 1.0
    return mi / ((ha + hb) / 2)


def random_labels(rng, n, ids):
    return np.asarray(ids)[rng.integers(0, len(ids), n)]


def random_pairs(seed, count, n, classes, clusters):
    """count pairs of random labelings of n points (one over the class ids, one over the cluster ids), drawn in
    turn from one generator seeded with seed."""
    rng = np.random.default_rng(seed)
    return [(random_labels(rng, n, classes), random_labels(rng, n, clusters)) for _ in range(count)]


CASES = [  # (n, class ids, cluster ids)
    (30, [0, 1, 2], [0, 1, 2]),                  # equal numbers
    (40, [0, 1, 2, 3], [0, 1, 2, 3]),
    (25, [0, 1, 2], [0, 1, 2, 3, 4]),            # more clusters than classes
    (35, [0, 1], [0, 1, 2, 3, 4, 5]),
    (30, [0, 1, 2, 3, 4], [0, 1]),               # fewer clusters than classes
    (30, [0, 1, 2, 3, 4, 5], [0, 1, 2]),
    (30, [-7, 3, 100], [-1, 42, 9, -100]),       # non-contiguous and negative ids
    (20, [5, -5], [-3, 0, 1000]),
]


# ---------------------------------------------------------------- contingency, ACC, ARI, NMI

@pytest.mark.parametrize("n,classes,clusters", CASES)
def test_contingency_counts_each_pair_like_a_loop_over_points(n, classes, clusters):
    [(y_true, y_pred)] = random_pairs(n + len(classes), 1, n, classes, clusters)
    C, pred_ids, true_ids = metrics.contingency(y_pred, y_true)
    assert pred_ids.tolist() == sorted(set(y_pred.tolist()))
    assert true_ids.tolist() == sorted(set(y_true.tolist()))
    pairs = collections.Counter(zip(y_pred.tolist(), y_true.tolist()))
    for i, p in enumerate(pred_ids):
        for j, t in enumerate(true_ids):
            assert C[i, j] == pairs[(p, t)]


@pytest.mark.parametrize("n,classes,clusters", CASES)
def test_cluster_acc_equals_brute_force_over_all_matchings(n, classes, clusters):
    for y_true, y_pred in random_pairs(len(clusters) * 100 + n, 20, n, classes, clusters):
        assert metrics.cluster_acc(y_true, y_pred) == pytest.approx(brute_force_acc(y_true, y_pred), abs=1e-12)


def test_cluster_acc_counts_extra_clusters_as_wrong_and_is_one_for_a_relabeling():
    y_true = np.array([0, 0, 0, 1, 1, 1])
    # splitting class 0 into two clusters: only one of them can be matched
    assert metrics.cluster_acc(y_true, np.array([0, 0, 2, 1, 1, 1])) == pytest.approx(5 / 6)
    # every point its own cluster: one point per class matched
    assert metrics.cluster_acc(y_true, np.arange(6)) == pytest.approx(2 / 6)
    # a pure relabeling with odd ids
    assert metrics.cluster_acc(y_true, np.array([-4, -4, -4, 9, 9, 9])) == 1.0


@pytest.mark.parametrize("n,classes,clusters", CASES)
def test_all_metrics_ari_and_nmi_equal_sklearn_and_their_definitions(n, classes, clusters):
    for y_true, y_pred in random_pairs(7 * n + len(clusters), 5, n, classes, clusters):
        m = metrics.all_metrics(y_true, y_pred)
        assert set(m) == {"acc", "ari", "nmi"}
        assert m["acc"] == pytest.approx(brute_force_acc(y_true, y_pred), abs=1e-12)
        assert m["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12)
        assert m["ari"] == pytest.approx(pair_counting_ari(y_true, y_pred), abs=1e-10)
        assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-12)
        assert m["nmi"] == pytest.approx(direct_nmi(y_true, y_pred), abs=1e-10)


# ---------------------------------------------------------------- align_to, majority_vote

@pytest.mark.parametrize("ids", [[0, 1, 2, 3, 4], [-3, 10, 7], [2, 5]])
def test_align_to_maps_a_permuted_copy_back_exactly(ids):
    rng = np.random.default_rng(len(ids))
    y = random_labels(rng, 60, ids)
    for _ in range(10):
        perm = dict(zip(ids, rng.permutation(ids).tolist()))
        permuted = np.array([perm[v] for v in y.tolist()])
        np.testing.assert_array_equal(metrics.align_to(permuted, y), y)
        # also when the copy uses entirely different ids
        renamed = np.array([1000 + 3 * perm[v] for v in y.tolist()])
        np.testing.assert_array_equal(metrics.align_to(renamed, y), y)


@pytest.mark.parametrize("n,classes,clusters", CASES)
def test_align_to_is_a_bijective_relabeling_with_the_best_agreement(n, classes, clusters):
    for y_ref, y_pred in random_pairs(3 * n + len(classes), 10, n, classes, clusters):
        aligned = metrics.align_to(y_pred, y_ref)
        # a relabeling: same partition, one new label per old cluster
        pairs = set(zip(y_pred.tolist(), aligned.tolist()))
        assert len(pairs) == len(set(y_pred.tolist())) == len(set(aligned.tolist()))
        # its raw agreement with y_ref is the best one-to-one matching
        assert np.mean(aligned == y_ref) == pytest.approx(brute_force_acc(y_ref, y_pred), abs=1e-12)
        # clusters without a partner get labels y_ref does not use
        matched = min(len(set(y_pred.tolist())), len(set(y_ref.tolist())))
        used = set(aligned.tolist())
        assert len(used & set(y_ref.tolist())) == matched


def test_majority_vote_equals_counter_mode_with_ties_to_the_smallest_label():
    rng = np.random.default_rng(0)
    for n_tasks, ids in [(1, [0, 1]), (2, [0, 1, 2]), (3, [-2, 0, 5]), (4, [0, 1, 2, 3]), (5, [9, -9]),
                         (6, [1, 2, 3])]:
        labelings = random_labels(rng, n_tasks * 50, ids).reshape(n_tasks, 50)
        expected = []
        for column in labelings.T:
            counts = collections.Counter(column.tolist())
            top = max(counts.values())
            expected.append(min(v for v, c in counts.items() if c == top))
        np.testing.assert_array_equal(metrics.majority_vote(labelings), expected)
    # an explicit tie: 3 vs 3 -> the smaller label, also for negatives
    np.testing.assert_array_equal(metrics.majority_vote([[4], [-1], [4], [-1]]), [-1])


def test_aligned_majority_vote_of_noisy_permuted_copies_recovers_the_labeling():
    rng = np.random.default_rng(123)
    k, n = 5, 600
    y = rng.integers(0, k, n)
    copies = []
    for _ in range(9):
        perm = rng.permutation(k)
        noisy = perm[y].copy()
        flip = rng.random(n) < 0.10
        noisy[flip] = rng.integers(0, k, flip.sum())
        copies.append(noisy)
    aligned = [copies[0]] + [metrics.align_to(c, copies[0]) for c in copies[1:]]
    vote = metrics.majority_vote(np.stack(aligned))
    assert brute_force_acc(y, vote) >= 0.995
    assert brute_force_acc(y, copies[0]) < 0.95  # each copy alone is clearly worse
