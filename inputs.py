"""HUME's inputs: checking the flags, loading and cross-checking the arrays, and gathering rows for a step.

Arrays are loaded into memory (float32, on the device) or, with --mmap, left memory-mapped on disk: then only the
rows of the current outer iteration's subsets are read, so phi arrays larger than RAM work.
"""
import argparse
import math

import numpy as np
import torch

from utils import DEMO, HumeError, check_rows, load_array, load_labels, warn


def inner_lr_type(text):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def check_args(args):
    """Flag values that cannot work, each reported as one line naming the flag (before anything is read)."""
    positive = {"--outer_lr": args.outer_lr, "--tau": args.tau}
    if args.inner_lr != "auto":
        positive["--inner_lr"] = args.inner_lr
    for flag, v in dict(positive, **{"--H_reg": args.H_reg, "--train_fraction": args.train_fraction}).items():
        if not math.isfinite(v):
            raise HumeError(f"{flag} must be a finite number, got {v}")
    for flag, v in positive.items():
        if not v > 0:
            raise HumeError(f"{flag} must be > 0, got {v}")
    at_least = {"--num_iters": (args.num_iters, 0), "--adaptation_steps": (args.adaptation_steps, 1),
                "--num_subsets": (args.num_subsets, 1), "--subset_size": (args.subset_size, 2),
                "--eval_every": (args.eval_every, 1), "--ckpt_every": (args.ckpt_every, 1), "--k": (args.k, 2)}
    for flag, (v, lo) in at_least.items():
        if v < lo:
            raise HumeError(f"{flag} must be >= {lo}, got {v}")
    if not 0 < args.train_fraction < 1:
        raise HumeError(f"--train_fraction must be between 0 and 1 (exclusive), got {args.train_fraction}")
    if args.H_reg < 0:
        raise HumeError(f"--H_reg must be >= 0, got {args.H_reg}")
    if (args.phi1_path_val is None) != (args.phi2_path_val is None):
        raise HumeError("give both --phi1_path_val and --phi2_path_val (inductive) or neither (transductive)")
    if (args.phi1_path is None) != (args.phi2_path is None):
        raise HumeError("give both --phi1_path and --phi2_path, or neither to run the bundled demo")
    if args.phi2_path and args.phi2_path_val and len(args.phi2_path) != len(args.phi2_path_val):
        raise HumeError(f"{len(args.phi2_path)} --phi2_path files but {len(args.phi2_path_val)} --phi2_path_val "
                        "files; give one evaluation file per phi2 space, in the same order")
    if not 0 <= args.seed < 2 ** 32:
        raise HumeError(f"--seed must be between 0 and 2**32 - 1 (numpy's range), got {args.seed}")
    check_device(args.device)


