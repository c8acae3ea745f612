"""Choose the number of classes k without labels: run HUME for each k over a few seeds and compare the label-free
generalisation scores.

    python select_k.py --k_range 5..15 --seeds 0 1 -- --outer_lr 0.02 --num_subsets 3 --adaptation_steps 50 \
        --num_iters 60                     # bundled demo; flags after -- go to hume.py
    python select_k.py --k_range 2..7 --phi1_path P1.npy --phi2_path P2.npy --out tasks/select_k_mine/ --json k.json

Every flag this script does not know is passed to hume.py unchanged (paths, budgets, --device...); --k, --seed,
--exp_path and --quiet are set here: the tasks of k go to {--out}/k{k}/. The score of a task is its CV_Score
(10-fold CV accuracy of a logistic regression predicting the task's labels from phi2).

The rule (--rule gain, the default): choose the k with the highest mean CV score minus 1/k. The raw CV score is
biased toward small k: fewer classes are easier to predict, and merging two true classes costs nothing, so raw
scores tie (or favour k=2) whenever the true classes are well separated. 1/k is the score of a random balanced
labeling of k classes (chance), so CV - 1/k is how much better than chance a labeling is predicted; it rewards the
extra classes only while they stay as predictable as the others. On four blobs with phi1 = phi2 + noise
(tests/test_select_k.py) raw scores tie k=2 with k=4 while the gain picks 4; on the digits demo all three rules pick
k=10. --rule raw uses the mean CV score, --rule kappa the chance-normalised (CV - 1/k) / (1 - 1/k).
A heuristic: nothing guarantees that the human labeling is the one of highest score, and the scores of neighbouring
k are often within their seed-to-seed spread (see std); ground truth, when given to hume.py, is only shown in the
table (mean ACC), never used to choose.
"""
import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
from tqdm import tqdm

from humelib import hume_args
from humelib.embeddings import load_data
from humelib.fileio import check_output_file, ensure_dir, json_save, load_results
from humelib.flags import make_parser, report_flags, seed_int
from humelib.run_folder import Run
from humelib.runtime import HumeError, log, run_cli

HUME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hume.py")

RULES = {  # score of a k from its mean CV score: higher is better
    "gain": lambda cv, k: cv - 1 / k,
    "raw": lambda cv, k: cv,
    "kappa": lambda cv, k: (cv - 1 / k) / (1 - 1 / k),
}
SET_HERE = ("--k", "--seed", "--exp_path", "--quiet")  # hume.py flags this script sets itself
MAX_KS = 1000  # values of k in one --k_range A..B


def build_parser():
    p = make_parser(__doc__)
    p.allow_abbrev = False  # else a passed-through --k would be read as an abbreviation of --k_range
    p.epilog = ("Every other flag (or all flags after --) is passed to hume.py: data paths, budgets, --device. "
                "--k, --seed, --exp_path and --quiet are set by this script.")
    p.add_argument("--k_range", nargs="+", default=["5..15"],
                   help="values of k: A..B (inclusive range) and/or single numbers, e.g. 5..15 or 4 6 8")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2], help="HUME seeds run for every k")
    p.add_argument("--rule", choices=sorted(RULES), default="gain",
                   help="gain: max mean CV - 1/k; raw: max mean CV; kappa: max (CV - 1/k) / (1 - 1/k)")
    p.add_argument("--out", default="./tasks/select_k/", help="output folder; the tasks of k go to {out}/k{k}/")
    report_flags(p, "the table and the chosen k")
    return p


def parse_k_range(tokens):
    ks = []
    for t in tokens:
        m = re.fullmatch(r"([0-9]+)\.\.([0-9]+)", t)  # ASCII: '²'.isdigit() is true, int('²') fails
        if m:
            if int(m.group(2)) - int(m.group(1)) >= MAX_KS:
                raise HumeError(f"--k_range {t}: more than {MAX_KS} values of k (one HUME run each per seed); give a "
                                "shorter range")
            ks += range(int(m.group(1)), int(m.group(2)) + 1)
        elif re.fullmatch(r"[0-9]+", t):
            ks.append(int(t))
        else:
            raise HumeError(f"--k_range: cannot read {t!r}; use A..B (e.g. 5..15) or single numbers (e.g. 4 6 8)")
    ks = sorted(set(ks))
    if not ks or ks[0] < 2:
        raise HumeError(f"--k_range must hold values of k >= 2, got {' '.join(tokens)}")
    return ks


def hume_flags(extra):
    """The flags passed to hume.py, checked once up front (a typo fails now, not after the first k)."""
    extra = [a for a in extra if a != "--"]
    for a in extra:
        if a.split("=")[0] in SET_HERE:
            raise HumeError(f"{a.split('=')[0]} is set by select_k.py (use --k_range, --seeds, --out); "
                            "remove it from the flags passed to hume.py")
    hume_settings(extra)
    return extra


