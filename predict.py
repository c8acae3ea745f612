"""Write out the ensemble's labeling of any points, the training points or new ones never seen in training, and
optionally sort their files into one folder per cluster.

    python predict.py --tasks_path tasks/mine/ --phi1_path data/representations/resnet/minetrain_l2.npy \
        --out labels/mine --sort_into sorted/mine/
    python predict.py --tasks_path tasks/mine/ --phi1_path data/representations/resnet/newtrain_l2.npy \
        --align_on data/representations/resnet/minetrain_l2.npy --out labels/new      # a few new images
    python predict.py --tasks_path tasks/demo/ --phi1_path data/representations/pca/digitstest_l2.npy \
        --gt_labels_path data/labels/digitstest_targets.npy --out digits_test
    python predict.py --tasks_path tasks/turtle_demo/ --phi_paths data/representations/ocr/digitstest.npy \
        --out turtle_test                                           # TURTLE tasks (run_turtle.py): every space

Writes PREFIX.npy (int64, the cluster of each row) and PREFIX.csv with the columns row, cluster, agreement (the
share of the tasks whose aligned prediction is the vote: how sure the ensemble is), class (with --gt_labels_path:
the class the cluster is matched to, Hungarian; empty for a cluster left without one) and source (when known: from
NAME.sources.txt beside NAME.npy, as extract.py writes it, or --sources). The clusters are evaluate.py's ensemble:
each saved task encoder labels the points (argmax phi1 W^T; a TURTLE task the argmax of its mean softmax over
--phi_paths, every space's array of the points; so new points need no retraining), every task is
matched to the best-CV task, and each point takes the majority vote. The matching is made on the points being
labelled; --align_on makes it on those points and the training points together (their phi1, or for TURTLE tasks
one array per space), so a handful of new points
get the clusters' numbers of the training points. --sort_into DIR places each source file into DIR/cluster_XX/
(symlinks; --copy to copy). Nothing is overwritten: an existing output stops the run before anything is written.
Bad inputs end with one line on stderr and exit code 2.
"""
import contextlib
import csv
import errno
import os
import re
import shutil

import numpy as np

from humelib.arrays import check_rows, check_source_files, find_sources, load_array, load_labels
from humelib.fileio import OutputGroup, check_output_file
from humelib.flags import make_parser
from humelib.metrics import align_tasks, align_to, all_metrics, majority_vote
from humelib.run_folder import find_tasks
from humelib.runtime import HumeError, log, run_cli
from humelib.task_encoder import task_predictions


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--tasks_path", required=True, help="folder of tasks written by hume.py (linear_task_{seed}.pt) "
                   "or run_turtle.py (turtle_task_{seed}.pt)")
    p.add_argument("--phi1_path", help="HUME tasks: phi1 of the points to label (training points or new ones), in "
                   "the space the tasks were trained in")
    p.add_argument("--phi_paths", nargs="+", help="TURTLE tasks: every space's array of the points to label, in "
                   "the training order")
    p.add_argument("--out", required=True, help="PREFIX: writes PREFIX.npy and PREFIX.csv (folder created)")
    p.add_argument("--align_on", nargs="+", metavar="ARRAY", help="the training points in the same spaces (phi1, or "
                   "one array per --phi_paths space): match the tasks on them too (use it when labelling few new "
                   "points)")
    p.add_argument("--gt_labels_path", help="true labels of the points: adds the matched class column and prints "
                   "ACC/ARI/NMI")
    p.add_argument("--sources", help="the rows' sources, one a line; default: NAME.sources.txt beside --phi1_path")
    p.add_argument("--sort_into", metavar="DIR", help="place every source file into DIR/cluster_XX/")
    p.add_argument("--copy", action="store_true", help="--sort_into: copy the files instead of symlinking them")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    return p


def ensemble_labels(points, tasks, ref=None, turtle=False):
    """The ensemble's cluster per point, the share of tasks agreeing with it, and k. points: the arrays of the points
    (a list: [phi1] for HUME tasks, every space's with turtle); with ref (the same arrays for other points), the
    tasks are matched to the best-CV task on both together."""
    n = len(points[0])
    both = points if ref is None else [np.concatenate([a, b]) for a, b in zip(points, ref)]
    preds, cv, k = task_predictions(None, tasks, both) if turtle else task_predictions(both[0], tasks)
    _, aligned = align_tasks(preds, cv)
    vote = majority_vote(list(aligned.values()))
    agreement = np.mean([a == vote for a in aligned.values()], axis=0)
    return vote[:n], agreement[:n], k


