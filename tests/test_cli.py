"""hume.py and evaluate.py through their command lines, on tiny synthetic problems written as .npy files (bad
inputs: tests/test_cli_bad_inputs.py).

- End to end: transductive, inductive (labels with arbitrary integer values), --save_all; the files are the
  paper's formats (plain torch / pickle load them), predictions and accuracies are recomputed here independently.
  The transductive chain and the bundled demo run as real `python script ...` processes, the others in process.
- A folder "written by the paper's hume.py", built by hand with plain torch: the ensemble and best-CV choice.
"""
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

import helpers
from helpers import (FAST, REPO, assert_clean_failure, brute_force_acc, describe, hungarian_acc, orthogonal_linear,
                     save_npy, write_paper_task, write_problem)

DEMO_FILES = [os.path.join(REPO, p) for p in (
    "data/representations/pca/digitstrain_l2.npy", "data/representations/pca/digitstest_l2.npy",
    "data/representations/ocr/digitstrain.npy", "data/representations/ocr/digitstest.npy",
    "data/labels/digitstest_targets.npy")]
DEMO_TEST_POINTS = 360



# ---------------------------------------------------------------- end-to-end runs

def _setup_trans(root):
    P = write_problem(os.path.join(root, "data"), n=240, k=4, seed=1)
    out = os.path.join(root, "out")
    steps = [("hume.py", ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--gt_labels_path", P["labels"],
                          "--k", 4, "--seed", 3, "--exp_path", out] + FAST),
             ("evaluate.py", ["--phi1_path", P["phi1"], "--gt_labels_path", P["labels"], "--tasks_path", out,
                              "--json", os.path.join(out, "eval.json"), "--quiet"])]
    return steps, {"P": P, "out": out, "seed": 3, "x": P["arrays"]["phi1"], "y": P["arrays"]["labels"]}


def _setup_ind(root):
    # the synthetic problem split in two; labels with arbitrary integer values
    P = write_problem(os.path.join(root, "data"), n=300, k=4, seed=2, n_val=100, label_values=[10, -3, 7, 100])
    out = os.path.join(root, "out")
    steps = [("hume.py", ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--phi1_path_val", P["phi1_val"],
                          "--phi2_path_val", P["phi2_val"], "--gt_labels_path", P["labels_val"], "--k", 4,
                          "--seed", 5, "--exp_path", out] + FAST),
             ("evaluate.py", ["--phi1_path", P["phi1_val"], "--gt_labels_path", P["labels_val"], "--tasks_path", out,
                              "--json", os.path.join(out, "eval.json"), "--quiet"])]
    return steps, {"P": P, "out": out, "seed": 5, "x": P["arrays"]["phi1_val"], "y": P["arrays"]["labels_val"]}


def _setup_save_all(root):
    P = write_problem(os.path.join(root, "data"), n=240, k=3, seed=4)
    out = os.path.join(root, "out")
    steps = [("hume.py", ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--gt_labels_path", P["labels"],
                          "--k", 3, "--seed", 7, "--save_all", "--exp_path", out] + FAST),
             ("evaluate.py", ["--phi1_path", P["phi1"], "--gt_labels_path", P["labels"], "--tasks_path", out,
                              "--json", os.path.join(out, "eval.json"), "--quiet"])]
    return steps, {"P": P, "out": out, "seed": 7, "x": P["arrays"]["phi1"], "y": P["arrays"]["labels"]}


PAPER_K, PAPER_SIZES, PAPER_LABELS = 4, [12, 24, 36, 48], [5, 9, 2, 7]
PAPER_SEEDS = {3: ([1, 2, 3, 0], 0.70), 11: ([3, 0, 2, 1], 0.95), 42: ([2, 3, 0, 1], 0.80)}  # perm, CV


