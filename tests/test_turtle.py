"""run_turtle.py: its files read by plain torch and by evaluate.py, recovery of a well-separated labeling, resume,
and the bad-input table (in process). The math of an iteration: test_turtle_step.py."""
import json
import os
import pickle
import re
import subprocess

import numpy as np
import pytest
import torch

import annotate
import evaluate
import plot
import run_turtle
from helpers import REPO, blobs, child_env, cli, hungarian_acc, save_npy, signal_after

FAST = ["--T", "4", "--M", "2", "--eval_every", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Two spaces of the same 120 points (phi2 well separated, phi1 a noisy map of it), plus 40 evaluation
    points, written as .npy files."""
    folder = str(tmp_path_factory.mktemp("turtle_data"))
    phi1, phi2, y = blobs(n=160, k=4, d1=16, d2=12, seed=3)
    paths = {"phi1": save_npy(folder, "phi1", phi1[:120]), "phi2": save_npy(folder, "phi2", phi2[:120]),
             "y": save_npy(folder, "y", y[:120]), "phi1_val": save_npy(folder, "phi1_val", phi1[120:]),
             "phi2_val": save_npy(folder, "phi2_val", phi2[120:]), "y_val": save_npy(folder, "y_val", y[120:])}
    return {"folder": folder, "paths": paths, "arrays": (phi1, phi2, y)}


def two_spaces(p):
    return ["--phi_paths", p["phi1"], p["phi2"], "--phi_paths_val", p["phi1_val"], p["phi2_val"],
            "--gt_labels_path", p["y_val"], "--k", "4"]


def run_ok(argv):
    code, out, err = cli(run_turtle.main, argv)
    assert code == 0, err
    return out, err


# ---------------------------------------------------------------- files


def test_predict_labels_new_points_with_turtle_tasks_as_plain_heads_vote(problem, tmp_path):
    """predict.py on a folder of two TURTLE tasks and points they never saw: the labels equal a majority vote of
    the tasks recomputed here from the files with plain nn.Linear heads, scipy's matching and a Counter."""
    import collections
    from scipy.optimize import linear_sum_assignment
    import predict
    out, p = str(tmp_path / "run"), problem["paths"]
    for seed in ("0", "1"):
        run_ok(two_spaces(p) + FAST + ["--exp_path", out, "--seed", seed])
    code, _, err = cli(predict.main, ["--tasks_path", out, "--phi_paths", p["phi1_val"], p["phi2_val"],
                                      "--out", tmp_path / "labels", "--quiet"])
    assert code == 0, err
    preds = {}
    for seed in (0, 1):
        state = torch.load(os.path.join(out, f"turtle_task_{seed}.pt"), weights_only=True)
        probs = 0
        for key, path in [("phi1", "phi1_val"), ("phi2", "phi2_val")]:
            z = torch.from_numpy(np.load(p[path]))
            head = torch.nn.Linear(z.shape[1], 4)
            head.load_state_dict(state[key], strict=True)
            probs = probs + torch.softmax(head(z), 1).detach()
        preds[seed] = probs.argmax(1).numpy()
    cv = {s: pickle.load(open(os.path.join(out, f"results_{s}.pickle"), "rb"))["CV_Score"] for s in (0, 1)}
    best, other = (0, 1) if cv[0] >= cv[1] else (1, 0)
    C = np.zeros((4, 4))
    np.add.at(C, (preds[other], preds[best]), 1)
    rows, cols = linear_sum_assignment(-C)
    aligned = np.array([dict(zip(rows, cols)).get(c, c) for c in preds[other]])
    expected = [min(collections.Counter([a, b]).most_common(), key=lambda t: (-t[1], t[0]))[0]
                for a, b in zip(preds[best], aligned)]
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), expected)



