"""HUME's outer loop and the end of a run, with or without a run folder: hume.py runs it with one (its log,
checkpoints, resume), humelib.api without (arrays in, a task encoder out, no files).

    with set_up(cfg):                                    the seeds, and TF32 as asked (restored after)
        search = prepare(cfg, data, steps)               the inputs on the device, the inner kernels timed here
        encoder, state = train(cfg, search, steps, run)  the outer iterations (Eq. 7)
    results = score(cfg, data, steps, encoder, state)    the labeling of the evaluation points and its CV score
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from humelib import checkpoint, distributed, inner_lr, outer, products
from humelib.cvscore import cv_score
from humelib.embeddings import Data, Rows
from humelib.fileio import torch_save
from humelib.hume_args import Settings
from humelib.metrics import all_metrics
from humelib.run_folder import Run
from humelib.runtime import HumeError, interruptible, log, seed_everything, warn
from humelib.task_encoder import init_inner, make_task_encoder, predict, sample_subsets

MILESTONES = (100, 200)  # annealing: outer lr x0.1 and tau /10 at these iterations


@contextlib.contextmanager
def set_up(cfg: Settings) -> Iterator[None]:
    """For the block: CUDA matmuls in TF32 if --tf32 (restored after: a notebook keeps its own setting), and the
    global seeds (the task encoder's init draws from torch's)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    seed_everything(cfg.seed)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@dataclasses.dataclass
class Search:
    """The problem on the device: phi1 and the phi2 spaces as Rows, the subset sizes and the outer objective."""
    phi1: Rows
    phi2s: list
    phi1_val: Rows
    n: int
    m: int
    m_tr: int
    dims: list
    obj: outer.Objective
    plans: list
    y_val: np.ndarray | None  # labels of the evaluation points: metrics only


def prepare(cfg: Settings, data: Data, steps: list, world: SimpleNamespace | None = None) -> Search:
    """steps: one inner_lr.Step per phi2 space."""
    dev = torch.device(cfg.device)
    n = data.phi1.shape[0]
    m = min(cfg.subset_size, n)
    m_tr = int(cfg.train_fraction * m)  # both parts non-empty: checked with the data
    plans = plan_kernels(cfg, data, n, m, m_tr, world)
    obj = outer.Objective(tuple(s.lr for s in steps), cfg.adaptation_steps, cfg.H_reg, cfg.method, cfg.bf16,
                          tuple(plans))
    return Search(Rows(data.phi1, dev, cfg.normalize), [Rows(p, dev, scale=s.scale, ones=True)
                                                        for p, s in zip(data.phi2, steps)],
                  Rows(data.phi1_val, dev, cfg.normalize), n, m, m_tr, [p.shape[1] for p in data.phi2], obj, plans,
                  data.y_val)


def plan_kernels(cfg: Settings, data: Data, n: int, m: int, m_tr: int,
                 world: SimpleNamespace | None = None) -> list:
    """products.plan for each phi2 space on this run's shapes (this rank's share of the subsets): the inner loops'
    layout and kernel, timed here. The unrolled reference needs none (plain matmuls)."""
    if cfg.method == "unrolled":
        return []
    S = cfg.num_subsets if world is None else len(range(cfg.num_subsets)[distributed.share(world, cfg.num_subsets)])
    only = None if cfg.kernel == "auto" else cfg.kernel
    plans = [products.plan(n, m, m_tr, p.shape[1] + 1, cfg.k, S, cfg.device, cfg.bf16, only) for p in data.phi2]
    for p in plans:
        log(f"inner products: {p.summary()}", cfg.quiet)
        advice = products.advice(p)
        if advice:
            warn(advice)
    return plans


@dataclasses.dataclass
class State:
    """What the outer loop carries from one iteration to the next (and a checkpoint keeps)."""
    encoder: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    start: int
    extra: dict  # seconds so far, --no_rand_init's fixed inner init, the first and last inner fit


