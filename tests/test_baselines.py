"""baselines.py: Sinkhorn-Knopp's equipartition, SeLa self-labelling on blobs, and k-means / the linear probe
against direct scikit-learn calls on the same data (metrics recomputed here independently).

The methods run in-process with one thread (torch and BLAS): on a small shared machine, tiny problems run many
times faster single-threaded. main(argv) checks the script's error convention (exit 2, one stderr line).
"""
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from threadpoolctl import threadpool_limits

import baselines
from helpers import blobs, describe, hungarian_acc, run_chain_in_process, write_problem
from humelib.runtime import HumeError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def P(tmp_path_factory):
    return write_problem(str(tmp_path_factory.mktemp("baselines")), n=240, k=4, n_val=60)


def expected_metrics(y_true, y_pred):
    return {"acc": hungarian_acc(y_true, y_pred), "ari": adjusted_rand_score(y_true, y_pred),
            "nmi": normalized_mutual_info_score(y_true, y_pred)}


def assert_metrics_equal(got, y_true, y_pred):
    want = expected_metrics(y_true, y_pred)
    for m in want:
        assert got[m] == pytest.approx(want[m], abs=1e-12), m


# ---------------------------------------------------------------- Sinkhorn-Knopp and SeLa

@pytest.mark.parametrize("lam", [1.0, 25.0])
def test_sinkhorn_knopp_equipartitions_and_keeps_the_form_diag_u_P_lambda_diag_v(lam):
    n, k = 200, 5
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, 1)
    Q = baselines.sinkhorn_knopp(log_p, lam, tol=1e-10, max_iters=100_000)
    assert torch.allclose(Q.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    cols = Q.sum(0)
    assert (cols - n / k).abs().max() / (n / k) < 1e-6, cols
    M = torch.log(Q) - lam * log_p  # must be u_i + v_j: every 2x2 "interaction" vanishes
    assert (M - M[:, :1] - M[:1, :] + M[0, 0]).abs().max() < 1e-8


def test_sinkhorn_self_labelling_recovers_well_separated_blobs():
    for seed, k in ((0, 4), (1, 6)):
        _, phi2, y = blobs(n=300, k=k, seed=seed)
        pred = baselines.sinkhorn(phi2, phi2, k, seed=seed, quiet=True)
        assert hungarian_acc(y, pred) >= 0.99, (seed, k)


def test_sinkhorn_inductive_predicts_the_held_out_blobs(P):
    out = baselines.main(["--method", "sinkhorn", "--phi_path", P["phi2"], "--phi_path_val", P["phi2_val"],
                          "--gt_labels_path", P["labels_val"], "--k", "4", "--quiet"])
    assert out["setting"] == "inductive" and out["metrics"]["acc"] >= 0.99


# ---------------------------------------------------------------- k-means and the probe vs scikit-learn

@pytest.mark.parametrize("inductive", [False, True])
def test_kmeans_equals_a_direct_scikit_learn_call(P, inductive, tmp_path):
    A = P["arrays"]
    flags = ["--method", "kmeans", "--phi_path", P["phi1"], "--k", "4", "--seed", "3", "--quiet"]
    if inductive:
        flags += ["--phi_path_val", P["phi1_val"], "--gt_labels_path", P["labels_val"]]
        X_val, y_val = A["phi1_val"], A["labels_val"]
    else:
        flags += ["--gt_labels_path", P["labels"]]
        X_val, y_val = A["phi1"], A["labels"]
    out = baselines.main(flags + ["--json", str(tmp_path / "km.json")])
    direct = KMeans(n_clusters=4, n_init=10, random_state=3).fit(A["phi1"]).predict(X_val)
    assert_metrics_equal(out["metrics"], y_val, direct)
    assert (tmp_path / "km.json").exists()


def test_probe_equals_a_direct_scikit_learn_call(P):
    A = P["arrays"]
    out = baselines.main(["--method", "probe", "--phi_path", P["phi2"], "--phi_path_val", P["phi2_val"],
                          "--gt_labels_path_train", P["labels"], "--gt_labels_path", P["labels_val"], "--quiet"])
    direct = LogisticRegression(max_iter=1000).fit(A["phi2"], A["labels"]).predict(A["phi2_val"])
    assert_metrics_equal(out["metrics"], A["labels_val"], direct)
    assert out["accuracy"] == pytest.approx(np.mean(direct == A["labels_val"]))


def test_transductive_probe_trains_on_the_evaluation_labels(P):
    A = P["arrays"]
    out = baselines.main(["--method", "probe", "--phi_path", P["phi1"], "--gt_labels_path", P["labels"], "--quiet"])
    direct = LogisticRegression(max_iter=1000).fit(A["phi1"], A["labels"]).predict(A["phi1"])
    assert_metrics_equal(out["metrics"], A["labels"], direct)


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_a_hume_error(P, tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((60, 99), np.float32))
    cases = {
        "probe without train labels": ["--method", "probe", "--phi_path", P["phi2"], "--phi_path_val", P["phi2_val"],
                                       "--gt_labels_path", P["labels_val"]],
        "no evaluation labels": ["--phi_path", P["phi2"]],
        "val of another dimension": ["--phi_path", P["phi2"], "--phi_path_val", str(tmp_path / "wide.npy"),
                                     "--gt_labels_path", P["labels_val"]],
        "labels of the wrong length": ["--phi_path", P["phi2"], "--gt_labels_path", P["labels_val"]],
        "k larger than n": ["--phi_path", P["phi2_val"], "--gt_labels_path", P["labels_val"], "--k", "61"],
    }
    for name, flags in cases.items():
        with pytest.raises(HumeError):
            baselines.main(flags + ["--quiet"])
        assert not list(tmp_path.glob("*.json")), name


def test_the_script_exits_2_with_one_line_on_a_bad_input(P):
    (proc,) = run_chain_in_process([("baselines.py", ["--method", "probe", "--phi_path", P["phi2"], "--phi_path_val",
                                                      P["phi2_val"], "--gt_labels_path", P["labels_val"]])])
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--gt_labels_path_train" in lines[0], describe(proc)
