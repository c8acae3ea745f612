"""extract.py's command line: data sets and image folders -> phi arrays, labels and sources in the paper's layout;
bad inputs (exit 2, one line, nothing written); the arrays feeding hume.py and evaluate.py. Offline: FakeData, tiny
image folders, random weights. The backbones and their weights: tests/test_backbones.py."""
import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import torchvision
from PIL import Image

import extract
from helpers import KERNEL, describe, run_chain_in_process
from helpers import cli as run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAST = ["--image_size", "32", "--batch_size", "8", "--num_workers", "0", "--device", "cpu"]


def cli(*argv):
    """extract.py's main run in process as the script runs it: (exit code, stdout, stderr)."""
    return run_main(extract.main, argv)


def fake(out, *extra, size=12):
    """Arguments for a small FakeData run through resnet18; later flags in extra override earlier ones."""
    return ["--dataset", "fake", "--fake_size", size, "--split", "train", "--arch", "resnet18", "--out", out,
            *FAST, *extra]


def written(folder):
    return sorted(f for _, _, files in os.walk(folder) for f in files) if os.path.isdir(folder) else []


def assert_failed_cleanly(code, err, folder):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert written(folder) == [], "a failed run left files behind"


# ---------------------------------------------------------------- outputs

def test_fakedata_gives_unit_norm_float32_rows_labels_and_identical_reruns(tmp_path):
    out = tmp_path / "data" / "representations" / "random"
    code, log, err = cli(*fake(out, "--weights", "none", "--l2"))
    assert code == 0, err
    phi = np.load(out / "faketrain_l2.npy")
    assert phi.shape == (12, 512) and phi.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(phi, axis=1), 1.0, atol=1e-5)
    labels = np.load(tmp_path / "data" / "labels" / "faketrain_targets.npy")  # paper layout: data/labels/
    assert labels.shape == (12,) and labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 10
    assert "images/s" in log
    assert cli(*fake(out, "--weights", "none", "--l2"))[0] == 0
    np.testing.assert_array_equal(np.load(out / "faketrain_l2.npy"), phi)
    assert written(out) == ["faketrain_l2.npy", "faketrain_l2.sources.txt"]  # no temporary files left
    assert (out / "faketrain_l2.sources.txt").read_text().splitlines() == [f"fake:train:{i}" for i in range(12)]


def image_folder(root, rng, counts=(("cat", 3), ("dog", 2))):
    """root/CLASS/*.png|jpg of varied sizes and modes (resize, crop and RGB conversion must cope); returns the
    files in ImageFolder's order (classes sorted, then file names sorted)."""
    for cls, n in counts:
        os.makedirs(root / cls)
        for i in range(n):
            size = (40 + 7 * i, 30 + 5 * i)
            Image.fromarray(rng.integers(0, 255, size[::-1] + (3,), dtype=np.uint8)).save(root / cls / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (33, 35), dtype=np.uint8)).save(root / cls / "gray.jpg")
    return [root / cls / f for cls, _ in sorted(counts) for f in sorted(os.listdir(root / cls))]


def test_imagefolder_labels_follow_class_folders_and_sources_list_the_files_row_by_row(tmp_path, monkeypatch):
    files = image_folder(tmp_path / "imgs", np.random.default_rng(0))
    out = tmp_path / "reps"
    monkeypatch.chdir(tmp_path)  # a relative --root still gives absolute sources
    code, _, err = cli("--dataset", "imagefolder", "--root", "imgs", "--split", "test",
                       "--name", "pets", "--arch", "resnet18", "--weights", "none", "--out", out, *FAST)
    assert code == 0, err
    assert np.load(out / "petstest.npy").shape == (7, 512)
    np.testing.assert_array_equal(np.load(out / "petstest_targets.npy"), [0, 0, 0, 0, 1, 1, 1])
    assert (out / "petstest.sources.txt").read_text().splitlines() == [str(f) for f in files]


def test_cifar100_20_labels_are_the_coarse_superclasses(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    coarse = {}
    for split, n in [("train", 12), ("test", 6)]:
        coarse[split] = rng.integers(0, 20, n).tolist()
        entry = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "coarse_labels": coarse[split],
                 "fine_labels": rng.integers(0, 100, n).tolist()}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, f)
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ["train", "test", "meta"]}
    cifar = torchvision.datasets.CIFAR100  # the fakes stand in for the real files: only their checksums differ
    monkeypatch.setattr(cifar, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(cifar, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5["meta"]})
    out = tmp_path / "data" / "representations" / "random"
    for split, expected in [("train", coarse["train"]), ("traintest", coarse["train"] + coarse["test"])]:
        code, _, err = cli("--dataset", "cifar100-20", "--root", tmp_path, "--split", split,
                           "--arch", "resnet18", "--weights", "none", "--out", out, *FAST)
        assert code == 0, err
        assert np.load(out / f"cifar100-20{split}.npy").shape == (len(expected), 512)
        np.testing.assert_array_equal(np.load(tmp_path / "data" / "labels" / f"cifar100-20{split}_targets.npy"),
                                      expected)
    sources = (out / "cifar100-20traintest.sources.txt").read_text().splitlines()
    assert sources == [f"cifar100-20:train:{i}" for i in range(12)] + [f"cifar100-20:test:{i}" for i in range(6)]


