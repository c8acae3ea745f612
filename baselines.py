"""Baselines for the HUME table: k-means, Sinkhorn self-labelling (SeLa) and the supervised linear probe.

    python baselines.py --method kmeans --space phi1        # bundled demo: fit on train, score on test
    python baselines.py --method sinkhorn --space phi2
    python baselines.py --method probe --space phi2         # the supervised upper bound of a space
    python baselines.py --method kmeans --phi_path data/representations/dino/cifar10train.npy \
        --phi_path_val data/representations/dino/cifar10test.npy \
        --gt_labels_path data/labels/cifar10test_targets.npy --k 10 --json kmeans_dino.json

- kmeans: scikit-learn KMeans (n_init=10) in one space.
- sinkhorn: self-labelling as in SeLa (Asano et al., ICLR 2020): a linear classifier on the space is trained on
  pseudo-labels that the Sinkhorn-Knopp algorithm makes equipartitioned (entropic optimal transport, Q ~ P^lambda),
  alternating label updates and classifier epochs. Features are standardised (training mean/std) first so one
  learning rate suits every space. The classifier needs a strong L2 penalty (--weight_decay): SeLa learns the
  representation too, but on a fixed space an unpenalised linear classifier fits the random partition of its
  initial weights and the self-labelling never leaves it (demo, phi2: test ACC 0.43 without, 0.95-0.97 over seeds
  0-4 with 3.0; chosen on the demo with its labels, so treat it as a tuned setting).
- probe: plain LogisticRegression(max_iter=1000) on the training labels (--gt_labels_path_train), no
  standardisation, scored on the evaluation split: how far from "human" the best linear labeling of a space is.

Without --phi_path_val the setting is transductive (fit and score on the same points; the probe then reports its
training accuracy). With it, kmeans predicts the nearest centre and sinkhorn/probe the classifier's argmax on the
evaluation points. Reports ACC (Hungarian), ARI and NMI like evaluate.py; --json writes them too.
"""
import argparse
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

from humelib.arrays import DEMO, load_array, load_labels
from humelib.fileio import check_output_file, json_save
from humelib.flags import int_in, make_parser, nonnegative_float, positive_float, report_flags, seed_int
from humelib.metrics import all_metrics
from humelib.runtime import HumeError, log, run_cli, warn


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--method", choices=["kmeans", "sinkhorn", "probe"], default="kmeans", help="which baseline")
    p.add_argument("--space", choices=["phi1", "phi2"], default="phi2",
                   help="which representation of the bundled demo to use when no --phi_path is given")
    p.add_argument("--phi_path", help="representations (n x d .npy) to fit on; default: the bundled demo's train")
    p.add_argument("--phi_path_val", help="representations of the evaluation points (inductive); none: "
                   "transductive, score on --phi_path's points")
    p.add_argument("--gt_labels_path", help="labels of the evaluation points, for scoring")
    p.add_argument("--gt_labels_path_train", help="labels of --phi_path's points (the probe's training labels); "
                   "transductive: defaults to --gt_labels_path")
    p.add_argument("--k", type=int_in(2), default=10, help="number of clusters (kmeans, sinkhorn)")
    p.add_argument("--seed", type=seed_int, default=42, help="seeds k-means and the Sinkhorn classifier")
    p.add_argument("--lambda", dest="lam", type=positive_float, default=25.0,
                   help="sinkhorn: inverse temperature of the label update Q ~ P^lambda (SeLa's default)")
    p.add_argument("--rounds", type=int_in(1), default=40, help="sinkhorn: label updates")
    p.add_argument("--epochs", type=int_in(1), default=2, help="sinkhorn: classifier epochs after each label update")
    p.add_argument("--lr", type=positive_float, default=0.01, help="sinkhorn: Adam step size of the linear classifier")
    p.add_argument("--weight_decay", type=nonnegative_float, default=3.0,
                   help="sinkhorn: L2 penalty on the classifier (Adam weight_decay), on standardised features")
    p.add_argument("--batch_size", type=int_in(1), default=256, help="sinkhorn: mini-batch size")
    report_flags(p, "the result")
    return p


# ---------------------------------------------------------------- the methods

def kmeans(phi, phi_val, k, seed):
    from sklearn.cluster import KMeans
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(phi)
    return km.predict(phi_val)


def probe(phi, y, phi_val):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        pred = LogisticRegression(max_iter=1000).fit(phi, y).predict(phi_val)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        warn("the probe's logistic regression did not converge in 1000 iterations; its numbers are a lower bound")
    return pred


def sinkhorn_knopp(log_p, lam, tol=1e-8, max_iters=1000):
    """SeLa's label update (Asano et al., 2020, Eq. 5-6): the equipartitioned labels closest to P^lambda,
    Q = diag(u) P^lambda diag(v), with every row summing to 1 and every column to n/k.

    log_p: (n, k) log-probabilities. Works in the log domain (P^25 underflows) and in float64; stops when every
    column sum is within tol (relative) of n/k, or after max_iters. Returns Q (n, k), float64."""
    log_q = lam * log_p.double()
    n, k = log_q.shape
    log_col = torch.log(torch.tensor(n / k, dtype=torch.float64))
    for it in range(max_iters):
        log_q = log_q - torch.logsumexp(log_q, 0) + log_col  # columns to n/k
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)  # rows to 1
        if it % 10 == 9 and (torch.logsumexp(log_q, 0) - log_col).abs().max() < tol:
            break
    return log_q.exp()


