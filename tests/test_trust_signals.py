"""Interruptions and concurrent runs: SIGTERM (SLURM's time-out/preemption) stops hume.py between iterations
with a final checkpoint, exit 143 and a message saying how to continue, and the resumed run equals an uninterrupted
one; a second run of the same seed into the same folder is refused; sweep.sh runs a repeated seed once."""
import os
import signal
import subprocess
import sys
import time

import torch

import hume
from humelib import outer, run_folder
from helpers import FAST, KERNEL, REPO, child_env, cli, refused, signal_after, temp_files, write_problem
from test_sweep import SWEEP, bash, stand_ins

BUDGET = ["--k", "4", "--num_subsets", "2", "--adaptation_steps", "5", "--subset_size", "100", "--outer_lr", "0.01",
          "--inner_lr", "auto", "--device", "cpu", "--quiet", "--seed", "0", "--num_iters", "150",
          "--ckpt_every", "25", "--eval_every", "5"] + KERNEL


def flags(P, folder):
    return ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--gt_labels_path", P["labels"],
            "--exp_path", folder] + BUDGET


def task(folder):
    return torch.load(os.path.join(folder, "linear_task_0.pt"), weights_only=True)


def test_sigterm_checkpoints_says_resume_exits_143_and_resume_equals_uninterrupted(tmp_path):
    P = write_problem(str(tmp_path / "data"), n=200)
    cut, full = str(tmp_path / "cut"), str(tmp_path / "full")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "hume.py")] + flags(P, cut), cwd=REPO,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = os.path.join(cut, "checkpoint_0.pt")
    deadline = time.time() + 120
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted (SIGTERM)")
    assert "--resume" in err and not temp_files(cut)
    assert not os.path.exists(os.path.join(cut, "linear_task_0.pt"))
    stopped_at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 25 <= stopped_at < 150  # the final checkpoint is at the iteration the signal let finish
    assert cli(hume.main, flags(P, cut) + ["--resume"])[0] == 0
    assert cli(hume.main, flags(P, full))[0] == 0
    a, b = task(full), task(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    iterations = [int(ln.split('"iteration": ')[1].split(",")[0]) for ln in open(os.path.join(cut, "metrics_0.jsonl"))]
    assert iterations == list(range(5, 151, 5))


def test_second_run_of_the_same_seed_into_the_same_folder_is_refused(tmp_path):
    P = write_problem(str(tmp_path / "data"), n=200)
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    small = ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--exp_path", folder, "--k", "4", "--seed", "0"] + FAST
    with run_folder.Run(folder, 0, "hume").lock():  # the first run, still going
        refused(cli(hume.main, small), "seed 0 is already running", "--exp_path")
        assert sorted(os.listdir(folder)) == ["hume_0.lock"]
    assert cli(hume.main, small)[0] == 0  # the lock went with the first run


def test_lock_name_never_matches_the_papers_file_names(tmp_path):
    import re
    with run_folder.Run(str(tmp_path), 7, "hume").lock() as path:
        name = os.path.basename(path)
    assert not re.fullmatch(r"linear_task_(\d+)\.pt", name) and not re.fullmatch(r"results_(\d+)\.pickle", name)


def test_sweep_runs_a_repeated_seed_once(tmp_path):
    env = stand_ins(str(tmp_path / "bin"), gpus=0)
    exp = tmp_path / "exp"
    proc = bash(SWEEP, ["--seeds", "3 3 4 3", "--no_eval", "--", "--exp_path", exp], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert "2 seed(s) to run" in proc.stdout and "seed 3: given more than once" in proc.stdout
    assert sum("--seed 3" in ln for ln in (exp / "log_3.txt").read_text().splitlines() if ln.startswith("GPU=")) == 1


def test_a_signal_in_the_last_iteration_checkpoints_it_and_resume_only_finishes(tmp_path, monkeypatch):
    P = write_problem(str(tmp_path / "data"), n=200)
    folder = str(tmp_path / "run")
    argv = ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--exp_path", folder, "--k", "4", "--seed", "0",
            "--ckpt_every", "50"] + FAST  # 3 iterations
    calls = []  # SIGTERM arrives while the last iteration runs
    monkeypatch.setattr(outer, "outer_step", signal_after(outer.outer_step, 3, signal.SIGTERM, calls))
    code, _, err = cli(hume.main, argv)
    assert code == 143 and "--resume" in err.strip().splitlines()[-1]
    assert torch.load(os.path.join(folder, "checkpoint_0.pt"), weights_only=True)["iteration"] == 3
    assert not os.path.exists(os.path.join(folder, "linear_task_0.pt")) and not temp_files(folder)
    assert cli(hume.main, argv + ["--resume"])[0] == 0
    assert len(calls) == 3 and os.path.exists(os.path.join(folder, "results_0.pickle"))
