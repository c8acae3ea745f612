"""extract.py: images -> phi arrays in the paper's layout. Offline: FakeData, tiny image folders, random weights."""
import argparse
import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import extract
from helpers import cli as run_main
from humelib import backbones

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


@pytest.mark.parametrize("arch,dim,size", [("resnet50", 2048, 32), ("vit_b_16", 768, 224),
                                           ("efficientnet_b0", 1280, 32), ("mobilenet_v3_small", 1024, 32)])
def test_models_output_penultimate_features(arch, dim, size):
    model, _ = backbones.torchvision_model(arch, "none")
    with torch.inference_mode():
        assert model(torch.randn(2, 3, size, size)).shape == (2, dim)


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


# ---------------------------------------------------------------- weights

def random_state_dict(arch, seed):
    torch.manual_seed(seed)
    return torchvision.models.get_model(arch).state_dict()


CHECKPOINT_STYLES = [  # (prefix of the backbone to load, prefix of its momentum copy, flags the backbone needs)
    ("module.encoder_q.", "module.encoder_k.", []),  # MoCo v2
    ("backbone.", "momentum_backbone.", ["--cifar_stem", "--image_size", 16]),  # solo-learn, CIFAR ResNet stem
]


@pytest.mark.parametrize("keep,drop,stem", CHECKPOINT_STYLES)
def test_self_supervised_checkpoint_gives_the_features_of_its_clean_state_dict(tmp_path, keep, drop, stem):
    sd = random_state_dict("resnet18", seed=1)
    if stem:
        sd["conv1.weight"] = torch.randn(64, 3, 3, 3)
    torch.save(sd, tmp_path / "clean.pth")
    wrapped = {keep + k: v for k, v in sd.items()}  # includes the fc head, which must be ignored
    wrapped.update({drop + k: v + 1 for k, v in sd.items()})  # the momentum copy: as many matches, not the one
    wrapped.update({keep + "fc.0.weight": torch.randn(512, 512), "module.queue": torch.randn(128, 64)})
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": wrapped}, tmp_path / "ssl.pth.tar")
    phis, logs = {}, {}
    for name, weights in [("clean", tmp_path / "clean.pth"), ("ssl", tmp_path / "ssl.pth.tar"), ("random", "none")]:
        code, logs[name], err = cli(*fake(tmp_path / name, "--weights", weights, *stem, size=8))
        assert code == 0, err
        phis[name] = np.load(tmp_path / name / "faketrain.npy")
    assert f"prefix '{keep}' stripped" in logs["ssl"]
    np.testing.assert_array_equal(phis["ssl"], phis["clean"])
    assert not np.allclose(phis["random"], phis["clean"])


def test_torchvision_weights_name_loads_from_torch_cache_offline(tmp_path, monkeypatch):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    os.makedirs(cache)
    torch.save(random_state_dict("resnet18", seed=2), cache / os.path.basename(weights.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model, registry = backbones.torchvision_model("resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    assert registry is weights
    assert backbones.make_transform(registry, None, None, None).crop_size == [224]  # the weights' own preprocessing
    torch.manual_seed(2)
    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference.eval()(x))


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


@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])  # extra blocks; other tensor shapes
def test_checkpoint_of_another_architecture_exits_2(tmp_path, arch):
    torch.save({"state_dict": {"module." + k: v for k, v in random_state_dict(arch, 0).items()}},
               tmp_path / "other.pth")
    out = tmp_path / "reps"
    code, _, err = cli(*fake(out, "--weights", tmp_path / "other.pth"))
    assert_failed_cleanly(code, err, out)
    assert "another architecture" in err


def test_unknown_weights_name_and_pickled_objects_exit_2(tmp_path):
    out = tmp_path / "reps"
    code, _, err = cli(*fake(out, "--weights", "ResNet50_Weights.IMAGENET1K_V2"))
    assert_failed_cleanly(code, err, out)
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "objects.pth")  # DINO-style
    code, _, err = cli(*fake(out, "--weights", tmp_path / "objects.pth"))
    assert_failed_cleanly(code, err, out)
    assert "re-save" in err


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


def test_model_that_cannot_take_the_image_size_exits_2(tmp_path):
    out = tmp_path / "reps"
    code, _, err = cli(*fake(out, "--weights", "none", size=2), "--arch", "vit_b_16")
    assert_failed_cleanly(code, err, out)
    assert "--image_size" in err


# ---------------------------------------------------------------- timm backbones (random init or local files)

TIMM = [("vit_tiny_patch16_224", 192, 32), ("vit_small_patch14_dinov2.lvd142m", 384, 28)]  # 2x2 patches


@pytest.mark.parametrize("arch,dim,size", TIMM)
def test_timm_vit_gives_pre_logits_rows_unit_with_l2_and_identical_reruns(tmp_path, arch, dim, size):
    argv = fake(tmp_path, "--arch", arch, "--weights", "none", "--image_size", size, "--l2", size=6)
    code, log, err = cli(*argv)
    assert code == 0, err
    phi = np.load(tmp_path / "faketrain_l2.npy")
    assert phi.shape == (6, dim) and phi.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(phi, axis=1), 1.0, atol=1e-5)
    assert f"input_size (3, {size}, {size})" in log  # the model's data config, resized
    assert cli(*argv)[0] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "faketrain_l2.npy"), phi)


