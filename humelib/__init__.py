"""humelib: the code the scripts at the top level share (hume.py, run_turtle.py, evaluate.py and the others), and
HUME and TURTLE as Python functions on arrays (humelib.api):

    import humelib
    d = humelib.demo()
    fit = humelib.fit_hume(d["phi1"], d["phi2"], k=10, seed=0, outer_lr=0.01, num_subsets=5, adaptation_steps=100,
                           num_iters=150)
    labels = fit.labels(d["phi1_test"])
"""
from humelib.api import Fit, demo, fit_hume, fit_turtle
from humelib.metrics import all_metrics, cluster_acc
from humelib.runtime import HumeError

__all__ = ["Fit", "HumeError", "all_metrics", "cluster_acc", "demo", "fit_hume", "fit_turtle"]
