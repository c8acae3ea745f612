"""The readers of task folders on damaged or degenerate folders: the CV score is never NaN, evaluate.py never picks
a non-finite score nor writes NaN into JSON, folders mixing k or d1 are refused naming the seeds, hand-edited
metrics logs name file:line, CSVs with a byte-order mark are read, and outputs or ranges that cannot work are refused
before any work."""
import json
import os
import pickle

import numpy as np
import pytest

import annotate
import evaluate
import plot
import select_k
from humelib import cvscore, fileio
from helpers import cli, refused, write_paper_task, write_problem


@pytest.fixture(scope="module")
def P(tmp_path_factory):
    return write_problem(str(tmp_path_factory.mktemp("data")), n=200, k=4)


def rotation(k, d1, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d1, d1)))
    return q[:k]


def folder_of(tmp_path, tasks, metrics=True):
    """tasks: {seed: (k, d1, cv)} written the paper's way, plus a one-line metrics log each."""
    folder = str(tmp_path / "tasks")
    for seed, (k, d1, cv) in tasks.items():
        write_paper_task(folder, seed, rotation(k, d1, seed), cv)
        if metrics:
            with open(os.path.join(folder, f"metrics_{seed}.jsonl"), "w") as f:
                f.write('{"iteration": 1, "loss": 1.0}\n')
    return folder


@pytest.mark.parametrize("labels", [np.arange(30), np.r_[np.zeros(29), 1], np.r_[np.zeros(25), np.arange(5) + 1]])
@pytest.mark.parametrize("score_of", [cvscore.cv_score, cvscore.turtle_cv_score])
def test_cv_score_is_a_number_for_tiny_classes_and_k_equal_n(labels, score_of):
    x = np.random.default_rng(0).normal(size=(len(labels), 3))
    score = score_of(x, labels)
    assert np.isfinite(score) and 0 <= score <= 1


def test_evaluate_never_picks_a_nan_score_and_writes_null_not_nan(P, tmp_path):
    folder = folder_of(tmp_path, {0: (4, 16, 0.4), 1: (4, 16, float("nan")), 2: (4, 16, float("inf"))})
    out = str(tmp_path / "e.json")
    assert cli(evaluate.main, ["--tasks_path", folder, "--phi1_path", P["phi1"], "--json", out, "--quiet"])[0] == 0
    report = json.loads(open(out).read(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert report["best_cv_seed"] == 0 and report["tasks"]["1"]["CV_Score"] is None


@pytest.mark.parametrize("script", [evaluate.main, plot.main])
@pytest.mark.parametrize("tasks, needle", [
    ({0: (4, 16, 0.5), 1: (3, 16, 0.5)}, "k=3: seeds 1; k=4: seeds 0"),
    ({0: (4, 16, 0.5), 1: (4, 12, 0.5)}, "d1=12: seeds 1; d1=16: seeds 0"),
])
def test_a_folder_mixing_k_or_d1_is_refused_naming_the_seeds(P, tmp_path, script, tasks, needle):
    folder = folder_of(tmp_path, tasks)
    argv = ["--tasks_path", folder, "--phi1_path", P["phi1"]] + (["--out", str(tmp_path / "f")]
                                                                 if script is plot.main else [])
    refused(cli(script, argv), needle)


@pytest.mark.parametrize("line, needle", [('{"iteration": 2, "loss": "low"}', "are not numbers"),
                                          ('{"iteration": 2}', "no loss"), ("[1, 2]", "no iteration, loss"),
                                          ('{"iteration": 2, "loss": 1, "metrics": {"acc": null}}', "not numbers")])
def test_plot_names_file_and_line_of_a_hand_edited_log(P, tmp_path, line, needle):
    folder = folder_of(tmp_path, {0: (4, 16, 0.5)})
    with open(os.path.join(folder, "metrics_0.jsonl"), "a") as f:
        f.write(line + "\n")
    refused(cli(plot.main, ["--tasks_path", folder, "--phi1_path", P["phi1"], "--out", str(tmp_path / "f")]),
            "metrics_0.jsonl:2", needle)


def test_annotate_apply_reads_a_csv_with_a_byte_order_mark(P, tmp_path):
    folder = folder_of(tmp_path, {0: (4, 16, 0.5)}, metrics=False)
    points = ["--tasks_path", folder, "--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--quiet"]
    picks = str(tmp_path / "picks.csv")
    assert cli(annotate.main, points + ["--budget", "8", "--out", picks])[0] == 0
    rows = open(picks).read().splitlines()
    filled = [rows[0]] + [r + "cat" for r in rows[1:]]
    with open(picks, "w", encoding="utf-8-sig") as f:  # as a spreadsheet saves it
        f.write("\n".join(filled) + "\n")
    out = str(tmp_path / "named.npy")
    assert cli(annotate.main, points + ["--apply", picks, "--out", out])[0] == 0
    assert set(np.load(out).tolist()) == {"cat"}


@pytest.mark.parametrize("case", ["json folder", "json parent file", "prefix path", "annotate out folder"])
def test_outputs_that_cannot_work_are_refused_before_work(P, tmp_path, case):
    folder = folder_of(tmp_path, {0: (4, 16, 0.5)})
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    main, argv, needle = {
        "json folder": (evaluate.main, ["--json", str(tmp_path / "adir")], "--json"),
        "json parent file": (evaluate.main, ["--json", str(tmp_path / "afile" / "e.json")], "a file of that name"),
        "prefix path": (plot.main, ["--prefix", "a/b", "--out", str(tmp_path / "figs")], "--prefix"),
        "annotate out folder": (annotate.main, ["--phi2_path", P["phi2"], "--budget", "4", "--out",
                                                str(tmp_path / "adir")], "--out"),
    }[case]
    refused(cli(main, ["--tasks_path", folder, "--phi1_path", P["phi1"]] + argv), needle)
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile", "tasks"] and not os.listdir(tmp_path / "adir")


@pytest.mark.parametrize("extra, needle", [(["--k_range", "4", "17"], "k = 17 is more than the data allows"),
                                           (["--k_range", "4", "--json", "{tmp}"], "--json"),
                                           (["--k_range", "4", "--out", "{out}"], "k4 is a file"),
                                           (["--k_range", "4", "--seeds", "0", "-1"], "--seeds must be between 0"),
                                           (["--k_range", "2..100000000000"], "more than 1000 values of k")])
def test_select_k_refuses_what_cannot_work_before_any_run(P, tmp_path, extra, needle):
    out = tmp_path / "out"
    out.mkdir()
    (out / "k4").write_text("in the way")
    extra = [str(tmp_path) if a == "{tmp}" else str(out) if a == "{out}" else a for a in extra]
    argv = ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--seeds", "0", "--quiet"]
    if "--out" not in extra:
        argv += ["--out", str(tmp_path / "fresh")]
    refused(cli(select_k.main, argv + extra), needle)
    assert not (tmp_path / "fresh").exists() and sorted(os.listdir(out)) == ["k4"]


def test_results_written_by_our_hume_carry_only_loadable_types(tmp_path):
    path = str(tmp_path / "results_0.pickle")
    fileio.pickle_save({"CV_Score": 0.5, "args": {"inner_lr": [0.1, 0.2], "phi2_scale": np.float64(2.0),
                                                 "phi2_path": ["a.npy"], "mmap": False, "phi1_path_val": None}}, path)
    assert fileio.load_results(path)["args"]["phi2_scale"] == 2.0
    assert pickle.load(open(path, "rb"))["CV_Score"] == 0.5  # and plain pickle (the paper's evaluate) still reads it
