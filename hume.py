"""HUME: search for the labeling a human would give a data set, with no labels (Gadetsky & Brbic, NeurIPS 2023).

A task encoder W (k x d1, orthonormal rows) labels the data in space phi1; a linear classifier trained on those labels
in space phi2 must generalise to held-out points. Minimising that error (plus a balance term) over W recovers the
human labeling. Labels are used only to report metrics.

    python hume.py                                     # bundled digits demo, the paper's defaults (slow on a CPU)
    python hume.py --outer_lr 0.01 --num_subsets 5 --adaptation_steps 100 --num_iters 150   # the README's demo
    python hume.py --phi1_path P1.npy --phi2_path P2.npy --gt_labels_path Y.npy --k 10 --exp_path tasks/run/ --seed 0

Writes to --exp_path: linear_task_{seed}.pt and results_{seed}.pickle (the paper's formats, see evaluate.py) and
metrics_{seed}.jsonl (one JSON object per evaluation) and checkpoint_{seed}.pt (every --ckpt_every iterations;
--resume continues from it). Bad inputs end with one line on stderr and exit code 2.
Equation numbers in comments are those of the paper (arXiv 2311.02940v1, the NeurIPS 2023 version), as its public
code cites them: Eq. 3 the task encoder, Eq. 5 the inner problem, Eq. 7 HUME's objective.
"""
import dataclasses
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from humelib import checkpoint, distributed, hume_args, inner_lr, outer, products, run_folder
from humelib.cvscore import cv_score
from humelib.embeddings import Rows, load_data
from humelib.fileio import append_jsonl, ensure_dir, torch_bytes, torch_save
from humelib.metrics import all_metrics
from humelib.run_folder import keep_log_until, seed_lock, start_log
from humelib.runtime import HumeError, interruptible, log, release_freed_memory, run_cli, seed_everything, summary, warn
from humelib.task_encoder import init_inner, make_task_encoder, predict, sample_subsets

MILESTONES = (100, 200)  # annealing: outer lr x0.1 and tau /10 at these iterations


def schedule(cfg, it):
    """Outer lr and tau at iteration it: both divided by 10 at each milestone passed (unless --no_anneal)."""
    drops = 0 if cfg.no_anneal else sum(it >= m for m in MILESTONES)
    return cfg.outer_lr * 0.1 ** drops, cfg.tau / 10 ** drops