def hume_settings(extra):
    """The settings hume.py will run with (k aside): parsed and checked as hume.py does."""
    parser = hume_args.build_parser("hume.py")
    parser.prog = "hume.py (flags passed on by select_k.py)"
    args = parser.parse_args(extra + ["--k", "2"])
    hume_args.check_args(args)
    return hume_args.settings(args)


def check_grid(ks, extra, out, json_path):
    """Before any run: every k fits the data (k <= n points and <= phi1's dimension) and every output can be
    written."""
    cfg = dataclasses.replace(hume_settings(extra), mmap=True)  # only the shapes are needed
    phi1 = load_data(cfg).phi1
    n, d1 = phi1.shape
    too_big = [k for k in ks if k > min(n, d1)]
    if too_big:
        raise HumeError(f"--k_range: k = {', '.join(map(str, too_big))} is more than the data allows (n = {n} "
                        f"points, phi1 of dimension {d1}); use k <= {min(n, d1)}")
    if json_path:
        check_output_file(json_path, "--json")
    for k in ks:
        folder = os.path.join(out, f"k{k}")
        if os.path.islink(folder):
            raise HumeError(f"--out {out}: {folder} is a symbolic link to another folder; the tasks of k={k} are "
                            "never written through links: remove it or choose another --out")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise HumeError(f"--out {out}: {folder} is a file, but the tasks of k={k} go into a folder of that name; "
                            "move it or choose another --out")
    ensure_dir(out, "--out")


def run_hume(argv):
    """One `python hume.py argv...` process; its warnings (e.g. an inner loop that does not train) are passed on,
    and a failure stops the grid with hume.py's own error line."""
    run = subprocess.run([sys.executable, HUME] + argv, capture_output=True, text=True)
    for line in run.stderr.splitlines():
        if line.startswith("warning:"):
            print(line, file=sys.stderr)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
        raise HumeError(f"hume.py {' '.join(argv[-6:-1])} failed: {last.removeprefix('error: ')}")


def run_grid(ks, seeds, extra, out, quiet):
    """HUME for every (k, seed); returns {k: [results dict per seed]} read back from the results pickles."""
    results = {k: [] for k in ks}
    grid = [(k, s) for k in ks for s in seeds]
    for k, s in tqdm(grid, desc="select_k (k, seed)", disable=True if quiet else None):
        folder = os.path.join(out, f"k{k}")
        run_hume(extra + ["--k", str(k), "--seed", str(s), "--exp_path", folder, "--quiet"])
        results[k].append(load_results(Run(folder, s, "hume").results))
    return results


def score_table(results, rule):
    """One row per k: mean and std of the CV score over seeds, the rule's score, and mean ACC if labels were given.
    Returns (rows, chosen k)."""
    rows = []
    for k, runs in results.items():
        cv = np.array([r["CV_Score"] for r in runs])
        row = {"k": k, "cv_mean": float(cv.mean()), "cv_std": float(cv.std()), "chance": 1 / k,
               "score": float(RULES[rule](cv.mean(), k))}
        if all("metrics" in r for r in runs):
            row["acc_mean"] = float(np.mean([r["metrics"]["acc"] for r in runs]))
        rows.append(row)
    best = max(rows, key=lambda r: (r["score"], -r["k"]))  # ties: the smaller k
    return rows, best["k"]


def format_table(rows, chosen, rule):
    acc = all("acc_mean" in r for r in rows)
    lines = [f"{'k':>4} {'CV mean':>8} {'std':>7} {'1/k':>6} {rule:>8}" + (f" {'ACC mean':>9}" if acc else "")]
    for r in rows:
        lines.append(f"{r['k']:>4} {r['cv_mean']:8.4f} {r['cv_std']:7.4f} {r['chance']:6.3f} {r['score']:8.4f}" +
                     (f" {r['acc_mean']:9.4f}" if acc else "") + ("  <- chosen" if r["k"] == chosen else ""))
    lines.append(f"chosen k = {chosen} (rule {rule}: highest {'mean CV' if rule == 'raw' else rule + ' score'}; "
                 "a heuristic, see select_k.py --help)")
    return "\n".join(lines)


def main(argv=None):
    args, extra = build_parser().parse_known_args(argv)
    ks = parse_k_range(args.k_range)
    seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would run twice into the same files
    extra = hume_flags(extra)
    check_grid(ks, extra, args.out, args.json)
    rows, chosen = score_table(run_grid(ks, seeds, extra, args.out, args.quiet), args.rule)
    log(format_table(rows, chosen, args.rule), args.quiet)
    out = {"rule": args.rule, "chosen_k": chosen, "seeds": seeds, "hume_flags": extra, "table": rows}
    if args.json:
        json_save(out, args.json)
    return out


if __name__ == "__main__":
    run_cli(main)
