"""--resume never continues a different run: a changed objective setting (--inner_lr value or 'auto', --normalize),
arrays of other shapes, a foreign or damaged checkpoint, or one past --num_iters end in one line; --mmap (which
changes nothing) resumes."""
import os
import shutil

import numpy as np
import pytest
import torch

import hume
from helpers import KERNEL, cli, refused, save_npy, write_problem

BUDGET = ["--k", "4", "--num_subsets", "2", "--adaptation_steps", "5", "--subset_size", "100", "--device", "cpu",
          "--quiet", "--seed", "0", "--num_iters", "4", "--ckpt_every", "2"] + KERNEL


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished run whose folder holds checkpoint_0.pt at iteration 2; each test works on a copy."""
    root = tmp_path_factory.mktemp("resume")
    P = write_problem(str(root / "data"), n=200)
    argv = ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--exp_path", str(root / "run")] + BUDGET
    assert cli(hume.main, argv)[0] == 0
    return P, str(root / "run"), argv


@pytest.fixture
def run(done, tmp_path):
    P, folder, argv = done
    copy = str(tmp_path / "run")
    shutil.copytree(folder, copy)
    return P, copy, [copy if a == folder else a for a in argv] + ["--resume"]


@pytest.mark.parametrize("extra, needle", [
    (["--inner_lr", "0.01"], "--inner_lr 0.001 (now 0.01)"),
    (["--inner_lr", "auto"], "--inner_lr 0.001 (now 'auto')"),
    (["--normalize"], "--normalize False (now True)"),
    (["--H_reg", "5"], "--H_reg 10.0 (now 5.0)"),
    (["--num_iters", "1"], "past --num_iters 1"),
])
def test_resume_refuses_a_different_run(run, extra, needle):
    _, folder, argv = run
    before = sorted(os.listdir(folder))
    refused(cli(hume.main, argv + extra), "--resume", needle)
    assert sorted(os.listdir(folder)) == before


def test_resume_refuses_arrays_of_other_shapes(run):
    P, folder, argv = run
    save_npy(os.path.dirname(P["phi2"]) + "_other", "phi2", np.load(P["phi2"])[:, :8])
    other = os.path.join(os.path.dirname(P["phi2"]) + "_other", "phi2.npy")
    shutil.copy(P["phi2"], P["phi2"] + ".bak")
    try:
        shutil.copy(other, P["phi2"])  # same path, other content
        refused(cli(hume.main, argv), "shapes", "[200, 12]", "[200, 8]")
    finally:
        shutil.move(P["phi2"] + ".bak", P["phi2"])


@pytest.mark.parametrize("content", [{"a": 1}, [1, 2, 3], "truncated", "tuple-rng"])
def test_resume_refuses_a_foreign_or_damaged_checkpoint_in_one_line(run, content):
    _, folder, argv = run
    path = os.path.join(folder, "checkpoint_0.pt")
    if content == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif content == "tuple-rng":  # an old-style checkpoint: numpy's RNG state as numpy objects
        state = torch.load(path, weights_only=True)
        state["numpy_rng"] = np.random.get_state()
        torch.save(state, path)
    else:
        torch.save(content, path)
    refused(cli(hume.main, argv), "checkpoint_0.pt")


def test_resume_with_a_checkpoint_of_wrong_tensor_shapes_is_one_line(run):
    _, folder, argv = run
    path = os.path.join(folder, "checkpoint_0.pt")
    state = torch.load(path, weights_only=True)
    state["encoder"] = {k: torch.zeros(3, 3) for k in state["encoder"]}
    torch.save(state, path)
    refused(cli(hume.main, argv), "checkpoint_0.pt", "not a checkpoint written by this version")


def test_mmap_does_not_change_the_run_so_it_resumes(run):
    _, folder, argv = run
    assert cli(hume.main, argv + ["--mmap"])[0] == 0


@pytest.mark.parametrize("damage", ["extra not a dict", "seconds text", "w0 without --no_rand_init",
                                    "adam moment shape"])
def test_resume_refuses_a_checkpoint_with_damaged_run_state(run, damage):
    _, folder, argv = run
    path = os.path.join(folder, "checkpoint_0.pt")
    state = torch.load(path, weights_only=True)
    if damage == "extra not a dict":
        state["extra"] = "garbage"
    elif damage == "seconds text":
        state["extra"]["seconds"] = "long"
    elif damage == "w0 without --no_rand_init":
        state["extra"]["w0_fixed"] = [torch.zeros(2, 2)]
    else:
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2, 2)
    torch.save(state, path)
    refused(cli(hume.main, argv), "checkpoint_0.pt", "delete it to start over")


def test_a_planted_symlink_as_the_log_is_never_followed(run, tmp_path):
    _, folder, argv = run
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    log = os.path.join(folder, "metrics_0.jsonl")
    os.remove(log)
    os.symlink(victim, log)
    refused(cli(hume.main, argv), "metrics_0.jsonl: is a symbolic link")  # --resume
    refused(cli(hume.main, [a for a in argv if a != "--resume"]), "metrics_0.jsonl: is a symbolic link")  # fresh
    assert victim.read_text() == "precious\n" and os.path.islink(log)  # refused, neither followed nor replaced


def test_a_planted_symlink_as_the_lock_is_refused_not_followed(run, tmp_path):
    _, folder, argv = run
    os.remove(os.path.join(folder, "hume_0.lock"))
    os.symlink(tmp_path / "elsewhere.lock", os.path.join(folder, "hume_0.lock"))
    refused(cli(hume.main, argv), "hume_0.lock", "symbolic link")
    assert not (tmp_path / "elsewhere.lock").exists()
