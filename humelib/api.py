"""HUME and TURTLE from Python, on arrays: no command line, no files. The scripts run the same loops
(humelib.hume_loop, humelib.turtle_loop), so a fit here with a script's settings and seed gives the labeling the
script gives.

    import humelib
    d = humelib.demo()
    fit = humelib.fit_hume(d["phi1"], d["phi2"], k=10, seed=0, outer_lr=0.01, num_subsets=5, adaptation_steps=100,
                           num_iters=150)
    labels = fit.labels(d["phi1_test"])        # one cluster a point
    print(fit.cv_score(d["phi2_test"], labels), humelib.cluster_acc(d["y_test"], labels))

Settings are the scripts' flags by name (hume.py --help, run_turtle.py --help), checked as the flags are; a bad one
raises HumeError. Like the scripts, a fit seeds Python's, numpy's and torch's global generators.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from numpy.typing import ArrayLike

from humelib import hume_args, hume_loop, inner_lr, turtle_args, turtle_loop
from humelib.arrays import DEMO, check_array, check_labels
from humelib.cvscore import cv_score
from humelib.embeddings import Data, Rows, check_data
from humelib.hume_args import Settings
from humelib.runtime import HumeError
from humelib.task_encoder import predict, turtle_predict

FILE_FLAGS = {"phi1_path", "phi2_path", "phi1_path_val", "phi2_path_val", "gt_labels_path", "phi_paths",
              "phi_paths_val", "exp_path", "resume", "save_all", "ckpt_every", "mmap", "cross_val"}


class Fit:
    """A fitted task encoder: `encoder` (HUME: orthogonal nn.Linear(d1, k) on phi1; TURTLE: one head per space),
    `labels(...)` of any points, and `results` (what the scripts save in results_{seed}.pickle: the labeling of the
    evaluation points, its CV score, ACC/ARI/NMI with labels, the settings)."""

    def __init__(self, method: str, encoder: torch.nn.Module, settings: Settings | argparse.Namespace,
                 results: dict) -> None:
        self.method, self.encoder, self.settings, self.results = method, encoder, settings, results

    def labels(self, *phis: ArrayLike) -> np.ndarray:
        """HUME: labels(phi1) of points in phi1's space; TURTLE: labels(phi_1, ..., phi_K), one array per space."""
        arrays = [check_array(p, f"points in space {i}") for i, p in enumerate(phis)]
        with torch.no_grad():
            if self.method == "hume":
                (phi1,) = arrays
                return predict(self.encoder.weight, Rows(phi1, self.settings.device, self.settings.normalize))
            return turtle_predict(self.encoder, [torch.from_numpy(a).to(self.settings.device) for a in arrays])

    def cv_score(self, phi2: ArrayLike, labels: ArrayLike) -> float:
        """The label-free score of labels in the space phi2 (10-fold cross-validated accuracy of a linear
        classifier): higher is more separable."""
        return cv_score(check_array(phi2, "phi2"), check_labels(labels, "labels", len(phi2)))

    def __repr__(self) -> str:
        return f"Fit({self.method}, CV score {self.results['CV_Score']:.4f})"


def settings_from(parser: argparse.ArgumentParser, flags: dict) -> argparse.Namespace:
    """The flags checked by the script's own parser (types, ranges, choices); argparse's namespace."""
    unknown = sorted(set(flags) - set(vars(parser.parse_args([]))) | (set(flags) & FILE_FLAGS))
    if unknown:
        raise HumeError(f"not a setting here: {', '.join(unknown)} (arrays are passed directly, and nothing is "
                        "written); see the script's --help for the others")
    argv = []
    for name, value in flags.items():
        if isinstance(value, bool):
            argv += [f"--{name}"] if value else []
        else:
            argv += [f"--{name}", str(value)]
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as e:  # exit_on_error=False: argparse raises; the parser words it as HumeError
        parser.error(str(e))


