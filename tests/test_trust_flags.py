"""Degenerate flags and inputs end in one line naming the flag or file, before anything is written: non-finite
floats, a seed outside numpy's range, devices torch cannot use, arrays with no variance, zero rows under
--normalize, output paths that cannot work. A diverging run names the flag that most likely caused it."""
import os

import numpy as np
import pytest
import torch

import hume
from helpers import FAST, cli, refused, save_npy, write_problem


@pytest.fixture(scope="module")
def P(tmp_path_factory):
    return write_problem(str(tmp_path_factory.mktemp("data")), n=200, k=4)


def flags(P, folder, **override):
    f = {"phi1_path": P["phi1"], "phi2_path": P["phi2"], "k": "4", "exp_path": folder}
    f.update(override)
    return FAST + [a for k, v in f.items() for a in (f"--{k}", v)]  # after FAST: an override wins


NO_CUDA = "cuda" if not torch.cuda.is_available() else "cuda:99"
FLAG_CASES = [
    ({"outer_lr": "inf"}, "--outer_lr must be a finite number"),
    ({"outer_lr": "nan"}, "--outer_lr must be a finite number"),
    ({"H_reg": "nan"}, "--H_reg must be a finite number"),
    ({"H_reg": "inf"}, "--H_reg must be a finite number"),
    ({"inner_lr": "inf"}, "--inner_lr must be a finite number"),
    ({"inner_lr": "nan"}, "--inner_lr must be a finite number"),
    ({"tau": "nan"}, "--tau must be a finite number"),
    ({"tau": "inf"}, "--tau must be a finite number"),
    ({"train_fraction": "nan"}, "--train_fraction must be a finite number"),
    ({"seed": "-1"}, "--seed must be between 0 and 2**32 - 1"),
    ({"seed": str(2 ** 32)}, "--seed must be between 0 and 2**32 - 1"),
    ({"device": "tpu"}, "--device tpu"),
    ({"device": "meta"}, "--device meta: HUME runs on cpu, cuda or mps"),
    ({"device": "garbage!"}, "--device garbage!: not a torch device"),
    ({"device": NO_CUDA}, f"--device {NO_CUDA}"),
]
if not torch.backends.mps.is_available():
    FLAG_CASES.append(({"device": "mps"}, "--device mps: MPS is not available"))


@pytest.mark.parametrize("override, needle", FLAG_CASES, ids=[f"{list(o)[0]}={list(o.values())[0]}"
                                                                for o, _ in FLAG_CASES])
def test_bad_flag_is_one_line_and_writes_nothing(P, tmp_path, override, needle):
    folder = str(tmp_path / "run")
    refused(cli(hume.main, flags(P, folder, **override)), needle)
    assert not os.path.exists(folder)


def arrays(P, tmp_path, which):
    phi1, phi2 = np.load(P["phi1"]), np.load(P["phi2"])
    if which == "phi2 constant":
        phi2 = np.tile(phi2[:1], (len(phi2), 1))
    elif which == "phi2 zero":
        phi2 = np.zeros_like(phi2)
    elif which == "phi1 constant":
        phi1 = np.tile(phi1[:1], (len(phi1), 1))
    elif which == "phi2 beyond float32":
        phi2 = phi2.astype(np.float64)
        phi2[5, 0] = 1e300
    elif which == "phi1 zero rows":
        phi1 = phi1.copy()
        phi1[[3, 7]] = 0
    return save_npy(str(tmp_path), "phi1", phi1), save_npy(str(tmp_path), "phi2", phi2)


@pytest.mark.parametrize("which, extra, needle", [
    ("phi2 constant", [], "--phi2_path"), ("phi2 zero", ["--inner_lr", "auto"], "--phi2_path"),
    ("phi1 constant", [], "--phi1_path"), ("phi1 zero rows", ["--normalize"], "2 row(s) are all zeros"),
    ("phi2 beyond float32", [], "beyond float32's range (first at row 5)"),
])
def test_degenerate_arrays_are_refused(P, tmp_path, which, extra, needle):
    phi1, phi2 = arrays(P, tmp_path, which)
    folder = str(tmp_path / "run")
    line = refused(cli(hume.main, flags(P, folder, phi1_path=phi1, phi2_path=phi2) + extra), needle)
    assert ("no variance" in line) == ("constant" in which or "zero" == which[-4:]) and not os.path.exists(folder)


def test_divergence_names_the_inner_lr(P, tmp_path):
    argv = flags(P, str(tmp_path / "run"), inner_lr="1e30", adaptation_steps="20")
    refused(cli(hume.main, argv), "became", "lower --inner_lr")


def test_exp_path_that_is_a_file_is_refused(P, tmp_path):
    path = tmp_path / "exp"
    path.write_text("not a folder")
    refused(cli(hume.main, flags(P, str(path))), "--exp_path", "a file of that name exists")
    assert path.read_text() == "not a folder"


def test_an_output_name_taken_by_a_folder_is_refused_before_work(P, tmp_path):
    folder = tmp_path / "run"
    (folder / "results_42.pickle").mkdir(parents=True)
    refused(cli(hume.main, flags(P, str(folder), seed="42")), "results_42.pickle: is a folder")
    assert sorted(os.listdir(folder)) == ["results_42.pickle"]
