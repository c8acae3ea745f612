"""Nothing a script reads can run code: hostile results pickles, checkpoints, task files and .npy files end in one
line and exit 2, and the payload (which would create a marker file) never runs. Genuine files still load: our own
results pickles and those the paper's hume.py writes (pickle.HIGHEST_PROTOCOL, a numpy float CV_Score)."""
import os
import pickle

import numpy as np
import pytest
import torch

import annotate
import evaluate
import hume
import plot
import select_k
from humelib import fileio, runtime
from helpers import FAST, cli, refused, temp_files, write_paper_task, write_problem


class Payload:
    """Unpickling this runs os.system(touch MARKER)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def P(tmp_path_factory):
    return write_problem(str(tmp_path_factory.mktemp("data")), n=200, k=4)


def data_flags(P):
    return ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--gt_labels_path", P["labels"], "--k", "4"]


@pytest.fixture(scope="module")
def ours(P, tmp_path_factory):
    """A folder written by our hume.py (seed 0)."""
    folder = str(tmp_path_factory.mktemp("ours"))
    assert cli(hume.main, data_flags(P) + FAST + ["--exp_path", folder, "--seed", "0"])[0] == 0
    return folder


def hostile_folder(tmp_path, marker):
    """A task folder whose only task is genuine but whose results pickle carries a payload."""
    folder = str(tmp_path / "tasks")
    write_paper_task(folder, 0, np.eye(4, 16), 0.5)
    with open(os.path.join(folder, "results_0.pickle"), "wb") as f:
        pickle.dump({"CV_Score": 0.5, "args": Payload(marker)}, f)
    return folder


def test_restricted_unpickler_loads_ours_with_its_args(ours):
    res = fileio.load_results(os.path.join(ours, "results_0.pickle"))
    assert isinstance(res["CV_Score"], float) and res["args"]["seed"] == 0 and len(res["preds"]) == 200


def test_restricted_unpickler_loads_a_paper_pickle(tmp_path):
    path = str(tmp_path / "results_1.pickle")
    with open(path, "wb") as f:  # the paper's hume.py: a dict, HIGHEST_PROTOCOL, CV_Score as sklearn returns it
        pickle.dump({"CV_Score": np.mean(np.array([0.5, 0.75])), "preds": np.arange(10), "k": np.int64(4)}, f,
                    protocol=pickle.HIGHEST_PROTOCOL)
    assert fileio.load_results(path)["CV_Score"] == 0.625


@pytest.mark.parametrize("name, argv", [
    ("evaluate", lambda f, P: ["--tasks_path", f, "--phi1_path", P["phi1"], "--gt_labels_path", P["labels"]]),
    ("plot", lambda f, P: ["--tasks_path", f, "--out", os.path.join(f, "fig")]),
    ("annotate", lambda f, P: ["--tasks_path", f, "--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--budget", "4",
                               "--out", os.path.join(f, "picks.csv")]),
])
def test_hostile_results_pickle_is_refused_by_every_reader(tmp_path, P, name, argv):
    marker = str(tmp_path / "MARKER")
    folder = hostile_folder(tmp_path, marker)
    with open(os.path.join(folder, "metrics_0.jsonl"), "w") as f:  # plot reads the logs first
        f.write('{"iteration": 1, "loss": 1.0}\n')
    main = {"evaluate": evaluate.main, "plot": plot.main, "annotate": annotate.main}[name]
    refused(cli(main, argv(folder, P)), "refuses to load object", "not a results pickle written by HUME")
    assert not os.path.exists(marker)
    assert not os.path.exists(os.path.join(folder, "picks.csv")) and not temp_files(folder)


def test_select_k_reads_results_with_the_restricted_unpickler(tmp_path, P, monkeypatch):
    marker, out = str(tmp_path / "MARKER"), str(tmp_path / "out")

    def plant(argv):  # stands in for the HUME run: it leaves a hostile results pickle behind
        folder = argv[argv.index("--exp_path") + 1]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"results_{argv[argv.index('--seed') + 1]}.pickle"), "wb") as f:
            pickle.dump({"CV_Score": Payload(marker)}, f)
    monkeypatch.setattr(select_k, "run_hume", plant)
    argv = ["--k_range", "4", "--seeds", "0", "--out", out, "--quiet", "--phi1_path", P["phi1"], "--phi2_path",
            P["phi2"]]
    refused(cli(select_k.main, argv), "refuses to load object")
    assert not os.path.exists(marker)


@pytest.mark.parametrize("content, needle", [
    (b"", "damaged results pickle"),
    (pickle.dumps({"CV_Score": 0.5})[:-3], "damaged results pickle"),
    (pickle.dumps([1, 2]), "expected a dict with a CV_Score"),
    (pickle.dumps({"cv": 1}), "expected a dict with a CV_Score"),
    (pickle.dumps({"CV_Score": "high"}), "not a number"),
])
def test_damaged_results_pickle_is_one_line(tmp_path, P, content, needle):
    folder = str(tmp_path / "tasks")
    write_paper_task(folder, 0, np.eye(4, 16), 0.5)
    with open(os.path.join(folder, "results_0.pickle"), "wb") as f:
        f.write(content)
    refused(cli(evaluate.main, ["--tasks_path", folder, "--phi1_path", P["phi1"]]), "results_0.pickle", needle)


def test_planted_checkpoint_does_not_run_on_resume(tmp_path, P):
    marker, folder = str(tmp_path / "MARKER"), str(tmp_path / "run")
    os.makedirs(folder)
    torch.save({"iteration": 1, "fixed": Payload(marker)}, os.path.join(folder, "checkpoint_0.pt"))
    refused(cli(hume.main, data_flags(P) + FAST + ["--exp_path", folder, "--seed", "0", "--resume"]),
            "checkpoint_0.pt", "nothing in it was run")
    assert not os.path.exists(marker)


def test_checkpoint_holds_only_tensors_and_plain_values(tmp_path, P):
    folder = str(tmp_path / "run")
    argv = data_flags(P) + FAST + ["--exp_path", folder, "--seed", "0", "--ckpt_every", "1"]
    assert cli(hume.main, argv)[0] == 0
    state = torch.load(os.path.join(folder, "checkpoint_0.pt"), weights_only=True)
    assert state["iteration"] == 2 and isinstance(state["python_rng"], list)


def test_planted_task_file_does_not_run(tmp_path, P):
    marker = str(tmp_path / "MARKER")
    folder = str(tmp_path / "tasks")
    write_paper_task(folder, 0, np.eye(4, 16), 0.5)
    torch.save({"parametrizations.weight.original": Payload(marker)}, os.path.join(folder, "linear_task_0.pt"))
    refused(cli(evaluate.main, ["--tasks_path", folder, "--phi1_path", P["phi1"]]), "linear_task_0.pt")
    assert not os.path.exists(marker)


@pytest.mark.parametrize("content, needle", [
    (b"0.1,0.2\n0.3,0.4\n", "not a .npy file"),
    (b"", "not a .npy file (it is empty)"),
    (None, "pickled object array: refusing"),
    (b"\x93NUMPY\x01\x00garbage", "damaged .npy file"),
])
def test_npy_that_is_not_an_array_says_what_it_is_never_allow_pickle(tmp_path, P, content, needle):
    path = str(tmp_path / "phi1.npy")
    if content is None:
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    else:
        with open(path, "wb") as f:
            f.write(content)
    folder = str(tmp_path / "run")
    line = refused(cli(hume.main, ["--phi1_path", path, "--phi2_path", P["phi2"], "--exp_path", folder] + FAST),
                   "--phi1_path", needle)
    assert "allow_pickle" not in line and not os.path.exists(folder)


def test_extract_reads_cifar100_label_files_with_the_restricted_unpickler(tmp_path):
    """A planted CIFAR-100 label file (extract.py's one pickle, read for the 20 superclasses) runs nothing."""
    from types import SimpleNamespace

    import extract
    marker = str(tmp_path / "MARKER")
    (tmp_path / "cifar-100-python").mkdir()
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"coarse_labels": Payload(marker)}, f)
    ds = SimpleNamespace(root=str(tmp_path), base_folder="cifar-100-python", train=True)
    with pytest.raises(runtime.HumeError, match="refuses to load object"):
        extract.cifar100_coarse_labels(ds)
    assert not os.path.exists(marker)