def spaces(x: ArrayLike | list) -> list:
    """One array per representation space: a list or tuple of them, or one array alone."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def fit_hume(phi1: ArrayLike, phi2: ArrayLike | list, *, phi1_val: ArrayLike | None = None,
             phi2_val: ArrayLike | list | None = None, y_val: ArrayLike | None = None, quiet: bool = True,
             **flags: object) -> Fit:
    """HUME on arrays: phi1 (n, d1), phi2 (n, d2) or a list of such arrays (several spaces); the evaluation points
    phi1_val/phi2_val (default: the training points) are labeled and scored, y_val only reports ACC/ARI/NMI.
    flags: hume.py's settings by name (k=10, seed=42, num_iters=1000, ...)."""
    args = settings_from(hume_args.build_parser(__doc__, exit_on_error=False), dict(flags, quiet=quiet))
    hume_args.check_args(args)
    cfg = hume_args.Settings(**vars(args))
    if (phi1_val is None) != (phi2_val is None):
        raise HumeError("give both phi1_val and phi2_val, or neither (the training points are then labeled)")
    phi1 = check_array(phi1, "phi1")
    phi2s = [check_array(p, f"phi2[{i}]") for i, p in enumerate(spaces(phi2))]
    if phi1_val is None:
        phi1_val, phi2s_val = phi1, phi2s
    else:
        phi1_val = check_array(phi1_val, "phi1_val")
        phi2s_val = [check_array(p, f"phi2_val[{i}]") for i, p in enumerate(spaces(phi2_val))]
    y = None if y_val is None else check_labels(y_val, "y_val", len(phi1_val))
    data = check_data(cfg, Data(phi1, phi2s, phi1_val, phi2s_val, y))
    steps = inner_lr.resolve(cfg.inner_lr, data.phi2, cfg.quiet)
    with hume_loop.set_up(cfg):
        search = hume_loop.prepare(cfg, data, steps)
        encoder, state = hume_loop.train(cfg, search, steps)
    del search
    return Fit("hume", encoder, cfg, hume_loop.score(cfg, data, steps, encoder, state))


def fit_turtle(phis: ArrayLike | list, *, phis_val: ArrayLike | list | None = None, y_val: ArrayLike | None = None,
               quiet: bool = True, **flags: object) -> Fit:
    """TURTLE on arrays: phis, one (n, d_i) array per space (or one array); phis_val the evaluation points in the
    same spaces (default: the training points); y_val only reports ACC/ARI/NMI. flags: run_turtle.py's settings by
    name (k=10, T=6000, gamma=10.0, seed=42, ...)."""
    args = settings_from(turtle_args.build_parser(__doc__, exit_on_error=False), dict(flags, quiet=quiet))
    turtle_args.check_args(args)
    args.cross_val = False
    d = {"phis": [check_array(p, f"phis[{i}]") for i, p in enumerate(spaces(phis))]}
    d["phis_val"] = d["phis"] if phis_val is None else [check_array(p, f"phis_val[{i}]")
                                                        for i, p in enumerate(spaces(phis_val))]
    d["y_val"] = None if y_val is None else check_labels(y_val, "y_val", len(d["phis_val"][0]))
    turtle_loop.check_data(args, d)
    theta, seconds = turtle_loop.train(args, d)
    return Fit("turtle", theta, args, turtle_loop.score(args, d, theta, seconds))


def demo() -> dict:
    """The bundled digits demo as arrays: phi1/phi2/y of the 1,437 training digits and phi1_test/phi2_test/y_test
    of the 360 test digits (phi1: PCA-50 of the pixels, unit rows; phi2: an OCR network's features)."""
    load = lambda key: np.load(DEMO[key], allow_pickle=False)
    return {"phi1": load("phi1_train"), "phi2": load("phi2_train"), "y": load("labels_train"),
            "phi1_test": load("phi1_test"), "phi2_test": load("phi2_test"), "y_test": load("labels_test")}