def _setup_paper(root):
    """Tasks as the paper's hume.py writes them, for a phi1 built so that task j predicts perm_j(class) except on
    its own 10% of the points (i % 10 == j), disjoint between tasks, where it predicts a wrong cluster.
    phi1 = [onehot(class) | 3 blocks of k], task j: W_j = [P_j | B_j] / sqrt(2) (B_j selects block j), then one
    random rotation of the whole space (W_j keeps orthonormal rows)."""
    k = PAPER_K
    cls = np.repeat(np.arange(k), PAPER_SIZES)
    cls = cls[np.random.default_rng(3).permutation(len(cls))]
    n, d1 = len(cls), k + 3 * k
    X = np.zeros((n, d1))
    X[np.arange(n), cls] = 1.0
    expected_preds = {}
    Ws = {}
    rot = np.linalg.qr(np.random.default_rng(4).normal(size=(d1, d1)))[0]
    for j, (seed, (perm, cv)) in enumerate(PAPER_SEEDS.items()):
        perm = np.asarray(perm)
        pred = perm[cls].copy()
        flip = np.arange(n) % 10 == j
        wrong = (pred[flip] + 1) % k
        X[np.nonzero(flip)[0], k + j * k + wrong] = 2.0
        pred[flip] = wrong
        W = np.zeros((k, d1))
        W[perm, np.arange(k)] = 1.0
        W[np.arange(k), k + j * k + np.arange(k)] = 1.0
        Ws[seed] = (W / np.sqrt(2)) @ rot
        expected_preds[seed] = pred
    X = X / np.linalg.norm(X, axis=1, keepdims=True) @ rot
    out = os.path.join(root, "tasks")
    for seed, (perm, cv) in PAPER_SEEDS.items():
        write_paper_task(out, seed, Ws[seed], cv)
        assert np.array_equal(np.argmax(X @ Ws[seed].T, 1), expected_preds[seed])  # the construction works
    y = np.asarray(PAPER_LABELS)[cls]
    phi1, labels = save_npy(root, "phi1", X.astype(np.float32)), save_npy(root, "labels", y)
    steps = [("evaluate.py", ["--phi1_path", phi1, "--gt_labels_path", labels, "--tasks_path", out,
                              "--json", os.path.join(root, "eval.json"), "--quiet"])]
    return steps, {"out": out, "y": y, "cls": cls, "preds": expected_preds, "json": os.path.join(root, "eval.json")}


def _setup_json_new_folder(root):
    steps, c = _setup_paper(root)
    c["json"] = os.path.join(root, "new", "sub", "eval.json")
    steps[0][1][steps[0][1].index("--json") + 1] = c["json"]
    return steps, c


def _setup_demo(root):
    out = os.path.join(root, "demo_out")
    steps = [("hume.py", ["--num_iters", 2, "--num_subsets", 2, "--adaptation_steps", 3, "--exp_path", out,
                          "--quiet"]),
             ("evaluate.py", ["--tasks_path", out, "--json", os.path.join(root, "eval.json")])]
    return steps, {"out": out, "json": os.path.join(root, "eval.json")}


CHAINS = {"trans": _setup_trans, "ind": _setup_ind, "save_all": _setup_save_all, "paper": _setup_paper,
          "json_new_folder": _setup_json_new_folder, "demo": _setup_demo}
SUBPROCESS = {"trans", "demo"}  # these run as real `python script ...` processes (the README's way); the rest in process


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """chain(key) -> (results, context) of the named end-to-end chain, run once per module on first use."""
    done = {}

    def get(key):
        if key not in done:
            steps, ctx = CHAINS[key](str(tmp_path_factory.mktemp(key)))
            run = helpers.run_chain if key in SUBPROCESS else helpers.run_chain_in_process
            done[key] = (run(steps), ctx)
        return done[key]
    return get


def assert_ok(proc):
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)


# ---------------------------------------------------------------- 2. end to end

def load_task(path, d1, k):
    """The task file into a plain orthogonal(nn.Linear(d1, k, bias=False)), strictly; returns W (k x d1)."""
    module = orthogonal_linear(d1, k)
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return module.weight.detach().double()


def load_results(path):
    with open(path, "rb") as f:
        return pickle.load(f)  # a file this test's own run wrote


