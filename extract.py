r"""
Turn images into the phi1/phi2 .npy arrays that hume.py reads, in the paper's layout:
data/representations/NAME/{dataset}{split}[_l2].npy, beside it the same name with .sources.txt (where each row
came from: file path or data-set index), and data/labels/{dataset}{split}_targets.npy.

phi1, a self-supervised model trained on the data set itself (MoCo v2 checkpoint; rows L2-normalised):
$ python extract.py --dataset cifar10 --root ~/datasets --split train --arch resnet50 \
    --weights checkpoint_0199.pth.tar --out data/representations/mocov2/ --l2
phi2, DINOv2 ViT-g/14 through timm (its own preprocessing; weights from the Hugging Face hub, cached):
$ python extract.py --dataset cifar10 --root ~/datasets --split train --arch vit_giant_patch14_dinov2.lvd142m \
    --weights pretrained --image_size 224 --out data/representations/dino/
phi2, a torchvision model by its weights name:
$ python extract.py --dataset cifar10 --root ~/datasets --split train --arch vit_h_14 \
    --weights ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1 --out data/representations/swag/
Offline smoke test (fake images, random weights):
$ python extract.py --dataset fake --split train --arch resnet18 --weights none --image_size 32 \
    --out /tmp/hume_demo/data/representations/random/ --l2
"""
import os
import pickle
import time

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torchvision import datasets
from tqdm import tqdm

from humelib.arrays import l2_normalize, source_problem
from humelib.backbones import build_backbone
from humelib.fileio import OutputGroup, check_output_file, ensure_dir
from humelib.flags import default_device, device, finite_float, int_in, make_parser, positive_float, seed_int
from humelib.images import CarryErrors, Failed, check_image_files, collate, read_image
from humelib.runtime import HumeError, log, run_cli
from humelib.unpickler import restricted_load

SPLITS = {"cifar10": ("train", "test", "traintest"), "cifar100-20": ("train", "test", "traintest"),
          "stl10": ("train", "test", "traintest", "unlabeled"), "imagefolder": None, "fake": None}  # None: any


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
    p.add_argument("--fake_size", type=int_in(1), default=1000, help="number of images of --dataset fake")
    p.add_argument("--name", help="file name prefix instead of the data set's name (outputs are NAME{split}.npy)")
    p.add_argument("--arch", default="resnet50",
                   help="a torchvision.models classification architecture (features: the penultimate layer) or a "
                        "timm model, bare or with its pretrained tag, e.g. vit_small_patch14_dinov2.lvd142m, "
                        "vit_large_patch14_clip_quickgelu_224.openai (features: the pooled pre-logits embedding); "
                        "a name in both is torchvision's")
    p.add_argument("--weights", required=True,
                   help="torchvision: a checkpoint file (plain, MoCo, DINO or solo-learn state_dict: prefixes such "
                        "as module.encoder_q. or backbone. are stripped) or a weights name "
                        "(ResNet50_Weights.IMAGENET1K_V2, or DEFAULT; from torch's cache, else downloaded); timm: "
                        "pretrained (from the Hugging Face hub cache, else downloaded) or a .safetensors/.pth "
                        "state_dict of exactly that model; both: none (random init, for tests)")
    p.add_argument("--cifar_stem", action="store_true",
                   help="ResNets only: 3x3 stride-1 first conv (padding 2) and no max-pool, as solo-learn's "
                        "CIFAR checkpoints are trained")
    p.add_argument("--image_size", type=int_in(16, 8192),
                   help="resize the shorter side and centre-crop to this size; default: the torchvision weights' "
                        "own preprocessing, else 224; timm: the model's data config (DINOv2: 518), ViTs "
                        "interpolating their position embeddings to other sizes")
    p.add_argument("--mean", type=finite_float, nargs=3, help="normalisation mean (default: the weights' or the timm "
                                                       "model's, else ImageNet)")
    p.add_argument("--std", type=positive_float, nargs=3, help="normalisation std (default: the weights' or the timm "
                                                      "model's, else ImageNet)")
    p.add_argument("--batch_size", type=int_in(1), default=256)
    p.add_argument("--num_workers", type=int_in(0), default=min(8, os.cpu_count() or 1),
                   help="image-decoding processes")
    p.add_argument("--device", type=device, default=default_device())
    p.add_argument("--amp", action="store_true",
                   help="autocast the model to bfloat16 on CPU, float16 on CUDA (features are stored as float32)")
    p.add_argument("--seed", type=seed_int, default=0, help="seeds the random init of --weights none and --cifar_stem")
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
            return datasets.ImageFolder(args.root, transform, loader=read_image)
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


def row_sources(args, dataset):
    """Where each row comes from, in row order: the image's absolute path (image folders: valid from any working
    directory), else {dataset}:{split}:{index in that split}, e.g. cifar10:test:123."""
    if args.dataset == "imagefolder":
        sources = [os.path.abspath(path) for path, _ in dataset.samples]
        check_image_files(sources, f"--root {args.root}")
        return sources
    subsets = dataset.datasets if isinstance(dataset, torch.utils.data.ConcatDataset) else [dataset]
    splits = ["train", "test"] if len(subsets) == 2 else [args.split]
    return [f"{args.dataset}:{split}:{i}" for split, ds in zip(splits, subsets) for i in range(len(ds))]