def test_saved_task_loads_strict_into_plain_linear_heads(problem, tmp_path):
    out = str(tmp_path / "run")
    run_ok(two_spaces(problem["paths"]) + FAST + ["--exp_path", out, "--seed", "0"])
    state = torch.load(os.path.join(out, "turtle_task_0.pt"), weights_only=True)
    assert sorted(state) == ["phi1", "phi2"] and all(sorted(s) == ["bias", "weight"] for s in state.values())
    heads = []
    for key, path in [("phi1", "phi1_val"), ("phi2", "phi2_val")]:
        z = torch.from_numpy(np.load(problem["paths"][path]))
        head = torch.nn.Linear(z.shape[1], 4)
        head.load_state_dict(state[key], strict=True)
        heads.append(torch.softmax(head(z), 1))
    with open(os.path.join(out, "results_0.pickle"), "rb") as f:
        res = pickle.load(f)
    np.testing.assert_array_equal(res["preds"], (sum(heads) / 2).argmax(1).numpy())
    assert 0 <= res["CV_Score"] <= 1
    for name in os.listdir(out):  # the paper's scripts must never mistake our files for HUME tasks
        assert not re.fullmatch(r"linear_task_(\d+)\.pt", name)
    assert sorted(os.listdir(out)) == ["hume_0.lock", "metrics_0.jsonl", "owner_0.txt", "results_0.pickle",
                                       "turtle_checkpoint_0.pt", "turtle_task_0.pt"]
    with open(os.path.join(out, "metrics_0.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["iteration"] for r in records] == [2, 4] and all("acc" in r["metrics"] for r in records)


def test_released_layout_evaluates_with_evaluate_py(problem, tmp_path):
    """Two checkpoints in TURTLE's released layout, built with plain torch: evaluate.py scores each and ensembles."""
    phi1, phi2, y = problem["arrays"]
    paths, folder = problem["paths"], str(tmp_path / "released")
    os.makedirs(folder)
    centres = np.stack([phi2[:120][y[:120] == c].mean(0) for c in range(4)])
    expected = {}
    for seed, perm in [(3, [0, 1, 2, 3]), (8, [2, 0, 3, 1])]:
        head1, head2 = torch.nn.Linear(16, 4), torch.nn.Linear(12, 4)
        with torch.no_grad():
            head1.weight.zero_(), head1.bias.zero_()
            head2.weight.copy_(torch.from_numpy(centres[perm]))
            head2.bias.copy_(torch.from_numpy(-0.5 * (centres[perm] ** 2).sum(1)))
        torch.save({"phi1": head1.state_dict(), "phi2": head2.state_dict()},
                   os.path.join(folder, f"turtle_task_{seed}.pt"))
        with open(os.path.join(folder, f"results_{seed}.pickle"), "wb") as f:
            pickle.dump({"CV_Score": 0.5 + seed / 100}, f)
        z1, z2 = (torch.from_numpy(np.load(paths[p])) for p in ("phi1_val", "phi2_val"))
        expected[seed] = ((torch.softmax(head1(z1), 1) + torch.softmax(head2(z2), 1)) / 2).argmax(1).numpy()
    report = str(tmp_path / "eval.json")
    code, _, err = cli(evaluate.main, ["--tasks_path", folder, "--phi_paths", paths["phi1_val"], paths["phi2_val"],
                                       "--gt_labels_path", paths["y_val"], "--json", report, "--quiet"])
    assert code == 0, err
    with open(report) as f:
        out = json.load(f)
    for seed in (3, 8):
        assert out["tasks"][str(seed)]["acc"] == pytest.approx(hungarian_acc(y[120:], expected[seed]))
    assert out["best_cv_seed"] == 8 and out["ensemble"]["acc"] == pytest.approx(hungarian_acc(y[120:], expected[8]))
    code, _, err = cli(evaluate.main, ["--tasks_path", folder, "--phi_paths", paths["phi2_val"], "--quiet"])
    assert code == 2 and err.startswith("error:") and "2 space(s)" in err


def test_resume_equals_uninterrupted_run(problem, tmp_path):
    base = two_spaces(problem["paths"]) + ["--M", "2", "--eval_every", "2", "--ckpt_every", "3", "--device",
                                           "cpu", "--quiet", "--warm_start", "--seed", "1"]
    run_ok(base + ["--T", "6", "--exp_path", str(tmp_path / "a")])
    run_ok(base + ["--T", "3", "--exp_path", str(tmp_path / "b")])
    run_ok(base + ["--T", "6", "--exp_path", str(tmp_path / "b"), "--resume"])
    a, b = (torch.load(str(tmp_path / f / "turtle_task_1.pt"), weights_only=True) for f in "ab")
    for key in a:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name])
    with open(tmp_path / "b" / "metrics_1.jsonl") as f:
        assert [json.loads(line)["iteration"] for line in f] == [2, 3, 4, 6]  # 3: the end of the first run
    code, _, err = cli(run_turtle.main, base + ["--T", "8", "--gamma", "2", "--exp_path", str(tmp_path / "b"),
                                                "--resume"])
    assert code == 2 and "--gamma" in err


