"""A run folder knows which method owns each seed, and hume.py and run_turtle.py check every file of a seed before
any work (table-driven, main(argv) in process): a second method on the same seed, a results pickle of no known
method, a folder, FIFO or symlink where a file goes, a checkpoint at a negative or non-integer iteration: exit 2,
one line, and the folder and everything around it unchanged (helpers.tree). Folders of the paper's hume.py (task and
results only) still belong to hume.py and are read by evaluate.py."""
import errno
import os
import pathlib
import pickle
import shutil

import numpy as np
import pytest
import torch

import evaluate
from humelib import fileio
import hume
import run_turtle
from helpers import FAST, cli, refused, tree, write_paper_task, write_problem

TURTLE_FAST = ["--T", "2", "--M", "1", "--eval_every", "1", "--ckpt_every", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def P(tmp_path_factory):
    return write_problem(str(tmp_path_factory.mktemp("data")), n=120, k=4)


def hume_argv(P, folder, *more):
    return ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--k", "4", "--exp_path", folder, "--seed", "0"] + \
        FAST + list(more)


def turtle_argv(P, folder, *more):
    return ["--phi_paths", P["phi2"], "--k", "4", "--exp_path", folder, "--seed", "0"] + TURTLE_FAST + list(more)


def paper_task(folder, P, seed=0):
    """linear_task_{seed}.pt + results_{seed}.pickle as the paper's hume.py writes them (no owner file)."""
    W = np.linalg.qr(np.random.default_rng(seed).normal(size=(P["d1"], P["k"])))[0].T
    write_paper_task(folder, seed, W, 0.5)


def turtle_task(folder, P, seed=0):
    """turtle_task_{seed}.pt in TURTLE's layout + results_{seed}.pickle, by hand."""
    os.makedirs(folder, exist_ok=True)
    torch.save({"phi1": {"weight": torch.randn(P["k"], P["d2"]), "bias": torch.zeros(P["k"])}},
               os.path.join(folder, f"turtle_task_{seed}.pt"))
    with open(os.path.join(folder, f"results_{seed}.pickle"), "wb") as f:
        pickle.dump({"CV_Score": 0.5}, f)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def setups(P, tmp_path):
    """name -> (script's main, argv builder, how to prepare the folder, words the error line must hold)."""
    victim = str(tmp_path / "victim.txt")

    def link(name):
        return lambda d: os.symlink(victim, os.path.join(d, name))

    def fifo(name):
        return lambda d: os.mkfifo(os.path.join(d, name))

    def folder(name):
        return lambda d: os.mkdir(os.path.join(d, name))

    def orphan(d):
        with open(os.path.join(d, "results_0.pickle"), "wb") as f:
            pickle.dump({"CV_Score": 0.1}, f)

    def both(d):
        paper_task(d, P)
        turtle_task(d, P)
    turtle, hume_ = (run_turtle.main, turtle_argv), (hume.main, hume_argv)
    return {
        "turtle into the paper's HUME seed": (*turtle, lambda d: paper_task(d, P), "belongs to hume.py"),
        "turtle into a HUME seed by its marker": (*turtle, lambda d: (write(os.path.join(d, "owner_0.txt"), "hume\n"),
                                                                      write(os.path.join(d, "metrics_0.jsonl"), "")),
                                                  "belongs to hume.py"),
        "hume into a TURTLE seed": (*hume_, lambda d: turtle_task(d, P), "belongs to run_turtle.py"),
        "hume into a TURTLE seed by its checkpoint": (*hume_, lambda d: write(
            os.path.join(d, "turtle_checkpoint_0.pt"), "x"), "belongs to run_turtle.py"),
        "turtle: results of no known method": (*turtle, orphan, "of no known method"),
        "hume: results of no known method": (*hume_, orphan, "of no known method"),
        "hume: files of both methods": (*hume_, both, "both hume.py and run_turtle.py"),
        "turtle: a marker naming no method": (*turtle, lambda d: write(os.path.join(d, "owner_0.txt"), "x\n"),
                                              "names no method"),
        "turtle: results is a folder": (*turtle, folder("results_0.pickle"), "results_0.pickle: is a folder"),
        "turtle: metrics log links outside": (*turtle, link("metrics_0.jsonl"), "metrics_0.jsonl: is a symbolic"),
        "turtle: task file is a FIFO": (*turtle, fifo("turtle_task_0.pt"), "not a regular file"),
        "turtle: checkpoint links outside": (*turtle, link("turtle_checkpoint_0.pt"), "symbolic link"),
        "turtle: owner marker is a FIFO": (*turtle, fifo("owner_0.txt"), "owner_0.txt: is not a regular file"),
        "hume: task file links outside": (*hume_, link("linear_task_0.pt"), "linear_task_0.pt: is a symbolic"),
        "hume: results is a FIFO": (*hume_, fifo("results_0.pickle"), "not a regular file"),
        "hume: checkpoint is a folder": (*hume_, folder("checkpoint_0.pt"), "checkpoint_0.pt: is a folder"),
    }


CASES = list(setups(None, pathlib.Path("/")))  # the names only


@pytest.mark.parametrize("case", CASES)
def test_a_seed_of_another_method_or_a_trap_is_refused_before_any_work(P, tmp_path, case):
    main, argv, prepare, words = setups(P, tmp_path)[case]
    (tmp_path / "victim.txt").write_text("precious\n")
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    prepare(folder)
    before = tree(str(tmp_path))
    refused(cli(main, argv(P, folder)), words)
    assert tree(str(tmp_path)) == before  # nothing trained, written, replaced or followed


def test_the_papers_folder_stays_hume_s_and_readable(P, tmp_path):
    folder = str(tmp_path / "paper")
    paper_task(folder, P)
    assert cli(hume.main, hume_argv(P, folder))[0] == 0  # the paper's own seed: hume.py may rerun it
    with open(os.path.join(folder, "owner_0.txt")) as f:
        assert f.read() == "hume\n"
    paper_task(folder, P, seed=1)  # a seed the paper's hume.py wrote beside ours
    code, out, err = cli(evaluate.main, ["--tasks_path", folder, "--phi1_path", P["phi1"], "--gt_labels_path",
                                         P["labels"]])
    assert code == 0 and "ensemble of 2" in out + err, err
    refused(cli(run_turtle.main, turtle_argv(P, folder)), "belongs to hume.py")
    assert cli(run_turtle.main, turtle_argv(P, folder, "--seed", "5"))[0] == 0  # another seed is free


@pytest.fixture(scope="module")
def checkpoints(P, tmp_path_factory):
    """A finished TURTLE run and a HUME run with a checkpoint (iteration 2 of 3), to resume from."""
    turtle_dir, hume_dir = str(tmp_path_factory.mktemp("turtle")), str(tmp_path_factory.mktemp("hume"))
    assert cli(run_turtle.main, turtle_argv(P, turtle_dir))[0] == 0
    assert cli(hume.main, hume_argv(P, hume_dir, "--ckpt_every", "2"))[0] == 0
    return {"turtle": (turtle_dir, "turtle_checkpoint_0.pt", run_turtle.main, turtle_argv),
            "hume": (hume_dir, "checkpoint_0.pt", hume.main, hume_argv)}


RESUME = [("turtle", {"iteration": -5}, "iteration -5"), ("turtle", {"iteration": 1.5}, "iteration 1.5"),
          ("turtle", {"iteration": True}, "iteration True"), ("turtle", {"seconds": float("nan")}, "nan seconds"),
          ("turtle", {"iteration": 10 ** 9}, "past --T"),
          ("hume", {"iteration": -5}, "iteration -5"), ("hume", {"iteration": 2.0}, "iteration 2.0"),
          ("hume", {"iteration": 10 ** 9}, "past --num_iters"), ("hume", {"seconds": -1.0}, "run state"),
          ("hume", {"seconds": float("inf")}, "run state")]


@pytest.mark.parametrize("method,change,words", RESUME, ids=[f"{m}-{c}" for m, c, _ in RESUME])
def test_resume_refuses_a_checkpoint_at_a_senseless_iteration(P, checkpoints, tmp_path, method, change, words):
    src, name, main, argv = checkpoints[method]
    folder = str(tmp_path / "run")
    shutil.copytree(src, folder)
    state = torch.load(os.path.join(folder, name), weights_only=True)
    (state["extra"] if method == "hume" and "seconds" in change else state).update(change)
    torch.save(state, os.path.join(folder, name))
    before = tree(str(tmp_path))
    refused(cli(main, argv(P, folder, "--resume")), "--resume", words)
    assert tree(str(tmp_path)) == before


@pytest.mark.parametrize("method", ["turtle", "hume"])
def test_task_and_results_stay_one_unit_when_the_results_rename_fails(P, tmp_path, monkeypatch, method):
    main, argv, task = {"turtle": (run_turtle.main, turtle_argv, "turtle_task_0.pt"),
                        "hume": (hume.main, hume_argv, "linear_task_0.pt")}[method]
    folder = str(tmp_path / "run")
    assert cli(main, argv(P, folder))[0] == 0
    pair = lambda: {n: open(os.path.join(folder, n), "rb").read() for n in (task, "results_0.pickle")}
    before = pair()
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("results_0.pickle"):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(fileio.os, "replace", replace)
    refused(cli(main, argv(P, folder, "--seed", "0", "--outer_lr" if method == "hume" else "--gamma", "0.5")),
            "results_0.pickle")
    assert pair() == before  # the new task was put back to the old one: the pair still matches
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp_")]
