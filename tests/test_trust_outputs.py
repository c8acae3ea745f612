"""Outputs of extract.py, predict.py and the report writers (table-driven, main(argv) in process): names that leave
--out, links and special files where outputs go, a full disk mid-copy, a group of files whose last write or rename
fails: exit 2, one line, and everything under the test's folder unchanged (helpers.tree). predict.py's CSV keeps
foreign names inert in a spreadsheet; task files holding NaN or inf are refused by every script that reads them."""
import csv
import errno
import os
import shutil

import numpy as np
import pytest
import torch

import annotate
import baselines
import evaluate
import extract
from humelib import fileio
import plot
import predict
import select_k
from helpers import cli, refused, tree, write_paper_task, write_problem

EXTRACT = ["--dataset", "fake", "--fake_size", "4", "--split", "train", "--arch", "resnet18", "--weights", "none",
           "--image_size", "32", "--batch_size", "4", "--num_workers", "0", "--device", "cpu"]


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------- extract.py

NAMES = ["../../x", "a/b", "..", ".", ".hidden", ""]


@pytest.mark.parametrize("name", NAMES)
def test_extract_refuses_a_name_that_leaves_out(tmp_path, name):
    os.makedirs(tmp_path / "a" / "b")
    before = tree(str(tmp_path))
    refused(cli(extract.main, EXTRACT + ["--out", tmp_path / "a" / "b" / "out", "--name", name]), "--name")
    assert tree(str(tmp_path)) == before


TRAPS = {"features link outside": ("faketrain.npy", lambda p, v: os.symlink(v, p), "symbolic link"),
         "sources a FIFO": ("faketrain.sources.txt", lambda p, v: os.mkfifo(p), "not a regular file"),
         "labels a folder": ("faketrain_targets.npy", lambda p, v: os.mkdir(p), "is a folder")}


@pytest.mark.parametrize("case", TRAPS)
def test_extract_checks_every_output_before_building_the_model(tmp_path, monkeypatch, case):
    name, make, words = TRAPS[case]
    (tmp_path / "victim").write_text("precious")
    os.makedirs(tmp_path / "out")
    make(str(tmp_path / "out" / name), str(tmp_path / "victim"))
    monkeypatch.setattr(extract, "build_backbone", full_disk)  # reached only if the outputs were not checked first
    before = tree(str(tmp_path))
    refused(cli(extract.main, EXTRACT + ["--out", tmp_path / "out"]), name, words)
    assert tree(str(tmp_path)) == before


def test_extract_features_sources_and_labels_stay_one_unit_when_the_labels_write_fails(tmp_path, monkeypatch):
    argv = EXTRACT + ["--out", tmp_path / "out"]
    assert cli(extract.main, argv)[0] == 0
    before = tree(str(tmp_path))
    monkeypatch.setattr(extract.np, "save", full_disk)  # the labels: the last file of the group
    refused(cli(extract.main, argv + ["--seed", "1"]), "faketrain_targets.npy", "No space left")
    assert tree(str(tmp_path)) == before  # the old features and sources, row for row with the old labels


