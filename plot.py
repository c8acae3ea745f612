"""Figures of a folder of HUME (or run_turtle.py) tasks: training curves, the ensemble's confusion matrix, CV score
against accuracy and the ensemble's cluster sizes, as PNGs.

    python plot.py --tasks_path tasks/demo                 # evaluation points and labels as hume.py recorded them
    python plot.py --tasks_path tasks/inductive/moco_dino/cifar10/ --out figures/ \
        --phi1_path data/representations/mocov2/cifar10test_l2.npy --gt_labels_path data/labels/cifar10test_targets.npy

Writes {prefix}_curves.png (outer loss and ACC/ARI/NMI per iteration from metrics_{seed}.jsonl, one line per seed),
{prefix}_confusion.png (ensemble vs ground truth, Hungarian-ordered), {prefix}_cv_vs_acc.png (does the label-free
CV score pick good tasks?) and {prefix}_cluster_sizes.png into --out, and prints their paths. Without
--phi1_path (TURTLE tasks: --phi_paths), the evaluation points and labels are those recorded in
results_{seed}.pickle. Without labels, the figures that need them are skipped with a note. The ensemble is
evaluate.py's: tasks matched to the best-CV task, then a majority vote.

    python plot.py --montage --tasks_path tasks/mine/ --phi1_path data/representations/resnet/minetrain_l2.npy \
        --phi2_path data/representations/swag/minetrain.npy --out figures/ --prefix mine

--montage draws, instead, what is in each cluster (montage.py): a row per non-empty cluster with its size and
--per_cluster members picked as annotate.py picks them (representative, diverse; in --phi2_path when given, else in
phi1), as thumbnails of their image files (from NAME.sources.txt beside the phi1 file NAME.npy, or --sources). For
data without images, --texts FILE (a line per row) prints the members' texts instead. Bad inputs end with one line
on stderr and exit code 2.
"""
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from humelib import montage
from humelib.arrays import (check_rows, check_source_files, find_sources, load_array, load_labels, load_sources,
                            sources_path)
from humelib.fileio import atomic_write, check_output_file, ensure_dir, load_results, read_jsonl
from humelib.flags import int_in, make_parser
from humelib.metrics import align_to, all_metrics, cluster_acc, contingency
from humelib.run_folder import find_logs, find_tasks
from humelib.runtime import HumeError, log, run_cli
from humelib.task_encoder import task_ensemble

DPI = 100
FIGSIZE = {"curves": (11, 7), "confusion": (7.5, 6.5), "cv_vs_acc": (7, 5), "cluster_sizes": (8, 4.5)}  # inches
MAX_ANNOTATED = 20  # write counts into the confusion matrix cells up to this many classes


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--tasks_path", required=True, help="folder written by hume.py (or sweep.sh)")
    p.add_argument("--out", default="figures/", help="folder for the PNGs (created)")
    p.add_argument("--prefix", help="file name prefix; default: the name of the tasks folder")
    p.add_argument("--phi1_path", help="phi1 of the evaluation points; default: as recorded by hume.py")
    p.add_argument("--phi_paths", nargs="+", help="TURTLE tasks: every space's array of the evaluation points; "
                   "default: as recorded by run_turtle.py")
    p.add_argument("--gt_labels_path", help="labels of those points (for the figures that need them); "
                   "default: as recorded by hume.py when --phi1_path is not given")
    p.add_argument("--montage", action="store_true", help="instead, draw what is in each cluster: a row per non-empty "
                   "cluster, its size and a few representative, diverse members as thumbnails of their images, in "
                   f"{{prefix}}_montage.png (more than {montage.ROWS_PER_PAGE} clusters: _montage_1.png, _2, ...)")
    p.add_argument("--phi2_path", help="--montage: pick the members in this space (same rows); default: phi1")
    p.add_argument("--sources", help="--montage: the rows' image files, one a line; default: NAME.sources.txt "
                   "beside the phi1 file NAME.npy (extract.py writes it)")
    p.add_argument("--texts", help="--montage, for data without images: a text per row, one a line; prints a few "
                   "members of each cluster instead of drawing")
    p.add_argument("--per_cluster", type=int_in(1), default=8, help="--montage: members shown per cluster")
    return p


