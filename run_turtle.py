"""TURTLE: find the labeling whose linear classifiers have the largest margin in one or several strong spaces
(Gadetsky, Jiang & Brbic, "Let Go of Your Labels with Unsupervised Transfer", ICML 2024).

A task encoder theta (one weight-normalised linear head per space) labels the data; linear classifiers trained on
those labels for M steps in every space must fit them well. Minimising their loss over theta (first-order: the inner
result is held fixed, Eq. (13)) plus a balance term recovers the human labeling. Labels are used only to report.

    python run_turtle.py                                   # bundled digits demo: phi2 alone, TURTLE's defaults
    python run_turtle.py --T 1000 --exp_path tasks/turtle_demo/ --seed 0 && \
        python evaluate.py --tasks_path tasks/turtle_demo/
    python run_turtle.py --phi_paths clip_train.npy dino_train.npy --phi_paths_val clip_val.npy dino_val.npy \
        --gt_labels_path y_val.npy --k 10 --exp_path tasks/turtle/cifar10/ --seed 0

Writes to --exp_path: turtle_task_{seed}.pt (TURTLE's checkpoint layout: {"phi1": state_dict, "phi2": ...} of plain
nn.Linear(d_i, k) heads, weight norm removed), results_{seed}.pickle (CV_Score and more, as hume.py), metrics_{seed}
.jsonl (one JSON object per evaluation) and turtle_checkpoint_{seed}.pt (--resume continues from it, also to a larger
--T). Bad inputs end with one line on stderr and exit code 2.
"""
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from humelib import run_folder
from humelib.arrays import DEMO, check_rows, load_array, load_labels
from humelib.cvscore import cv_score, turtle_cv_score
from humelib.fileio import append_jsonl, ensure_dir, torch_bytes, torch_save
from humelib.flags import default_device, device, int_in, make_parser, nonnegative_float, positive_float, seed_int
from humelib.metrics import all_metrics
from humelib.run_folder import keep_log_until, seed_lock, start_log
from humelib.runtime import HumeError, first_line, interruptible, log, run_cli, seed_everything, summary
from humelib.task_encoder import export_turtle_task, make_turtle_encoder, turtle_predict
from humelib.turtle_step import init_inner, inner_adam, outer_step

# settings a resumed run must share with the run it continues (--T may grow)
FIXED = ("k", "gamma", "inner_lr", "outer_lr", "batch_size", "M", "warm_start", "seed", "phi_paths")


def build_parser():
    p = make_parser(__doc__)
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


# ---------------------------------------------------------------- inputs

def check_args(args):
    """Flag values that cannot work, each reported as one line naming the flag (before anything is read)."""
    if args.phi_paths is None and (args.phi_paths_val or args.gt_labels_path):
        raise HumeError("give --phi_paths (the training arrays), or no path flag at all to run the bundled demo")
    if args.phi_paths and args.phi_paths_val and len(args.phi_paths) != len(args.phi_paths_val):
        raise HumeError(f"{len(args.phi_paths)} --phi_paths files but {len(args.phi_paths_val)} --phi_paths_val "
                        "files; give one evaluation file per space, in the same order")


def load_data(args):
    """{"phis", "phis_val", "y_val"} and their paths, checked against each other; evaluation = training points
    when no --phi_paths_val (transductive). No path flags: the demo's phi2, trained on its train split, scored on its
    test split."""
    if args.phi_paths is None:
        paths, paths_val, y_path = [DEMO["phi2_train"]], [DEMO["phi2_test"]], DEMO["labels_test"]
    else:
        paths, paths_val, y_path = args.phi_paths, args.phi_paths_val, args.gt_labels_path
    d = {"paths": paths, "phis": [load_array(p, "--phi_paths") for p in paths]}
    check_rows([(f"--phi_paths {p}", a) for p, a in zip(paths, d["phis"])])
    d["phis_val"] = [load_array(p, "--phi_paths_val") for p in paths_val] if paths_val else d["phis"]
    check_rows([(f"--phi_paths_val {p}", a) for p, a in zip(paths_val or paths, d["phis_val"])])
    for p, a, b in zip(paths_val or [], d["phis"], d["phis_val"]):
        if a.shape[1] != b.shape[1]:
            raise HumeError(f"--phi_paths_val {p} has dimension {b.shape[1]} but its training array has "
                            f"{a.shape[1]}; both must come from the same representation")
    d["y_val"] = load_labels(y_path, "--gt_labels_path", len(d["phis_val"][0])) if y_path else None
    d["paths_val"], d["y_path"] = paths_val or paths, y_path  # recorded in the results (plot.py reads them)
    if args.k > len(d["phis"][0]):
        raise HumeError(f"--k {args.k} is larger than the number of training points ({len(d['phis'][0])})")
    return d


