"""Score a folder of HUME (or TURTLE) tasks: each task's ACC/ARI/NMI, their mean and std, and the paper's ensemble.

    python evaluate.py                                  # the tasks of the bundled demo in ./linear_tasks/
    python evaluate.py --phi1_path data/representations/mocov2/cifar10test_l2.npy \
        --tasks_path tasks/inductive/moco_dino/cifar10/ --gt_labels_path data/labels/cifar10test_targets.npy
    python evaluate.py --tasks_path tasks/turtle/ --phi_paths clip_val.npy dino_val.npy --gt_labels_path y_val.npy

Reads every linear_task_{seed}.pt with its results_{seed}.pickle, as our hume.py or the paper's writes them, and
every turtle_task_{seed}.pt (run_turtle.py's, or TURTLE's released layout) with its results_{seed}.pickle.
Ensemble (the paper's headline number): every task is matched (Hungarian, task vs task) to the task with the highest
label-free CV score, then each point takes the majority vote. Ground truth is used only for scoring.
"""
import os
import pickle
import re

import numpy as np
import torch

from utils import (DEMO, HumeError, align_to, all_metrics, check_rows, ensure_dir, json_save, load_array,
                   load_labels, log, majority_vote, make_parser, run_cli)

TASK_FILE = re.compile(r"(?:linear|turtle)_task_(-?\d+)\.pt")  # not linear_task_{iter}_{seed}.pt (--save_all)


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--phi1_path", help="phi1 of the points to label; default: the bundled demo's test split")
    p.add_argument("--phi_paths", nargs="+", help="for TURTLE tasks: every space's array of the points to label, in "
                   "the training order; default: the bundled demo's phi2 test split when no path is given")
    p.add_argument("--tasks_path", default="./linear_tasks/", help="folder of linear_task_{seed}.pt or "
                   "turtle_task_{seed}.pt files")
    p.add_argument("--gt_labels_path", help="ground-truth labels of those points (scoring only); default: the "
                   "demo's test labels when --phi1_path is not given")
    p.add_argument("--json", help="also write everything reported to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print nothing (use with --json)")
    return p


def find_tasks(folder):
    """{seed: (task path, results path)} for every task in folder; every task needs its results pickle."""
    if not os.path.isdir(folder):
        raise HumeError(f"--tasks_path {folder}: no such folder")
    names = sorted((int(m.group(1)), f) for f in os.listdir(folder) if (m := TASK_FILE.fullmatch(f)))
    if not names:
        raise HumeError(f"--tasks_path {folder}: no linear_task_{{seed}}.pt or turtle_task_{{seed}}.pt files; run "
                        f"hume.py or run_turtle.py with --exp_path {folder} first")
    tasks = {}
    for s, name in names:
        res = os.path.join(folder, f"results_{s}.pickle")
        if s in tasks:
            raise HumeError(f"--tasks_path {folder}: seed {s} has both a HUME and a TURTLE task, which would share "
                            f"results_{s}.pickle; keep each method in its own folder")
        if not os.path.isfile(res):
            raise HumeError(f"--tasks_path {folder}: {name} has no results_{s}.pickle (its CV score); "
                            "rerun that seed or remove the task")
        tasks[s] = (os.path.join(folder, name), res)
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
    try:
        with open(path, "rb") as f:
            return float(pickle.load(f)["CV_Score"])
    except Exception as e:
        raise HumeError(f"{path}: cannot read its CV_Score ({type(e).__name__}: {e})") from None


def ensemble(preds, cv):
    """The paper's ensemble: align every task's predictions ({seed: labels}) to the best-CV task's with the
    Hungarian algorithm, then take the per-point majority vote. Returns (best seed, ensemble labels)."""
    best = max(cv, key=cv.get)
    return best, majority_vote([align_to(preds[s], preds[best]) for s in preds])


def untrained_inner(res_path):
    """True when hume.py recorded that the task's inner classifier barely trained (inner CE lowered by less than
    hypergrad.DROP_MIN at the first iteration): such a task was searched without signal. False for the paper's
    pickles, which carry no diagnosis."""
    from hypergrad import DROP_MIN
    with open(res_path, "rb") as f:
        first = (pickle.load(f).get("inner_fit") or {}).get("first")
    return bool(first) and first["ce_drop"] < DROP_MIN


def task_predictions(phi1, tasks, phis=None):
    """{seed: argmax(phi1 W^T)} (TURTLE tasks: run_turtle.predict on phis), {seed: CV score} and the largest k."""
    preds, ks = {}, []
    for s, (task_path, _) in tasks.items():
        if os.path.basename(task_path).startswith("turtle_task_"):
            preds[s], k = turtle_predictions(task_path, phis)
        elif phi1 is None:
            raise HumeError(f"{task_path} is a HUME task: give --phi1_path, phi1 of the points to label")
        else:
            W = load_task(task_path, phi1.shape[1])
            preds[s], k = (torch.from_numpy(phi1) @ W.T).argmax(1).numpy(), W.shape[0]
        ks.append(k)
    cv = {s: load_cv_score(res_path) for s, (_, res_path) in tasks.items()}
    return preds, cv, max(ks)


def turtle_predictions(task_path, phis):
    """A TURTLE task's labels of the points (every space's array in phis) and its k."""
    import run_turtle
    if phis is None:
        raise HumeError(f"{task_path} is a TURTLE task: give --phi_paths, every space's array of the points to label")
    heads = run_turtle.load_task(task_path, [a.shape[1] for a in phis])
    return run_turtle.predict(heads, [torch.from_numpy(a) for a in phis]), heads[0].out_features


def evaluate(phi1, tasks, y_true=None, phis=None):
    """Per-task predictions, CV scores and (with labels) metrics, plus the ensemble. Returns a JSON-ready dict."""
    preds, cv, _ = task_predictions(phi1, tasks, phis)
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
    if args.phi1_path is None and args.phi_paths is None:
        args.phi1_path, args.phi_paths = DEMO["phi1_test"], [DEMO["phi2_test"]]
        args.gt_labels_path = args.gt_labels_path or DEMO["labels_test"]
    if args.json and os.path.dirname(args.json):
        ensure_dir(os.path.dirname(args.json), "--json")
    phi1 = load_array(args.phi1_path, "--phi1_path") if args.phi1_path else None
    phis = [load_array(p, "--phi_paths") for p in args.phi_paths] if args.phi_paths else None
    arrays = ([("--phi1_path", phi1)] if args.phi1_path else []) + \
        [(f"--phi_paths {p}", a) for p, a in zip(args.phi_paths or [], phis or [])]
    check_rows(arrays)
    n = len(arrays[0][1])
    y = load_labels(args.gt_labels_path, "--gt_labels_path", n) if args.gt_labels_path else None
    out = evaluate(phi1, find_tasks(args.tasks_path), y, phis)
    report(out, args.quiet)
    if args.json:
        json_save(out, args.json)


if __name__ == "__main__":
    run_cli(main)
