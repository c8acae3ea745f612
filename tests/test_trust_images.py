"""Hostile image files and file names, against the one image reader (images.py) through extract.py and plot.py
--montage: a FIFO named *.png, a PNG whose header claims 30000 x 30000 pixels, truncated and non-image data, file
names that cannot be one line of the sources file. Each is one stderr line naming the image, exit code 2, no
traceback (also from DataLoader worker processes), nothing written. And a headless timm state_dict (saved from a
num_classes=0 model) loads and gives the model's pre-logits features.
"""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import extract
import plot
from helpers import cli, refused, save_npy, write_paper_task

FAST = ["--arch", "resnet18", "--weights", "none", "--image_size", "32", "--batch_size", "4", "--device", "cpu"]


def png(path, seed=0, size=(20, 24)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def bomb_png(path, width=30000, height=30000):
    """A valid PNG header claiming width x height RGB pixels, and almost no data (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def truncated_png(path):
    png(path, size=(64, 64))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    return path


def garbage_png(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return path


def fifo_png(path):
    os.mkfifo(path)
    return path


def odd_name(folder, name):
    """A valid PNG under a name given as bytes (non-UTF-8 names cannot be made from str)."""
    data = open(png(os.path.join(folder, "tmp.png")), "rb").read()
    os.remove(os.path.join(folder, "tmp.png"))
    fd = os.open(os.path.join(os.fsencode(folder), name), os.O_WRONLY | os.O_CREAT)
    os.write(fd, data)
    os.close(fd)
    return name


def written(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]


# id: (make the bad file in the class folder -> the name the error line must hold, more strings it must hold)
BAD_FILES = {
    "fifo": (lambda d: fifo_png(os.path.join(d, "fifo.png")), ["fifo.png", "not a regular file"]),
    "bomb": (lambda d: bomb_png(os.path.join(d, "bomb.png")), ["bomb.png", "too many pixels"]),
    "truncated": (lambda d: truncated_png(os.path.join(d, "cut.png")), ["cut.png", "cannot be read as an image"]),
    "garbage": (lambda d: garbage_png(os.path.join(d, "junk.png")), ["junk.png", "cannot be read as an image"]),
    "broken_link": (lambda d: os.symlink(os.path.join(d, "gone.png"), os.path.join(d, "link.png")),
                    ["link.png", "cannot be read"]),
    "link_to_fifo": (lambda d: os.symlink(fifo_png(os.path.join(d, "..", "f")), os.path.join(d, "lf.png")),
                     ["lf.png", "not a regular file"]),
    "newline": (lambda d: odd_name(d, b"a\nb.png"), ["a\\nb.png", "line break"]),
    "carriage_return": (lambda d: odd_name(d, b"a\rb.png"), ["line break"]),
    "u2028": (lambda d: odd_name(d, "a\u2028b.png".encode()), ["\\u2028", "line break"]),
    "u0085": (lambda d: odd_name(d, "a\x85b.png".encode()), ["\\x85", "line break"]),
    "form_feed": (lambda d: odd_name(d, b"a\x0cb.png"), ["line break"]),
    "escape_char": (lambda d: odd_name(d, b"a\x1b[31mb.png"), ["\\x1b", "control character"]),
    "not_utf8": (lambda d: odd_name(d, b"caf\xe9.png"), ["caf\\udce9", "not UTF-8"]),
}


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_extract_names_the_bad_image_in_one_line_and_writes_nothing(tmp_path, case, workers):
    make, needles = BAD_FILES[case]
    folder = tmp_path / "root" / "cls"
    folder.mkdir(parents=True)
    for i in range(5):
        png(folder / f"{i}.png", seed=i)
    make(str(folder))
    out = tmp_path / "reps"
    line = refused(cli(extract.main, ["--dataset", "imagefolder", "--root", tmp_path / "root", "--out", out,
                                      "--num_workers", workers, *FAST]), *needles)
    assert "Traceback" not in line and "worker" not in line
    assert written(out) == []


def test_a_bomb_is_refused_before_it_is_decoded_by_the_reader_itself(tmp_path):
    from humelib.images import read_image
    from humelib.runtime import HumeError
    with pytest.raises(HumeError, match="too many pixels"):
        read_image(bomb_png(str(tmp_path / "b.png")))
    assert read_image(png(str(tmp_path / "ok.png"))).size == (24, 20)


# ---------------------------------------------------------------- plot.py --montage

@pytest.mark.parametrize("case", ["fifo", "bomb", "truncated", "garbage"])
def test_montage_names_the_bad_image_in_one_line_and_draws_nothing(tmp_path, case):
    make, needles = BAD_FILES[case]
    clusters = np.arange(12) % 3
    phi1 = np.eye(8)[clusters] + 0.05 * np.random.default_rng(0).normal(size=(12, 8))
    phi1 /= np.linalg.norm(phi1, axis=1, keepdims=True)
    img = tmp_path / "img"
    img.mkdir()
    sources = [png(str(img / f"{i}.png"), seed=i) for i in range(11)]
    bad = make(str(img))
    sources.append(bad if isinstance(bad, str) else str(img / "x"))
    with open(tmp_path / "phi1.sources.txt", "w") as f:
        f.writelines(s + "\n" for s in sources)
    write_paper_task(str(tmp_path / "tasks"), 0, np.eye(8)[:3], cv_score=0.9)
    phi1_path = save_npy(str(tmp_path), "phi1", phi1.astype(np.float32))
    out = tmp_path / "figs"
    needles = needles if case != "fifo" else ["--montage", "fifo.png", "not files"]
    refused(cli(plot.main, ["--montage", "--tasks_path", tmp_path / "tasks", "--phi1_path", phi1_path,
                            "--per_cluster", "4", "--out", out]), *needles)
    assert written(out) == []


# ---------------------------------------------------------------- a headless timm state_dict

def vit_tiny_reference(model, files, size=32):
    """Pre-logits features of model on the image files, with vit_tiny_patch16_224's preprocessing (bicubic,
    crop_pct 0.9, mean = std = 0.5) written out by hand."""
    T = torchvision.transforms
    transform = T.Compose([T.Resize(int(size / 0.9), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                           T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


def test_headless_timm_state_dict_loads_and_gives_the_pre_logits_features(tmp_path):
    import timm
    torch.manual_seed(11)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True).eval()
    sd = model.state_dict()
    assert not any(k.startswith("head.") for k in sd)  # what feature checkpoints look like
    torch.save(sd, tmp_path / "headless.pth")
    (tmp_path / "root" / "cls").mkdir(parents=True)
    files = [png(str(tmp_path / "root" / "cls" / f"{i}.png"), seed=i, size=(40, 36)) for i in range(5)]
    code, _, err = cli(extract.main, ["--dataset", "imagefolder", "--root", tmp_path / "root", "--out",
                                      tmp_path / "reps", "--arch", "vit_tiny_patch16_224", "--weights",
                                      tmp_path / "headless.pth", "--image_size", "32", "--num_workers", "0",
                                      "--device", "cpu"])
    assert code == 0, err
    phi = np.load(tmp_path / "reps" / "imagefoldertrain.npy")
    np.testing.assert_allclose(phi, vit_tiny_reference(model, files), rtol=1e-4, atol=1e-4)


def test_headless_state_dict_of_another_architecture_is_refused_in_one_line(tmp_path):
    import timm
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), tmp_path / "small.pth")
    out = tmp_path / "reps"
    refused(cli(extract.main, ["--dataset", "fake", "--fake_size", "4", "--out", out, "--arch",
                               "vit_tiny_patch16_224", "--weights", tmp_path / "small.pth", "--image_size", "32",
                               "--num_workers", "0", "--device", "cpu"]), "small.pth", "another architecture")
    assert written(out) == []
