"""hume.py and evaluate.py refuse bad inputs (table-driven, main(argv) in process as its __main__ runs it): exit code
2, exactly one stderr line "error: ..." naming the flag or file, no traceback, and nothing written (a new --exp_path
is not created, an existing empty one stays empty, nothing appears beside --json or in the tasks folder).
"""
import os
import pickle

import numpy as np
import pytest
import torch

import helpers
from helpers import FAST, assert_clean_failure, save_npy, write_paper_task, write_problem

# ---------------------------------------------------------------- bad inputs: the tables

class Case:
    """What a bad-input builder gets: the shared valid problem P (paths), and writers into its own folder."""

    def __init__(self, folder, P):
        self.folder, self.P = folder, P
        os.makedirs(folder, exist_ok=True)

    def npy(self, name, arr):
        return save_npy(self.folder, name, arr)

    def raw(self, name, data):
        path = os.path.join(self.folder, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def base(self, **override):
        """Valid transductive hume.py flags, some replaced: override(phi1_path=...) or None to drop a flag."""
        flags = {"phi1_path": self.P["phi1"], "phi2_path": self.P["phi2"], "gt_labels_path": self.P["labels"]}
        flags.update(override)
        return [a for f, v in flags.items() if v is not None for a in (f"--{f}", v)]

    def inductive(self, **override):
        flags = {"phi1_path_val": self.P["phi1_val"], "phi2_path_val": self.P["phi2_val"],
                 "gt_labels_path": self.P["labels_val"]}
        flags.update(override)
        return self.base(**flags)

    def arr(self, name):
        return self.P["arrays"][name].copy()


RANDOM_BYTES = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
assert not RANDOM_BYTES.startswith(b"\x93NUMPY")


def _truncated_npy(c):
    path = c.npy("phi2_cut", c.arr("phi2"))
    with open(path, "rb") as f:
        data = f.read()
    return c.raw("phi2_cut.npy", data[:len(data) // 2])


def _poison(arr, value):
    arr[5, 3] = value
    return arr


# id: (builder(case) -> hume.py flags (FAST and --exp_path are added), [strings the error line must contain])
HUME_BAD = {
    "rows_mismatch": (lambda c: c.base(phi2_path=c.npy("phi2", c.arr("phi2")[:-1])), ["--phi2_path"]),
    "labels_length": (lambda c: c.base(gt_labels_path=c.npy("y", c.arr("labels")[:-1])), ["--gt_labels_path"]),
    "nan_phi1": (lambda c: c.base(phi1_path=c.npy("phi1_nan", _poison(c.arr("phi1"), np.nan))),
                 ["--phi1_path", "phi1_nan.npy"]),
    "inf_phi2": (lambda c: c.base(phi2_path=c.npy("phi2_inf", _poison(c.arr("phi2"), np.inf))),
                 ["--phi2_path", "phi2_inf.npy"]),
    "phi1_1d": (lambda c: c.base(phi1_path=c.npy("phi1_1d", c.arr("phi1")[:, 0])), ["--phi1_path"]),
    "phi2_int64": (lambda c: c.base(phi2_path=c.npy("phi2_int", np.round(c.arr("phi2")).astype(np.int64))),
                   ["--phi2_path"]),
    "k_1": (lambda c: c.base() + ["--k", 1], ["--k"]),
    "k_gt_n": (lambda c: c.base() + ["--k", len(c.arr("phi1")) + 1], ["--k"]),
    # W is k x d1 with orthonormal rows: impossible when k > d1 (the synthetic phi1 has 16 dims)
    "k_gt_d1": (lambda c: c.base() + ["--k", c.P["d1"] + 4], ["--k"]),
    "missing_phi1": (lambda c: c.base(phi1_path=os.path.join(c.folder, "nope.npy")), ["--phi1_path", "nope.npy"]),
    "only_phi1_val": (lambda c: c.inductive(phi2_path_val=None), ["--phi2_path_val"]),
    "only_phi2_val": (lambda c: c.inductive(phi1_path_val=None), ["--phi1_path_val"]),
    "only_phi1_path": (lambda c: c.base(phi2_path=None), ["--phi2_path"]),
    "only_phi2_path": (lambda c: c.base(phi1_path=None), ["--phi1_path"]),
    "train_fraction_0": (lambda c: c.base() + ["--train_fraction", 0], ["--train_fraction"]),
    "train_fraction_1": (lambda c: c.base() + ["--train_fraction", 1], ["--train_fraction"]),
    # inside (0, 1) but 0.005 x 100 points leaves no training point: found only once the data size is known
    "train_fraction_empty_split": (lambda c: c.base() + ["--train_fraction", 0.005], ["--train_fraction"]),
    "inner_lr_negative": (lambda c: c.base() + ["--inner_lr", -0.1], ["--inner_lr"]),
    "corrupt_npy": (lambda c: c.base(phi1_path=c.raw("junk.npy", RANDOM_BYTES)), ["--phi1_path", "junk.npy"]),
    "truncated_npy": (lambda c: c.base(phi2_path=_truncated_npy(c)), ["--phi2_path", "phi2_cut.npy"]),
    "val_dim_mismatch": (lambda c: c.inductive(phi1_path_val=c.npy("p1v", c.arr("phi1_val")[:, :-1])),
                         ["--phi1_path_val"]),
    "val_labels_length": (lambda c: c.inductive(gt_labels_path=c.P["labels"]), ["--gt_labels_path"]),
}
# the same inputs against an --exp_path that already exists (empty): it must stay empty
HUME_BAD_EXISTING = ["rows_mismatch", "nan_phi1", "k_gt_n", "k_gt_d1", "corrupt_npy", "train_fraction_empty_split",
                     "val_labels_length"]


def _task_folder(c, seeds=(7,), d1=None):
    """A valid task folder (paper format) for the shared problem's phi1."""
    folder = os.path.join(c.folder, "tasks")
    g = torch.Generator().manual_seed(0)
    for s in seeds:
        W = torch.linalg.qr(torch.randn(d1 or c.P["d1"], c.P["k"], generator=g))[0].T
        write_paper_task(folder, s, W, 0.5)
    return folder


def _without(path):
    os.remove(path)
    return os.path.dirname(path)


def _replace(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return os.path.dirname(path)


# id: (builder(case) -> (--tasks_path, --phi1_path, --gt_labels_path), [strings the error line must contain])
EVAL_BAD = {
    "empty_folder": (lambda c: (os.makedirs(os.path.join(c.folder, "empty")) or os.path.join(c.folder, "empty"),
                                c.P["phi1"], c.P["labels"]), ["--tasks_path"]),
    "missing_folder": (lambda c: (os.path.join(c.folder, "absent"), c.P["phi1"], c.P["labels"]), ["--tasks_path"]),
    "no_results_pickle": (lambda c: (_without(os.path.join(_task_folder(c), "results_7.pickle")), c.P["phi1"],
                                     c.P["labels"]), ["results_7.pickle"]),
    "corrupt_task": (lambda c: (_replace(os.path.join(_task_folder(c), "linear_task_7.pt"), RANDOM_BYTES),
                                c.P["phi1"], c.P["labels"]), ["linear_task_7.pt"]),
    "corrupt_results": (lambda c: (_replace(os.path.join(_task_folder(c), "results_7.pickle"), RANDOM_BYTES),
                                   c.P["phi1"], c.P["labels"]), ["results_7.pickle"]),
    "results_without_cv": (lambda c: (_replace(os.path.join(_task_folder(c), "results_7.pickle"),
                                               pickle.dumps({"preds": [1, 2]})), c.P["phi1"], c.P["labels"]),
                           ["results_7.pickle"]),
    "other_d1": (lambda c: (_task_folder(c, d1=c.P["d1"] - 6), c.P["phi1"], c.P["labels"]), ["linear_task_7.pt"]),
    "labels_length": (lambda c: (_task_folder(c), c.P["phi1"], c.npy("y_short", c.arr("labels")[:-1])),
                      ["--gt_labels_path"]),
}


@pytest.fixture(scope="module")
def shared_problem(tmp_path_factory):
    return write_problem(str(tmp_path_factory.mktemp("shared")), n=240, k=4, d1=16, seed=0, n_val=60)


def run_hume_bad(folder, P, case, existing):
    build, expect = HUME_BAD[case]
    args = build(Case(os.path.join(folder, "in"), P))
    exp = os.path.join(folder, "exp")
    if existing:
        os.makedirs(exp)
    (proc,) = helpers.run_chain_in_process([("hume.py", args + FAST + ["--exp_path", exp])])
    return proc, exp, expect


@pytest.mark.parametrize("case", list(HUME_BAD))
def test_hume_bad_input(shared_problem, tmp_path, case):
    proc, exp, expect = run_hume_bad(str(tmp_path), shared_problem, case, existing=False)
    assert_clean_failure(proc, expect)
    assert not os.path.exists(exp), f"--exp_path was created by a run that failed: {os.listdir(exp)}"


@pytest.mark.parametrize("case", HUME_BAD_EXISTING)
def test_hume_bad_input_existing_folder(shared_problem, tmp_path, case):
    proc, exp, expect = run_hume_bad(str(tmp_path), shared_problem, case, existing=True)
    assert_clean_failure(proc, expect)
    assert os.listdir(exp) == [], "a run that failed wrote into --exp_path"


@pytest.mark.parametrize("case", list(EVAL_BAD))
def test_evaluate_bad_input(shared_problem, tmp_path, case):
    build, expect = EVAL_BAD[case]
    tasks, phi1, labels = build(Case(str(tmp_path / "in"), shared_problem))
    before = sorted(os.listdir(tasks)) if os.path.isdir(tasks) else None
    out_json = tmp_path / "report" / "eval.json"
    out_json.parent.mkdir()
    (proc,) = helpers.run_chain_in_process([("evaluate.py", ["--tasks_path", tasks, "--phi1_path", phi1,
                                                             "--gt_labels_path", labels, "--json", out_json])])
    assert_clean_failure(proc, expect)
    assert os.listdir(out_json.parent) == [], "a failed run wrote beside --json"
    if before is not None:
        assert sorted(os.listdir(tasks)) == before, "the tasks folder changed"
