"""Name the clusters HUME found with a small labelling budget: pick a few samples for a human to label, then name
every cluster by the majority of its labelled members (the idea of USL, unsupervised selective labelling:
Wang et al., ECCV 2022).

    python annotate.py --budget 20                     # demo: 20 test points to label -> picks.csv
    python annotate.py --apply picks.csv               # after filling in its label column -> named_labels.npy
    python annotate.py --simulate                      # demo: ACC of the named labeling for 1, 2, 5 labels a cluster
    python annotate.py --tasks_path tasks/inductive/moco_dino/cifar10/ \
        --phi1_path data/representations/mocov2/cifar10test_l2.npy \
        --phi2_path data/representations/dino/cifar10test.npy --budget 50 --out cifar10_picks.csv

Clusters: the ensemble of the tasks in --tasks_path on --phi1_path, as evaluate.py forms it (every task matched to
the best-CV task, then a per-point majority vote). The budget is spread over the clusters in proportion to their
size, at least one each when the budget allows. Within a cluster, samples are picked greedily to minimise the
cluster's k-means cost in phi2 (rows L2-normalised) with the picks as centres: the first pick is the point closest
to the cluster's centre (representative), each next one covers the part of the cluster the earlier picks cover
worst, so picks are never near each other (diverse). The CSV lists index, cluster, rank (1 = most representative)
and an empty label column for the human; --apply reads the columns index and label (other columns are ignored; a
cluster column, if present, must agree with the clusters). Ties in a cluster's vote go to the label listed first.
A cluster with no labelled member is named like the nearest named cluster (centres in phi2), with a warning.
"""
import collections
import csv

import numpy as np
from tqdm import tqdm

from humelib.arrays import DEMO, check_rows, l2_normalize, load_array, load_labels
from humelib.fileio import atomic_write, check_output_file, json_save
from humelib.flags import int_in, make_parser, report_flags
from humelib.metrics import cluster_acc
from humelib.runtime import HumeError, log, run_cli, warn
from humelib.selection import allocate, pick
from humelib.run_folder import find_tasks
from humelib.task_encoder import task_ensemble


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--tasks_path", default="./linear_tasks/", help="folder of HUME tasks (linear_task_{seed}.pt)")
    p.add_argument("--phi1_path", help="phi1 of the points to label; default: the bundled demo's test split")
    p.add_argument("--phi2_path", help="phi2 of the same points (picks are made there); default: the demo's test")
    p.add_argument("--phi_paths", nargs="+", help="TURTLE tasks (run_turtle.py): every space's array of the same "
                   "points, in the training order; default: --phi2_path alone")
    p.add_argument("--budget", type=int_in(1), help="how many samples the human will label (pick mode)")
    p.add_argument("--apply", metavar="LABELS.csv", help="a CSV with columns index,label: name the clusters and "
                   "write the full labeling")
    p.add_argument("--simulate", action="store_true", help="let --gt_labels_path play the human: ACC of the named "
                   "labeling for each --per_cluster budget")
    p.add_argument("--per_cluster", type=int_in(1), nargs="+", default=[1, 2, 5],
                   help="--simulate: budgets, in labels per cluster")
    p.add_argument("--gt_labels_path", help="--simulate: the true labels of the points; default: the demo's test "
                   "labels when no path is given")
    p.add_argument("--out", help="pick mode: the CSV of picks (default picks.csv); --apply: the .npy of the full "
                   "labeling (default named_labels.npy)")
    report_flags(p, "--simulate's table")
    return p


# ---------------------------------------------------------------- clusters

def ensemble_clusters(phi1, tasks_path, phis=None):
    """evaluate.py's ensemble labeling of phi1 (TURTLE tasks: of phis): tasks aligned (Hungarian) to the best-CV
    task, majority vote."""
    return task_ensemble(phi1, find_tasks(tasks_path), phis)[3]  # the vote


def spread(clusters, budget):
    """The budget's samples per cluster (np.unique order): in proportion to size, at least one each if possible."""
    return allocate(np.unique(clusters, return_counts=True)[1], budget)


