"""One HUME run over 2 CPU processes (torchrun, gloo, localhost) equals a single-process run. The single-process
runs (the reference, the refused world setups: refused before any process group) run hume.py's main in process."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import hume
from helpers import KERNEL, REPO, cli, write_problem

BUDGET = ["--k", "4", "--num_subsets", "3", "--adaptation_steps", "8", "--subset_size", "120", "--outer_lr", "0.01",
          "--inner_lr", "auto", "--device", "cpu", "--seed", "1", "--eval_every", "2", "--quiet"] + KERNEL


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(args, nproc=2, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", free_port(), "hume.py"] + args
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def task(folder):
    return torch.load(os.path.join(folder, "linear_task_1.pt"), weights_only=True)


def problem_args(tmp_path):
    p = write_problem(str(tmp_path / "data"), n=200)
    return ["--phi1_path", p["phi1"], "--phi2_path", p["phi2"], "--gt_labels_path", p["labels"]] + BUDGET


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A 6-iteration run over 2 processes (checkpoints every 2) and its inputs."""
    tmp = tmp_path_factory.mktemp("torchrun")
    common = problem_args(tmp) + ["--ckpt_every", "2"]
    out = torchrun(common + ["--num_iters", "6", "--exp_path", str(tmp / "two")])
    assert out.returncode == 0, out.stderr[-2000:]
    return common, str(tmp / "two")


def test_two_processes_give_the_single_process_task_odd_subsets(two_process_run, tmp_path):
    common, two = two_process_run
    one = str(tmp_path / "one")
    assert cli(hume.main, common + ["--num_iters", "6", "--exp_path", one])[0] == 0
    a, b = task(one), task(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # only rank 0 writes: the same files, and each metrics line once
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    assert len(open(os.path.join(two, "metrics_1.jsonl")).readlines()) == 3


def test_resumed_two_process_run_equals_uninterrupted(two_process_run, tmp_path):
    """A 4-iteration run leaves its checkpoint of iteration 2; resumed to 6 iterations it must equal the
    6-iteration run (the schedule does not depend on --num_iters)."""
    common, full = two_process_run
    cut = str(tmp_path / "cut")
    assert torchrun(common + ["--num_iters", "4", "--exp_path", cut]).returncode == 0
    assert os.path.isfile(os.path.join(cut, "checkpoint_1.pt"))
    out = torchrun(common + ["--num_iters", "6", "--exp_path", cut, "--resume"])
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = task(full), task(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_world_setups_exit_2_with_one_line(tmp_path, monkeypatch):
    common = problem_args(tmp_path) + ["--num_iters", "2", "--exp_path", str(tmp_path / "out")]
    no_master = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    more_ranks = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": free_port()}
    for env, words in ((no_master, "MASTER_ADDR"), (more_ranks, "--num_subsets")):
        with monkeypatch.context() as m:  # the environment torchrun would give this process
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                m.delenv(var, raising=False)
            for var, value in env.items():
                m.setenv(var, value)
            code, out, err = cli(hume.main, common)
        assert code == 2
        assert err.startswith("error:") and err.count("\n") == 1 and words in err
        assert "Traceback" not in err + out
    assert not os.path.exists(tmp_path / "out")
