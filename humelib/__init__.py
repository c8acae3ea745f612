"""humelib: the code the scripts at the top level share (hume.py, run_turtle.py, evaluate.py and the others), and
HUME and TURTLE as Python functions on arrays (humelib.api):

    import humelib
    d = humelib.demo()
    fit = humelib.fit_hume(d["phi1"], d["phi2"], k=10, seed=0, outer_lr=0.01, num_subsets=5, adaptation_steps=100,
                           num_iters=150)
    labels = fit.labels(d["phi1_test"])
"""
import os

# 2 MB pages for torch's large CPU buffers (PyTorch's THP_MEM_ALLOC_ENABLE, where Linux gives transparent huge pages
# to the regions that ask: "madvise" mode, a common default). Torch reads it at the process's first large allocation,
# so it is set here, before any. The inner loops stream X_tr and its packed copies, tens of MB, four times a step; with
# 4 KB pages the TLB misses of those reads slow every product. A value the user set wins (0 switches it off).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from humelib.api import Fit, demo, fit_hume, fit_turtle  # noqa: E402  (after the setting above)
from humelib.metrics import all_metrics, cluster_acc  # noqa: E402
from humelib.runtime import HumeError  # noqa: E402

__all__ = ["Fit", "HumeError", "all_metrics", "cluster_acc", "demo", "fit_hume", "fit_turtle"]
