"""TURTLE: find the labeling whose linear classifiers have the largest margin in one or several strong spaces
(Gadetsky, Jiang & Brbic, "Let Go of Your Labels with Unsupervised Transfer", ICML 2024).

A task encoder theta (one weight-normalised linear head per space) labels the data; linear classifiers trained on
those labels for M steps in every space must fit them well. Minimising their loss over theta (first-order: the inner
result is held fixed, Eq. (13)) plus a balance term recovers the human labeling. Labels are used only to report.

    python run_turtle.py                                   # bundled digits demo: phi2 alone, TURTLE's defaults
    python run_turtle.py --T 1000 --exp_path tasks/turtle_demo/ --seed 0 && \
        python evaluate.py --tasks_path tasks/turtle_demo/
    python run_turtle.py --phi_paths clip_train.npy dino_train.npy --phi_paths_val clip_val.npy dino_val.npy \
        --gt_labels_path y_val.npy --k 10 --exp_path tasks/turtle/cifar10/ --seed 0

Writes to --exp_path: turtle_task_{seed}.pt (TURTLE's checkpoint layout: {"phi1": state_dict, "phi2": ...} of plain
nn.Linear(d_i, k) heads, weight norm removed), results_{seed}.pickle (CV_Score and more, as hume.py), metrics_{seed}
.jsonl (one JSON object per evaluation) and turtle_checkpoint_{seed}.pt (--resume continues from it, also to a larger
--T). Bad inputs end with one line on stderr and exit code 2.
"""
from humelib import turtle_args, turtle_loop
from humelib.arrays import DEMO, load_array, load_labels
from humelib.fileio import ensure_dir, torch_bytes
from humelib.run_folder import Run
from humelib.runtime import log, run_cli, summary
from humelib.task_encoder import export_turtle_task


def load_data(args):
    """{"phis", "phis_val", "y_val"} and their paths, checked against each other; evaluation = training points
    when no --phi_paths_val (transductive). No path flags: the demo's phi2, trained on its train split, scored on its
    test split."""
    if args.phi_paths is None:
        paths, paths_val, y_path = [DEMO["phi2_train"]], [DEMO["phi2_test"]], DEMO["labels_test"]
    else:
        paths, paths_val, y_path = args.phi_paths, args.phi_paths_val, args.gt_labels_path
    d = {"paths": paths, "phis": [load_array(p, "--phi_paths") for p in paths]}
    d["phis_val"] = [load_array(p, "--phi_paths_val") for p in paths_val] if paths_val else d["phis"]
    d["y_val"] = load_labels(y_path, "--gt_labels_path", len(d["phis_val"][0])) if y_path else None
    d["paths_val"], d["y_path"] = paths_val or paths, y_path  # recorded in the results (plot.py reads them)
    names = [f"--phi_paths {p}" for p in paths], [f"--phi_paths_val {p}" for p in paths_val or paths]
    return turtle_loop.check_data(args, d, names)


def main(argv=None):
    args = turtle_args.build_parser(__doc__).parse_args(argv)
    turtle_args.check_args(args)
    d = load_data(args)
    ensure_dir(args.exp_path, "--exp_path")  # only after every input check passed: bad input writes nothing
    mode = "inductive" if d["phis_val"] is not d["phis"] else "transductive"
    log(f"TURTLE {mode}: n={len(d['phis'][0])} dims={[a.shape[1] for a in d['phis']]} k={args.k} -> "
        f"{args.exp_path}", args.quiet)
    run = Run(args.exp_path, args.seed, "turtle")
    run.check()  # every output, and the seed not hume.py's, before any work
    with run.lock():  # a second run of this seed into this folder is refused
        run.claim()
        try:
            theta, seconds = turtle_loop.train(args, d, run)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (SLURM): say how to continue
            e.hint = run.resume_hint(args.ckpt_every)
            raise
        results = turtle_loop.score(args, d, theta, seconds)
        run.commit(torch_bytes(export_turtle_task(theta)), results)  # one unit
    log(summary(seconds, results), args.quiet)
    return results


if __name__ == "__main__":
    run_cli(main)
