"""run_turtle.py's command line: the parser (TURTLE's flags, names and defaults, then ours) and the checks on flag
values (humelib.api reuses both for its settings).
"""
from __future__ import annotations

import argparse

from humelib.flags import default_device, device, int_in, make_parser, nonnegative_float, positive_float, seed_int
from humelib.runtime import HumeError


def build_parser(doc: str, exit_on_error: bool = True) -> argparse.ArgumentParser:
    p = make_parser(doc, exit_on_error)
    p.add_argument("--phi_paths", nargs="+", help="one .npy per representation space (n x d_i, same rows in the "
                   "same order); default: the bundled demo's phi2")
    p.add_argument("--phi_paths_val", nargs="+", help="the evaluation points in the same spaces (inductive); "
                   "none: label and report the training points (transductive)")
    p.add_argument("--gt_labels_path", help="labels of the evaluation points, used only to report metrics")
    p.add_argument("--k", type=int_in(2), default=10, help="number of classes of the labeling searched for")
    p.add_argument("--gamma", type=nonnegative_float, default=10.0,
                   help="weight of the entropy (balance) term, Eq. (12)")
    p.add_argument("--T", type=int_in(0), default=6000, help="outer iterations")
    p.add_argument("--inner_lr", type=positive_float, default=0.001, help="Adam step size of the inner classifiers")
    p.add_argument("--outer_lr", type=positive_float, default=0.001, help="Adam step size of the task encoder")
    p.add_argument("--batch_size", type=int_in(1), default=10000, help="points per outer iteration (capped at n)")
    p.add_argument("--M", type=int_in(1), default=10, help="inner Adam steps per outer iteration")
    p.add_argument("--warm_start", action="store_true", help="keep the inner classifiers and their Adam state "
                   "across iterations (default: cold start, a fresh random init every iteration)")
    p.add_argument("--cross_val", action="store_true", help="CV_Score as TURTLE's cross_val.py: on the training "
                   "points, an L2-penalised fit (cuML's C=1.0, i.e. scikit-learn's C=1.0) to convergence, 10 folds "
                   "from np.random.seed(42) (slower on large data); without it HUME's score on the evaluation "
                   "points: unpenalised, scikit-learn's lbfgs max_iter=100, KFold(10, shuffle, random_state=1)")
    p.add_argument("--device", type=device, default=default_device(), help="torch device")
    p.add_argument("--exp_path", default="./turtle_tasks/", help="output folder (created)")
    p.add_argument("--seed", type=seed_int, default=42, help="seeds python, numpy and torch")
    p.add_argument("--eval_every", type=int_in(1), default=20, help="evaluate and log metrics every N iterations")
    p.add_argument("--ckpt_every", type=int_in(1), default=500, help="write turtle_checkpoint_{seed}.pt every N "
                   "iterations and at the end")
    p.add_argument("--resume", action="store_true", help="continue from turtle_checkpoint_{seed}.pt if any")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work, each reported as one line naming the flag (before anything is read)."""
    if args.phi_paths is None and (args.phi_paths_val or args.gt_labels_path):
        raise HumeError("give --phi_paths (the training arrays), or no path flag at all to run the bundled demo")
    if args.phi_paths and args.phi_paths_val and len(args.phi_paths) != len(args.phi_paths_val):
        raise HumeError(f"{len(args.phi_paths)} --phi_paths files but {len(args.phi_paths_val)} --phi_paths_val "
                        "files; give one evaluation file per space, in the same order")
