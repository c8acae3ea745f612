"""HUME: search for the labeling a human would give a data set, with no labels (Gadetsky & Brbic, NeurIPS 2023).

A task encoder W (k x d1, orthonormal rows) labels the data in space phi1; a linear classifier trained on those labels
in space phi2 must generalise to held-out points. Minimising that error (plus a balance term) over W recovers the
human labeling. Labels are used only to report metrics.

    python hume.py                                     # bundled digits demo, the paper's defaults (slow on a CPU)
    python hume.py --outer_lr 0.01 --num_subsets 5 --adaptation_steps 100 --num_iters 150   # the README's demo
    python hume.py --phi1_path P1.npy --phi2_path P2.npy --gt_labels_path Y.npy --k 10 --exp_path tasks/run/ --seed 0

Writes to --exp_path: linear_task_{seed}.pt and results_{seed}.pickle (the paper's formats, see evaluate.py) and
metrics_{seed}.jsonl (one JSON object per evaluation). Bad inputs end with one line on stderr and exit code 2.
"""
import argparse
import os
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import hypergrad
from utils import (DEMO, HumeError, all_metrics, append_jsonl, check_rows, cv_score, ensure_dir, l2_normalize,
                   load_array, load_labels, log, make_parser, pickle_save, run_cli, seed_everything, torch_save,
                   warn)