def timm_reference(arch, state_dict, images, size, crop_pct, mean, std):
    """Features of images computed by timm directly: its num_classes=0 model (pooled features), with the
    preprocessing of the model's data config written out by hand."""
    import timm
    model = timm.create_model(arch, dynamic_img_size=True)
    model.load_state_dict(state_dict)
    model.reset_classifier(0)
    T = torchvision.transforms
    transform = T.Compose([T.Resize(int(size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in images])
    with torch.inference_mode():
        return model.eval()(x).numpy()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_file_gives_the_features_of_timm_itself(tmp_path, suffix):
    import safetensors.torch
    import timm
    torch.manual_seed(5)
    sd = timm.create_model("vit_tiny_patch16_224").state_dict()
    path = tmp_path / ("vit_tiny" + suffix)
    safetensors.torch.save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    files = image_folder(tmp_path / "imgs", np.random.default_rng(1))
    phis = {}
    for name, weights in [("file", path), ("random", "none")]:
        code, _, err = cli("--dataset", "imagefolder", "--root", tmp_path / "imgs", "--arch", "vit_tiny_patch16_224",
                           "--weights", weights, "--out", tmp_path / name, *FAST)
        assert code == 0, err
        phis[name] = np.load(tmp_path / name / "imagefoldertrain.npy")
    # vit_tiny_patch16_224's default config (augreg): bicubic, crop_pct 0.9, mean = std = 0.5
    reference = timm_reference("vit_tiny_patch16_224", sd, files, 32, 0.9, (0.5,) * 3, (0.5,) * 3)
    np.testing.assert_allclose(phis["file"], reference, rtol=1e-4, atol=1e-4)
    assert not np.allclose(phis["random"], reference, atol=1e-2)


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


@pytest.mark.parametrize("source", ["vit_small_patch14_dinov2", "resnet18"])
def test_weights_file_of_another_architecture_is_refused_in_one_line(tmp_path, source):
    import safetensors.torch
    import timm
    if source == "resnet18":
        path = tmp_path / "other.pth"
        torch.save(random_state_dict("resnet18", 0), path)
    else:  # same key names, other shapes
        path = tmp_path / "other.safetensors"
        safetensors.torch.save_file(timm.create_model(source).state_dict(), path)
    out = tmp_path / "reps"
    code, _, err = cli(*fake(out, "--arch", "vit_tiny_patch16_224", "--weights", path))
    assert_failed_cleanly(code, err, out)
    assert "another architecture" in err and "first: " in err


def test_unknown_timm_arch_suggests_close_matches(tmp_path):
    out = tmp_path / "reps"
    code, _, err = cli(*fake(out, "--arch", "vit_smal_patch14_dinov2.lvd142m", "--weights", "none"))
    assert_failed_cleanly(code, err, out)
    assert "vit_small_patch14_dinov2.lvd142m" in err


def test_pretrained_for_a_timm_model_without_weights_and_pickled_objects_exit_2(tmp_path):
    out = tmp_path / "reps"
    code, _, err = cli(*fake(out, "--arch", "vit_base_patch16_gap_224", "--weights", "pretrained"))
    assert_failed_cleanly(code, err, out)
    assert "no pretrained weights" in err
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "objects.pth")
    code, _, err = cli(*fake(out, "--arch", "vit_tiny_patch16_224", "--weights", tmp_path / "objects.pth"))
    assert_failed_cleanly(code, err, out)
    assert "re-save" in err


def test_pretrained_without_network_says_so_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as on a machine without network: nothing downloads
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "reps"
    code, _, err = cli(*fake(out, "--arch", "vit_tiny_patch16_224.augreg_in21k", "--weights", "pretrained"))
    assert_failed_cleanly(code, err, out)
    assert "cannot be downloaded" in err and "--weights FILE" in err


# ---------------------------------------------------------------- end to end

def test_extracted_arrays_feed_hume_and_evaluate(tmp_path):
    reps = tmp_path / "data" / "representations"
    assert cli(*fake(reps / "a", "--weights", "none", "--l2", size=120))[0] == 0
    assert cli(*fake(reps / "b", "--weights", "none", "--seed", 1, size=120))[0] == 0
    phi1, phi2 = reps / "a" / "faketrain_l2.npy", reps / "b" / "faketrain.npy"
    labels, tasks = tmp_path / "data" / "labels" / "faketrain_targets.npy", tmp_path / "tasks"
    for cmd in [["hume.py", "--phi1_path", phi1, "--phi2_path", phi2, "--gt_labels_path", labels, "--k", 10,
                 "--num_iters", 3, "--num_subsets", 2, "--adaptation_steps", 5, "--subset_size", 100,
                 "--exp_path", tasks, "--seed", 0, "--device", "cpu"],
                ["evaluate.py", "--phi1_path", phi1, "--tasks_path", tasks, "--gt_labels_path", labels]]:
        r = subprocess.run([sys.executable, os.path.join(ROOT, cmd[0]), *map(str, cmd[1:])],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    assert (tasks / "linear_task_0.pt").exists() and (tasks / "results_0.pickle").exists()
