"""annotate.py: the budget is spent exactly and reaches every cluster, the greedy picks are checked step by step
against a brute-force k-means cost, --apply with the true labels of the picks gives the Hungarian ACC, and bad
label files are refused with one clear line (exit 2).

Tasks are built by hand in the paper's format (helpers.write_paper_task): phi1 rows are near one-hot in the class,
W is a row permutation of the identity, so the clusters are known exactly; --noisy moves 5% of the points into the
next class's cluster, so the clusters are imperfect and the Hungarian ACC is 0.95.
"""
import collections
import csv

import numpy as np
import pytest

import annotate
from humelib import selection
from helpers import describe, hungarian_acc, run_chain_in_process, save_npy, write_paper_task
from humelib.runtime import HumeError

K, N = 4, 200


def make_problem(folder, moved=0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(N) % K)
    in_cluster = y.copy()
    in_cluster[rng.choice(N, moved, replace=False)] += 1
    in_cluster %= K
    phi1 = np.eye(8)[in_cluster] + 0.05 * rng.normal(size=(N, 8))
    phi1 /= np.linalg.norm(phi1, axis=1, keepdims=True)
    phi2 = rng.normal(size=(K, 12))[y] * 3 + 0.6 * rng.normal(size=(N, 12))
    for s in range(3):  # three tasks: the same clusters under different cluster numbers
        write_paper_task(folder, s, np.eye(8)[rng.permutation(K)], cv_score=0.9 + 0.01 * s)
    return {"tasks": folder, "phi1": save_npy(folder, "phi1", phi1.astype(np.float32)),
            "phi2": save_npy(folder, "phi2", phi2.astype(np.float32)), "labels": save_npy(folder, "y", y),
            "y": y, "in_cluster": in_cluster}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_problem(str(tmp_path_factory.mktemp("clean")))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return make_problem(str(tmp_path_factory.mktemp("noisy")), moved=N // 20)


def flags(P, *more):
    return ["--tasks_path", P["tasks"], "--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--quiet", *more]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    return str(path)


# ---------------------------------------------------------------- picking

def test_allocation_spends_the_budget_exactly_and_gives_every_cluster_one_when_it_can():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 40, size=rng.integers(1, 9))
        budget = int(rng.integers(1, sizes.sum() + 1))
        counts = selection.allocate(sizes, budget)
        assert counts.sum() == budget and np.all(counts <= sizes)
        if budget >= len(sizes):
            assert counts.min() >= 1
        else:
            assert set(np.flatnonzero(counts)) == set(np.argsort(-sizes, kind="stable")[:budget])


def test_greedy_picks_start_at_the_centre_and_each_minimises_the_brute_force_kmeans_cost():
    z = np.random.default_rng(1).normal(size=(25, 3))
    picks = selection.pick_in_cluster(z, 5)
    assert picks[0] == np.argmin(((z - z.mean(0)) ** 2).sum(1))
    for r in range(1, 5):
        def cost(j):
            return sum(min(((z[i] - z[p]) ** 2).sum() for p in picks[:r] + [j]) for i in range(len(z)))
        best = min((j for j in range(len(z)) if j not in picks[:r]), key=cost)
        assert cost(picks[r]) == pytest.approx(cost(best))
    assert len(set(picks)) == 5


@pytest.mark.parametrize("budget", [2, K, 7, 13])
def test_picks_exactly_the_budget_with_one_per_cluster_when_the_budget_allows(clean, budget, tmp_path):
    out = str(tmp_path / "picks.csv")
    annotate.main(flags(clean, "--budget", str(budget), "--out", out))
    rows = read_csv(out)
    assert list(rows[0].keys()) == ["index", "cluster", "rank", "label"]
    index = [int(r["index"]) for r in rows]
    assert len(rows) == budget == len(set(index))
    clusters = collections.Counter(r["cluster"] for r in rows)
    assert len(clusters) == min(budget, K)
    same_cluster = {(clean["in_cluster"][i], r["cluster"]) for i, r in zip(index, rows)}
    assert len(same_cluster) == len(clusters)  # the cluster column names the points' true clusters one-to-one
    assert all(r["label"] == "" for r in rows)


# ---------------------------------------------------------------- naming