def read_metrics(folder):
    """{seed: [record, ...]} from every metrics_{seed}.jsonl (a run still going may end in a partial line)."""
    logs = find_logs(folder)
    if not logs:
        raise HumeError(f"--tasks_path {folder}: no metrics_{{seed}}.jsonl files (our hume.py writes them; the "
                        "paper's does not)")
    runs = {seed: [] for seed in logs}
    for seed, path in logs.items():
        for line, rec in read_jsonl(path, required=("iteration", "loss")):  # a partial last line is dropped
            scores = rec.get("metrics", {})
            numbers = [rec["iteration"], rec["loss"]]
            numbers += [scores.get(m) for m in ("acc", "ari", "nmi")] if isinstance(scores, dict) and scores else []
            if not isinstance(scores, dict) or not all(isinstance(v, (int, float)) for v in numbers):
                raise HumeError(f"{path}:{line}: iteration, loss or metrics are not numbers; delete that line")
            runs[seed].append(rec)
    return runs


def recorded_paths(tasks):
    """(phi1 path, or run_turtle.py's list of every space's path; labels path) of the evaluation points as
    hume.py or run_turtle.py recorded them in its results pickles."""
    for seed, (_, res_path) in tasks.items():
        res = load_results(res_path)  # restricted unpickler: a hostile pickle cannot run code
        rec = res.get("args") if isinstance(res.get("args"), dict) else {}
        phi1 = res.get("phi_paths_val") or rec.get("phi1_path_val") or rec.get("phi1_path")
        labels = res.get("gt_labels_path") or rec.get("gt_labels_path")
        if phi1:
            names = phi1 if isinstance(phi1, (list, tuple)) else [phi1]
            if not all(isinstance(p, str) for p in names) or not isinstance(labels, (str, type(None))):
                raise HumeError(f"{res_path}: its recorded data paths are not file names; pass --phi1_path")
            return phi1 if isinstance(phi1, str) else list(phi1), labels, f"results_{seed}.pickle"
    raise HumeError("the results pickles record no data paths (written by the paper's hume.py?): pass --phi1_path")


def evaluation_data(args, tasks):
    """phi1 (HUME tasks), every space's array (TURTLE tasks, else None) and the labels of the evaluation points."""
    if args.gt_labels_path and not (args.phi1_path or args.phi_paths):
        raise HumeError("--gt_labels_path needs --phi1_path or --phi_paths (the points those labels belong to)")
    phi1_path, phi_paths, labels_path, source = args.phi1_path, args.phi_paths, args.gt_labels_path, "the flags"
    if not (phi1_path or phi_paths):
        recorded, labels_path, source = recorded_paths(tasks)
        phi1_path, phi_paths = (recorded, None) if isinstance(recorded, str) else (None, recorded)
        for path in [phi1_path, labels_path] + (phi_paths or []):
            if path and not os.path.isfile(path):
                raise HumeError(f"{path}, recorded in {source}, is gone: pass --phi1_path or --phi_paths (and "
                                "--gt_labels_path)")
    log(f"evaluation points: {phi1_path or ' '.join(phi_paths)} (from {source})")
    phi1 = load_array(phi1_path, "--phi1_path") if phi1_path else None
    phis = [load_array(p, "--phi_paths") for p in phi_paths] if phi_paths else None
    n = len(phi1) if phi1 is not None else len(phis[0])
    y = load_labels(labels_path, "--gt_labels_path", n) if labels_path else None
    return phi1_path, phi1, phis, y


def has_scores(runs):
    """Did hume.py log ACC/ARI/NMI (it does when it was given labels)?"""
    return any("metrics" in r for recs in runs.values() for r in recs)


