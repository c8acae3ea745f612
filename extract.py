r"""
Turn images into the phi1/phi2 .npy arrays that hume.py reads, in the paper's layout:
data/representations/NAME/{dataset}{split}[_l2].npy and data/labels/{dataset}{split}_targets.npy.

phi1, a self-supervised model trained on the data set itself (MoCo v2 checkpoint; rows L2-normalised):
$ python extract.py --dataset cifar10 --root ~/datasets --split train --arch resnet50 \
    --weights checkpoint_0199.pth.tar --out data/representations/mocov2/ --l2
phi2, a large pretrained model from torchvision's registry (its own preprocessing is used):
$ python extract.py --dataset cifar10 --root ~/datasets --split train --arch vit_h_14 \
    --weights ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1 --out data/representations/swag/
Offline smoke test (fake images, random weights):
$ python extract.py --dataset fake --split train --arch resnet18 --weights none --image_size 32 \
    --out /tmp/hume_demo/data/representations/random/ --l2
"""
import collections
import difflib
import os
import pickle
import time

import numpy as np
import torch
import torchvision
from numpy.lib.format import open_memmap
from torch import nn
from torchvision import datasets, transforms as T
from tqdm import tqdm

from utils import HumeError, atomic_write, ensure_dir, l2_normalize, log, make_parser, run_cli

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = {"cifar10": ("train", "test", "traintest"), "cifar100-20": ("train", "test", "traintest"),
          "stl10": ("train", "test", "traintest", "unlabeled"), "imagefolder": None, "fake": None}  # None: any