# ---------------------------------------------------------------- predict.py

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three HUME tasks (the paper's format) over a small problem, and one small file per row as its sources."""
    root = tmp_path_factory.mktemp("run")
    P = write_problem(str(root / "data"), n=60, k=4)
    rng = np.random.default_rng(0)
    for s in range(3):
        write_paper_task(str(root / "tasks"), s, np.linalg.qr(rng.normal(size=(P["d1"], 4)))[0].T, 0.5 + s / 10)
    os.makedirs(root / "imgs")
    sources = [str(root / "imgs" / f"img_{i}.png") for i in range(60)]
    for i, s in enumerate(sources):
        with open(s, "wb") as f:
            f.write(bytes([i]) * 1000)
    with open(root / "sources.txt", "w") as f:
        f.writelines(s + "\n" for s in sources)
    return {"P": P, "tasks": str(root / "tasks"), "sources": str(root / "sources.txt")}


def predict_argv(run, tmp_path, *more):
    return ["--tasks_path", run["tasks"], "--phi1_path", run["P"]["phi1"], "--sources", run["sources"],
            "--out", tmp_path / "out" / "labels", "--quiet"] + list(more)


def cluster_link(tmp_path):
    os.makedirs(tmp_path / "elsewhere")
    os.makedirs(tmp_path / "sorted")
    os.symlink(tmp_path / "elsewhere", tmp_path / "sorted" / "cluster_0")


PREDICT = {
    "a cluster folder links elsewhere": (cluster_link, ["--sort_into"], "cluster_0 is a symbolic link"),
    "labels.npy is a FIFO": (lambda t: (os.makedirs(t / "out"), os.mkfifo(t / "out" / "labels.npy")), [], "exists"),
    "labels.csv links outside": (lambda t: (os.makedirs(t / "out"), os.symlink(t / "victim", t / "out" / "labels.csv")),
                                 [], "exists"),
    "--sort_into is a file": (lambda t: (t / "sorted").write_text("x"), ["--sort_into"], "exists"),
}


@pytest.mark.parametrize("case", PREDICT)
def test_predict_never_writes_through_a_link_or_over_a_special_file(run, tmp_path, case):
    prepare, more, words = PREDICT[case]
    (tmp_path / "victim").write_text("precious")
    prepare(tmp_path)
    before = tree(str(tmp_path))
    argv = predict_argv(run, tmp_path, *(more and [more[0], tmp_path / "sorted"]))
    refused(cli(predict.main, argv), words)
    assert tree(str(tmp_path)) == before


def test_predict_copy_on_a_full_disk_removes_the_half_copied_file_and_says_so(run, tmp_path, monkeypatch):
    calls = []

    def copy_until_full(src, dst):
        calls.append(dst)
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read()[:500] if len(calls) == 5 else f.read())
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", dst)
    monkeypatch.setattr(predict.shutil, "copy2", copy_until_full)
    os.makedirs(tmp_path / "out")  # --out's folder (made by the output check when missing)
    before = tree(str(tmp_path))
    line = refused(cli(predict.main, predict_argv(run, tmp_path, "--sort_into", tmp_path / "sorted", "--copy")),
                   "No space left on device", "removed")
    assert "Directory not empty" not in line and len(calls) == 5
    assert tree(str(tmp_path)) == before  # no half-copied file, no cluster folder, no labels


def test_predict_labels_and_sorted_files_go_together_when_the_csv_rename_fails(run, tmp_path, monkeypatch):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith(".csv"):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(fileio.os, "replace", replace)
    os.makedirs(tmp_path / "out")
    before = tree(str(tmp_path))
    refused(cli(predict.main, predict_argv(run, tmp_path, "--sort_into", tmp_path / "sorted")), "labels.csv")
    assert len(calls) == 2  # labels.npy was renamed, then put back
    assert tree(str(tmp_path)) == before


HOSTILE = ["=HYPERLINK(\"http://x\",\"y\")", "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "plain.png", "a,b \"q\".png",
           "x=1.png", " =lead"]