def plot_curves(runs):
    panels = [("loss", "outer loss")]
    if has_scores(runs):
        panels += [(m, m.upper()) for m in ("acc", "ari", "nmi")]
    fig = Figure(figsize=FIGSIZE["curves"], dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 2).ravel() if len(panels) > 1 else [fig.subplots()]
    for ax, (key, name) in zip(axes, panels):
        for seed, recs in runs.items():
            pts = [(r["iteration"], r["loss"] if key == "loss" else r["metrics"][key])
                   for r in recs if key == "loss" or "metrics" in r]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=f"seed {seed}")
        ax.set(title=name + (" (lower is better)" if key == "loss" else " on the evaluation set"),
               xlabel="outer iteration", ylabel=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", ncol=1 + len(runs) // 6)
    fig.suptitle(f"Training curves of {len(runs)} seed(s)")
    return fig


def plot_confusion(vote, y, n_tasks, best):
    aligned = align_to(vote, y)  # clusters renamed after their Hungarian-matched class
    C, pred_ids, true_ids = contingency(aligned, y)  # (clusters, classes)
    cols = list(true_ids) + [p for p in pred_ids if p not in set(true_ids)]  # matched first, then leftovers
    M = np.zeros((len(true_ids), len(cols)), dtype=np.int64)  # (classes, clusters)
    for i, p in enumerate(pred_ids):
        M[:, cols.index(p)] = C[i]
    share = M / np.maximum(M.sum(1, keepdims=True), 1)
    fig = Figure(figsize=FIGSIZE["confusion"], dpi=DPI, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(im, ax=ax, label="share of the class")
    if len(cols) <= MAX_ANNOTATED and len(true_ids) <= MAX_ANNOTATED:
        for (i, j), c in np.ndenumerate(M):
            if c:
                ax.text(j, i, str(c), ha="center", va="center", fontsize="small",
                        color="white" if share[i, j] > 0.5 else "black")
    if len(cols) <= 3 * MAX_ANNOTATED:
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(true_ids)), [str(t) for t in true_ids])
    ax.set(xlabel="ensemble cluster, named by its matched class (cells: point counts)", ylabel="true class",
           title=f"Ensemble of {n_tasks} task(s) (aligned to best-CV seed {best}) vs ground truth\n" +
           "  ".join(f"{k.upper()} {v:.3f}" for k, v in all_metrics(y, vote).items()))
    return fig


