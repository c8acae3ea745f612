"""hume.py's command line: the parser (the paper's flags, names and defaults, then ours), the checks on flag values,
and the Settings they resolve to. Resolved once after validation and passed explicitly; nothing changes them later.
select_k.py reuses the parser to check the flags it passes on to hume.py.
"""
from __future__ import annotations

import argparse
import dataclasses

from humelib import products
from humelib.arrays import DEMO
from humelib.flags import (default_device, device, finite_float, int_in, make_parser, nonnegative_float, positive_float,
                           seed_int)
from humelib.inner_lr import inner_lr_type
from humelib.runtime import HumeError


def build_parser(doc: str, exit_on_error: bool = True) -> argparse.ArgumentParser:
    p = make_parser(doc, exit_on_error)
    p.add_argument("--phi1_path", help="phi1 .npy (n x d1, rows L2-normalised); default: the bundled digits demo")
    p.add_argument("--phi2_path", nargs="+", help="phi2 .npy (n x d2), same rows as phi1; several files = several "
                   "spaces, the outer loss averaged over them; default: the bundled digits demo")
    p.add_argument("--phi1_path_val", help="phi1 of the evaluation points (inductive); give with --phi2_path_val")
    p.add_argument("--phi2_path_val", nargs="+", help="phi2 of the evaluation points, one per --phi2_path")
    p.add_argument("--gt_labels_path", help="labels of the evaluation points, used only to report metrics")
    p.add_argument("--k", type=int_in(2), default=10, help="number of classes of the labeling searched for")
    p.add_argument("--inner_lr", type=inner_lr_type, default=0.001,
                   help="step size of the inner gradient descent; 'auto' = 1/lambda_max of phi2's second moment, "
                   "one per space (use it for embeddings with unit-norm rows)")
    p.add_argument("--outer_lr", type=positive_float, default=0.001, help="Adam step size for the task encoder")
    p.add_argument("--tau", type=positive_float, default=0.1, help="temperature of the sparsemax labels")
    p.add_argument("--H_reg", type=nonnegative_float, default=10.0, help="weight of the entropy (balance) term")
    p.add_argument("--num_iters", type=int_in(0), default=1000, help="outer iterations")
    p.add_argument("--adaptation_steps", type=int_in(1), default=300, help="inner gradient steps per subset")
    p.add_argument("--num_subsets", type=int_in(1), default=20, help="subsets averaged per outer step")
    p.add_argument("--subset_size", type=int_in(2), default=10000, help="points per subset, X_tr + X_te (capped at n)")
    p.add_argument("--train_fraction", type=finite_float, default=0.9, help="share of a subset used as X_tr")
    p.add_argument("--no_anneal", action="store_true", help="no outer-lr/tau annealing at iterations 100 and 200")
    p.add_argument("--no_rand_init", action="store_true", help="one fixed inner init w0 instead of a fresh one")
    p.add_argument("--device", type=device, default=default_device(), help="torch device")
    p.add_argument("--exp_path", default="./linear_tasks/", help="output folder (created)")
    p.add_argument("--save_all", action="store_true", help="also save the task encoder at every iteration")
    p.add_argument("--seed", type=seed_int, default=42, help="seeds python, numpy and torch")
    # beyond the paper
    p.add_argument("--eval_every", type=int_in(1), default=20, help="evaluate and log metrics every N iterations")
    p.add_argument("--ckpt_every", type=int_in(1), default=50, help="write checkpoint_{seed}.pt every N iterations")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_{seed}.pt in --exp_path if any")
    p.add_argument("--hypergrad", choices=["adjoint", "unrolled"], default="adjoint",
                   help="adjoint: batched, stores only inner iterates; unrolled: autograd graph (the paper's way)")
    p.add_argument("--first_order", action="store_true",
                   help="drop the inner loop's dependence on the labels (cheaper, approximate)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (faster, less precise)")
    p.add_argument("--bf16", action="store_true", help="inner-loop GEMMs read a bfloat16 copy of phi2 (large data "
                   "sets; several times faster on CPUs with AVX512_BF16 or AMX, a warning where it is slower); "
                   "approximate hypergradient, its error measured by bench.py --methods bf16")
    p.add_argument("--kernel", choices=("auto",) + products.kernels(), default="auto",
                   help="what computes the inner products: auto times every candidate that runs here on the run's "
                   "shapes at start-up (about a second) and keeps the fastest, logged with its timings; a name pins "
                   "it (bit-identical reruns on one machine whatever the timings say)")
    p.add_argument("--mmap", action="store_true", help="memory-map the .npy files and read only each iteration's "
                   "subsets (arrays larger than RAM)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise phi1 rows (HUME expects unit-norm phi1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    return p


@dataclasses.dataclass(frozen=True)
class Settings:
    """One run's settings, as the flags give them (paths with the demo filled in when none were given)."""
    phi1_path: str
    phi2_path: tuple
    phi1_path_val: str
    phi2_path_val: tuple
    gt_labels_path: str
    k: int
    inner_lr: object  # a float, or "auto" (inner_lr.resolve turns it into one step per phi2 space)
    outer_lr: float
    tau: float
    H_reg: float
    num_iters: int
    adaptation_steps: int
    num_subsets: int
    subset_size: int
    train_fraction: float
    no_anneal: bool
    no_rand_init: bool
    device: str
    exp_path: str
    save_all: bool
    seed: int
    eval_every: int
    ckpt_every: int
    resume: bool
    hypergrad: str
    first_order: bool
    tf32: bool
    bf16: bool
    kernel: str
    mmap: bool
    normalize: bool
    quiet: bool

    @property
    def method(self) -> str:
        """How hypergrad differentiates the inner loop: adjoint, unrolled or first_order."""
        return "first_order" if self.first_order else self.hypergrad

    @property
    def inductive(self) -> bool:
        return self.phi1_path_val is not None


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work, each reported as one line naming the flag (before anything is read)."""
    if not 0 < args.train_fraction < 1:
        raise HumeError(f"--train_fraction must be between 0 and 1 (exclusive), got {args.train_fraction}")
    if (args.phi1_path_val is None) != (args.phi2_path_val is None):
        raise HumeError("give both --phi1_path_val and --phi2_path_val (inductive) or neither (transductive)")
    if (args.phi1_path is None) != (args.phi2_path is None):
        raise HumeError("give both --phi1_path and --phi2_path, or neither to run the bundled demo")
    if args.kernel != "auto" and args.kernel.endswith("-bf16") != args.bf16:
        want = "one ending in -bf16" if args.bf16 else "one without -bf16"
        raise HumeError(f"--kernel {args.kernel} does not match --bf16 ({'on' if args.bf16 else 'off'}): pick {want}, "
                        "or --kernel auto")
    if args.kernel != "auto" and products.probe(args.kernel, args.device):
        raise HumeError(f"--kernel {args.kernel} cannot run here: {products.probe(args.kernel, args.device)}; "
                        "use --kernel auto")
    if args.phi2_path and args.phi2_path_val and len(args.phi2_path) != len(args.phi2_path_val):
        raise HumeError(f"{len(args.phi2_path)} --phi2_path files but {len(args.phi2_path_val)} --phi2_path_val "
                        "files; give one evaluation file per phi2 space, in the same order")


def settings(args: argparse.Namespace) -> Settings:
    """Settings from checked flags. With no path flags at all: the bundled demo, inductive (train split, scored
    on the test split)."""
    paths = {"phi1_path": args.phi1_path, "phi2_path": args.phi2_path, "phi1_path_val": args.phi1_path_val,
             "phi2_path_val": args.phi2_path_val, "gt_labels_path": args.gt_labels_path}
    if args.phi1_path is None and args.phi1_path_val is None and args.gt_labels_path is None:
        paths = {"phi1_path": DEMO["phi1_train"], "phi2_path": [DEMO["phi2_train"]],
                 "phi1_path_val": DEMO["phi1_test"], "phi2_path_val": [DEMO["phi2_test"]],
                 "gt_labels_path": DEMO["labels_test"]}
    for key in ("phi2_path", "phi2_path_val"):
        paths[key] = tuple(paths[key]) if paths[key] else None
    return Settings(**{**vars(args), **paths})


def parse(doc: str, argv: list[str] | None = None) -> Settings:
    """The command line, parsed, checked and resolved into Settings."""
    args = build_parser(doc).parse_args(argv)
    check_args(args)
    return settings(args)