# ---------------------------------------------------------------- naming

def name_clusters(clusters, labelled, phi2):
    """{cluster: name}: the majority label of its labelled members (ties: the label seen first); a cluster with none
    takes the name of the nearest named cluster (centres of L2-normalised phi2)."""
    votes = collections.defaultdict(collections.Counter)
    for i, label in labelled.items():
        votes[clusters[i]][label] += 1
    names = {c: v.most_common(1)[0][0] for c, v in votes.items()}
    unnamed = [c for c in np.unique(clusters) if c not in names]
    if unnamed:
        z = l2_normalize(np.asarray(phi2, dtype=np.float64))
        named = list(names)
        centres = np.stack([z[clusters == c].mean(0) for c in named])
        for c in unnamed:
            names[c] = names[named[int(np.argmin(((centres - z[clusters == c].mean(0)) ** 2).sum(1)))]]
        warn(f"clusters {', '.join(str(c) for c in unnamed)} have no labelled member; each is named like the "
             "nearest named cluster (label at least one sample of every cluster to avoid this)")
    return names


def named_labeling(clusters, names):
    return np.array([names[c] for c in clusters])


def parse_label(text):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return text


def read_labels_csv(path, clusters):
    """{index: label} from a CSV with a header naming the columns index and label; blank labels are skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a byte-order mark
            rows = list(csv.DictReader(f))
            columns = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise HumeError(f"--apply {path}: cannot be read as a CSV file ({e})") from None
    missing = [c for c in ("index", "label") if c not in columns]
    if missing:
        raise HumeError(f"--apply {path}: no column {' or '.join(missing)} (header: {','.join(columns) or 'none'}); "
                        "the first line must name the columns index,label")
    labelled = {}
    for line, row in enumerate(rows, start=2):
        text = (row["index"] or "").strip()
        if not text.isascii() or not text.isdigit() or int(text) >= len(clusters):  # '²'.isdigit(), int('²') fails
            raise HumeError(f"--apply {path} line {line}: index {text!r} is not a point index (0 to "
                            f"{len(clusters) - 1}); the indices are rows of --phi1_path/--phi2_path")
        i = int(text)
        if (row.get("cluster") or "").strip() not in ("", str(clusters[i])):
            raise HumeError(f"--apply {path} line {line}: point {i} is listed in cluster {row['cluster']} but the "
                            f"tasks put it in cluster {clusters[i]}; were the picks made with other --tasks_path?")
        if not (row["label"] or "").strip():
            continue
        label = parse_label(row["label"])
        if labelled.get(i, label) != label:
            raise HumeError(f"--apply {path} line {line}: point {i} is given two labels ({labelled[i]!r}, "
                            f"{label!r}); keep one")
        labelled[i] = label
    if not labelled:
        raise HumeError(f"--apply {path}: no labels given; fill in the label column")
    return labelled


# ---------------------------------------------------------------- modes

def write_picks(rows, path):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "cluster", "rank", "label"])
            w.writerows([i, c, r, ""] for i, c, r in rows)
    atomic_write(path, write)


def apply_labels(clusters, phi2, csv_path, out):
    labelled = read_labels_csv(csv_path, clusters)
    names = name_clusters(clusters, labelled, phi2)
    labeling = named_labeling(clusters, names)
    if labeling.dtype.kind in "iu":
        labeling = labeling.astype(np.int64)
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name without it
            np.save(f, labeling, allow_pickle=False)
    atomic_write(out, write)
    return labelled, names


def simulate(clusters, phi2, y, per_cluster, quiet=True):
    """Rows {per_cluster, budget, acc}: plain accuracy of the labeling named from the picks' true labels."""
    n_clusters = len(np.unique(clusters))
    rows = []
    for b in tqdm(per_cluster, desc="simulate", disable=True if quiet else None):
        budget = min(b * n_clusters, len(y))
        labelled = {i: int(y[i]) for i, _, _ in pick(clusters, phi2, spread(clusters, budget))}
        named = named_labeling(clusters, name_clusters(clusters, labelled, phi2))
        rows.append({"per_cluster": b, "budget": budget, "acc": float(np.mean(named == y))})
    return rows