def cifar100_coarse_labels(ds):
    """torchvision keeps only the 100 fine labels; the 20 superclasses are stored beside them in the same file."""
    path = os.path.join(ds.root, ds.base_folder, "train" if ds.train else "test")
    try:
        with open(path, "rb") as f:
            return restricted_load(f, encoding="latin1")["coarse_labels"]
    except (pickle.UnpicklingError, KeyError, EOFError) as e:
        raise HumeError(f"{path}: not CIFAR-100's own label file ({type(e).__name__}: {e}); download it again") \
            from None


# ---------------------------------------------------------------- extraction

def extract(model, loader, n, path, device, l2, arch, amp):
    """Write the model's features of all n images into a memory-mapped float32 .npy at path, batch by batch,
    so that the array never sits in RAM. Returns the labels (n,), int64."""
    feats, labels, start = None, np.empty(n, dtype=np.int64), 0
    kind = torch.device(device).type
    autocast = torch.autocast(kind, dtype=torch.bfloat16 if kind == "cpu" else torch.float16, enabled=amp)
    with torch.inference_mode(), autocast:
        for batch in tqdm(loader, desc=os.path.basename(path), unit="batch", disable=None):
            if isinstance(batch, Failed):  # an image that cannot be read, named in one line
                raise HumeError(f"{batch}; nothing was written")
            images, targets = batch
            try:
                images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
                x = model(images).flatten(1).float().cpu().numpy()
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
    if args.name is not None and (source_problem(args.name) or os.sep in args.name or args.name in (".", "..")):
        raise HumeError(f"--name {args.name!r}: must be a file name prefix, not a path; use --out for the folder")
    if args.dataset != "fake" and not (args.root and (os.path.isdir(args.root) or args.download)):
        raise HumeError(f"--root {args.root}: folder not found; point it at the {args.dataset} data "
                        "(or pass --download with a network)")
    out = os.path.normpath(args.out)
    labels_dir = args.labels_dir or (os.path.join(os.path.dirname(os.path.dirname(out)), "labels")
                                     if os.path.basename(os.path.dirname(out)) == "representations" else out)
    if args.name is not None and (not args.name or os.sep in args.name or "/" in args.name or
                                  args.name in (".", "..") or args.name.startswith(".")):
        raise HumeError(f"--name {args.name!r}: a file name prefix must not be empty, start with a dot or hold a "
                        "path separator (outputs go into --out); give a plain name such as mine")
    ensure_dir(out, "--out")  # fail before any expensive work
    ensure_dir(labels_dir, "--labels_dir")
    stem = f"{args.name or args.dataset}{args.split}"
    feat_path = os.path.join(out, stem + ("_l2" if args.l2 else "") + ".npy")
    label_path = os.path.join(labels_dir, stem + "_targets.npy")
    sources_path = feat_path[:-len(".npy")] + ".sources.txt"
    for path, flag in ((feat_path, "--out"), (sources_path, "--out"), (label_path, "--labels_dir")):
        check_output_file(path, flag)

    model, transform = build_backbone(args.arch, args.weights, args.seed, args.cifar_stem, args.image_size,
                                      args.mean, args.std)
    dataset = load_dataset(args, transform)
    if len(dataset) == 0:
        raise HumeError(f"--dataset {args.dataset} --split {args.split}: no images")
    sources = row_sources(args, dataset)
    loader = torch.utils.data.DataLoader(CarryErrors(dataset), batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"),
                                         collate_fn=collate)
    model.to(args.device, memory_format=torch.channels_last)  # NHWC: faster convolutions, ViTs unaffected

    def write_sources(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(s + "\n" for s in sources)

    t0 = time.time()
    try:  # features, sources and labels: all new or all old, whatever fails (files.OutputGroup)
        with OutputGroup() as group:
            labels = group.write(feat_path, lambda tmp: extract(model, loader, len(dataset), tmp, args.device,
                                                                args.l2, args.arch, args.amp))
            group.write(sources_path, write_sources)
            if labels.min() >= 0:  # torchvision marks unlabeled images (STL-10 unlabeled) with -1
                group.write(label_path, lambda tmp: np.save(tmp, labels))
            else:  # an older extraction's labels would no longer match these rows
                group.remove(label_path)
    except OSError as e:  # unreadable image; DataLoader workers wrap the message in a traceback
        raise HumeError(f"{str(e).strip().splitlines()[-1]}; nothing was written") from None
    if labels.min() >= 0:
        log(f"labels: {label_path} ({len(np.unique(labels))} classes)")
    seconds = time.time() - t0
    shape = np.load(feat_path, mmap_mode="r").shape
    log(f"wrote {feat_path}: {shape[0]} x {shape[1]} float32 in {seconds:.1f} s "
        f"({shape[0] / seconds:.1f} images/s on {args.device})")


if __name__ == "__main__":
    run_cli(main)
