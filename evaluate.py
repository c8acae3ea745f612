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

import numpy as np

from humelib import inner_lr
from humelib.arrays import DEMO, check_rows, load_array, load_labels
from humelib.fileio import check_output_file, json_save, load_results
from humelib.flags import make_parser, report_flags
from humelib.metrics import all_metrics
from humelib.runtime import log, run_cli
from humelib.run_folder import find_tasks
from humelib.task_encoder import task_ensemble


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--phi1_path", help="phi1 of the points to label; default: the bundled demo's test split")
    p.add_argument("--phi_paths", nargs="+", help="for TURTLE tasks: every space's array of the points to label, in "
                   "the training order; default: the bundled demo's phi2 test split when no path is given")
    p.add_argument("--tasks_path", default="./linear_tasks/", help="folder of linear_task_{seed}.pt or "
                   "turtle_task_{seed}.pt files")
    p.add_argument("--gt_labels_path", help="ground-truth labels of those points (scoring only); default: the "
                   "demo's test labels when --phi1_path is not given")
    report_flags(p, "everything reported")
    return p


def untrained_inner(res_path):
    """True when hume.py recorded that the task's inner classifier barely trained at the first iteration: such a
    task was searched without signal. False for the paper's pickles, which carry no diagnosis."""
    fit = load_results(res_path).get("inner_fit")
    return inner_lr.untrained(fit.get("first") if isinstance(fit, dict) else None)


def evaluate(phi1, tasks, y_true=None, phis=None):
    """Per-task predictions, CV scores and (with labels) metrics, plus the ensemble. Returns a JSON-ready dict."""
    preds, cv, best, vote, _ = task_ensemble(phi1, tasks, phis)
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
    phi1_path, phi_paths, labels_path = args.phi1_path, args.phi_paths, args.gt_labels_path
    if phi1_path is None and phi_paths is None:  # the bundled demo's test split
        phi1_path, phi_paths = DEMO["phi1_test"], [DEMO["phi2_test"]]
        labels_path = labels_path or DEMO["labels_test"]
    if args.json:
        check_output_file(args.json, "--json")
    phi1 = load_array(phi1_path, "--phi1_path") if phi1_path else None
    phis = [load_array(p, "--phi_paths") for p in phi_paths] if phi_paths else None
    arrays = ([("--phi1_path", phi1)] if phi1_path else []) + [(f"--phi_paths {p}", a) for p, a in
                                                               zip(phi_paths or [], phis or [])]
    check_rows(arrays)
    y = load_labels(labels_path, "--gt_labels_path", len(arrays[0][1])) if labels_path else None
    out = evaluate(phi1, find_tasks(args.tasks_path), y, phis)
    report(out, args.quiet)
    if args.json:
        json_save(out, args.json)


if __name__ == "__main__":
    run_cli(main)