def check_device(name):
    """Only devices torch can run HUME on here: cpu, cuda[:i] when CUDA is there, mps when available."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise HumeError(f"--device {name}: not a torch device; use cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HumeError(f"--device {name}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise HumeError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise HumeError(f"--device {name}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise HumeError(f"--device {name}: HUME runs on cpu, cuda or mps, not {dev.type}")


def load_data(args):
    """The arrays of one run, checked against each other: phi1, phi2 (a list, one per space), phi1_val,
    phi2_val, y_val. Evaluation = training points when no *_val paths are given (transductive)."""
    if args.phi1_path is None and args.phi1_path_val is None and args.gt_labels_path is None:
        args.phi1_path, args.phi2_path = DEMO["phi1_train"], [DEMO["phi2_train"]]
        args.phi1_path_val, args.phi2_path_val = DEMO["phi1_test"], [DEMO["phi2_test"]]
        args.gt_labels_path = DEMO["labels_test"]
    load = lambda path, flag: load_array(path, flag, mmap=args.mmap)
    d = {"phi1": load(args.phi1_path, "--phi1_path"), "phi2": [load(p, "--phi2_path") for p in args.phi2_path]}
    check_rows([("--phi1_path", d["phi1"])] + [(f"--phi2_path {p}", a) for p, a in zip(args.phi2_path, d["phi2"])])
    if args.phi1_path_val:
        d["phi1_val"] = load(args.phi1_path_val, "--phi1_path_val")
        d["phi2_val"] = [load(p, "--phi2_path_val") for p in args.phi2_path_val]
        check_rows([("--phi1_path_val", d["phi1_val"])] +
                   [(f"--phi2_path_val {p}", a) for p, a in zip(args.phi2_path_val, d["phi2_val"])])
        for train, val, flag in [(d["phi1"], d["phi1_val"], "--phi1_path_val")] + \
                [(a, b, f"--phi2_path_val {p}") for a, b, p in zip(d["phi2"], d["phi2_val"], args.phi2_path_val)]:
            if train.shape[1] != val.shape[1]:
                raise HumeError(f"{flag} has dimension {val.shape[1]} but its training array has {train.shape[1]}; "
                                "both must come from the same representation")
    else:
        d["phi1_val"], d["phi2_val"] = d["phi1"], d["phi2"]
    n_val = d["phi1_val"].shape[0]
    d["y_val"] = load_labels(args.gt_labels_path, "--gt_labels_path", n_val) if args.gt_labels_path else None
    n, d1 = d["phi1"].shape
    if args.k > n:
        raise HumeError(f"--k {args.k} is larger than the number of training points ({n})")
    if args.k > d1:
        raise HumeError(f"--k {args.k} is larger than phi1's dimension ({d1}): a task encoder's k rows cannot be "
                        "orthonormal; use a richer phi1 or a smaller --k")
    m = min(args.subset_size, n)
    if not 1 <= int(args.train_fraction * m) < m:
        raise HumeError(f"--train_fraction {args.train_fraction} of a subset of {m} points leaves an empty "
                        "train or test part; use a larger --subset_size or a fraction nearer 0.5")
    check_variance(d["phi1"], "--phi1_path", args.phi1_path)
    for p, a in zip(args.phi2_path, d["phi2"]):
        check_variance(a, "--phi2_path", p)
    lo, hi = row_norm_range(d["phi1"])
    if args.normalize and lo == 0:
        zero = int(sum(np.count_nonzero(np.linalg.norm(np.asarray(d["phi1"][i:i + (1 << 16)]), axis=1) == 0)
                       for i in range(0, d["phi1"].shape[0], 1 << 16)))
        raise HumeError(f"--phi1_path {args.phi1_path}: {zero} row(s) are all zeros and cannot be normalised "
                        "(--normalize); remove those points from every array")
    if not args.normalize and max(abs(lo - 1), abs(hi - 1)) > 1e-3:
        warn(f"--phi1_path rows are not unit norm (norms {lo:.3g} to {hi:.3g}); HUME's phi1 is L2-normalised: "
             "pass --normalize to do it here")
    return d


def check_variance(x, flag, path, chunk=1 << 16):
    """Refuse an array whose rows are all the same (zero included): it separates nothing, and --inner_lr auto
    would divide by zero."""
    first = np.asarray(x[:1], dtype=np.float64)
    for i in range(0, x.shape[0], chunk):
        if np.any(np.asarray(x[i:i + chunk], dtype=np.float64) != first):
            return
    raise HumeError(f"{flag} {path}: every row is the same (no variance); this is not a representation of the points")


def row_norm_range(x, chunk=1 << 16):
    norms = np.concatenate([np.linalg.norm(np.asarray(x[i:i + chunk], dtype=np.float32), axis=1)
                            for i in range(0, x.shape[0], chunk)])
    return float(norms.min()), float(norms.max())


def source(arr, dev, normalize=False, ones=False, scale=1.0):
    """What gather() reads rows from: in memory, a prepared tensor on the device; with --mmap, the array itself
    (rows are prepared as they are read)."""
    if isinstance(arr, np.memmap):
        return {"mmap": arr, "normalize": normalize, "ones": ones, "scale": scale, "dev": dev}
    return prepare(torch.from_numpy(np.asarray(arr, dtype=np.float32)).to(dev), normalize, ones, scale)


def prepare(x, normalize, ones, scale=1.0):
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    if scale != 1.0:  # --inner_lr auto: phi2 at RMS row norm sqrt(d2)
        x = x * scale
    if ones:  # the inner classifier's bias as a ones column
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    return x


def gather(src, rows):
    """Rows (sorted, a LongTensor) of a source, as a float32 tensor on its device."""
    if torch.is_tensor(src):
        return src[rows.to(src.device)]
    x = np.asarray(src["mmap"][rows.cpu().numpy()], dtype=np.float32)  # sorted rows: sequential disk reads
    return prepare(torch.from_numpy(x).to(src["dev"]), src["normalize"], src["ones"], src["scale"])


def gather_range(src, start, stop):
    n = src.shape[0] if torch.is_tensor(src) else src["mmap"].shape[0]
    return gather(src, torch.arange(start, min(stop, n)))


def num_rows(src):
    return src.shape[0] if torch.is_tensor(src) else src["mmap"].shape[0]