def test_an_interrupt_says_how_to_go_on(problem, tmp_path, monkeypatch):
    """Ctrl-C before the first iteration: no checkpoint exists, so the line says to start over; Ctrl-C after two
    iterations: a final checkpoint is written and the line names it with --resume. Exit 130 both times."""
    import signal
    from humelib import turtle_loop
    argv = two_spaces(problem["paths"]) + FAST[2:] + ["--T", "6", "--ckpt_every", "4", "--seed", "0",
                                                      "--exp_path", str(tmp_path / "run")]
    ckpt = tmp_path / "run" / "turtle_checkpoint_0.pt"

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(turtle_loop, "make_turtle_encoder", interrupt)
        code, _, err = cli(run_turtle.main, argv)
    assert code == 130 and not ckpt.exists()
    assert err.strip().splitlines()[-1] == ("interrupted (SIGINT): no checkpoint yet (the first is written at "
                                            "iteration 4): rerun to start over")
    monkeypatch.setattr(turtle_loop, "outer_step", signal_after(turtle_loop.outer_step, 2, signal.SIGINT, []))
    code, _, err = cli(run_turtle.main, argv)
    assert code == 130 and ckpt.exists(), err
    assert torch.load(str(ckpt), weights_only=True)["iteration"] == 2
    assert err.strip().splitlines()[-1] == f"interrupted (SIGINT): rerun the same command with --resume to continue " \
                                           f"from {ckpt}"


def test_recovers_well_separated_labeling(tmp_path):
    _, phi2, y = blobs(n=400, k=5, d1=8, d2=10, seed=7, noise=0.3)
    folder = str(tmp_path)
    argv = ["--phi_paths", save_npy(folder, "phi", phi2), "--gt_labels_path", save_npy(folder, "y", y), "--k", "5",
            "--T", "300", "--outer_lr", "0.01", "--device", "cpu", "--quiet", "--exp_path", folder, "--seed", "0"]
    run_ok(argv)
    with open(os.path.join(folder, "results_0.pickle"), "rb") as f:
        res = pickle.load(f)
    assert hungarian_acc(y, res["preds"]) >= 0.99


def test_demo_runs_inductively(tmp_path):
    run_ok(["--T", "2", "--M", "1", "--device", "cpu", "--quiet", "--exp_path", str(tmp_path), "--seed", "0"])
    with open(tmp_path / "results_0.pickle", "rb") as f:
        res = pickle.load(f)
    assert len(res["preds"]) == 360 and "acc" in res["metrics"]  # the demo's test split


def test_plot_and_annotate_read_a_turtle_folder(problem, tmp_path):
    p, out = problem["paths"], str(tmp_path / "run")
    for seed in ("0", "1"):
        run_ok(two_spaces(p) + FAST + ["--exp_path", out, "--seed", seed])
    code, stdout, err = cli(plot.main, ["--tasks_path", out, "--out", str(tmp_path / "figs")])  # paths as recorded
    assert code == 0, err
    assert len([line for line in stdout.splitlines() if line.endswith(".png")]) == 4
    report = str(tmp_path / "sim.json")
    code, _, err = cli(annotate.main, ["--tasks_path", out, "--phi1_path", p["phi1_val"], "--phi2_path",
                                       p["phi2_val"], "--phi_paths", p["phi1_val"], p["phi2_val"], "--simulate",
                                       "--gt_labels_path", p["y_val"], "--json", report, "--quiet"])
    assert code == 0, err
    assert os.path.isfile(report)