@pytest.mark.parametrize("data", ["clean", "noisy"])
def test_apply_with_the_true_labels_of_the_picks_reproduces_the_hungarian_acc(data, request, tmp_path):
    P = request.getfixturevalue(data)
    picks, named = str(tmp_path / "picks.csv"), str(tmp_path / "named.npy")
    annotate.main(flags(P, "--budget", str(K), "--out", picks))
    rows = [[r["index"], r["cluster"], r["rank"], P["y"][int(r["index"])]] for r in read_csv(picks)]
    annotate.main(flags(P, "--apply", write_csv(picks, ["index", "cluster", "rank", "label"], rows), "--out", named))
    labeling = np.load(named)
    assert labeling.dtype == np.int64 and labeling.shape == (N,)
    assert np.mean(labeling == P["y"]) == pytest.approx(hungarian_acc(P["y"], P["in_cluster"]))
    assert hungarian_acc(P["y"], P["in_cluster"]) == (1.0 if data == "clean" else 0.95)


def test_apply_names_clusters_by_majority_with_text_labels_and_fills_unlabelled_clusters(clean, tmp_path):
    y, in_cluster = clean["y"], clean["in_cluster"]
    names = np.array(["cat", "dog", "owl", "eel"])
    first = [np.flatnonzero(in_cluster == c)[:3] for c in range(K)]
    rows = [[i, names[y[i]]] for c in range(K - 1) for i in first[c]]  # cluster K-1 gets no label
    rows[1][1] = "wrong"  # outvoted two to one
    named = str(tmp_path / "named.npy")
    annotate.main(flags(clean, "--apply", write_csv(tmp_path / "l.csv", ["index", "label"], rows), "--out", named))
    labeling = np.load(named)
    labelled = in_cluster < K - 1
    assert np.all(labeling[labelled] == names[y[labelled]])
    assert set(labeling[~labelled]) <= set(names[:K - 1])  # named like one of the named clusters


def test_simulate_reports_plain_acc_of_the_named_labeling(noisy, tmp_path):
    out = annotate.main(flags(noisy, "--simulate", "--gt_labels_path", noisy["labels"], "--per_cluster", "1", "3",
                              "--json", str(tmp_path / "sim.json")))
    assert [r["budget"] for r in out["table"]] == [K, 3 * K]
    assert out["table"][0]["acc"] == pytest.approx(0.95)  # each cluster's centre point names it correctly
    assert out["all_labelled_acc"] == pytest.approx(0.95) and out["hungarian_acc"] == pytest.approx(0.95)
    assert (tmp_path / "sim.json").exists()


# ---------------------------------------------------------------- bad label files

BAD_CSVS = {
    "unknown index": (["index", "label"], [[0, 1], [N, 2]]),
    "negative index": (["index", "label"], [[-1, 1]]),
    "index not a number": (["index", "label"], [["seven", 1]]),
    "index a superscript digit": (["index", "label"], [["\u00b2", 1]]),  # '²'.isdigit() is true, int('²') fails
    "index in Arabic-Indic digits": (["index", "label"], [["\u0661", 1]]),
    "missing label column": (["index", "cluster"], [[0, 1]]),
    "missing index column": (["idx", "label"], [[0, 1]]),
    "two labels for one point": (["index", "label"], [[3, 1], [3, 2]]),
    "no label given": (["index", "label"], [[3, ""]]),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_label_files_raise_a_hume_error_and_write_nothing(clean, case, tmp_path):
    header, rows = BAD_CSVS[case]
    with pytest.raises(HumeError):
        annotate.main(flags(clean, "--apply", write_csv(tmp_path / "l.csv", header, rows),
                            "--out", str(tmp_path / "named.npy")))
    assert not (tmp_path / "named.npy").exists()


def test_a_cluster_column_that_disagrees_with_the_tasks_is_refused(clean, tmp_path):
    i = 0
    wrong = (int(annotate.ensemble_clusters(np.load(clean["phi1"]), clean["tasks"])[i]) + 1) % K
    with pytest.raises(HumeError, match="cluster"):
        annotate.main(flags(clean, "--apply", write_csv(tmp_path / "l.csv", ["index", "cluster", "label"],
                                                        [[i, wrong, 1]])))


def test_the_script_exits_2_with_one_line_on_a_csv_without_a_label_column(clean, tmp_path):
    path = write_csv(tmp_path / "l.csv", ["index", "cluster"], [[0, 1]])
    (proc,) = run_chain_in_process([("annotate.py", flags(clean, "--apply", path, "--out", str(tmp_path / "o.npy")))])
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "label" in lines[0], describe(proc)
    assert not (tmp_path / "o.npy").exists()