def load_points(args):
    """phi1 and phi2 of the points (the demo's test split when neither path is given) and the labels' path."""
    phi1_path, phi2_path, labels_path = args.phi1_path, args.phi2_path, args.gt_labels_path
    if phi1_path is None and phi2_path is None:
        phi1_path, phi2_path, labels_path = DEMO["phi1_test"], DEMO["phi2_test"], labels_path or DEMO["labels_test"]
    elif phi1_path is None or phi2_path is None:
        raise HumeError("give both --phi1_path and --phi2_path (the same points), or neither for the bundled demo")
    phi1, phi2 = load_array(phi1_path, "--phi1_path"), load_array(phi2_path, "--phi2_path")
    check_rows([("--phi1_path", phi1), ("--phi2_path", phi2)])
    return phi1, phi2, labels_path


def main(argv=None):
    args = build_parser().parse_args(argv)
    modes = [m for m, on in (("--budget", args.budget is not None), ("--apply", args.apply),
                             ("--simulate", args.simulate)) if on]
    if len(modes) != 1:
        raise HumeError("give exactly one of --budget B (pick samples), --apply LABELS.csv (name the clusters) or "
                        f"--simulate (measure ACC against --gt_labels_path); got {' '.join(modes) or 'none'}")
    phi1, phi2, labels_path = load_points(args)
    if args.simulate and not labels_path:
        raise HumeError("--simulate needs --gt_labels_path (the true labels play the human)")
    if args.budget is not None and not 1 <= args.budget <= len(phi1):
        raise HumeError(f"--budget must be between 1 and the number of points ({len(phi1)}), got {args.budget}")
    y = load_labels(labels_path, "--gt_labels_path", len(phi1)) if args.simulate else None
    if args.budget is not None or args.apply:  # every output checked before the work
        check_output_file(args.out or ("picks.csv" if args.budget is not None else "named_labels.npy"), "--out")
    if args.simulate and args.json:
        check_output_file(args.json, "--json")
    phis = [load_array(p, "--phi_paths") for p in args.phi_paths] if args.phi_paths else [phi2]
    check_rows([("--phi1_path", phi1)] + [(f"--phi_paths {p}", a) for p, a in zip(args.phi_paths or [], phis)])
    clusters = ensemble_clusters(phi1, args.tasks_path, phis)
    k = len(np.unique(clusters))
    if args.budget is not None:
        out = args.out or "picks.csv"
        rows = pick(clusters, phi2, spread(clusters, args.budget), args.quiet)
        write_picks(rows, out)
        log(f"{len(rows)} samples from {len({c for _, c, _ in rows})} of {k} clusters -> {out}; fill in the label "
            f"column and run: python annotate.py --apply {out}", args.quiet)
        return rows
    if args.apply:
        out = args.out or "named_labels.npy"
        labelled, names = apply_labels(clusters, phi2, args.apply, out)
        log(f"{len(labelled)} labels named {k} clusters: " + ", ".join(f"{c}->{v}" for c, v in names.items()) +
            f"; labeling of {len(clusters)} points -> {out}", args.quiet)
        return names
    rows = simulate(clusters, phi2, y, args.per_cluster, args.quiet)
    limit = float(np.mean(named_labeling(clusters, name_clusters(clusters, dict(enumerate(y.tolist())), phi2)) == y))
    lines = [f"{'per cluster':>11} {'budget':>7} {'ACC':>7}"] + \
            [f"{r['per_cluster']:>11} {r['budget']:>7} {r['acc']:7.4f}" for r in rows]
    lines.append(f"{k} clusters; every point labelled (majority naming): ACC {limit:.4f}; "
                 f"Hungarian ACC of the clusters: {cluster_acc(y, clusters):.4f}")
    log("\n".join(lines), args.quiet)
    result = {"clusters": k, "table": rows, "all_labelled_acc": limit, "hungarian_acc": cluster_acc(y, clusters)}
    if args.json:
        json_save(result, args.json)
    return result


if __name__ == "__main__":
    run_cli(main)