def test_sweep_runs_turtle_seeds_then_evaluates(problem, tmp_path):
    p, exp = problem["paths"], str(tmp_path / "sweep")
    cmd = ["bash", os.path.join(REPO, "sweep.sh"), "--turtle", "--seeds", "0 1", "--jobs", "2", "--eval_phi_paths",
           f"{p['phi1_val']} {p['phi2_val']}", "--eval_labels", p["y_val"], "--"] + two_spaces(p) + FAST + \
        ["--exp_path", exp]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(os.path.join(exp, "evaluation.json")) as f:
        report = json.load(f)
    assert sorted(report["tasks"]) == ["0", "1"] and "acc" in report["ensemble"]
    again = subprocess.run(cmd[:2] + ["--no_eval"] + cmd[2:], cwd=REPO, env=child_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped, its task already exists") == 2


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def bad_cases(p, folder):
    phi2 = np.load(p["phi2"])
    nan = phi2.copy()
    nan[5, 2] = np.nan
    f = lambda name, arr: save_npy(folder, name, arr)
    cases = {
        "rows differ between spaces": ["--phi_paths", p["phi1"], f("short", phi2[:50])],
        "val rows differ": ["--phi_paths", p["phi1"], p["phi2"], "--phi_paths_val", p["phi1_val"], p["phi2"]],
        "nan": ["--phi_paths", f("nan", nan)],
        "1-D array": ["--phi_paths", f("flat", phi2[:, 0])],
        "missing file": ["--phi_paths", p["phi1"], os.path.join(folder, "nope.npy")],
        "one val path missing": ["--phi_paths", p["phi1"], p["phi2"], "--phi_paths_val", p["phi1_val"],
                                 os.path.join(folder, "nope.npy")],
        "val count": ["--phi_paths", p["phi1"], p["phi2"], "--phi_paths_val", p["phi1_val"]],
        "val dimension": ["--phi_paths", p["phi2"], "--phi_paths_val", p["phi1_val"]],
        "labels length": ["--phi_paths", p["phi2"], "--gt_labels_path", p["y_val"]],
        "labels are floats": ["--phi_paths", p["phi2"], "--gt_labels_path", p["phi2"]],
        "val without train": ["--phi_paths_val", p["phi2_val"]],
        "k < 2": ["--phi_paths", p["phi2"], "--k", "1"],
        "k > n": ["--phi_paths", p["phi2"], "--k", "500"],
        "T < 0": ["--T", "-1"], "M = 0": ["--M", "0"], "inner_lr 0": ["--inner_lr", "0"],
        "outer_lr < 0": ["--outer_lr", "-1"], "gamma < 0": ["--gamma", "-1"], "batch_size 0": ["--batch_size", "0"],
        "eval_every 0": ["--eval_every", "0"], "T not a number": ["--T", "many"],
        "unknown flag": ["--num_iters", "3"], "abbreviated flag": ["--warm"],
    }
    if not torch.cuda.is_available():
        cases["no cuda"] = ["--device", "cuda"]
    return cases


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(problem, tmp_path):
    failures = []
    for name, argv in bad_cases(problem["paths"], str(tmp_path / "inputs")).items():
        out = str(tmp_path / "out" / name.replace(" ", "_"))
        code, stdout, err = cli(run_turtle.main, argv + ["--exp_path", out, "--quiet"])
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error:") or os.path.exists(out):
            failures.append(f"{name}: exit {code}, stderr {err!r}, wrote {os.path.exists(out)}")
    assert not failures, "\n".join(failures)


def test_predict_needs_exactly_one_kind_of_points(problem, tmp_path):
    import predict
    from helpers import refused
    p = problem["paths"]
    for extra in ([], ["--phi1_path", p["phi1"], "--phi_paths", p["phi2"]]):
        refused(cli(predict.main, ["--tasks_path", str(tmp_path), "--out", tmp_path / "o"] + extra),
                "--phi1_path", "--phi_paths")
    assert not os.listdir(tmp_path)