HEADS = ("fc", "classifier", "heads", "head")  # where torchvision models keep their classifier
# Checkpoints holding two copies of the backbone: keep the one that evaluation code uses.
PREFER, AVOID = ("encoder_q", "base_encoder", "teacher", "online"), ("encoder_k", "momentum", "target", "student")


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--dataset", required=True, choices=list(SPLITS),
                   help="cifar100-20 = CIFAR-100 with its 20 coarse superclasses as labels; imagefolder = any "
                        "root/CLASS/IMAGE tree; fake = torchvision FakeData (random images, for tests and demos)")
    p.add_argument("--root", help="folder holding the data set as torchvision lays it out (e.g. the folder with "
                                  "cifar-10-batches-py/), or the class folders for imagefolder")
    p.add_argument("--split", default="train", choices=["train", "test", "traintest", "unlabeled"],
                   help="traintest = train then test, for the transductive setting; unlabeled: stl10 only; "
                        "imagefolder and fake: only names the output")
    p.add_argument("--download", action="store_true", help="let torchvision download the data set into --root")
    p.add_argument("--fake_size", type=int, default=1000, help="number of images of --dataset fake")
    p.add_argument("--name", help="file name prefix instead of the data set's name (outputs are NAME{split}.npy)")
    p.add_argument("--arch", default="resnet50", help="any torchvision.models classification architecture")
    p.add_argument("--weights", required=True,
                   help="a checkpoint file (plain, MoCo, DINO or solo-learn state_dict: prefixes such as "
                        "module.encoder_q. or backbone. are stripped), a torchvision weights name "
                        "(ResNet50_Weights.IMAGENET1K_V2, or DEFAULT; from torch's cache, else downloaded), "
                        "or none (random init, for tests)")
    p.add_argument("--cifar_stem", action="store_true",
                   help="ResNets only: 3x3 stride-1 first conv (padding 2) and no max-pool, as solo-learn's "
                        "CIFAR checkpoints are trained")
    p.add_argument("--image_size", type=int, help="resize the shorter side and centre-crop to this size; default: "
                                                  "the torchvision weights' own preprocessing, else 224")
    p.add_argument("--mean", type=float, nargs=3, help="normalisation mean (default: the weights', else ImageNet)")
    p.add_argument("--std", type=float, nargs=3, help="normalisation std (default: the weights', else ImageNet)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="image-decoding processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds the random init of --weights none and --cifar_stem")
    p.add_argument("--l2", action="store_true", help="L2-normalise every row and add the _l2 suffix (do this for phi1)")
    p.add_argument("--out", required=True, help="output folder, e.g. data/representations/mocov2/ (created)")
    p.add_argument("--labels_dir", help="where {name}{split}_targets.npy goes; default: data/labels/ beside "
                                        "data/representations/ when --out is data/representations/NAME/, else --out")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data

def load_dataset(args, transform):
    """The torchvision data set for --dataset/--split, yielding (image tensor, label); label -1 means none."""
    if args.dataset == "fake":  # a different offset per split so train and test images differ
        offset = 1_000_000 * ["train", "test", "traintest", "unlabeled"].index(args.split)
        return datasets.FakeData(args.fake_size, (3, 32, 32), 10, transform, random_offset=offset)
    if args.dataset == "imagefolder":
        try:
            return datasets.ImageFolder(args.root, transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise HumeError(f"--root {args.root}: not an image folder tree root/CLASS/IMAGE ({e})") from None
    parts = ["train", "test"] if args.split == "traintest" else [args.split]
    try:
        if args.dataset == "stl10":
            subsets = [datasets.STL10(args.root, s, transform=transform, download=args.download) for s in parts]
        else:
            cls = datasets.CIFAR10 if args.dataset == "cifar10" else datasets.CIFAR100
            subsets = [cls(args.root, s == "train", transform, download=args.download) for s in parts]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise HumeError(f"--root {args.root}: {args.dataset} {args.split} not found or corrupted ({e})") from None
    if args.dataset == "cifar100-20":
        for ds in subsets:
            ds.targets = cifar100_coarse_labels(ds)
    return subsets[0] if len(subsets) == 1 else torch.utils.data.ConcatDataset(subsets)


def cifar100_coarse_labels(ds):
    """torchvision keeps only the 100 fine labels; the 20 superclasses are stored beside them in the same file."""
    with open(os.path.join(ds.root, ds.base_folder, "train" if ds.train else "test"), "rb") as f:
        return pickle.load(f, encoding="latin1")["coarse_labels"]


def make_transform(weights, image_size, mean, std):
    """The weights' own preprocessing when known and not overridden, else resize + centre crop + normalise."""
    if weights is not None and image_size is None and mean is None and std is None:
        return weights.transforms()
    preset = weights.transforms() if weights is not None else None
    return T.Compose([T.Resize(image_size or 224), T.CenterCrop(image_size or 224), T.ToTensor(),
                      T.Normalize(mean or (preset.mean if preset else IMAGENET_MEAN),
                                  std or (preset.std if preset else IMAGENET_STD))])


# ---------------------------------------------------------------- model

def build_model(arch, weights="none", seed=0, cifar_stem=False):
    """A torchvision model that returns penultimate features; returns (model, torchvision weights or None)."""
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        hint = difflib.get_close_matches(arch, known, n=3)
        raise HumeError(f"--arch {arch}: not a torchvision classification model"
                        + (f"; did you mean {', '.join(hint)}?" if hint else "; see torchvision.models.list_models()"))
    registry = None
    if weights != "none" and not os.path.isfile(weights):
        enum = torchvision.models.get_model_weights(arch)
        try:
            registry = enum.verify(weights)
        except KeyError:
            raise HumeError(f"--weights {weights}: neither a file nor a weights name of {arch} (names: "
                            f"{', '.join(w.name for w in enum)}, DEFAULT; or none)") from None
    torch.manual_seed(seed)  # random init (--weights none, --cifar_stem) is reproducible
    try:
        model = torchvision.models.get_model(arch, weights=registry)
    except OSError as e:  # no network and not in torch's cache
        raise HumeError(f"--weights {weights}: not in torch's cache ({torch.hub.get_dir()}/checkpoints) and "
                        f"cannot be downloaded ({e}); copy {registry.url} there or pass a file") from None
    if cifar_stem:
        if not isinstance(model, torchvision.models.ResNet):
            raise HumeError(f"--cifar_stem: only for ResNets, not {arch}")
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=2, bias=False)
        model.maxpool = nn.Identity()
    head = strip_head(model, arch)
    if registry is None and weights != "none":
        load_checkpoint(model, weights, head, arch)
    return model.eval(), registry


def strip_head(model, arch):
    """Replace the classifier's last Linear by Identity, so the model outputs the layer before it.
    Returns the removed layer's state_dict prefix (e.g. "fc.", "classifier.6.", "heads.head.")."""
    for name in HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            setattr(model, name, nn.Identity())
            return name + "."
        linears = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)] if head is not None else []
        if linears:
            parent, _, leaf = linears[-1].rpartition(".")
            setattr(head.get_submodule(parent), leaf, nn.Identity())
            return f"{name}.{linears[-1]}."
    raise HumeError(f"--arch {arch}: no linear classifier head found ({'/'.join(HEADS)}); pick another architecture")