def check_run(chain, key):
    """The common checks of one hume.py + evaluate.py chain; returns what the tests check further."""
    procs, c = chain(key)
    for p in procs:
        assert_ok(p)
    assert len(procs) == 2
    out, seed, k, d1 = c["out"], c["seed"], c["P"]["k"], c["P"]["d1"]
    for name in (f"linear_task_{seed}.pt", f"results_{seed}.pickle", f"metrics_{seed}.jsonl"):
        assert os.path.isfile(os.path.join(out, name)), f"{name} missing from {sorted(os.listdir(out))}"
    res = load_results(os.path.join(out, f"results_{seed}.pickle"))
    assert isinstance(res, dict) and isinstance(res["CV_Score"], float) and 0 <= res["CV_Score"] <= 1

    with open(os.path.join(out, f"metrics_{seed}.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    assert lines, "empty metrics log"
    for rec in lines:
        assert isinstance(rec, dict)
        assert {"iteration", "loss", "tau", "lr", "seconds", "metrics"} <= set(rec), rec
        assert np.isfinite(rec["loss"]) and set(rec["metrics"]) >= {"acc", "ari", "nmi"}
    assert lines[-1]["iteration"] == 3

    W = load_task(os.path.join(out, f"linear_task_{seed}.pt"), d1, k)
    x, y = c["x"], c["y"]
    preds = (torch.from_numpy(x).double() @ W.T).argmax(1).numpy()
    assert np.array_equal(preds, np.asarray(res["preds"]).reshape(-1)), "stored preds != argmax(phi1 W^T)"
    acc = hungarian_acc(y, preds)
    assert acc == pytest.approx(brute_force_acc(y, preds), abs=1e-12)
    assert res["metrics"]["acc"] == pytest.approx(acc, abs=1e-9)

    with open(os.path.join(out, "eval.json")) as f:
        report = json.load(f)
    assert list(report["tasks"]) == [str(seed)]
    t = report["tasks"][str(seed)]
    assert t["acc"] == pytest.approx(acc, abs=1e-9)
    assert t["CV_Score"] == pytest.approx(res["CV_Score"], abs=1e-12)
    assert int(report["best_cv_seed"]) == seed
    assert report["ensemble"]["acc"] == pytest.approx(acc, abs=1e-9)  # one task: the ensemble is that task
    assert sum(report["ensemble_cluster_sizes"]) == len(y)
    return res, report, W


def test_transductive_end_to_end(chain):
    res, report, W = check_run(chain, "trans")
    assert len(res["preds"]) == 240


def test_inductive_end_to_end(chain):
    res, report, W = check_run(chain, "ind")
    assert len(res["preds"]) == 100  # predictions on the evaluation split only


def test_save_all(chain):
    res, report, W = check_run(chain, "save_all")
    procs, c = chain("save_all")
    names = os.listdir(c["out"])
    iters = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"linear_task_(\d+)_7\.pt", n)))
    assert len(iters) == 3 and iters in ([0, 1, 2], [1, 2, 3]), sorted(names)
    for i in iters:  # every snapshot is a task file in the paper's format
        load_task(os.path.join(c["out"], f"linear_task_{i}_7.pt"), c["P"]["d1"], c["P"]["k"])
    last = load_task(os.path.join(c["out"], f"linear_task_{iters[-1]}_7.pt"), c["P"]["d1"], c["P"]["k"])
    assert torch.allclose(last, W, atol=1e-6), "the last snapshot is not the final task"
    assert list(report["tasks"]) == ["7"], "evaluate.py counted the per-iteration snapshots as tasks"


def test_task_encoder_orthonormal(chain):
    for key in ("trans", "ind", "save_all"):
        procs, c = chain(key)
        assert_ok(procs[0])
        W = load_task(os.path.join(c["out"], f"linear_task_{c['seed']}.pt"), c["P"]["d1"], c["P"]["k"])
        assert torch.allclose(W @ W.T, torch.eye(c["P"]["k"], dtype=W.dtype), atol=1e-5, rtol=0), key


