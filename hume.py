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
"""
import json
import os
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import checkpoint
import distributed
import hypergrad
from inputs import check_args, gather, gather_range, inner_lr_type, load_data, num_rows, source
from utils import (HumeError, all_metrics, append_jsonl, atomic_write, cv_score, ensure_dir, log, make_parser,
                   pickle_save, run_cli, seed_everything, torch_save, warn)

MILESTONES = (100, 200)  # annealing: outer lr x0.1 and tau /10 at these iterations


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--phi1_path", help="phi1 .npy (n x d1, rows L2-normalised); default: the bundled digits demo")
    p.add_argument("--phi2_path", nargs="+", help="phi2 .npy (n x d2), same rows as phi1; several files = several "
                   "spaces, the outer loss averaged over them; default: the bundled digits demo")
    p.add_argument("--phi1_path_val", help="phi1 of the evaluation points (inductive); give with --phi2_path_val")
    p.add_argument("--phi2_path_val", nargs="+", help="phi2 of the evaluation points, one per --phi2_path")
    p.add_argument("--gt_labels_path", help="labels of the evaluation points, used only to report metrics")
    p.add_argument("--k", type=int, default=10, help="number of classes of the labeling searched for")
    p.add_argument("--inner_lr", type=inner_lr_type, default=0.001,
                   help="step size of the inner gradient descent; 'auto' = 1/lambda_max of phi2's second moment, "
                   "one per space (use it for embeddings with unit-norm rows)")
    p.add_argument("--outer_lr", type=float, default=0.001, help="Adam step size for the task encoder")
    p.add_argument("--tau", type=float, default=0.1, help="temperature of the sparsemax labels")
    p.add_argument("--H_reg", type=float, default=10.0, help="weight of the entropy (balance) term")
    p.add_argument("--num_iters", type=int, default=1000, help="outer iterations")
    p.add_argument("--adaptation_steps", type=int, default=300, help="inner gradient steps per subset")
    p.add_argument("--num_subsets", type=int, default=20, help="subsets averaged per outer step")
    p.add_argument("--subset_size", type=int, default=10000, help="points per subset, X_tr + X_te (capped at n)")
    p.add_argument("--train_fraction", type=float, default=0.9, help="share of a subset used as X_tr")
    p.add_argument("--no_anneal", action="store_true", help="no outer-lr/tau annealing at iterations 100 and 200")
    p.add_argument("--no_rand_init", action="store_true", help="one fixed inner init w0 instead of a fresh one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--exp_path", default="./linear_tasks/", help="output folder (created)")
    p.add_argument("--save_all", action="store_true", help="also save the task encoder at every iteration")
    p.add_argument("--seed", type=int, default=42, help="seeds python, numpy and torch")
    # beyond the paper
    p.add_argument("--eval_every", type=int, default=20, help="evaluate and log metrics every N iterations")
    p.add_argument("--ckpt_every", type=int, default=50, help="write checkpoint_{seed}.pt every N iterations")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_{seed}.pt in --exp_path if any")
    p.add_argument("--hypergrad", choices=["adjoint", "unrolled"], default="adjoint",
                   help="adjoint: batched, stores only inner iterates; unrolled: autograd graph (the paper's way)")
    p.add_argument("--first_order", action="store_true",
                   help="drop the inner loop's dependence on the labels (cheaper, approximate)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (faster, less precise)")
    p.add_argument("--bf16", action="store_true", help="inner-loop GEMMs read a bfloat16 copy of phi2 (large data "
                   "sets; ~5x faster GEMMs on CPUs with AVX512_BF16); approximate hypergradient, its error measured by "
                   "bench.py --methods bf16")
    p.add_argument("--mmap", action="store_true", help="memory-map the .npy files and read only each iteration's "
                   "subsets (arrays larger than RAM)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise phi1 rows (HUME expects unit-norm phi1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    return p


def make_task_encoder(d1, k):
    """The paper's task encoder: a linear map with orthonormal rows (the saved state_dict has this layout)."""
    return nn.utils.parametrizations.orthogonal(nn.Linear(d1, k, bias=False))


def sample_subsets(gen, n, S, m):
    """S subsets of m distinct points each (indices (S, m)); the first train_fraction of each row is X_tr."""
    return torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(S)])