def load_checkpoint(model, path, head, arch):
    """Load a backbone from a checkpoint file whose keys may carry a wrapper prefix; fail on any mismatch."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never runs pickled code
    except pickle.UnpicklingError:
        raise HumeError(f"--weights {path}: holds Python objects besides tensors; re-save only its weights, "
                        "e.g. torch.save(ckpt['state_dict'], 'clean.pth')") from None
    except Exception as e:
        raise HumeError(f"--weights {path}: cannot be read as a torch checkpoint ({type(e).__name__})") from None
    for key in ("state_dict", "model", "teacher", "module", "network"):  # MoCo, solo-learn, DINO wrappers
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
    own = model.state_dict()
    tensors = {k: v for k, v in ckpt.items() if torch.is_tensor(v)} if isinstance(ckpt, dict) else {}
    prefix = best_prefix(tensors, own)
    if prefix is None:
        raise HumeError(f"--weights {path}: none of its tensors fits --arch {arch}; "
                        "is it a checkpoint of another architecture?")
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    n_head = sum(k.startswith(head) for k in sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(head)}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    reshaped = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own
                and v.shape != own[k].shape]
    modules = {k.split(".")[0] for k in own}
    unexpected = [k for k in sd if k not in own]
    foreign = [k for k in unexpected if k.split(".")[0] in modules]  # extra blocks inside the model's own modules
    if missing or reshaped or foreign:
        stem = any(r.startswith("conv1.weight") for r in reshaped)  # CIFAR ResNets have a 3x3 first conv
        raise HumeError(f"--weights {path} does not fit --arch {arch}: {len(reshaped)} tensors of other shapes"
                        f"{eg(reshaped)}, {len(missing)} missing{eg(missing)}, {len(foreign)} extra{eg(foreign)}; "
                        "is it a checkpoint of another architecture" + ("? (add --cifar_stem)" if stem else "?"))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    log(f"loaded {len(sd) - len(unexpected)} tensors from {path} (prefix '{prefix}' stripped); ignored "
        f"{n_head} classifier-head and {len(tensors) - len(sd) - n_head} other tensors; missing: none; "
        f"unexpected: {len(unexpected)}{eg(unexpected)}")


def best_prefix(tensors, own):
    """The key prefix whose removal matches most of the model's keys (ties: PREFER over AVOID, shortest)."""
    hits = collections.Counter(k[:i] for k in tensors for i in [0] + [j + 1 for j, c in enumerate(k) if c == "."]
                               if k[i:] in own)
    if not hits:
        return None
    return max(hits, key=lambda p: (hits[p], any(w in p for w in PREFER), -any(w in p for w in AVOID), -len(p)))


def eg(keys):
    return f" (e.g. {', '.join(keys[:3])})" if keys else ""