def test_predict_csv_escapes_spreadsheet_formulas_and_stays_valid(run, tmp_path):
    names = (HOSTILE * 7)[:60]
    (tmp_path / "src.txt").write_text("".join(n + "\n" for n in names))
    argv = predict_argv(run, tmp_path)
    argv[argv.index("--sources") + 1] = tmp_path / "src.txt"
    assert cli(predict.main, argv)[0] == 0
    with open(tmp_path / "out" / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["row", "cluster", "agreement", "source"] and len(rows) == 61
    expected = ["'" + n if n[0] in "=+-@\t\r" else n for n in names]  # OWASP: quote a cell a spreadsheet would run
    assert [r[3] for r in rows[1:]] == expected
    assert [int(r[0]) for r in rows[1:]] == list(range(60))


# ---------------------------------------------------------------- task files holding NaN or inf

def nan_task_folder(run, tmp_path, value):
    folder = tmp_path / "tasks"
    shutil.copytree(run["tasks"], folder)
    path = folder / "linear_task_1.pt"
    state = torch.load(path, weights_only=True)
    state["parametrizations.weight.original"][0, 0] = value
    torch.save(state, path)
    return str(folder)


def readers(run, tasks, tmp_path):
    P = run["P"]
    (tmp_path / "texts.txt").write_text("t\n" * 60)
    return {"evaluate": (evaluate.main, ["--tasks_path", tasks, "--phi1_path", P["phi1"]]),
            "predict": (predict.main, ["--tasks_path", tasks, "--phi1_path", P["phi1"], "--out", tmp_path / "o"]),
            "annotate": (annotate.main, ["--tasks_path", tasks, "--phi1_path", P["phi1"], "--phi2_path", P["phi2"],
                                         "--budget", "4", "--out", tmp_path / "picks.csv"]),
            "plot --montage": (plot.main, ["--montage", "--tasks_path", tasks, "--phi1_path", P["phi1"], "--texts",
                                           tmp_path / "texts.txt", "--out", tmp_path / "fig"])}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("script", ["evaluate", "predict", "annotate", "plot --montage"])
def test_a_task_with_nan_or_inf_weights_is_refused_by_every_reader(run, tmp_path, script, value):
    tasks = nan_task_folder(run, tmp_path, value)
    main, argv = readers(run, tasks, tmp_path)[script]
    before = tree(str(tmp_path))
    refused(cli(main, argv), "linear_task_1.pt", "NaN or inf")
    assert tree(str(tmp_path)) == before


def test_a_turtle_task_with_an_infinite_bias_is_refused(run, tmp_path):
    P = run["P"]
    os.makedirs(tmp_path / "t")
    torch.save({"phi1": {"weight": torch.randn(4, P["d2"]), "bias": torch.tensor([0.0, float("inf"), 0.0, 0.0])}},
               tmp_path / "t" / "turtle_task_0.pt")
    shutil.copy(os.path.join(run["tasks"], "results_0.pickle"), tmp_path / "t" / "results_0.pickle")
    refused(cli(evaluate.main, ["--tasks_path", tmp_path / "t", "--phi_paths", P["phi2"]]), "turtle_task_0.pt",
            "NaN or inf")


# ---------------------------------------------------------------- report files (--json, --out) of every script

def report_writers(run, target):
    P = run["P"]
    return {"evaluate --json": (evaluate.main, ["--tasks_path", run["tasks"], "--phi1_path", P["phi1"],
                                                "--json", target]),
            "baselines --json": (baselines.main, ["--phi_path", P["phi2"], "--gt_labels_path", P["labels"], "--k", "4",
                                                  "--json", target]),
            "annotate --simulate --json": (annotate.main, ["--simulate", "--tasks_path", run["tasks"], "--phi1_path",
                                                           P["phi1"], "--phi2_path", P["phi2"], "--gt_labels_path",
                                                           P["labels"], "--json", target]),
            "annotate --budget --out": (annotate.main, ["--budget", "4", "--tasks_path", run["tasks"], "--phi1_path",
                                                        P["phi1"], "--phi2_path", P["phi2"], "--out", target]),
            "select_k --json": (select_k.main, ["--k_range", "2..3", "--seeds", "0", "--out", os.path.join(
                os.path.dirname(target), "grid"), "--json", target, "--phi1_path", P["phi1"], "--phi2_path",
                P["phi2"]])}


KINDS = {"FIFO": (lambda p, v: os.mkfifo(p), "not a regular file"),
         "link to a file outside": (lambda p, v: os.symlink(v, p), "symbolic link"),
         "folder": (lambda p, v: os.mkdir(p), "is a folder")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("script", ["evaluate --json", "baselines --json", "annotate --simulate --json",
                                    "annotate --budget --out", "select_k --json"])
def test_a_report_target_that_is_not_a_regular_file_is_refused_not_replaced(run, tmp_path, script, kind):
    make, words = KINDS[kind]
    (tmp_path / "victim").write_text("precious")
    target = str(tmp_path / "report")
    make(target, str(tmp_path / "victim"))
    main, argv = report_writers(run, target)[script]
    before = tree(str(tmp_path))
    refused(cli(main, argv), target, words)
    assert tree(str(tmp_path)) == before