# ---------------------------------------------------------------- training

def checkpoint_path(args):
    return os.path.join(args.exp_path, f"turtle_checkpoint_{args.seed}.pt")


def save_checkpoint(args, it, theta, opt, inner, inner_opt, gen, seconds):
    """Everything needed to continue bit for bit, as tensors and plain values (loads with weights_only=True)."""
    state = {"iteration": it, "theta": theta.state_dict(), "opt": opt.state_dict(), "generator": gen.get_state(),
             "torch_rng": torch.get_rng_state(), "seconds": seconds, "fixed": {k: getattr(args, k) for k in FIXED}}
    if args.warm_start:
        state.update(inner=inner.state_dict(), inner_opt=inner_opt.state_dict())
    torch_save(state, checkpoint_path(args))


def load_checkpoint(args, theta, opt, inner, inner_opt, gen):
    """Restore a checkpoint in place; returns (next iteration, seconds so far), or None when there is none."""
    path = checkpoint_path(args)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as e:
        raise HumeError(f"--resume: {path} cannot be read ({type(e).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("fixed"), dict):
        raise HumeError(f"--resume: {path} is not a checkpoint written by run_turtle.py; delete it to start over")
    changed = [k for k in FIXED if state["fixed"].get(k) != getattr(args, k)]
    if changed:
        was = ", ".join(f"--{k} {state['fixed'].get(k)!r} (now {getattr(args, k)!r})" for k in changed)
        raise HumeError(f"--resume: {path} was written with {was}; rerun with the same settings or another "
                        "--exp_path")
    try:
        theta.load_state_dict(state["theta"])
        opt.load_state_dict(state["opt"])
        if args.warm_start:
            inner.load_state_dict(state["inner"])
            inner_opt.load_state_dict(state["inner_opt"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        it, seconds = state["iteration"], float(state["seconds"])
    except Exception as e:
        raise HumeError(f"--resume: {path} is damaged ({type(e).__name__}: {first_line(e)}); delete it to start "
                        "over") from None
    if type(it) is not int or it < 0 or not 0 <= seconds < float("inf"):
        raise HumeError(f"--resume: {path} is damaged (iteration {it!r}, {seconds!r} seconds); delete it to start "
                        "over")
    if it > args.T:
        raise HumeError(f"--resume: {path} is at iteration {it}, past --T {args.T}; give --T {it} or more")
    return it, seconds


def train(args, d):
    dev = torch.device(args.device)
    seed_everything(args.seed)
    phis = [torch.from_numpy(a).to(dev) for a in d["phis"]]
    phis_val = [torch.from_numpy(a).to(dev) for a in d["phis_val"]]
    n, dims = len(phis[0]), [z.shape[1] for z in phis]
    m = min(args.batch_size, n)
    theta = make_turtle_encoder(dims, args.k).to(dev)
    opt = torch.optim.Adam(theta.parameters(), lr=args.outer_lr)
    gen = torch.Generator().manual_seed(args.seed)  # batches and inner inits

    def new_inner():
        inner = init_inner(gen, dims, args.k, dev)
        return inner, inner_adam(inner, args.inner_lr)
    inner, inner_opt = new_inner() if args.warm_start else (None, None)
    metrics_path = os.path.join(args.exp_path, f"metrics_{args.seed}.jsonl")
    start, seconds = 0, 0.0
    resumed = load_checkpoint(args, theta, opt, inner, inner_opt, gen) if args.resume else None
    if resumed:
        start, seconds = resumed
        keep_log_until(metrics_path, start)
        log(f"resumed from {checkpoint_path(args)} at iteration {start}", args.quiet)
    fresh_log = [not resumed]  # a fresh run replaces an old log at its first write, not before
    t0 = time.time() - seconds

    def final_checkpoint(it):  # Ctrl-C/SIGTERM after iteration it: a checkpoint unless one was just written
        if (it + 1) % args.ckpt_every and it + 1 != args.T:
            save_checkpoint(args, it + 1, theta, opt, inner, inner_opt, gen, time.time() - t0)
    bar = tqdm(range(start, args.T), initial=start, total=args.T, disable=True if args.quiet else None,
               desc=f"TURTLE seed {args.seed}")
    for it in interruptible(bar, final_checkpoint):  # a signal takes effect between iterations
        idx = torch.randperm(n, generator=gen)[:m].to(dev)  # without replacement
        if not args.warm_start:
            inner, inner_opt = new_inner()  # cold start
        loss, pred_error, entropy = outer_step(theta, opt, inner, inner_opt, phis, idx, args.gamma, args.M)
        if (it + 1) % args.eval_every == 0 or it + 1 == args.T:  # the only host syncs of the loop
            record = evaluation(it + 1, (loss, pred_error, entropy), theta, phis_val, d["y_val"], time.time() - t0)
            bar.set_postfix(loss=f"{record['loss']:.3f}", clusters=record["clusters_found"],
                            **{k: f"{v:.4f}" for k, v in record.get("metrics", {}).items() if k == "acc"})
            start_log(metrics_path, fresh_log)
            append_jsonl(metrics_path, record)
        if (it + 1) % args.ckpt_every == 0 or it + 1 == args.T:
            save_checkpoint(args, it + 1, theta, opt, inner, inner_opt, gen, time.time() - t0)
    return theta, time.time() - t0


def evaluation(it, losses, theta, phis_val, y_val, seconds):
    """One metrics_{seed}.jsonl record: the outer loss and its two terms, clusters used, ACC/ARI/NMI if labels."""
    loss, pred_error, entropy = torch.stack(losses).tolist()
    if not np.isfinite(loss):
        raise HumeError(f"the outer loss became {loss} at iteration {it}; lower --outer_lr or --inner_lr")
    preds = turtle_predict(theta, phis_val)
    record = {"iteration": it, "loss": loss, "pred_error": pred_error, "entropy": entropy,
              "clusters_found": int(len(np.unique(preds))), "seconds": round(seconds, 3)}
    if y_val is not None:
        record["metrics"] = all_metrics(y_val, preds)
    return record


def finish(args, d, theta, seconds):
    """Predictions on the evaluation points, the label-free CV score (mean over spaces) and the two task files."""
    on_device = lambda arrays: [torch.from_numpy(a).to(args.device) for a in arrays]
    preds = turtle_predict(theta, on_device(d["phis_val"]))
    cv_on = d["phis"] if args.cross_val else d["phis_val"]  # TURTLE's --cross_val scores the training points
    cv_preds = turtle_predict(theta, on_device(cv_on)) if args.cross_val else preds
    score = turtle_cv_score if args.cross_val else cv_score
    t0 = time.time()
    cv = float(np.mean([score(a, cv_preds) for a in cv_on]))  # several spaces: the mean, as TURTLE
    cv_seconds = round(time.time() - t0, 3)
    results = {"CV_Score": cv, "preds": preds, "args": vars(args), "seconds": seconds, "cv_seconds": cv_seconds,
               "method": "turtle", "phi_paths": d["paths"], "phi_paths_val": d["paths_val"],
               "gt_labels_path": d["y_path"]}
    if d["y_val"] is not None:
        results["metrics"] = all_metrics(d["y_val"], preds)
    run_folder.commit(args.exp_path, args.seed, f"turtle_task_{args.seed}.pt", torch_bytes(export_turtle_task(theta)),
                results)
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    d = load_data(args)
    ensure_dir(args.exp_path, "--exp_path")  # only after every input check passed: bad input writes nothing
    mode = "inductive" if d["phis_val"] is not d["phis"] else "transductive"
    log(f"TURTLE {mode}: n={len(d['phis'][0])} dims={[a.shape[1] for a in d['phis']]} k={args.k} -> "
        f"{args.exp_path}", args.quiet)
    run_folder.check(args.exp_path, args.seed, "turtle")  # every output, and the seed not hume.py's, before any work
    with seed_lock(args.exp_path, args.seed):  # a second run of this seed into this folder is refused
        run_folder.claim(args.exp_path, args.seed, "turtle")
        try:
            theta, seconds = train(args, d)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (SLURM): say how to continue
            e.hint = f"rerun the same command with --resume to continue from {checkpoint_path(args)}"
            raise
        results = finish(args, d, theta, seconds)
    log(summary(seconds, results), args.quiet)
    return results


if __name__ == "__main__":
    run_cli(main)