def test_amp_features_stay_close_to_float32(tmp_path):
    phis = {}
    for name, extra in [("fp32", []), ("amp", ["--amp"])]:
        code, _, err = cli(*fake(tmp_path / name, "--arch", "vit_tiny_patch16_224", "--weights", "none", *extra,
                                 size=8))
        assert code == 0, err
        phis[name] = np.load(tmp_path / name / "faketrain.npy")
    assert phis["amp"].dtype == np.float32 and not np.array_equal(phis["amp"], phis["fp32"])  # bf16 did run
    cos = np.sum(phis["amp"] * phis["fp32"], 1) / np.linalg.norm(phis["amp"], axis=1) / np.linalg.norm(
        phis["fp32"], axis=1)
    assert cos.min() > 0.99, cos


# ---------------------------------------------------------------- bad inputs: exit 2, one line, nothing written

def test_unknown_arch_exits_2_with_one_line_from_the_command_line(tmp_path):
    out = tmp_path / "reps"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "extract.py"),
                        *map(str, fake(out, "--weights", "none", "--arch", "resnet19"))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "resnet18" in r.stderr, r.stderr
    assert written(out) == []


def test_unknown_dataset_exits_2(tmp_path):
    code, _, err = cli(*fake(tmp_path / "reps", "--weights", "none", "--dataset", "mnist"))
    assert_failed_cleanly(code, err, tmp_path / "reps")


def test_missing_root_exits_2(tmp_path):
    out = tmp_path / "reps"
    code, _, err = cli("--dataset", "cifar10", "--root", tmp_path / "nowhere", "--arch", "resnet18",
                       "--weights", "none", "--out", out, *FAST)
    assert_failed_cleanly(code, err, out)
    assert "--root" in err


def test_output_folder_not_writable_exits_2(tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = cli(*fake(tmp_path / "file" / "reps", "--weights", "none"))
    assert code == 2 and err.count("\n") == 1 and "--out" in err, err
    if os.geteuid() != 0:  # root writes anywhere
        os.makedirs(tmp_path / "locked")
        os.chmod(tmp_path / "locked", 0o555)
        code, _, err = cli(*fake(tmp_path / "locked", "--weights", "none"))
        assert_failed_cleanly(code, err, tmp_path / "locked")


def test_unreadable_image_midway_leaves_nothing_behind(tmp_path):
    os.makedirs(tmp_path / "imgs" / "a")
    for i in range(9):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    (tmp_path / "imgs" / "a" / "9.png").write_bytes(b"not an image")  # in the second batch
    out = tmp_path / "data" / "representations" / "x"
    code, _, err = cli("--dataset", "imagefolder", "--root", tmp_path / "imgs", "--arch", "resnet18",
                       "--weights", "none", "--out", out, *FAST)
    assert_failed_cleanly(code, err, tmp_path / "data")
    assert "9.png" in err


# ---------------------------------------------------------------- end to end

def test_extracted_arrays_feed_hume_and_evaluate(tmp_path):
    """The arrays as written, read by hume.py and evaluate.py (their main in process; the files are the point)."""
    reps = tmp_path / "data" / "representations"
    assert cli(*fake(reps / "a", "--weights", "none", "--l2", size=120))[0] == 0
    assert cli(*fake(reps / "b", "--weights", "none", "--seed", 1, size=120))[0] == 0
    phi1, phi2 = reps / "a" / "faketrain_l2.npy", reps / "b" / "faketrain.npy"
    labels, tasks = tmp_path / "data" / "labels" / "faketrain_targets.npy", tmp_path / "tasks"
    procs = run_chain_in_process([
        ("hume.py", ["--phi1_path", phi1, "--phi2_path", phi2, "--gt_labels_path", labels, "--k", 10,
                     "--num_iters", 3, "--num_subsets", 2, "--adaptation_steps", 5, "--subset_size", 100,
                     "--exp_path", tasks, "--seed", 0, "--device", "cpu", *KERNEL]),
        ("evaluate.py", ["--phi1_path", phi1, "--tasks_path", tasks, "--gt_labels_path", labels])])
    assert len(procs) == 2 and all(p.returncode == 0 for p in procs), describe(procs[-1])
    assert (tasks / "linear_task_0.pt").exists() and (tasks / "results_0.pickle").exists()
