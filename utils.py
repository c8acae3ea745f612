"""The helpers scripts share, where the paper's layout has utils.py; they live in humelib/runtime.py (errors,
signals, a script's main, messages, seeding) and humelib/arrays.py (checked .npy loading, labels, the demo's paths)."""
from humelib.arrays import DEMO, check_rows, l2_normalize, load_array, load_labels
from humelib.runtime import HumeError, log, run_cli, seed_everything, warn

__all__ = ["DEMO", "HumeError", "check_rows", "l2_normalize", "load_array", "load_labels", "log", "run_cli",
           "seed_everything", "warn"]
