"""TURTLE's outer loop and the end of a run, with or without a run folder: run_turtle.py runs it with one (its log,
checkpoints, resume), humelib.api without (arrays in, a task encoder out, no files).

    theta, seconds = train(args, d, run)     the outer iterations (TURTLE, Eq. (13), first-order)
    results = score(args, d, theta, seconds) the labeling of the evaluation points and its CV score
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from humelib import checkpoint
from humelib.cvscore import cv_score, turtle_cv_score
from humelib.arrays import check_rows
from humelib.metrics import all_metrics
from humelib.run_folder import Run
from humelib.runtime import HumeError, interruptible, log, seed_everything
from humelib.task_encoder import make_turtle_encoder, turtle_predict
from humelib.turtle_step import init_inner, inner_adam, outer_step


def check_data(args: argparse.Namespace, d: dict, names: tuple | None = None) -> dict:
    """The arrays of a run ({"phis", "phis_val", "y_val"}) checked against each other and against k. names: how
    errors name the training and the evaluation arrays (lists; None: arrays given in memory)."""
    names = names or ([f"phis[{i}]" for i in range(len(d["phis"]))],
                      [f"phis_val[{i}]" for i in range(len(d["phis_val"]))])
    check_rows(list(zip(names[0], d["phis"])))
    if d["phis_val"] is not d["phis"]:
        check_rows(list(zip(names[1], d["phis_val"])))
        if len(d["phis_val"]) != len(d["phis"]):
            raise HumeError(f"{len(d['phis'])} training spaces but {len(d['phis_val'])} evaluation spaces; give one "
                            "evaluation array per space, in the same order")
        for name, a, b in zip(names[1], d["phis"], d["phis_val"]):
            if a.shape[1] != b.shape[1]:
                raise HumeError(f"{name} has dimension {b.shape[1]} but its training array has {a.shape[1]}; both "
                                "must come from the same representation")
    if args.k > len(d["phis"][0]):
        raise HumeError(f"--k {args.k} is larger than the number of training points ({len(d['phis'][0])})")
    return d


def train(args: argparse.Namespace, d: dict, run: Run | None = None) -> tuple:
    """The outer loop from a fresh start or the run's checkpoint; without a run, no files. d: the arrays
    ({"phis", "phis_val", "y_val"}). Returns the task encoder theta and the seconds it trained."""
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
    start, seconds = 0, 0.0
    resumed = checkpoint.load_turtle(run, args, theta, opt, inner, inner_opt, gen) if run and args.resume else None
    if resumed:
        start, seconds = resumed
        log(f"resumed from {run.checkpoint} at iteration {start}", args.quiet)
    if run:
        run.begin_log(start if resumed else None)
    t0 = time.time() - seconds

    def save_checkpoint(it):
        if run:
            run.start_log()  # the log must belong to the checkpoint's run
            checkpoint.save_turtle(run, args, it, theta, opt, inner, inner_opt, gen, time.time() - t0)

    def final_checkpoint(it):  # Ctrl-C/SIGTERM after iteration it: a checkpoint unless one was just written
        if (it + 1) % args.ckpt_every and it + 1 != args.T:
            save_checkpoint(it + 1)
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
            if run:
                run.append_log(record)
        if (it + 1) % args.ckpt_every == 0 or it + 1 == args.T:
            save_checkpoint(it + 1)
    return theta, time.time() - t0


def evaluation(it: int, losses: tuple, theta: nn.Module, phis_val: list[torch.Tensor], y_val: np.ndarray | None,
               seconds: float) -> dict:
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


def score(args: argparse.Namespace, d: dict, theta: nn.Module, seconds: float) -> dict:
    """The labeling of the evaluation points, its label-free CV score (several spaces: the mean, as TURTLE) and,
    with labels, ACC/ARI/NMI: the results a run saves (results_{seed}.pickle)."""
    on_device = lambda arrays: [torch.from_numpy(a).to(args.device) for a in arrays]
    preds = turtle_predict(theta, on_device(d["phis_val"]))
    cv_on = d["phis"] if args.cross_val else d["phis_val"]  # TURTLE's --cross_val scores the training points
    cv_preds = turtle_predict(theta, on_device(cv_on)) if args.cross_val else preds
    score = turtle_cv_score if args.cross_val else cv_score
    t0 = time.time()
    cv = float(np.mean([score(a, cv_preds) for a in cv_on]))  # several spaces: the mean, as TURTLE
    cv_seconds = round(time.time() - t0, 3)
    results = {"CV_Score": cv, "preds": preds, "args": vars(args), "seconds": seconds, "cv_seconds": cv_seconds,
               "method": "turtle", "phi_paths": d.get("paths"), "phi_paths_val": d.get("paths_val"),
               "gt_labels_path": d.get("y_path")}
    if d["y_val"] is not None:
        results["metrics"] = all_metrics(d["y_val"], preds)
    return results