MILESTONES = (100, 200)  # annealing: outer lr x0.1 and tau /10 at these iterations


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--phi1_path", help="phi1 .npy (n x d1, rows L2-normalised); default: the bundled digits demo")
    p.add_argument("--phi2_path", help="phi2 .npy (n x d2), same rows as phi1; default: the bundled digits demo")
    p.add_argument("--phi1_path_val", help="phi1 of the evaluation points (inductive); give with --phi2_path_val")
    p.add_argument("--phi2_path_val", help="phi2 of the evaluation points (inductive); give with --phi1_path_val")
    p.add_argument("--gt_labels_path", help="labels of the evaluation points, used only to report metrics")
    p.add_argument("--k", type=int, default=10, help="number of classes of the labeling searched for")
    p.add_argument("--inner_lr", type=inner_lr_type, default=0.001,
                   help="step size of the inner gradient descent; 'auto' = 1/lambda_max of phi2's second moment "
                   "(use it for embeddings with unit-norm rows)")
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
    p.add_argument("--hypergrad", choices=["adjoint", "unrolled"], default="adjoint",
                   help="adjoint: batched, stores only inner iterates; unrolled: autograd graph (the paper's way)")
    p.add_argument("--first_order", action="store_true",
                   help="drop the inner loop's dependence on the labels (cheaper, approximate)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (faster, less precise)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise phi1 rows (HUME expects unit-norm phi1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    return p


def inner_lr_type(text):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def check_args(args):
    positive = {"--outer_lr": args.outer_lr, "--tau": args.tau}
    if args.inner_lr != "auto":
        positive["--inner_lr"] = args.inner_lr
    for flag, v in positive.items():
        if not v > 0:
            raise HumeError(f"{flag} must be > 0, got {v}")
    at_least = {"--num_iters": (args.num_iters, 0), "--adaptation_steps": (args.adaptation_steps, 1),
                "--num_subsets": (args.num_subsets, 1), "--subset_size": (args.subset_size, 2),
                "--eval_every": (args.eval_every, 1), "--k": (args.k, 2)}
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
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise HumeError(f"--device {args.device}: CUDA is not available here; use --device cpu")


def load_data(args):
    """The arrays of one run (numpy, float32), checked against each other. Evaluation = training points when
    no *_val paths are given (transductive)."""
    if args.phi1_path is None and args.phi1_path_val is None and args.gt_labels_path is None:
        args.phi1_path, args.phi2_path = DEMO["phi1_train"], DEMO["phi2_train"]
        args.phi1_path_val, args.phi2_path_val = DEMO["phi1_test"], DEMO["phi2_test"]
        args.gt_labels_path = DEMO["labels_test"]
    d = {"phi1": load_array(args.phi1_path, "--phi1_path"), "phi2": load_array(args.phi2_path, "--phi2_path")}
    check_rows([("--phi1_path", d["phi1"]), ("--phi2_path", d["phi2"])])
    if args.phi1_path_val:
        d["phi1_val"] = load_array(args.phi1_path_val, "--phi1_path_val")
        d["phi2_val"] = load_array(args.phi2_path_val, "--phi2_path_val")
        check_rows([("--phi1_path_val", d["phi1_val"]), ("--phi2_path_val", d["phi2_val"])])
        for name, flag in (("phi1", "--phi1_path_val"), ("phi2", "--phi2_path_val")):
            if d[name + "_val"].shape[1] != d[name].shape[1]:
                raise HumeError(f"{flag} has dimension {d[name + '_val'].shape[1]} but the training {name} has "
                                f"{d[name].shape[1]}; both must come from the same representation")
    else:
        d["phi1_val"], d["phi2_val"] = d["phi1"], d["phi2"]
    n_val = d["phi1_val"].shape[0]
    d["y_val"] = load_labels(args.gt_labels_path, "--gt_labels_path", n_val) if args.gt_labels_path else None
    if args.k > d["phi1"].shape[0]:
        raise HumeError(f"--k {args.k} is larger than the number of training points ({d['phi1'].shape[0]})")
    norms = np.linalg.norm(d["phi1"], axis=1)
    if args.normalize:
        d["phi1"], d["phi1_val"] = l2_normalize(d["phi1"]), l2_normalize(d["phi1_val"])
    elif np.abs(norms - 1).max() > 1e-3:
        warn(f"--phi1_path rows are not unit norm (norms {norms.min():.3g} to {norms.max():.3g}); HUME's phi1 is "
             "L2-normalised: pass --normalize to do it here")
    return d


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


def hypergradient(encoder, phi1, phi2a, idx, m_tr, w0, tau, args):
    """Mean outer loss over the subsets idx (S, m); its gradient is accumulated into the encoder's .grad.
    The orthogonal parametrisation is evaluated and back-propagated once, however many subsets."""
    W = encoder.weight
    W_leaf = W.detach().requires_grad_(True)
    method = "first_order" if args.first_order else args.hypergrad
    S = idx.shape[0]
    chunks = [slice(s, s + 1) for s in range(S)] if method == "unrolled" else [slice(0, S)]
    total, fits = 0.0, []
    for c in chunks:  # the unrolled reference frees each subset's graph before building the next
        losses, fit = hypergrad.outer_losses(phi1, phi2a, W_leaf, tau, idx[c], m_tr, w0[c], args.inner_lr,
                                             args.adaptation_steps, args.H_reg, method)
        (losses.sum() / S).backward()
        total, fits = total + losses.detach().sum() / S, fits + [fit]
    W.backward(W_leaf.grad)
    return total, torch.cat(fits)


def outer_step(encoder, opt, phi1, phi2a, idx, m_tr, w0, tau, args):
    """One outer iteration: hypergradient averaged over subsets, clipped to norm 1.0, one Adam step."""
    opt.zero_grad(set_to_none=True)
    loss, fit = hypergradient(encoder, phi1, phi2a, idx, m_tr, w0, tau, args)
    nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
    opt.step()
    return loss, fit


@torch.no_grad()
def predict(encoder, phi1):
    return (phi1 @ encoder.weight.T).argmax(1).cpu().numpy()


def fit_summary(fit):
    """Mean inner diagnosis over subsets: CE before/after the inner loop, share lowered, train agreement."""
    ce0, ceT, agree = fit.mean(0).tolist()
    return {"ce_start": ce0, "ce_end": ceT, "ce_drop": (ce0 - ceT) / max(ce0, 1e-12), "train_agreement": agree}


def resolve_inner_lr(args, phi2):
    """Turn --inner_lr auto into 1/lambda_max; lambda_max is returned for the diagnosis either way."""
    lam = hypergrad.lambda_max(phi2)
    args.inner_lr_auto = args.inner_lr == "auto"
    if args.inner_lr_auto:
        args.inner_lr = 1.0 / lam
    how = "auto = 1/lambda_max" if args.inner_lr_auto else "given"
    log(f"inner_lr {args.inner_lr:.4g} ({how}); lambda_max of phi2 {lam:.4g}; "
        f"inner_lr x lambda_max {args.inner_lr * lam:.3g} (stable below ~4)", args.quiet)
    return lam


def train(args, d):
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    seed_everything(args.seed)
    phi1 = torch.from_numpy(d["phi1"]).to(dev)
    phi2 = torch.from_numpy(d["phi2"]).to(dev)
    phi2a = torch.cat([phi2, torch.ones(len(phi2), 1, device=dev)], 1)  # bias as a ones column
    phi1_val = torch.from_numpy(d["phi1_val"]).to(dev)
    n, d1 = phi1.shape
    m = min(args.subset_size, n)
    m_tr = int(args.train_fraction * m)
    if not 1 <= m_tr < m:
        raise HumeError(f"--train_fraction {args.train_fraction} of a subset of {m} points leaves an empty "
                        "train or test part; use a larger --subset_size or a fraction nearer 0.5")
    lam = resolve_inner_lr(args, d["phi2"])
    encoder = make_task_encoder(d1, args.k).to(dev)
    opt = torch.optim.Adam(encoder.parameters(), lr=args.outer_lr)
    gen = torch.Generator().manual_seed(args.seed)
    w0_fixed = init_inner(gen, 1, args.k, phi2.shape[1], phi2.dtype).to(dev) if args.no_rand_init else None
    metrics_path = os.path.join(args.exp_path, f"metrics_{args.seed}.jsonl")
    open(metrics_path, "w").close()
    start = time.time()
    bar = tqdm(range(args.num_iters), disable=True if args.quiet else None, desc=f"HUME seed {args.seed}")
    for it in bar:
        lr, tau = schedule(args, it)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = sample_subsets(gen, n, args.num_subsets, m).to(dev)
        if w0_fixed is None:
            w0 = init_inner(gen, args.num_subsets, args.k, phi2.shape[1], phi2.dtype).to(dev)
        else:
            w0 = w0_fixed.expand(args.num_subsets, -1, -1)
        loss, fit = outer_step(encoder, opt, phi1, phi2a, idx, m_tr, w0, tau, args)
        loss = loss.item()  # one host sync per outer iteration
        if not np.isfinite(loss):
            raise HumeError(f"the outer loss became {loss} at iteration {it}; lower --outer_lr or --inner_lr")
        bar.set_postfix(loss=f"{loss:.4f}")
        if it == 0:
            d["inner_fit_first"] = fit_summary(fit)
            message = hypergrad.diagnose(d["inner_fit_first"], args.inner_lr, lam)
            if message:
                warn(message)
        if args.save_all:
            torch_save(encoder.state_dict(), os.path.join(args.exp_path, f"linear_task_{it}_{args.seed}.pt"))
        if (it + 1) % args.eval_every == 0 or it + 1 == args.num_iters:
            d["inner_fit_last"] = fit_summary(fit)
            record = {"iteration": it + 1, "loss": loss, "tau": tau, "lr": lr, "inner_lr": args.inner_lr,
                      "inner_fit": d["inner_fit_last"],
                      "seconds": round(time.time() - start, 3)}
            if d["y_val"] is not None:
                record["metrics"] = all_metrics(d["y_val"], predict(encoder, phi1_val))
                log(f"iter {it + 1}: loss {loss:.4f} " +
                    " ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items()), args.quiet)
            append_jsonl(metrics_path, record)
    return encoder, time.time() - start


def finish(args, d, encoder, seconds):
    """Predictions on the evaluation set, the label-free CV score, and the paper's two files (atomic)."""
    preds = predict(encoder, torch.from_numpy(d["phi1_val"]).to(args.device))
    results = {"CV_Score": cv_score(d["phi2_val"], preds), "preds": preds, "args": vars(args),
               "seconds": seconds, "inner_lr": args.inner_lr,
               "inner_fit": {"first": d.get("inner_fit_first"), "last": d.get("inner_fit_last")}}
    if d["y_val"] is not None:
        results["metrics"] = all_metrics(d["y_val"], preds)
    state = {k: v.cpu() for k, v in encoder.state_dict().items()}
    torch_save(state, os.path.join(args.exp_path, f"linear_task_{args.seed}.pt"))
    pickle_save(results, os.path.join(args.exp_path, f"results_{args.seed}.pickle"))
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    d = load_data(args)
    ensure_dir(args.exp_path, "--exp_path")  # only after every input check passed: bad input writes nothing
    mode = "inductive" if args.phi1_path_val else "transductive"
    log(f"HUME {mode}: n={len(d['phi1'])} d1={d['phi1'].shape[1]} d2={d['phi2'].shape[1]} k={args.k} "
        f"-> {args.exp_path}", args.quiet)
    encoder, seconds = train(args, d)
    results = finish(args, d, encoder, seconds)
    summary = f"done in {seconds:.1f}s: CV score {results['CV_Score']:.4f}"
    if "metrics" in results:
        summary += " | " + " ".join(f"{k.upper()} {v:.4f}" for k, v in results["metrics"].items())
    log(summary, args.quiet)


if __name__ == "__main__":
    run_cli(main)