def train(cfg, data, steps, world=None):
    """The outer loop from a fresh start or the checkpoint. steps: one inner_lr.Step per phi2
    space. Returns the task encoder and the run's state (seconds, inner diagnosis)."""
    dev = torch.device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    seed_everything(cfg.seed)
    phi1 = Rows(data.phi1, dev, cfg.normalize)
    n, d1 = data.phi1.shape
    m = min(cfg.subset_size, n)
    m_tr = int(cfg.train_fraction * m)  # both parts non-empty: checked by load_data
    phi2s = [Rows(p, dev, scale=s.scale, ones=True) for p, s in zip(data.phi2, steps)]
    phi1_val = Rows(data.phi1_val, dev, cfg.normalize)
    plans = plan_kernels(cfg, data, n, m, m_tr, world)
    obj = outer.Objective(tuple(s.lr for s in steps), cfg.adaptation_steps, cfg.H_reg, cfg.method, cfg.bf16,
                          tuple(plans))
    encoder = make_task_encoder(d1, cfg.k).to(dev)
    opt = torch.optim.Adam(encoder.parameters(), lr=cfg.outer_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    dims = [p.shape[1] for p in data.phi2]
    w0_fixed = [init_inner(gen, 1, cfg.k, d2, torch.float32).to(dev) for d2 in dims] if cfg.no_rand_init else None
    metrics_path = os.path.join(cfg.exp_path, f"metrics_{cfg.seed}.jsonl")
    writer = world is None or world.rank == 0  # only rank 0 writes files
    start_it, state = 0, {"seconds": 0.0}
    shapes = {"phi1": list(data.phi1.shape), "phi2": [list(p.shape) for p in data.phi2]}
    resumed = checkpoint.load(cfg, encoder, opt, gen, shapes) if cfg.resume else None
    if resumed:
        start_it, state = resumed
        w0_fixed = state.get("w0_fixed")
        if writer:
            keep_log_until(metrics_path, start_it)
        log(f"resumed from {checkpoint.path_for(cfg)} at iteration {start_it}", cfg.quiet)
    state["w0_fixed"] = w0_fixed
    fresh_log = [writer and not resumed]  # a fresh run replaces an old log at its first write, not before

    def save_checkpoint(iteration):
        state["seconds"] = time.time() - t0
        if writer:
            start_log(metrics_path, fresh_log)  # the log must belong to the checkpoint's run
            checkpoint.save(cfg, iteration, encoder, opt, gen, state, shapes)

    def final_checkpoint(it):  # Ctrl-C/SIGTERM after iteration it: a checkpoint unless one was just written
        if (it + 1) % cfg.ckpt_every or it + 1 == cfg.num_iters:  # after the last one too: --resume then finishes
            save_checkpoint(it + 1)
    t0 = time.time() - state["seconds"]
    bar = tqdm(range(start_it, cfg.num_iters), initial=start_it, total=cfg.num_iters,
               disable=True if cfg.quiet else None, desc=f"HUME seed {cfg.seed}")
    for it in interruptible(bar, final_checkpoint):  # a signal takes effect between iterations
        lr, tau = schedule(cfg, it)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = sample_subsets(gen, n, cfg.num_subsets, m).to(dev)
        w0s = [w.expand(cfg.num_subsets, -1, -1) for w in w0_fixed] if w0_fixed else \
            [init_inner(gen, cfg.num_subsets, cfg.k, d2, torch.float32).to(dev) for d2 in dims]
        loss, fit, gnorm = outer.outer_step(encoder, opt, phi1, phi2s, outer.Batch(idx, m_tr, w0s), tau, obj, world)
        loss, gnorm = torch.stack([loss, gnorm]).tolist()  # one host sync per outer iteration
        if not (np.isfinite(loss) and np.isfinite(gnorm)):
            last = checkpoint.path_for(cfg) if os.path.isfile(checkpoint.path_for(cfg)) else "none written yet"
            raise HumeError(f"the outer loss or its gradient became {loss if not np.isfinite(loss) else gnorm} at "
                            f"iteration {it}; the task encoder was not updated. Last good checkpoint: {last}. "
                            f"{divergence_cause(steps, tau)}")
        bar.set_postfix(loss=f"{loss:.4f}")
        if it == 0 and writer:
            state["inner_fit_first"] = inner_lr.fit_summary(fit)
            for msg in filter(None, [inner_lr.diagnose(state["inner_fit_first"], s.lr, s.lam) for s in steps]):
                warn(msg)
        if cfg.save_all and writer:
            torch_save(encoder.state_dict(), os.path.join(cfg.exp_path, f"linear_task_{it}_{cfg.seed}.pt"))
        if world and ((it + 1) % cfg.eval_every == 0 or it + 1 == cfg.num_iters):
            distributed.check_in_sync(world, encoder, it + 1)
        if writer and ((it + 1) % cfg.eval_every == 0 or it + 1 == cfg.num_iters):
            state["inner_fit_last"] = inner_lr.fit_summary(fit)
            record = {"iteration": it + 1, "loss": loss, "tau": tau, "lr": lr, "inner_lr": inner_lrs(steps),
                      "grad_norm": gnorm, "inner_fit": state["inner_fit_last"], "seconds": round(time.time() - t0, 3)}
            if plans:  # the first record this process writes says how its inner loops run
                record["plan"], plans = plan_record(plans), None
            if data.y_val is not None:
                record["metrics"] = all_metrics(data.y_val, predict(encoder.weight, phi1_val))
                log(f"iter {it + 1}: loss {loss:.4f} " +
                    " ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items()), cfg.quiet)
            start_log(metrics_path, fresh_log)
            append_jsonl(metrics_path, record)
        if (it + 1) % cfg.ckpt_every == 0 and it + 1 < cfg.num_iters:
            save_checkpoint(it + 1)
    state["seconds"] = time.time() - t0
    return encoder, state


def plan_kernels(cfg, data, n, m, m_tr, world):
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


def plan_record(plans):
    """The plans as logged: the CPU's instruction set as torch sees it, and per phi2 space the choice, the
    milliseconds per inner step of every candidate and why the others could not run."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "spaces": [{"layout": p.layout, "kernel": p.kernel, "subsets_at_once": p.workers,
                        "ms_per_step": p.timings, "unavailable": p.unavailable} for p in plans]}


def inner_lrs(steps):
    """The inner step(s) as logged and saved: one number, or a list with one per phi2 space."""
    return steps[0].lr if len(steps) == 1 else [s.lr for s in steps]


def divergence_cause(steps, tau):
    """The flag that most likely made the loss non-finite, as advice."""
    worst = max(s.lr * s.lam for s in steps)
    if worst > 4:
        return (f"The inner step is unstable (inner_lr x lambda_max = {worst:.3g}, stable below ~4): lower "
                "--inner_lr (or use --inner_lr auto)")
    if tau < 1e-4:
        return f"The temperature is {tau:.3g} at this iteration: raise --tau (or pass --no_anneal)"
    return "Lower --outer_lr (or --inner_lr; see the inner_lr x lambda_max line)"


def resume_hint(cfg):
    path = checkpoint.path_for(cfg)
    if os.path.isfile(path):
        return f"rerun the same command with --resume to continue from {path}"
    return f"no checkpoint yet (the first is written at iteration {cfg.ckpt_every}): rerun to start over"


def finish(cfg, data, steps, encoder, state):
    """Predictions on the evaluation set, the label-free CV score, and the paper's two files with the scored log
    (one unit: run_folder.commit)."""
    preds = predict(encoder.weight, Rows(data.phi1_val, cfg.device, cfg.normalize))
    t0 = time.time()
    cv = float(np.mean([cv_score(p, preds) for p in data.phi2_val]))  # several spaces: mean over them
    cv_seconds = round(time.time() - t0, 3)
    scales = [s.scale for s in steps]
    results = {"CV_Score": cv, "preds": preds, "args": dict(dataclasses.asdict(cfg), phi2_scale=scales[0] if
                                                            len(scales) == 1 else scales),
               "seconds": state["seconds"], "cv_seconds": cv_seconds, "inner_lr": inner_lrs(steps),
               "inner_fit": {"first": state.get("inner_fit_first"), "last": state.get("inner_fit_last")}}
    if data.y_val is not None:
        results["metrics"] = all_metrics(data.y_val, preds)
    run_folder.commit(cfg.exp_path, cfg.seed, f"linear_task_{cfg.seed}.pt",
                torch_bytes({k: v.cpu() for k, v in encoder.state_dict().items()}), results)
    return results


def main(argv=None):
    cfg = hume_args.parse(__doc__, argv)
    world = distributed.init(cfg.num_subsets, cfg.device) if distributed.launched() else None
    if world:
        cfg = dataclasses.replace(cfg, device=world.device, quiet=cfg.quiet or world.rank != 0)
    try:
        results = run(cfg, world)
    except BaseException:
        distributed.close(world)
        raise
    distributed.close(world, wait=True)
    return results


def run(cfg, world):
    data = load_data(cfg)
    ensure_dir(cfg.exp_path, "--exp_path")  # only after every input check passed: bad input writes nothing
    run_folder.check(cfg.exp_path, cfg.seed, "hume")  # every output, and the seed not run_turtle.py's, before any work
    if world and world.rank != 0:
        return train_and_finish(cfg, data, world)
    with seed_lock(cfg.exp_path, cfg.seed):  # a second run of this seed into this folder is refused
        run_folder.claim(cfg.exp_path, cfg.seed, "hume")
        try:
            return train_and_finish(cfg, data, world)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (SLURM): say how to continue
            e.hint = resume_hint(cfg)
            raise


def train_and_finish(cfg, data, world):
    log(f"HUME {'inductive' if cfg.inductive else 'transductive'}: n={len(data.phi1)} d1={data.phi1.shape[1]} "
        f"d2={[p.shape[1] for p in data.phi2]} k={cfg.k} -> {cfg.exp_path}", cfg.quiet)
    steps = inner_lr.resolve(cfg.inner_lr, data.phi2, cfg.quiet)
    encoder, state = train(cfg, data, steps, world)
    if world and world.rank != 0:
        return None
    release_freed_memory()  # before the CV score and, again, before interpreter shutdown pages in its share
    results = finish(cfg, data, steps, encoder, state)
    release_freed_memory()
    log(summary(state["seconds"], results), cfg.quiet)
    return results


if __name__ == "__main__":
    run_cli(main)