# ---------------------------------------------------------------- extraction

def extract(model, loader, n, path, device, l2, arch):
    """Write the model's features of all n images into a memory-mapped float32 .npy at path, batch by batch,
    so that the array never sits in RAM. Returns the labels (n,), int64."""
    feats, labels, start = None, np.empty(n, dtype=np.int64), 0
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc=os.path.basename(path), unit="batch", disable=None):
            try:
                x = model(images.to(device, non_blocking=True)).flatten(1).float().cpu().numpy()
            except (RuntimeError, AssertionError, ValueError) as e:  # wrong input size (ViT asserts), GPU memory
                if feats is not None:
                    raise
                raise HumeError(f"--arch {arch} fails on images of shape {tuple(images.shape[1:])} on {device} "
                                f"({str(e).splitlines()[0]}); check --image_size or lower --batch_size") from None
            if feats is None:  # the feature dimension is known only after the first batch
                feats = open_memmap(path, mode="w+", dtype=np.float32, shape=(n, x.shape[1]))
            feats[start:start + len(x)] = l2_normalize(x) if l2 else x
            labels[start:start + len(x)] = targets.numpy()
            start += len(x)
    feats.flush()
    return labels


def main(argv=None):
    args = parse_args(argv)
    if SPLITS[args.dataset] and args.split not in SPLITS[args.dataset]:
        raise HumeError(f"--split {args.split}: {args.dataset} has {', '.join(SPLITS[args.dataset])}")
    if args.batch_size < 1 or args.num_workers < 0 or args.fake_size < 1:
        raise HumeError("--batch_size and --fake_size must be >= 1 and --num_workers >= 0")
    if args.dataset != "fake" and not (args.root and (os.path.isdir(args.root) or args.download)):
        raise HumeError(f"--root {args.root}: folder not found; point it at the {args.dataset} data "
                        "(or pass --download with a network)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise HumeError(f"--device {args.device}: no GPU visible to torch; use --device cpu")
    out = os.path.normpath(args.out)
    labels_dir = args.labels_dir or (os.path.join(os.path.dirname(os.path.dirname(out)), "labels")
                                     if os.path.basename(os.path.dirname(out)) == "representations" else out)
    ensure_dir(out, "--out")  # fail before any expensive work
    ensure_dir(labels_dir, "--labels_dir")
    stem = f"{args.name or args.dataset}{args.split}"
    feat_path = os.path.join(out, stem + ("_l2" if args.l2 else "") + ".npy")
    label_path = os.path.join(labels_dir, stem + "_targets.npy")

    model, registry = build_model(args.arch, args.weights, args.seed, args.cifar_stem)
    dataset = load_dataset(args, make_transform(registry, args.image_size, args.mean, args.std))
    if len(dataset) == 0:
        raise HumeError(f"--dataset {args.dataset} --split {args.split}: no images")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"))
    model.to(args.device)

    def write(tmp):
        labels = extract(model, loader, len(dataset), tmp, args.device, args.l2, args.arch)
        if labels.min() >= 0:  # torchvision marks unlabeled images (STL-10 unlabeled) with -1
            atomic_write(label_path, lambda t: np.save(t, labels))
            log(f"labels: {label_path} ({len(np.unique(labels))} classes)")

    t0 = time.time()
    try:
        atomic_write(feat_path, write)
    except OSError as e:  # unreadable image, disk full; DataLoader workers wrap the message in a traceback
        raise HumeError(f"{str(e).strip().splitlines()[-1]}; nothing was written") from None
    seconds = time.time() - t0
    shape = np.load(feat_path, mmap_mode="r").shape
    log(f"wrote {feat_path}: {shape[0]} x {shape[1]} float32 in {seconds:.1f} s "
        f"({shape[0] / seconds:.0f} images/s on {args.device})")


if __name__ == "__main__":
    run_cli(main)