def init_inner(gen, S, k, d2, dtype):
    """Inner classifiers [V, c] (S, k, d2+1), drawn like nn.Linear's default init: U(-1/sqrt(d2), 1/sqrt(d2))."""
    bound = 1 / np.sqrt(d2)
    return (torch.rand(S, k, d2 + 1, generator=gen, dtype=dtype) * 2 - 1) * bound


def schedule(args, it):
    """Outer lr and tau at iteration it: both divided by 10 at each milestone passed (unless --no_anneal)."""
    drops = 0 if args.no_anneal else sum(it >= m for m in MILESTONES)
    return args.outer_lr * 0.1 ** drops, args.tau / 10 ** drops


def hypergradient(encoder, phi1, phi2as, idx, m_tr, w0s, tau, args, total_subsets=None):
    """Outer loss over the subsets idx (S, m), averaged over subsets and phi2 spaces; its gradient is accumulated
    into the encoder's .grad. phi1/phi2as are gather() sources (phi2 with its ones column), w0s one init per space,
    args.inner_lr one step (or a list, one per space). The orthogonal parametrisation is evaluated and
    back-propagated once, however many subsets. total_subsets: the S the mean is over (idx may be a share of it)."""
    W = encoder.weight
    W_leaf = W.detach().requires_grad_(True)
    method = "first_order" if args.first_order else args.hypergrad
    S = total_subsets or idx.shape[0]
    # memory-mapped sources: the union of the subsets' rows is read once; in-memory ones are indexed in place
    in_memory = torch.is_tensor(phi1)
    rows, inv = (None, idx) if in_memory else torch.unique(idx, return_inverse=True)
    phi1_r = phi1 if in_memory else gather(phi1, rows)
    lrs = args.inner_lr if isinstance(args.inner_lr, list) else [args.inner_lr] * len(phi2as)
    chunks = [slice(s, s + 1) for s in range(idx.shape[0])] if method == "unrolled" else [slice(None)]
    total, fits = 0.0, []
    for phi2a, w0, lr in zip(phi2as, w0s, lrs):
        phi2a_r = phi2a if in_memory else gather(phi2a, rows)
        for c in chunks:  # the unrolled reference frees each subset's graph before building the next
            losses, fit = hypergrad.outer_losses(phi1_r, phi2a_r, W_leaf, tau, inv[c], m_tr, w0[c], lr,
                                                 args.adaptation_steps, args.H_reg, method, bf16=args.bf16)
            (losses.sum() / (S * len(phi2as))).backward()
            total, fits = total + losses.detach().sum() / (S * len(phi2as)), fits + [fit]
    W.backward(W_leaf.grad)
    return total, torch.cat(fits)


def outer_step(encoder, opt, phi1, phi2as, idx, m_tr, w0s, tau, args, world=None):
    """One outer iteration: hypergradient averaged over subsets, clipped to norm 1.0, one Adam step.
    Under torchrun each rank does its share of the subsets and one all-reduce sums the gradients.
    Returns the loss, the inner fit and the gradient norm before clipping (tensors: no host sync here)."""
    opt.zero_grad(set_to_none=True)
    S = idx.shape[0]
    mine = distributed.share(world, S) if world else slice(None)
    loss, fit = hypergradient(encoder, phi1, phi2as, idx[mine], m_tr, [w[mine] for w in w0s], tau, args, S)
    if world:
        loss, fit = distributed.all_reduce(world, encoder, loss, fit)
    gnorm = nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
    if torch.isfinite(gnorm):
        opt.step()
    return loss, fit, gnorm


@torch.no_grad()
def predict(encoder, phi1, chunk=1 << 16):
    """argmax(phi1 W^T) over a gather() source, in chunks (memory-mapped arrays are never read whole)."""
    W = encoder.weight
    return np.concatenate([(gather_range(phi1, i, i + chunk) @ W.T).argmax(1).cpu().numpy()
                           for i in range(0, num_rows(phi1), chunk)])


def fit_summary(fit):
    """Mean inner diagnosis over subsets: CE before/after the inner loop, share lowered, train agreement."""
    ce0, ceT, agree = fit.mean(0).tolist()
    return {"ce_start": ce0, "ce_end": ceT, "ce_drop": (ce0 - ceT) / max(ce0, 1e-12), "train_agreement": agree}


