"""extract.py's backbones and their weights: torchvision and timm models give their penultimate (pre-logits)
features; a self-supervised checkpoint, a torchvision weights name (from the torch cache, offline) and a timm weights
file give the features of the clean weights, checked against torchvision and timm themselves; weights of another
architecture, unknown names, pickled objects and an image size the model cannot take are refused in one line.
Offline: random weights only. extract.py's command line itself: tests/test_extract.py."""
import argparse
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from humelib import backbones
from test_extract import FAST, assert_failed_cleanly, cli, fake, image_folder


@pytest.mark.parametrize("arch,dim,size", [("resnet50", 2048, 32), ("vit_b_16", 768, 224),
                                           ("efficientnet_b0", 1280, 32), ("mobilenet_v3_small", 1024, 32)])
def test_models_output_penultimate_features(arch, dim, size):
    model, _ = backbones.torchvision_model(arch, "none")
    with torch.inference_mode():
        assert model(torch.randn(2, 3, size, size)).shape == (2, dim)


# ---------------------------------------------------------------- checkpoints and weights names

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