def test_no_temporary_files_left(chain):
    for key in ("trans", "ind", "save_all", "demo"):
        procs, c = chain(key)
        left = [n for n in os.listdir(c["out"]) if n.startswith(".tmp_")]
        assert not left, f"{key}: {left}"
        parent = os.path.dirname(c.get("json", c["out"]))
        assert not [n for n in os.listdir(parent) if n.startswith(".tmp_")]


# ---------------------------------------------------------------- 4. a folder from the paper's hume.py

def test_paper_folder(chain):
    (proc,), c = chain("paper")
    assert_ok(proc)
    with open(c["json"]) as f:
        report = json.load(f)
    y, preds = c["y"], c["preds"]
    assert sorted(report["tasks"], key=int) == [str(s) for s in sorted(PAPER_SEEDS)]
    for seed in PAPER_SEEDS:
        t = report["tasks"][str(seed)]
        assert t["CV_Score"] == pytest.approx(PAPER_SEEDS[seed][1])
        assert t["acc"] == pytest.approx(hungarian_acc(y, preds[seed]), abs=1e-12)
        assert t["acc"] == pytest.approx(0.9, abs=1e-12)  # 10% of the points are wrong in each task
    best = max(PAPER_SEEDS, key=lambda s: PAPER_SEEDS[s][1])
    assert int(report["best_cv_seed"]) == best == 11
    # the errors of the three tasks are disjoint: the majority vote is the true labeling
    assert report["ensemble"]["acc"] == pytest.approx(1.0, abs=1e-12)
    assert report["ensemble"]["ari"] == pytest.approx(1.0, abs=1e-9)
    assert report["ensemble"]["nmi"] == pytest.approx(1.0, abs=1e-9)
    # the ensemble speaks the best-CV task's cluster ids: cluster r holds the class that task maps to r
    perm = np.asarray(PAPER_SEEDS[best][0])
    assert report["ensemble_cluster_sizes"] == [PAPER_SIZES[int(np.nonzero(perm == r)[0][0])]
                                                for r in range(PAPER_K)]
    assert report["mean"]["acc"] == pytest.approx(0.9, abs=1e-12)


def test_evaluate_json_into_new_folder(chain):
    """--json into a folder that does not exist yet: either written (folder created) or refused with one error
    line, never a traceback after all the work."""
    (proc,), c = chain("json_new_folder")
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    if proc.returncode == 0:
        with open(c["json"]) as f:
            assert json.load(f)["ensemble"]["acc"] == pytest.approx(1.0)
    else:
        assert_clean_failure(proc, ["--json"])


# ---------------------------------------------------------------- 5. the bundled demo

def test_demo_defaults(chain):
    from humelib import arrays
    assert sorted(DEMO_FILES) == sorted(arrays.DEMO[k] for k in ("phi1_train", "phi1_test", "phi2_train",
                                                                "phi2_test", "labels_test"))
    procs, c = chain("demo")
    for p in procs:
        assert_ok(p)
    assert len(procs) == 2
    res = load_results(os.path.join(c["out"], "results_42.pickle"))
    assert len(res["preds"]) == DEMO_TEST_POINTS, "the demo must be scored on its test split"
    x, y = np.load(arrays.DEMO["phi1_test"]), np.load(arrays.DEMO["labels_test"])
    W = load_task(os.path.join(c["out"], "linear_task_42.pt"), x.shape[1], 10)  # the default --k 10
    assert np.array_equal((torch.from_numpy(x).double() @ W.T).argmax(1).numpy(), np.asarray(res["preds"]))
    with open(c["json"]) as f:
        report = json.load(f)
    assert sum(report["ensemble_cluster_sizes"]) == DEMO_TEST_POINTS
    assert report["tasks"]["42"]["acc"] == pytest.approx(hungarian_acc(y, res["preds"]), abs=1e-9)
    assert "ensemble" in report and "ACC" in procs[1].stdout