def resolve_inner_lr(args, phi2s):
    """Inner step per phi2 space (args.inner_lr becomes a list when several). With --inner_lr auto each space is
    rescaled to RMS row norm sqrt(d2) and stepped at 1/lambda_max (hypergrad.auto_inner_step).
    Returns the steps, the lambda_max of the data the inner loop sees, and the scales."""
    args.inner_lr_auto = args.inner_lr == "auto"
    if args.inner_lr_auto:
        scales, lrs, lams = map(list, zip(*[hypergrad.auto_inner_step(p) for p in phi2s]))
    else:
        scales, lrs, lams = [1.0] * len(phi2s), [args.inner_lr] * len(phi2s), [hypergrad.lambda_max(p) for p in phi2s]
    args.inner_lr = lrs if len(lrs) > 1 else lrs[0]
    args.phi2_scale = scales if len(scales) > 1 else scales[0]
    for i, (lr, lam, s) in enumerate(zip(lrs, lams, scales)):
        how = f"auto: phi2 x {s:.4g} (RMS row norm sqrt(d2)), step 1/lambda_max" if args.inner_lr_auto else "given"
        log(f"phi2 space {i}: inner_lr {lr:.4g} ({how}); lambda_max {lam:.4g}; inner_lr x lambda_max "
            f"{lr * lam:.3g} (stable below ~4)", args.quiet)
    return lrs, lams, scales


