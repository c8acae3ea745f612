"""From a folder of images to labels, a sorted folder and a montage, offline: the bundled digits as PNG files in two
class-less subfolders (with clashing file names), extract.py (random-init ResNet-18), hume.py with tiny budgets,
then predict.py on the training images and on new ones. predict.py's vote is checked against one recomputed here
from the task files with plain torch, scipy and collections.Counter; the sorted folder holds every file exactly
once; bad inputs end with one line and exit code 2, with nothing written.
"""
import collections
import csv
import filecmp
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_digits

import extract
import hume
import plot
import predict
from helpers import FAST, cli, orthogonal_linear

K, N_TRAIN, N_NEW = 4, 120, 15


def write_images(folder, pixels):
    """8x8 digits as 32x32 PNGs, folder/NNNN.png; returns their absolute paths in name order."""
    os.makedirs(folder)
    paths = [os.path.abspath(os.path.join(folder, f"{i:04d}.png")) for i in range(len(pixels))]
    for p, x in zip(paths, pixels):
        Image.fromarray((255 - x.reshape(8, 8) * 15).astype(np.uint8)).resize((32, 32)).save(p)
    return paths


def features(root, name, seed, l2, out):
    """extract.py on an image folder; returns the .npy path and the rows' files (torchvision's ImageFolder order:
    subfolders sorted, files sorted)."""
    extract.main(["--dataset", "imagefolder", "--root", root, "--name", name, "--arch", "resnet18", "--weights",
                  "none", "--image_size", "32", "--num_workers", "0", "--device", "cpu", "--seed", seed, "--out", out]
                 + ["--l2"] * l2)
    path = os.path.join(out, f"{name}train{'_l2' * l2}.npy")
    files = [os.path.join(d, f) for d, _, fs in sorted(os.walk(root)) for f in sorted(fs)]
    beside = path[:-4] + ".sources.txt"
    if os.path.exists(beside):  # extract.py writes it since branch extract; before that, this test does
        assert open(beside).read().splitlines() == files
    else:
        with open(beside, "w") as f:
            f.writelines(s + "\n" for s in files)
    return path, files


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    pixels = load_digits().data
    files = write_images(str(root / "mine" / "batch_a"), pixels[:N_TRAIN // 2]) + \
        write_images(str(root / "mine" / "batch_b"), pixels[N_TRAIN // 2:N_TRAIN])  # the same names in both
    write_images(str(root / "new" / "inbox"), pixels[N_TRAIN:N_TRAIN + N_NEW])
    feat = str(root / "feat")
    phi1, sources = features(str(root / "mine"), "mine", "0", True, feat)
    phi2, _ = features(str(root / "mine"), "mine", "1", False, feat)
    new, new_sources = features(str(root / "new"), "new", "0", True, feat)
    assert sources == files
    exp = str(root / "tasks")
    for seed in ("0", "1", "2"):
        hume.main(["--phi1_path", phi1, "--phi2_path", phi2, "--k", str(K), "--exp_path", exp, "--seed", seed] + FAST)
    return {"root": root, "phi1": phi1, "phi2": phi2, "new": new, "tasks": exp, "sources": sources,
            "new_sources": new_sources}


# ---------------------------------------------------------------- the vote, recomputed independently

def reference_vote(tasks, phi1):
    """Each task file loaded with plain torch, argmax(phi1 W^T); every task matched (scipy, on a Counter) to the
    task with the best CV_Score of its pickle; per-point Counter vote, ties to the smaller label. Returns the vote
    and the share of tasks agreeing with it."""
    seeds = sorted(int(m.group(1)) for f in os.listdir(tasks) if (m := re.fullmatch(r"linear_task_(\d+)\.pt", f)))
    preds, cv = {}, {}
    for s in seeds:
        state = torch.load(os.path.join(tasks, f"linear_task_{s}.pt"), weights_only=True)
        module = orthogonal_linear(*state["parametrizations.weight.original"].shape[::-1])
        module.load_state_dict(state)
        preds[s] = (torch.from_numpy(np.load(phi1)) @ module.weight.detach().T).argmax(1).numpy()
        with open(os.path.join(tasks, f"results_{s}.pickle"), "rb") as f:
            cv[s] = pickle.load(f)["CV_Score"]
    best = max(seeds, key=lambda s: cv[s])
    aligned = [relabel(preds[s], preds[best]) for s in seeds]
    vote = []
    for labels in zip(*aligned):
        counts = collections.Counter(labels)
        vote.append(min(counts, key=lambda c: (-counts[c], c)))
    vote = np.array(vote)
    return vote, np.mean([a == vote for a in aligned], axis=0)


def relabel(pred, ref):
    """pred's clusters renamed after the ref clusters they overlap most (one-to-one); the rest: fresh labels."""
    mine, theirs = sorted(set(pred.tolist())), sorted(set(ref.tolist()))
    pairs = collections.Counter(zip(pred.tolist(), ref.tolist()))
    rows, cols = linear_sum_assignment(-np.array([[pairs[a, b] for b in theirs] for a in mine]))
    names = {mine[r]: theirs[c] for r, c in zip(rows, cols)}
    fresh = max(pred.max(), ref.max()) + 1
    for a in mine:
        if a not in names:
            names[a], fresh = fresh, fresh + 1
    return np.array([names[a] for a in pred.tolist()])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ok(argv):
    code, out, err = cli(predict.main, argv)
    assert code == 0, err
    return out


# ---------------------------------------------------------------- labels out

def test_training_images_get_the_vote_recomputed_from_the_task_files(run, tmp_path):
    ok(["--tasks_path", run["tasks"], "--phi1_path", run["phi1"], "--out", tmp_path / "labels"])
    labels = np.load(tmp_path / "labels.npy")
    vote, agreement = reference_vote(run["tasks"], run["phi1"])
    assert labels.dtype == np.int64 and np.array_equal(labels, vote)
    rows = read_csv(tmp_path / "labels.csv")
    assert list(rows[0]) == ["row", "cluster", "agreement", "source"]  # the sources file was picked up
    assert [int(r["row"]) for r in rows] == list(range(N_TRAIN))
    assert [int(r["cluster"]) for r in rows] == vote.tolist()
    assert np.allclose([float(r["agreement"]) for r in rows], agreement, atol=5e-4)
    assert [r["source"] for r in rows] == run["sources"]


def test_new_images_are_labelled_by_the_saved_tasks_without_retraining(run, tmp_path):
    before = sorted(os.listdir(run["tasks"]))
    ok(["--tasks_path", run["tasks"], "--phi1_path", run["new"], "--out", tmp_path / "new"])
    assert np.array_equal(np.load(tmp_path / "new.npy"), reference_vote(run["tasks"], run["new"])[0])
    assert [r["source"] for r in read_csv(tmp_path / "new.csv")] == run["new_sources"]
    # --align_on: matched on the training images too, the new ones get the vote over both sets
    ok(["--tasks_path", run["tasks"], "--phi1_path", run["new"], "--align_on", run["phi1"], "--out", tmp_path / "al"])
    both = tmp_path / "both.npy"
    np.save(both, np.concatenate([np.load(run["new"]), np.load(run["phi1"])]))
    assert np.array_equal(np.load(tmp_path / "al.npy"), reference_vote(run["tasks"], both)[0][:N_NEW])
    assert sorted(os.listdir(run["tasks"])) == before  # nothing written among the tasks


def test_with_labels_the_class_column_is_the_hungarian_matched_class(run, tmp_path):
    y = np.arange(N_TRAIN) % 3 + 7  # three classes named 7, 8, 9: some of the K clusters stay unmatched
    np.save(tmp_path / "y.npy", y)
    out = ok(["--tasks_path", run["tasks"], "--phi1_path", run["phi1"], "--gt_labels_path", tmp_path / "y.npy",
              "--out", tmp_path / "labels"])
    assert "ACC" in out
    vote = np.load(tmp_path / "labels.npy")
    rows, cols = linear_sum_assignment(-np.array([[np.sum((vote == c) & (y == t)) for t in (7, 8, 9)]
                                                  for c in np.unique(vote)]))
    matched = {np.unique(vote)[r]: str((7, 8, 9)[c]) for r, c in zip(rows, cols)}
    assert [r["class"] for r in read_csv(tmp_path / "labels.csv")] == [matched.get(c, "") for c in vote]


# ---------------------------------------------------------------- sorting the files

def sorted_files(folder):
    """{file in folder (recursively): the path it holds or points to}."""
    return {os.path.join(d, f): os.path.realpath(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs}


def test_sort_into_links_every_file_once_into_its_clusters_folder(run, tmp_path):
    ok(["--tasks_path", run["tasks"], "--phi1_path", run["phi1"], "--out", tmp_path / "labels", "--sort_into",
        tmp_path / "sorted"])
    labels = np.load(tmp_path / "labels.npy")
    placed = sorted_files(tmp_path / "sorted")
    assert sorted(placed.values()) == sorted(os.path.realpath(s) for s in run["sources"])  # each exactly once
    cluster_of = {os.path.realpath(s): c for s, c in zip(run["sources"], labels)}
    for link, target in placed.items():
        assert os.path.islink(link)
        assert os.path.basename(os.path.dirname(link)) == f"cluster_{cluster_of[target]:0{len(str(K))}d}"
    assert len(os.listdir(tmp_path / "sorted")) == len(np.unique(labels))


def test_sort_into_with_copy_copies_the_bytes(run, tmp_path):
    ok(["--tasks_path", run["tasks"], "--phi1_path", run["phi1"], "--out", tmp_path / "labels", "--sort_into",
        tmp_path / "sorted", "--copy"])
    copies = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "sorted") for f in fs]
    assert len(copies) == N_TRAIN and not any(os.path.islink(c) for c in copies)
    labels = np.load(tmp_path / "labels.npy")
    for c in copies:  # its source: the file of that name (a clashing name has its row in front) in that cluster
        folder, name = os.path.basename(os.path.dirname(c)), os.path.basename(c)
        row = int(name.split("_")[0]) if "_" in name else None
        [source] = [s for i, s in enumerate(run["sources"]) if (row is None and os.path.basename(s) == name or
                                                                i == row) and folder == f"cluster_{labels[i]}"]
        assert filecmp.cmp(c, source, shallow=False)


def test_sort_into_refuses_any_existing_file_and_writes_nothing(run, tmp_path):
    ok(["--tasks_path", run["tasks"], "--phi1_path", run["phi1"], "--out", tmp_path / "first", "--sort_into",
        tmp_path / "first_sorted"])
    one = sorted(sorted_files(tmp_path / "first_sorted"))[0]
    clash = tmp_path / "second_sorted" / os.path.relpath(one, tmp_path / "first_sorted")
    clash.parent.mkdir(parents=True)
    clash.write_text("mine")
    code, out, err = cli(predict.main, ["--tasks_path", run["tasks"], "--phi1_path", run["phi1"], "--out",
                                        tmp_path / "second", "--sort_into", tmp_path / "second_sorted"])
    assert code == 2 and len(err.splitlines()) == 1 and "exists" in err and str(clash) in err
    assert list(sorted_files(tmp_path / "second_sorted")) == [str(clash)] and clash.read_text() == "mine"
    assert not any(p.name.startswith("second.") for p in tmp_path.iterdir())


# ---------------------------------------------------------------- bad inputs

def bad_cases(run, tmp):
    short = tmp / "short.txt"
    short.write_text("a.png\nb.png\n")
    rows = tmp / "rows.txt"
    rows.write_text("".join(f"cifar10:train:{i}\n" for i in range(N_TRAIN)))
    wrong_y = tmp / "y.npy"
    np.save(wrong_y, np.zeros(N_TRAIN + 1, dtype=np.int64))
    narrow = tmp / "narrow.npy"
    np.save(narrow, np.ones((N_TRAIN, 7), dtype=np.float32))
    taken = tmp / "taken"
    (tmp / "taken.csv").write_text("mine")
    base = ["--tasks_path", run["tasks"], "--phi1_path", run["phi1"]]
    return {
        "sources of another length": (base + ["--sources", short, "--out", tmp / "o"], "2 lines for 120 rows"),
        "data-set rows to sort": (base + ["--sources", rows, "--out", tmp / "o", "--sort_into", tmp / "s"],
                                  "data-set rows"),
        "an existing output": (base + ["--out", taken], "taken.csv exists"),
        "--copy alone": (base + ["--out", tmp / "o", "--copy"], "--copy needs --sort_into"),
        "labels of another length": (base + ["--gt_labels_path", wrong_y, "--out", tmp / "o"], "121 labels"),
        "phi1 of another space": (["--tasks_path", run["tasks"], "--phi1_path", narrow, "--out", tmp / "o"],
                                  "expects phi1 of dimension"),
        "--align_on of another space": (base + ["--align_on", narrow, "--out", tmp / "o"], "dimension 7"),
        "no tasks": (["--tasks_path", tmp / "none", "--phi1_path", run["phi1"], "--out", tmp / "o"],
                     "no such folder"),
    }


CASES = ["sources of another length", "data-set rows to sort", "an existing output", "--copy alone",
         "labels of another length", "phi1 of another space", "--align_on of another space", "no tasks"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run, tmp_path, case):
    argv, message = bad_cases(run, tmp_path)[case]
    before = sorted(os.listdir(tmp_path))
    code, out, err = cli(predict.main, argv)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_montage_of_the_folder_has_a_row_per_cluster_of_the_labels(run, tmp_path):
    ok(["--tasks_path", run["tasks"], "--phi1_path", run["phi1"], "--out", tmp_path / "labels"])
    code, out, err = cli(plot.main, ["--montage", "--tasks_path", run["tasks"], "--phi1_path", run["phi1"],
                                     "--phi2_path", run["phi2"], "--out", tmp_path, "--prefix", "mine"])
    assert code == 0, err
    rows = [line.split("clusters ")[1].split() for line in out.splitlines() if "rows: clusters" in line]
    assert rows == [[str(c) for c in np.unique(np.load(tmp_path / "labels.npy"))]]
    assert os.path.isfile(tmp_path / "mine_montage.png")


def test_a_failure_while_sorting_removes_what_it_created(run, tmp_path, monkeypatch):
    calls = []

    def failing_symlink(src, dst):  # the disk fills up at the fifth file
        calls.append(dst)
        if len(calls) == 5:
            raise OSError(28, "No space left on device", dst)
        os.close(os.open(dst, os.O_CREAT | os.O_WRONLY))
    monkeypatch.setattr(predict.os, "symlink", failing_symlink)
    code, _, err = cli(predict.main, ["--tasks_path", run["tasks"], "--phi1_path", run["phi1"], "--out",
                                      tmp_path / "labels", "--sort_into", tmp_path / "deep" / "sorted"])
    assert code == 2 and len(err.splitlines()) == 1 and "No space left on device" in err
    assert sorted(os.listdir(tmp_path)) == []  # no files, no folders, no labels