def plot_cv_vs_acc(preds, cv, best, vote, y):
    from scipy.stats import spearmanr
    seeds = list(preds)
    acc = {s: cluster_acc(y, preds[s]) for s in seeds}
    fig = Figure(figsize=FIGSIZE["cv_vs_acc"], dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.scatter([cv[s] for s in seeds], [acc[s] for s in seeds], label="task (seed)", zorder=3)
    ax.scatter([cv[best]], [acc[best]], marker="*", s=250, color="tab:red", zorder=4,
               label=f"best CV score (seed {best})")
    spots = {}  # seeds that land on the same point share one label
    for s in seeds:
        spots.setdefault((round(cv[s], 4), round(acc[s], 4)), []).append(str(s))
    for (x, y_), names in spots.items():
        ax.annotate(", ".join(names), (x, y_), textcoords="offset points", xytext=(5, 5), fontsize="small")
    ax.axhline(cluster_acc(y, vote), color="tab:green", ls="--", label="ensemble ACC")
    ax.axhline(np.mean(list(acc.values())), color="grey", ls=":", label="mean ACC over tasks")
    title = "Does the label-free CV score pick good tasks?"
    if len(seeds) >= 3 and len(set(cv.values())) > 1 and len(set(acc.values())) > 1:
        title += f"\nSpearman rank correlation {spearmanr([cv[s] for s in seeds], [acc[s] for s in seeds])[0]:.2f}"
    ax.set(xlabel="CV score (label-free)", ylabel="ACC (against ground truth)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_cluster_sizes(vote, y, k):
    fig = Figure(figsize=FIGSIZE["cluster_sizes"], dpi=DPI, layout="constrained")
    ax = fig.subplots()
    if y is None:
        ids, sizes = np.unique(vote, return_counts=True)
        order = np.argsort(-sizes, kind="stable")
        ids, sizes, xlabel = ids[order], sizes[order], "ensemble cluster (largest first)"
    else:
        ids, sizes = np.unique(align_to(vote, y), return_counts=True)
        xlabel = "ensemble cluster, named by its matched class"
    x = np.arange(len(ids))
    ax.bar(x, sizes, color="tab:blue", label="points in the cluster")
    if y is not None:
        classes, counts = np.unique(y, return_counts=True)
        true_size = dict(zip(classes.tolist(), counts.tolist()))
        ax.scatter(x, [true_size.get(i, 0) for i in ids.tolist()], marker="_", s=300, color="black", zorder=3,
                   label="points in the matched class")
    ax.axhline(len(vote) / k, color="grey", ls=":", label=f"balanced (n / k, k = {k})")
    if len(ids) <= 3 * MAX_ANNOTATED:
        ax.set_xticks(x, [str(i) for i in ids])
    ax.set(xlabel=xlabel, ylabel="points", title=f"Ensemble cluster sizes: {len(ids)} cluster(s) used of k = {k}")
    ax.legend(fontsize="small")
    return fig


def save(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    log(path)


def draw_montage(args, tasks, prefix):
    """plot.py --montage: the member thumbnails of every cluster (or, with --texts, their texts in the terminal)."""
    phi1_path, phi1, phis, _ = evaluation_data(args, tasks)
    if phi1 is None:  # TURTLE tasks: the points are named by their first space
        phi1_path, phi1 = (args.phi_paths or recorded_paths(tasks)[0])[0], phis[0]
    phi = load_array(args.phi2_path, "--phi2_path") if args.phi2_path else phi1
    check_rows([("--phi1_path", phi1), ("--phi2_path", phi)])
    if args.texts:
        texts = load_sources(args.texts, len(phi1), "--texts")
    else:
        sources = find_sources(args.sources, phi1_path, len(phi1))
        if sources is None:
            raise HumeError(f"--montage: no {sources_path(phi1_path)} (extract.py writes it beside the array): give "
                            "the images with --sources FILE, or --texts FILE for data without images")
        check_source_files(sources, "--montage")
    _, _, _, vote, k = task_ensemble(phi1, tasks, phis)
    rows = montage.groups(vote, phi, args.per_cluster)
    if args.texts:
        log("\n".join(montage.text_rows(rows, texts)))
        return
    paged = montage.pages(rows)
    paths = [os.path.join(args.out, f"{prefix}_montage{f'_{p}' if len(paged) > 1 else ''}.png")
             for p in range(1, len(paged) + 1)]
    if os.path.lexists(args.out):  # every output checked before the images are read (a new folder holds none)
        ensure_dir(args.out, "--out")
        for path in paths:
            check_output_file(path, "--out")
    images = montage.thumbnails(rows, sources, DPI)
    ensure_dir(args.out, "--out")
    for p, (page, path) in enumerate(zip(paged, paths), 1):
        title = (f"{len(rows)} non-empty clusters of k = {k}: size and up to {args.per_cluster} representative, "
                 f"diverse members (picked in {'phi2' if args.phi2_path else 'phi1'})" +
                 (f", page {p} of {len(paged)}" if len(paged) > 1 else ""))
        save(montage.draw_page(page, images, args.per_cluster, DPI, title), path)
        log(f"  rows: clusters {' '.join(str(c) for c, _, _ in page)}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    montage_only = [f for f, v in (("--phi2_path", args.phi2_path), ("--sources", args.sources),
                                   ("--texts", args.texts)) if v]
    if montage_only and not args.montage:
        raise HumeError(f"{montage_only[0]} is a --montage option; add --montage")
    if args.prefix is not None and (not args.prefix or os.sep in args.prefix or args.prefix in (".", "..")):
        raise HumeError(f"--prefix {args.prefix!r}: must be a file name prefix, not a path; use --out for the folder")
    tasks = find_tasks(args.tasks_path)
    prefix = args.prefix or os.path.basename(os.path.normpath(os.path.abspath(args.tasks_path)))
    if args.montage:
        return draw_montage(args, tasks, prefix)
    runs = read_metrics(args.tasks_path)
    ensure_dir(args.out, "--out")  # every output checked before the work
    path = {name: os.path.join(args.out, f"{prefix}_{name}.png") for name in FIGSIZE}
    for p in path.values():
        check_output_file(p, "--out")
    _, phi1, phis, y = evaluation_data(args, tasks)
    preds, cv, best, vote, k = task_ensemble(phi1, tasks, phis)
    if y is None:
        log("note: no ground-truth labels: skipped the confusion matrix and CV-vs-ACC figures (give --phi1_path "
            "and --gt_labels_path to draw them)" +
            ("" if has_scores(runs) else "; the training curves show the outer loss only"))
    save(plot_curves(runs), path["curves"])
    if y is not None:
        save(plot_confusion(vote, y, len(tasks), best), path["confusion"])
        save(plot_cv_vs_acc(preds, cv, best, vote, y), path["cv_vs_acc"])
    save(plot_cluster_sizes(vote, y, k), path["cluster_sizes"])


if __name__ == "__main__":
    run_cli(main)
