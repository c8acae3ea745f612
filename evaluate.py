"""Score a folder of HUME tasks: each task's ACC/ARI/NMI, their mean and std, and the paper's ensemble.

    python evaluate.py                                  # the tasks of the bundled demo in ./linear_tasks/
    python evaluate.py --phi1_path data/representations/mocov2/cifar10test_l2.npy \
        --tasks_path tasks/inductive/moco_dino/cifar10/ --gt_labels_path data/labels/cifar10test_targets.npy

Reads every linear_task_{seed}.pt with its results_{seed}.pickle, as our hume.py or the paper's writes them.
Ensemble (the paper's headline number): every task is matched (Hungarian, task vs task) to the task with the highest
label-free CV score, then each point takes the majority vote. Ground truth is used only for scoring.
"""
import math
import os
import re

import numpy as np
import torch

from utils import (DEMO, HumeError, align_to, all_metrics, check_output_file, json_save, load_array, load_labels,
                   load_results, log, majority_vote, make_parser, run_cli)

TASK_FILE = re.compile(r"linear_task_(-?\d+)\.pt")  # linear_task_{iter}_{seed}.pt (--save_all) does not match


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--phi1_path", help="phi1 of the points to label; default: the bundled demo's test split")
    p.add_argument("--tasks_path", default="./linear_tasks/", help="folder of linear_task_{seed}.pt files")
    p.add_argument("--gt_labels_path", help="ground-truth labels of those points (scoring only); default: the "
                   "demo's test labels when --phi1_path is not given")
    p.add_argument("--json", help="also write everything reported to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print nothing (use with --json)")
    return p


def find_tasks(folder):
    """{seed: (task path, results path)} for every task in folder; every task needs its results pickle."""
    if not os.path.isdir(folder):
        raise HumeError(f"--tasks_path {folder}: no such folder")
    seeds = sorted(int(m.group(1)) for f in os.listdir(folder) if (m := TASK_FILE.fullmatch(f)))
    if not seeds:
        raise HumeError(f"--tasks_path {folder}: no linear_task_{{seed}}.pt files; run hume.py with --exp_path "
                        f"{folder} first")
    tasks = {}
    for s in seeds:
        res = os.path.join(folder, f"results_{s}.pickle")
        if not os.path.isfile(res):
            raise HumeError(f"--tasks_path {folder}: linear_task_{s}.pt has no results_{s}.pickle (its CV score); "
                            "rerun that seed or remove the task")
        tasks[s] = (os.path.join(folder, f"linear_task_{s}.pt"), res)
    return tasks


def load_task(path, d1):
    """Task encoder weight W (k x d1) from a saved state_dict of orthogonal(nn.Linear(d1, k, bias=False))."""
    from hume import make_task_encoder
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        k, d = state["parametrizations.weight.original"].shape
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HumeError(f"{path}: not a HUME task file ({type(e).__name__}: {first})") from None
    if d != d1:
        raise HumeError(f"{path}: task encoder expects phi1 of dimension {d}, but --phi1_path has {d1}; "
                        "evaluate with the phi1 space the tasks were trained in")
    encoder = make_task_encoder(d1, k)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HumeError(f"{path}: does not load into orthogonal(nn.Linear({d1}, {k})): {str(e).splitlines()[0]}") \
            from None
    return encoder.weight.detach()


def load_cv_score(path):
    return load_results(path)["CV_Score"]  # restricted unpickler: a hostile pickle cannot run code


def ensemble(preds, cv):
    """The paper's ensemble: align every task's predictions ({seed: labels}) to the best-CV task's with the
    Hungarian algorithm, then take the per-point majority vote. Returns (best seed, ensemble labels)."""
    best = max(cv, key=lambda s: (math.isfinite(cv[s]), cv[s] if math.isfinite(cv[s]) else 0.0))  # never NaN/inf
    return best, majority_vote([align_to(preds[s], preds[best]) for s in preds])


def untrained_inner(res_path):
    """True when hume.py recorded that the task's inner classifier barely trained (inner CE lowered by less than
    hypergrad.DROP_MIN at the first iteration): such a task was searched without signal. False for the paper's
    pickles, which carry no diagnosis."""
    from hypergrad import DROP_MIN
    fit = load_results(res_path).get("inner_fit")
    first = fit.get("first") if isinstance(fit, dict) else None
    drop = first.get("ce_drop") if isinstance(first, dict) else None
    return isinstance(drop, (int, float)) and drop < DROP_MIN