def sinkhorn(phi, phi_val, k, seed, lam=25.0, rounds=40, epochs=2, lr=0.01, weight_decay=3.0, batch_size=256,
             quiet=False):
    """Self-labelling with a linear classifier on a fixed space: alternate Sinkhorn-Knopp label updates on the
    whole training set with `epochs` of cross-entropy training on the (hard) pseudo-labels. Returns the
    classifier's argmax on phi_val."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean, std = phi.mean(0), phi.std(0) + 1e-8
    x = torch.from_numpy((phi - mean) / std)
    x_val = torch.from_numpy((phi_val - mean) / std)
    head = torch.nn.Linear(x.shape[1], k)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in tqdm(range(rounds), desc="sinkhorn rounds", disable=True if quiet else None):
        with torch.no_grad():
            # only the argmax is used: columns within 0.1% of n/k are equipartitioned enough, and
            # near-converged classifiers can make Sinkhorn-Knopp slow to reach a tight tolerance
            pseudo = sinkhorn_knopp(torch.log_softmax(head(x), 1), lam, tol=1e-3).argmax(1)
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=gen).split(batch_size):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(head(x[batch]), pseudo[batch]).backward()
                opt.step()
    with torch.no_grad():
        return head(x_val).argmax(1).numpy()


# ---------------------------------------------------------------- the script

def with_demo(args):
    """The flags with the bundled demo's paths filled in when no path flag was given (a new namespace)."""
    if args.phi_path is not None:
        return args
    if args.phi_path_val or args.gt_labels_path or args.gt_labels_path_train:
        raise HumeError("give --phi_path with the other path flags, or no path flag to run the bundled demo")
    return argparse.Namespace(**{**vars(args), "phi_path": DEMO[f"{args.space}_train"],
                                 "phi_path_val": DEMO[f"{args.space}_test"], "gt_labels_path": DEMO["labels_test"],
                                 "gt_labels_path_train": DEMO["labels_train"]})


def check_args(args):
    if args.gt_labels_path is None:
        raise HumeError("--gt_labels_path is missing: baselines only report metrics, give the evaluation labels")
    if args.method == "probe" and args.phi_path_val and not args.gt_labels_path_train:
        raise HumeError("--method probe with --phi_path_val needs --gt_labels_path_train (labels of --phi_path)")


def load_data(args):
    phi = load_array(args.phi_path, "--phi_path")
    phi_val = phi
    if args.phi_path_val:
        phi_val = load_array(args.phi_path_val, "--phi_path_val")
        if phi_val.shape[1] != phi.shape[1]:
            raise HumeError(f"--phi_path_val has dimension {phi_val.shape[1]} but --phi_path has {phi.shape[1]}; "
                            "both must come from the same representation")
    y_val = load_labels(args.gt_labels_path, "--gt_labels_path", len(phi_val))
    y = None
    if args.method == "probe":
        y = load_labels(args.gt_labels_path_train or args.gt_labels_path, "--gt_labels_path_train", len(phi))
        if len(np.unique(y)) < 2:
            raise HumeError("--gt_labels_path_train holds a single class; the probe needs at least two")
    elif args.k > len(phi):
        raise HumeError(f"--k {args.k} is larger than the number of points in --phi_path ({len(phi)})")
    return phi, phi_val, y, y_val


def run(args, phi, phi_val, y):
    if args.method == "kmeans":
        return kmeans(phi, phi_val, args.k, args.seed)
    if args.method == "probe":
        return probe(phi, y, phi_val)
    return sinkhorn(phi, phi_val, args.k, args.seed, args.lam, args.rounds, args.epochs, args.lr, args.weight_decay,
                    args.batch_size, args.quiet)


def main(argv=None):
    args = with_demo(build_parser().parse_args(argv))
    check_args(args)
    if args.json:
        check_output_file(args.json, "--json")
    phi, phi_val, y, y_val = load_data(args)
    setting = "inductive" if args.phi_path_val else "transductive"
    start = time.time()
    pred = run(args, phi, phi_val, y)
    out = {"method": args.method, "setting": setting, "phi_path": args.phi_path, "phi_path_val": args.phi_path_val,
           "k": None if args.method == "probe" else args.k, "seed": args.seed, "seconds": time.time() - start,
           "metrics": all_metrics(y_val, pred),
           "cluster_sizes": np.unique(pred, return_counts=True)[1].tolist()}
    if args.method == "probe":
        out["accuracy"] = float(np.mean(pred == y_val))  # the probe predicts real labels: plain accuracy too
    log(f"{args.method} ({setting}) on {args.phi_path} (n={len(phi)}, d={phi.shape[1]}), scored on "
        f"{len(phi_val)} points: " + "  ".join(f"{m.upper()} {v:.4f}" for m, v in out["metrics"].items()),
        args.quiet)
    if args.json:
        json_save(out, args.json)
    return out


if __name__ == "__main__":
    run_cli(main)