def train(args, d, world=None):
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    seed_everything(args.seed)
    phi1 = source(d["phi1"], dev, args.normalize)
    n, d1 = d["phi1"].shape
    m = min(args.subset_size, n)
    m_tr = int(args.train_fraction * m)  # both parts non-empty: checked by load_data
    lrs, lams, scales = resolve_inner_lr(args, d["phi2"])
    phi2as = [source(p, dev, ones=True, scale=s) for p, s in zip(d["phi2"], scales)]
    phi1_val = source(d["phi1_val"], dev, args.normalize)
    encoder = make_task_encoder(d1, args.k).to(dev)
    opt = torch.optim.Adam(encoder.parameters(), lr=args.outer_lr)
    gen = torch.Generator().manual_seed(args.seed)
    dims = [p.shape[1] for p in d["phi2"]]
    w0_fixed = [init_inner(gen, 1, args.k, d2, torch.float32).to(dev) for d2 in dims] if args.no_rand_init else None
    metrics_path = os.path.join(args.exp_path, f"metrics_{args.seed}.jsonl")
    writer = world is None or world.rank == 0  # only rank 0 writes files
    start_it, state = 0, {"seconds": 0.0}
    resumed = checkpoint.load(args, encoder, opt, gen) if args.resume else None
    if resumed:
        start_it, state = resumed
        w0_fixed = state.get("w0_fixed")
        if writer:
            keep_log_until(metrics_path, start_it)
        log(f"resumed from {checkpoint.path_for(args)} at iteration {start_it}", args.quiet)
    elif writer:
        open(metrics_path, "w").close()
    state["w0_fixed"] = w0_fixed
    t0 = time.time() - state["seconds"]
    bar = tqdm(range(start_it, args.num_iters), initial=start_it, total=args.num_iters,
               disable=True if args.quiet else None, desc=f"HUME seed {args.seed}")
    for it in bar:
        lr, tau = schedule(args, it)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = sample_subsets(gen, n, args.num_subsets, m).to(dev)
        w0s = [w.expand(args.num_subsets, -1, -1) for w in w0_fixed] if w0_fixed else \
            [init_inner(gen, args.num_subsets, args.k, d2, torch.float32).to(dev) for d2 in dims]
        loss, fit, gnorm = outer_step(encoder, opt, phi1, phi2as, idx, m_tr, w0s, tau, args, world)
        loss, gnorm = torch.stack([loss, gnorm]).tolist()  # one host sync per outer iteration
        if not (np.isfinite(loss) and np.isfinite(gnorm)):
            last = checkpoint.path_for(args) if os.path.isfile(checkpoint.path_for(args)) else "none written yet"
            raise HumeError(f"the outer loss or its gradient became {loss if not np.isfinite(loss) else gnorm} at "
                            f"iteration {it}; the task encoder was not updated. Last good checkpoint: {last}. "
                            "Lower --outer_lr or --inner_lr (see the inner_lr x lambda_max line)")
        bar.set_postfix(loss=f"{loss:.4f}")
        if it == 0 and writer:
            state["inner_fit_first"] = fit_summary(fit)
            for msg in filter(None, [hypergrad.diagnose(state["inner_fit_first"], lr_j, lam)
                                     for lr_j, lam in zip(lrs, lams)]):
                warn(msg)
        if args.save_all and writer:
            torch_save(encoder.state_dict(), os.path.join(args.exp_path, f"linear_task_{it}_{args.seed}.pt"))
        if world and ((it + 1) % args.eval_every == 0 or it + 1 == args.num_iters):
            distributed.check_in_sync(world, encoder, it + 1)
        if writer and ((it + 1) % args.eval_every == 0 or it + 1 == args.num_iters):
            state["inner_fit_last"] = fit_summary(fit)
            record = {"iteration": it + 1, "loss": loss, "tau": tau, "lr": lr, "inner_lr": args.inner_lr,
                      "grad_norm": gnorm, "inner_fit": state["inner_fit_last"], "seconds": round(time.time() - t0, 3)}
            if d["y_val"] is not None:
                record["metrics"] = all_metrics(d["y_val"], predict(encoder, phi1_val))
                log(f"iter {it + 1}: loss {loss:.4f} " +
                    " ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items()), args.quiet)
            append_jsonl(metrics_path, record)
        if (it + 1) % args.ckpt_every == 0 and it + 1 < args.num_iters:
            state["seconds"] = time.time() - t0
            if writer:
                checkpoint.save(args, it + 1, encoder, opt, gen, state)
            kill_hook(it + 1)
    state["seconds"] = time.time() - t0
    return encoder, state


def keep_log_until(path, iteration):
    """On resume, drop log lines written after the checkpoint's iteration (they will be written again)."""
    with open(path) if os.path.isfile(path) else open(os.devnull) as f:
        kept = "".join(ln for ln in f if json.loads(ln)["iteration"] <= iteration)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(kept)
    atomic_write(path, write)


def kill_hook(iteration):
    """Tests simulate a crash right after a checkpoint: HUME_TEST_KILL_AT=N ends the process without cleanup."""
    if os.environ.get("HUME_TEST_KILL_AT") == str(iteration):
        os._exit(137)


def finish(args, d, encoder, state):
    """Predictions on the evaluation set, the label-free CV score, and the paper's two files (atomic)."""
    dev = torch.device(args.device)
    preds = predict(encoder, source(d["phi1_val"], dev, args.normalize))
    cv = float(np.mean([cv_score(p, preds) for p in d["phi2_val"]]))  # several spaces: mean over them
    results = {"CV_Score": cv, "preds": preds, "args": vars(args), "seconds": state["seconds"],
               "inner_lr": args.inner_lr,
               "inner_fit": {"first": state.get("inner_fit_first"), "last": state.get("inner_fit_last")}}
    if d["y_val"] is not None:
        results["metrics"] = all_metrics(d["y_val"], preds)
    torch_save({k: v.cpu() for k, v in encoder.state_dict().items()},
               os.path.join(args.exp_path, f"linear_task_{args.seed}.pt"))
    pickle_save(results, os.path.join(args.exp_path, f"results_{args.seed}.pickle"))
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    world = distributed.init(args) if distributed.launched() else None
    try:
        return run(args, world)
    finally:
        distributed.close(world)


def run(args, world):
    d = load_data(args)
    ensure_dir(args.exp_path, "--exp_path")  # only after every input check passed: bad input writes nothing
    mode = "inductive" if args.phi1_path_val else "transductive"
    log(f"HUME {mode}: n={len(d['phi1'])} d1={d['phi1'].shape[1]} d2={[p.shape[1] for p in d['phi2']]} "
        f"k={args.k} -> {args.exp_path}", args.quiet)
    encoder, state = train(args, d, world)
    if world and world.rank != 0:
        return None
    results = finish(args, d, encoder, state)
    summary = f"done in {state['seconds']:.1f}s: CV score {results['CV_Score']:.4f}"
    if "metrics" in results:
        summary += " | " + " ".join(f"{k.upper()} {v:.4f}" for k, v in results["metrics"].items())
    log(summary, args.quiet)
    return results


if __name__ == "__main__":
    run_cli(main)
