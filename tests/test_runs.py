"""Whole hume.py runs: resume equals an uninterrupted run, --mmap equals in-memory, adjoint equals unrolled."""
import os
import subprocess
import sys

import torch

from helpers import REPO, write_problem

BUDGET = ["--k", "4", "--num_subsets", "3", "--adaptation_steps", "10", "--subset_size", "120", "--outer_lr", "0.01",
          "--inner_lr", "auto", "--device", "cpu", "--quiet", "--seed", "3"]


def run(args, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "hume.py")] + args, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), cwd=REPO)


def task(folder, seed=3):
    return torch.load(os.path.join(folder, f"linear_task_{seed}.pt"), weights_only=True)


def paths(p, val=False):
    out = ["--phi1_path", p["phi1"], "--phi2_path", p["phi2"]]
    if val:
        out += ["--phi1_path_val", p["phi1_val"], "--phi2_path_val", p["phi2_val"], "--gt_labels_path",
                p["labels_val"]]
    return out


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    p = write_problem(str(tmp_path / "data"), n=200)
    common = paths(p) + BUDGET + ["--num_iters", "8", "--ckpt_every", "2", "--eval_every", "1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert run(common + ["--exp_path", full]).returncode == 0
    killed = run(common + ["--exp_path", cut], env={"HUME_TEST_KILL_AT": "4"})
    assert killed.returncode == 137
    assert os.path.isfile(os.path.join(cut, "checkpoint_3.pt"))
    assert not os.path.exists(os.path.join(cut, "linear_task_3.pt"))
    resumed = run(common + ["--exp_path", cut, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = task(full), task(cut)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [line for line in open(os.path.join(cut, "metrics_3.jsonl"))]
    assert len(log) == 8  # iterations 1..8 once each: lines after the checkpoint were dropped, then rewritten


def test_resume_refuses_changed_settings(tmp_path):
    p = write_problem(str(tmp_path / "data"), n=200)
    common = paths(p) + BUDGET + ["--num_iters", "4", "--ckpt_every", "2", "--exp_path", str(tmp_path / "r")]
    assert run(common, env={"HUME_TEST_KILL_AT": "2"}).returncode == 137
    out = run(common + ["--resume", "--H_reg", "5"])
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--H_reg" in out.stderr and "Traceback" not in out.stderr


def test_mmap_gives_the_same_task_as_in_memory(tmp_path):
    import hume
    p = write_problem(str(tmp_path / "data"), n=300, n_val=60)
    common = paths(p, val=True) + BUDGET + ["--num_iters", "4"]
    hume.main(common + ["--exp_path", str(tmp_path / "mem")])
    hume.main(common + ["--exp_path", str(tmp_path / "mmap"), "--mmap"])
    a, b = task(str(tmp_path / "mem")), task(str(tmp_path / "mmap"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_adjoint_and_unrolled_runs_give_the_same_task(tmp_path):
    import hume
    p = write_problem(str(tmp_path / "data"), n=200)
    common = paths(p) + BUDGET + ["--num_iters", "3"]
    hume.main(common + ["--exp_path", str(tmp_path / "adj"), "--hypergrad", "adjoint"])
    hume.main(common + ["--exp_path", str(tmp_path / "unr"), "--hypergrad", "unrolled"])
    a, b = task(str(tmp_path / "adj")), task(str(tmp_path / "unr"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