def start(cfg: Settings, search: Search, run: Run | None = None, writer: bool = True) -> State:
    """A fresh task encoder, Adam and generator, or those of the run's checkpoint (--resume)."""
    dev = torch.device(cfg.device)
    encoder = make_task_encoder(search.phi1.data.shape[1], cfg.k).to(dev)
    opt = torch.optim.Adam(encoder.parameters(), lr=cfg.outer_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    w0 = [init_inner(gen, 1, cfg.k, d2, torch.float32).to(dev) for d2 in search.dims] if cfg.no_rand_init else None
    st = State(encoder, opt, gen, 0, {"seconds": 0.0, "w0_fixed": w0})
    resumed = checkpoint.load(run, cfg, encoder, opt, gen, shapes(search)) if run and cfg.resume else None
    if resumed:
        st.start, st.extra = resumed
        st.extra.setdefault("w0_fixed", None)
        log(f"resumed from {run.checkpoint} at iteration {st.start}", cfg.quiet)
        keep_plans(cfg, search, st.extra.get("plans"))
    st.extra["plans"] = [[p.layout, p.kernel, p.workers] for p in search.plans]  # for a resume
    if run and writer:
        run.begin_log(st.start if resumed else None)
    return st


def keep_plans(cfg: Settings, search: Search, saved: object) -> None:
    """On --resume with --kernel auto: the layout and kernel the run started with, not this start's timing (where
    two candidates are close it can go either way, and another kernel rounds differently: the same choice continues
    the run bit for bit), as long as they run here; on another machine, or from an older checkpoint, the new plan."""
    layouts, kernels = ("subset", "shared", "auto"), products.kernels()
    if cfg.kernel != "auto" or not isinstance(saved, list) or len(saved) != len(search.plans) or not all(
            isinstance(c, list) and len(c) == 3 and c[0] in layouts and c[1] in kernels and type(c[2]) is int
            and 1 <= c[2] <= max(1, cfg.num_subsets) and c[1].endswith("bf16") == cfg.bf16 for c in saved):
        return
    if any(products.probe(kernel, cfg.device) for _, kernel, _ in saved):
        return
    plans = [products.Plan(layout, kernel, p.timings, p.unavailable, workers)
             for (layout, kernel, workers), p in zip(saved, search.plans)]
    if plans != search.plans:
        log("inner products: as the run started, " + "; ".join(f"{p.kernel} kernel, {p.layout} layout, {p.workers} "
                                                               "at a time" for p in plans), cfg.quiet)
    search.plans, search.obj = plans, search.obj._replace(plans=tuple(plans))


def shapes(search: Search) -> dict:
    """The input arrays' shapes, as a checkpoint records them."""
    return {"phi1": [search.n, search.phi1.data.shape[1]], "phi2": [[search.n, d2] for d2 in search.dims]}


def schedule(cfg: Settings, it: int) -> tuple:
    """Outer lr and tau at iteration it: both divided by 10 at each milestone passed (unless --no_anneal)."""
    drops = 0 if cfg.no_anneal else sum(it >= m for m in MILESTONES)
    return cfg.outer_lr * 0.1 ** drops, cfg.tau / 10 ** drops


def outer_iteration(cfg: Settings, search: Search, st: State, it: int,
                    world: SimpleNamespace | None = None) -> tuple:
    """Iteration it: annealing, the subsets and inner inits drawn, one outer step. Returns (loss, inner fit,
    gradient norm, lr, tau); loss and norm as floats (one host sync)."""
    lr, tau = schedule(cfg, it)
    for group in st.opt.param_groups:
        group["lr"] = lr
    dev = torch.device(cfg.device)
    idx = sample_subsets(st.gen, search.n, cfg.num_subsets, search.m).to(dev)
    w0_fixed = st.extra["w0_fixed"]
    w0s = [w.expand(cfg.num_subsets, -1, -1) for w in w0_fixed] if w0_fixed else \
        [init_inner(st.gen, cfg.num_subsets, cfg.k, d2, torch.float32).to(dev) for d2 in search.dims]
    batch = outer.Batch(idx, search.m_tr, w0s)
    loss, fit, gnorm = outer.outer_step(st.encoder, st.opt, search.phi1, search.phi2s, batch, tau, search.obj, world)
    loss, gnorm = torch.stack([loss, gnorm]).tolist()
    return loss, fit, gnorm, lr, tau


def train(cfg: Settings, search: Search, steps: list, run: Run | None = None,
          world: SimpleNamespace | None = None) -> tuple:
    """The outer loop from a fresh start or the run's checkpoint; without a run, no files. A first Ctrl-C/SIGTERM
    takes effect between iterations (after a checkpoint). Returns the task encoder and the run's state."""
    writer = world is None or world.rank == 0  # only rank 0 writes files
    st = start(cfg, search, run, writer)
    plans = search.plans
    t0 = time.time() - st.extra["seconds"]

    def save_checkpoint(iteration):
        st.extra["seconds"] = time.time() - t0
        if run and writer:
            run.start_log()  # the log must belong to the checkpoint's run
            checkpoint.save(run, cfg, iteration, st.encoder, st.opt, st.gen, st.extra, shapes(search))

    def final_checkpoint(it):  # a signal after iteration it: a checkpoint unless one was just written
        if (it + 1) % cfg.ckpt_every or it + 1 == cfg.num_iters:  # after the last one too: --resume then finishes
            save_checkpoint(it + 1)
    bar = tqdm(range(st.start, cfg.num_iters), initial=st.start, total=cfg.num_iters,
               disable=True if cfg.quiet else None, desc=f"HUME seed {cfg.seed}")
    for it in interruptible(bar, final_checkpoint):
        loss, fit, gnorm, lr, tau = outer_iteration(cfg, search, st, it, world)
        if not (np.isfinite(loss) and np.isfinite(gnorm)):
            raise HumeError(diverged(it, loss, gnorm, run, steps, tau))
        bar.set_postfix(loss=f"{loss:.4f}")
        if it == 0 and writer:
            st.extra["inner_fit_first"] = inner_lr.fit_summary(fit)
            for msg in filter(None, [inner_lr.diagnose(st.extra["inner_fit_first"], s.lr, s.lam) for s in steps]):
                warn(msg)
        if cfg.save_all and run and writer:
            torch_save(st.encoder.state_dict(), run.snapshot(it))
        evaluating = (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.num_iters
        if world and evaluating:
            distributed.check_in_sync(world, st.encoder, it + 1)
        if writer and evaluating:
            st.extra["inner_fit_last"] = inner_lr.fit_summary(fit)
            rec = record(cfg, search, st, it + 1, (loss, gnorm, lr, tau), steps, time.time() - t0, plans)
            plans = None  # the first record this process writes says how its inner loops run
            if run:
                run.append_log(rec)
        if (it + 1) % cfg.ckpt_every == 0 and it + 1 < cfg.num_iters:
            save_checkpoint(it + 1)
    st.extra["seconds"] = time.time() - t0
    return st.encoder, st.extra


def record(cfg: Settings, search: Search, st: State, iteration: int, numbers: tuple, steps: list, seconds: float,
           plans: list | None) -> dict:
    """One metrics_{seed}.jsonl record (and, with labels, the progress line)."""
    loss, gnorm, lr, tau = numbers
    rec = {"iteration": iteration, "loss": loss, "tau": tau, "lr": lr, "inner_lr": inner_lrs(steps),
           "grad_norm": gnorm, "inner_fit": st.extra["inner_fit_last"], "seconds": round(seconds, 3)}
    if plans:
        rec["plan"] = plan_record(plans)
    if search.y_val is not None:
        rec["metrics"] = all_metrics(search.y_val, predict(st.encoder.weight, search.phi1_val))
        log(f"iter {iteration}: loss {loss:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in rec["metrics"].items()),
            cfg.quiet)
    return rec


def plan_record(plans: list) -> dict:
    """The plans as logged: the CPU's instruction set as torch sees it, and per phi2 space the choice, the
    milliseconds per inner step of every candidate and why the others could not run."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "spaces": [{"layout": p.layout, "kernel": p.kernel, "subsets_at_once": p.workers,
                        "ms_per_step": p.timings, "unavailable": p.unavailable} for p in plans]}


def inner_lrs(steps: list) -> float | list[float]:
    """The inner step(s) as logged and saved: one number, or a list with one per phi2 space."""
    return steps[0].lr if len(steps) == 1 else [s.lr for s in steps]


def diverged(it: int, loss: float, gnorm: float, run: Run | None, steps: list, tau: float) -> str:
    """The error of a non-finite outer loss or gradient: where, the last good checkpoint, and the likely cause."""
    last = run.checkpoint if run and os.path.isfile(run.checkpoint) else "none written yet"
    worst = max(s.lr * s.lam for s in steps)
    if worst > 4:
        cause = (f"The inner step is unstable (inner_lr x lambda_max = {worst:.3g}, stable below ~4): lower "
                 "--inner_lr (or use --inner_lr auto)")
    elif tau < 1e-4:
        cause = f"The temperature is {tau:.3g} at this iteration: raise --tau (or pass --no_anneal)"
    else:
        cause = "Lower --outer_lr (or --inner_lr; see the inner_lr x lambda_max line)"
    return (f"the outer loss or its gradient became {loss if not np.isfinite(loss) else gnorm} at iteration {it}; "
            f"the task encoder was not updated. Last good checkpoint: {last}. {cause}")


def score(cfg: Settings, data: Data, steps: list, encoder: torch.nn.Module, state: dict) -> dict:
    """The labeling of the evaluation points, its label-free CV score (several phi2 spaces: the mean) and, with
    labels, ACC/ARI/NMI: the results a run saves (results_{seed}.pickle)."""
    preds = predict(encoder.weight, Rows(data.phi1_val, cfg.device, cfg.normalize))
    t0 = time.time()
    cv = float(np.mean([cv_score(p, preds) for p in data.phi2_val]))
    scales = [s.scale for s in steps]
    results = {"CV_Score": cv, "preds": preds, "args": dict(dataclasses.asdict(cfg), phi2_scale=scales[0] if
                                                            len(scales) == 1 else scales),
               "seconds": state["seconds"], "cv_seconds": round(time.time() - t0, 3), "inner_lr": inner_lrs(steps),
               "inner_fit": {"first": state.get("inner_fit_first"), "last": state.get("inner_fit_last")}}
    if data.y_val is not None:
        results["metrics"] = all_metrics(data.y_val, preds)
    return results