def matched_classes(vote, y):
    """The class each point's cluster is matched to (Hungarian), or "" for a cluster left without a class."""
    aligned, classes = align_to(vote, y), set(np.unique(y).tolist())
    return [c if c in classes else "" for c in aligned.tolist()]


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting so as a formula


def csv_text(text):
    """A foreign text cell (a source file name) made inert in a spreadsheet: a cell starting with = + - @ tab or CR
    gets a single quote in front (OWASP's CSV-injection rule); csv.writer quotes what needs it."""
    return "'" + text if text.startswith(FORMULA_START) else text


def write_labels(group, prefix, vote, agreement, classes, sources):
    """PREFIX.npy and PREFIX.csv, staged in group (committed together, see files.OutputGroup)."""
    def write_npy(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, vote.astype(np.int64), allow_pickle=False)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "cluster", "agreement"] + ["class"] * (classes is not None) +
                       ["source"] * (sources is not None))
            for i, (c, a) in enumerate(zip(vote.tolist(), agreement.tolist())):
                w.writerow([i, c, f"{a:.3f}"] + ([classes[i]] if classes is not None else []) +
                           ([csv_text(sources[i])] if sources is not None else []))
    group.write(prefix + ".npy", write_npy)
    group.write(prefix + ".csv", write_csv)


# ---------------------------------------------------------------- sorting files

def sort_plan(vote, sources, folder, k):
    """[(source file, destination)]: DIR/cluster_XX/NAME, XX zero-padded to the width of k. A name that occurs
    twice in one cluster gets its row number in front. Refuses, before anything exists, anything it would clobber."""
    if sources is None:
        raise HumeError("--sort_into needs the rows' files: no sources file beside --phi1_path (extract.py writes "
                        "NAME.sources.txt beside NAME.npy); give one with --sources")
    check_source_files(sources, "--sort_into")
    width = len(str(max(k, int(vote.max()) + 1)))
    names = [os.path.basename(s) for s in sources]
    seen = {}
    for c, name in zip(vote.tolist(), names):
        seen[c, name] = seen.get((c, name), 0) + 1
    plan = []
    for i, (c, src, name) in enumerate(zip(vote.tolist(), sources, names)):
        name = f"{i}_{name}" if seen[c, name] > 1 else name
        plan.append((os.path.abspath(src), os.path.join(folder, f"cluster_{c:0{width}d}", name)))
    dsts = [d for _, d in plan]
    if len(set(dsts)) < len(dsts):
        raise HumeError(f"--sort_into {folder}: two files would get the same name; rename one of them")
    clusters = sorted({os.path.dirname(d) for d in dsts})
    links = [c for c in clusters if os.path.islink(c)]  # DIR itself may be a link the user named; not what is in it
    if links:
        raise HumeError(f"--sort_into {folder}: {links[0]} is a symbolic link to another folder; nothing is written "
                        "through links: remove it or choose a new folder")
    taken = [p for p in [folder] + clusters if os.path.lexists(p) and not os.path.isdir(p)] + \
        [d for d in dsts if os.path.lexists(d)]
    if taken:
        raise HumeError(f"--sort_into {folder}: {taken[0]} exists ({len(taken)} in all) and would be overwritten; "
                        "nothing was written: choose a new folder")
    return plan