def check_same_d1(tasks):
    """A folder mixing tasks trained in phi1 spaces of different dimension is refused, naming the seeds."""
    by_d1 = {}
    for s, (path, _) in tasks.items():
        try:
            d1 = torch.load(path, map_location="cpu", weights_only=True)["parametrizations.weight.original"].shape[1]
        except Exception:
            continue  # load_task reports a damaged task file
        by_d1.setdefault(d1, []).append(str(s))
    if len(by_d1) > 1:
        mix = "; ".join(f"d1={d}: seeds {', '.join(seeds)}" for d, seeds in sorted(by_d1.items()))
        raise HumeError(f"--tasks_path {os.path.dirname(next(iter(tasks.values()))[0])}: mixes tasks trained in phi1 "
                        f"spaces of different dimension ({mix}); keep one phi1 space per folder")


def task_predictions(phi1, tasks):
    """{seed: argmax(phi1 W^T)}, {seed: CV score} and the largest k over the tasks."""
    phi1 = torch.from_numpy(phi1)
    check_same_d1(tasks)
    W = {s: load_task(task_path, phi1.shape[1]) for s, (task_path, _) in tasks.items()}
    by_k = {}
    for s, w in W.items():
        by_k.setdefault(w.shape[0], []).append(str(s))
    if len(by_k) > 1:
        mix = "; ".join(f"k={k}: seeds {', '.join(seeds)}" for k, seeds in sorted(by_k.items()))
        raise HumeError(f"--tasks_path {os.path.dirname(next(iter(tasks.values()))[0])}: mixes tasks of different k "
                        f"({mix}); keep one k per folder")
    preds = {s: (phi1 @ W[s].T).argmax(1).numpy() for s in tasks}
    cv = {s: load_cv_score(res_path) for s, (_, res_path) in tasks.items()}
    return preds, cv, max(w.shape[0] for w in W.values())


def evaluate(phi1, tasks, y_true=None):
    """Per-task predictions, CV scores and (with labels) metrics, plus the ensemble. Returns a JSON-ready dict."""
    preds, cv, _ = task_predictions(phi1, tasks)
    best, vote = ensemble(preds, cv)
    out = {"best_cv_seed": best,
           "tasks": {s: {"CV_Score": cv[s], "untrained_inner": untrained_inner(tasks[s][1])} for s in tasks},
           "ensemble_cluster_sizes": np.bincount(np.unique(vote, return_inverse=True)[1]).tolist()}
    if y_true is not None:
        for s in tasks:
            out["tasks"][s].update(all_metrics(y_true, preds[s]))
        names = ("acc", "ari", "nmi")
        out["mean"] = {m: float(np.mean([out["tasks"][s][m] for s in tasks])) for m in names}
        out["std"] = {m: float(np.std([out["tasks"][s][m] for s in tasks])) for m in names}
        out["ensemble"] = all_metrics(y_true, vote)
    return out


def report(out, quiet):
    rows = [f"{'seed':>6} {'CV':>7}" + ("" if "mean" not in out else f" {'ACC':>7} {'ARI':>7} {'NMI':>7}")]
    for s, t in out["tasks"].items():
        rows.append(f"{s:>6} {t['CV_Score']:7.4f}" +
                    ("" if "acc" not in t else f" {t['acc']:7.4f} {t['ari']:7.4f} {t['nmi']:7.4f}") +
                    (" !" if t["untrained_inner"] else ""))
    if "mean" in out:
        mean, std, ens = out["mean"], out["std"], out["ensemble"]
        rows.append("mean +- std over tasks: " + "  ".join(f"{m.upper()} {mean[m]:.4f} +- {std[m]:.4f}" for m in mean))
        rows.append(f"ensemble of {len(out['tasks'])} (aligned to best-CV seed {out['best_cv_seed']}): " +
                    "  ".join(f"{m.upper()} {v:.4f}" for m, v in ens.items()))
    else:
        rows.append(f"no --gt_labels_path: best-CV seed {out['best_cv_seed']}, "
                    f"ensemble cluster sizes {out['ensemble_cluster_sizes']}")
    if any(t["untrained_inner"] for t in out["tasks"].values()):
        rows.append("! the inner classifier of these tasks barely trained (hume.py warned): rerun them with "
                    "--inner_lr auto")
    log("\n".join(rows), quiet)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.phi1_path is None:
        args.phi1_path = DEMO["phi1_test"]
        args.gt_labels_path = args.gt_labels_path or DEMO["labels_test"]
    if args.json:
        check_output_file(args.json, "--json")
    phi1 = load_array(args.phi1_path, "--phi1_path")
    y = load_labels(args.gt_labels_path, "--gt_labels_path", len(phi1)) if args.gt_labels_path else None
    out = evaluate(phi1, find_tasks(args.tasks_path), y)
    report(out, args.quiet)
    if args.json:
        json_save(out, args.json)


if __name__ == "__main__":
    run_cli(main)