def sort_files(plan, copy, folder):
    """Link (or copy) every file as planned. Returns what it made (folders, files), for remove_made; on a failure
    (a full disk mid-copy) removes all of it, the partial file included, and says so in one line."""
    made = ([], [])

    def make_dir(path):
        if os.path.islink(path):  # planted since sort_plan
            raise OSError(errno.ELOOP, "a symbolic link to another folder", path)
        if not os.path.isdir(path):
            make_dir(os.path.dirname(path))
            os.mkdir(path)
            made[0].append(path)
    src = dst = None
    try:
        for src, dst in plan:
            make_dir(os.path.dirname(os.path.abspath(dst)))
            if os.path.lexists(dst):  # planted since sort_plan: never replaced
                raise OSError(errno.EEXIST, "it exists", dst)
            made[1].append(dst)  # before the copy: a copy cut short by a full disk is removed too
            (shutil.copy2 if copy else os.symlink)(src, dst)
    except BaseException as e:  # Ctrl-C too: nothing half-sorted is left
        remove_made(made)
        if not isinstance(e, OSError):
            raise
        fix = "free some space or choose another folder" if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
            "choose another folder"
        raise HumeError(f"--sort_into {folder}: cannot {'copy' if copy else 'link'} {src} to {dst} ({e.strerror}); "
                        f"the files and folders made so far were removed and nothing was written: {fix}") from None
    return made


def remove_made(made):
    folders, files = made
    for path in reversed(files):
        with contextlib.suppress(OSError):
            os.remove(path)
    for path in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.copy and not args.sort_into:
        raise HumeError("--copy needs --sort_into DIR (it copies the files there instead of linking them)")
    prefix = re.sub(r"\.(npy|csv)$", "", args.out)
    existing = [p for p in (prefix + ".npy", prefix + ".csv") if os.path.lexists(p)]
    if existing:
        raise HumeError(f"--out {args.out}: {existing[0]} exists; nothing was written: remove it or choose another "
                        "--out")
    if (args.phi1_path is None) == (args.phi_paths is None):
        raise HumeError("give --phi1_path (HUME tasks) or --phi_paths (TURTLE tasks): the points to label")
    paths, flag = ([args.phi1_path], "--phi1_path") if args.phi1_path else (args.phi_paths, "--phi_paths")
    points = [load_array(p, flag) for p in paths]
    check_rows([(f"{flag} {p}", a) for p, a in zip(paths, points)])
    ref = [load_array(p, "--align_on") for p in args.align_on] if args.align_on else None
    if ref is not None:
        if len(ref) != len(points):
            raise HumeError(f"--align_on: {len(ref)} array(s) for {len(points)} in {flag}; give the training points "
                            "in the same spaces")
        check_rows([(f"--align_on {p}", a) for p, a in zip(args.align_on, ref)])
        for p, a, b in zip(args.align_on, ref, points):
            if a.shape[1] != b.shape[1]:
                raise HumeError(f"--align_on {p}: dimension {a.shape[1]}, but {flag} has {b.shape[1]}; both must be "
                                "in the space the tasks were trained in")
    n = len(points[0])
    y = load_labels(args.gt_labels_path, "--gt_labels_path", n) if args.gt_labels_path else None
    sources = find_sources(args.sources, paths[0], n)
    vote, agreement, k = ensemble_labels(points, find_tasks(args.tasks_path), ref, turtle=args.phi_paths is not None)
    plan = sort_plan(vote, sources, args.sort_into, k) if args.sort_into else None
    for path in (prefix + ".npy", prefix + ".csv"):
        check_output_file(path, "--out")
    group = OutputGroup()  # the labels and the sorted files: all or nothing
    try:
        write_labels(group, prefix, vote, agreement, None if y is None else matched_classes(vote, y), sources)
        made = sort_files(plan, args.copy, args.sort_into) if plan else ([], [])
    except BaseException:
        group.discard()
        raise
    try:
        group.commit()
    except BaseException:
        remove_made(made)
        raise
    ids, sizes = np.unique(vote, return_counts=True)
    log(f"{len(vote)} points in {len(ids)} clusters (k = {k}; sizes {dict(zip(ids.tolist(), sizes.tolist()))}), "
        f"mean agreement {agreement.mean():.3f} -> {prefix}.npy, {prefix}.csv", args.quiet)
    if y is not None:
        log("against --gt_labels_path: " + "  ".join(f"{m.upper()} {v:.4f}" for m, v in all_metrics(y, vote).items()),
            args.quiet)
    if plan:
        log(f"{len(plan)} files {'copied' if args.copy else 'linked'} into "
            f"{os.path.join(args.sort_into, 'cluster_*')}", args.quiet)


if __name__ == "__main__":
    run_cli(main)
