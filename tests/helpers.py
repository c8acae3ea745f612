"""Small shared test fixtures: a tiny synthetic HUME problem written as .npy files, the paper's task-file format
built by hand with plain torch, an independent clustering accuracy, and ways to run the scripts (in process through
their main(argv), or as real subprocesses).
"""
import collections
import itertools
import os
import pickle
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# hume.py's inner-product kernel named (--kernel, a user's flag), not timed at start-up: the plan times every
# candidate for about a second, longer than a tiny run itself, and a named kernel gives bit-identical reruns (the
# resume tests compare with torch.equal). The plan is tested where it is the point: test_runs, test_products and the
# bundled demo's chain in test_cli run --kernel auto. "blas" (torch's matmul) runs on every machine.
KERNEL = ["--kernel", "blas"]

# Tiny budgets: a hume.py run is then dominated by `import torch` and the CV score.
FAST = ["--num_iters", "3", "--num_subsets", "2", "--adaptation_steps", "5", "--subset_size", "100",
        "--device", "cpu", "--quiet"] + KERNEL


# ---------------------------------------------------------------- synthetic data

def blobs(n=240, k=4, d1=16, d2=12, seed=0, noise=0.6, label_values=None):
    """Gaussian blobs: phi2 = class centre + noise (d2 dims), phi1 = a noisy linear map of phi2 (d1 dims) with
    unit-norm rows, labels (0..k-1, or label_values[class] when given). Balanced classes, shuffled order."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % k)
    centres = rng.normal(size=(k, d2)) * 3.0
    phi2 = centres[y] + noise * rng.normal(size=(n, d2))
    A = rng.normal(size=(d2, d1)) / np.sqrt(d2)
    phi1 = phi2 @ A + 0.1 * rng.normal(size=(n, d1))
    phi1 /= np.linalg.norm(phi1, axis=1, keepdims=True)
    if label_values is not None:
        y = np.asarray(label_values)[y]
    return phi1.astype(np.float32), phi2.astype(np.float32), y.astype(np.int64)


def save_npy(folder, name, arr):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name if name.endswith(".npy") else name + ".npy")
    np.save(path, arr)
    return path


def write_problem(folder, n=240, k=4, d1=16, d2=12, seed=0, n_val=0, label_values=None):
    """Write a synthetic problem into folder. Returns a dict of paths ("phi1", "phi2", "labels"; with n_val > 0
    also "phi1_val", "phi2_val", "labels_val" for the last n_val points, the first n - n_val being the training
    split) and the arrays themselves under "arrays"."""
    phi1, phi2, y = blobs(n, k, d1, d2, seed, label_values=label_values)
    out = {"k": k, "d1": d1, "d2": d2, "folder": folder,
           "arrays": {"phi1": phi1, "phi2": phi2, "labels": y}}
    n_tr = n - n_val
    out["phi1"] = save_npy(folder, "phi1", phi1[:n_tr])
    out["phi2"] = save_npy(folder, "phi2", phi2[:n_tr])
    out["labels"] = save_npy(folder, "labels", y[:n_tr])
    if n_val:
        out["arrays"] = {"phi1": phi1[:n_tr], "phi2": phi2[:n_tr], "labels": y[:n_tr],
                         "phi1_val": phi1[n_tr:], "phi2_val": phi2[n_tr:], "labels_val": y[n_tr:]}
        out["phi1_val"] = save_npy(folder, "phi1_val", phi1[n_tr:])
        out["phi2_val"] = save_npy(folder, "phi2_val", phi2[n_tr:])
        out["labels_val"] = save_npy(folder, "labels_val", y[n_tr:])
    return out


# ---------------------------------------------------------------- the paper's file formats, by hand

def orthogonal_linear(d1, k):
    import torch
    return torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(d1, k, bias=False))


def write_paper_task(folder, seed, W, cv_score):
    """linear_task_{seed}.pt and results_{seed}.pickle as the paper's hume.py writes them: torch.save of the
    state_dict of orthogonal(nn.Linear(d1, k, bias=False)) whose weight is W (k x d1, orthonormal rows), and a
    pickled dict {"CV_Score": float}."""
    import torch
    W = torch.as_tensor(np.asarray(W), dtype=torch.float32)
    module = orthogonal_linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        module.weight = W
    assert torch.allclose(module.weight, W, atol=1e-5), "W must have orthonormal rows"
    os.makedirs(folder, exist_ok=True)
    torch.save(module.state_dict(), os.path.join(folder, f"linear_task_{seed}.pt"))
    with open(os.path.join(folder, f"results_{seed}.pickle"), "wb") as f:
        pickle.dump({"CV_Score": float(cv_score)}, f)


# ---------------------------------------------------------------- independent metrics

def hungarian_acc(y_true, y_pred):
    """Best one-to-one cluster-to-class matching accuracy, via scipy's assignment solver on a contingency table
    built here with a Counter (unmatched points count as wrong)."""
    from scipy.optimize import linear_sum_assignment
    y_true, y_pred = np.asarray(y_true).tolist(), np.asarray(y_pred).tolist()
    clusters, classes = sorted(set(y_pred)), sorted(set(y_true))
    pairs = collections.Counter(zip(y_pred, y_true))
    C = np.array([[pairs[(c, t)] for t in classes] for c in clusters])
    rows, cols = linear_sum_assignment(-C)
    return C[rows, cols].sum() / len(y_true)


def brute_force_acc(y_true, y_pred):
    """The same accuracy by trying every injective cluster-to-class map (small k only)."""
    y_true, y_pred = np.asarray(y_true).tolist(), np.asarray(y_pred).tolist()
    clusters, classes = sorted(set(y_pred)), sorted(set(y_true))
    pairs = collections.Counter(zip(y_pred, y_true))
    if len(clusters) <= len(classes):
        best = max(sum(pairs[(c, t)] for c, t in zip(clusters, img))
                   for img in itertools.permutations(classes, len(clusters)))
    else:
        best = max(sum(pairs[(c, t)] for c, t in zip(img, classes))
                   for img in itertools.permutations(clusters, len(classes)))
    return best / len(y_true)


# ---------------------------------------------------------------- running the scripts
# In process (cli, run_chain_in_process: main(argv) as the script's __main__ runs it) for tables of cases, and as real
# `python script ...` processes (run_script, run_chain) where the process boundary is the point.

def cli(main, argv):
    """Run a script's main(argv) in this process exactly as its `__main__` does (utils.run_cli): returns
    (exit code, stdout, stderr). An exception that run_cli lets through (a traceback) propagates to the test."""
    import contextlib
    import io
    from humelib.runtime import run_cli
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(main, [str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def signal_after(fn, n, signum, calls):
    """fn wrapped to send this process signum right after its n-th call returns (a signal arriving while the n-th
    outer iteration runs); calls: a list the wrapper appends to on each call."""
    def wrapped(*a, **k):
        calls.append(1)
        out = fn(*a, **k)
        if len(calls) == n:
            os.kill(os.getpid(), signum)
        return out
    return wrapped


STEP_TIMEOUT = 300  # seconds, per script run


class Result:
    """A finished run: args (the command line), returncode, stdout, stderr."""

    def __init__(self, args, returncode, stdout, stderr):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr


def child_env():
    """The environment for script subprocesses: one BLAS/OpenMP thread each (several run at once on a small
    machine), and no stray PYTHON* settings from the test runner that could change the output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONSTARTUP")}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def command(script, args):
    return [sys.executable, os.path.join(REPO, script)] + [str(a) for a in args]


def run_script(script, args, timeout=STEP_TIMEOUT):
    """Run `python script args...` from the repo root in a fresh interpreter."""
    p = subprocess.run(command(script, args), cwd=REPO, env=child_env(), capture_output=True, text=True,
                       timeout=timeout)
    return Result(p.args, p.returncode, p.stdout, p.stderr)


def run_chain_in_process(steps):
    """steps: [(script, args), ...] run one after the other through main(argv) in this process (helpers.cli);
    stops after the first that fails. Same Result objects as run_chain."""
    import importlib
    procs = []
    for script, args in steps:
        code, out, err = cli(importlib.import_module(script.removesuffix(".py")).main, args)
        procs.append(Result(command(script, args), code, out, err))
        if code != 0:
            break
    return procs


def run_chain(steps, timeout=STEP_TIMEOUT):
    """steps: [(script, args), ...] run one after the other; stops after the first that fails."""
    procs = []
    for script, args in steps:
        procs.append(run_script(script, args, timeout))
        if procs[-1].returncode != 0:
            break
    return procs


def describe(proc):
    """Everything a failing assertion should show about a finished run."""
    return f"\n$ {' '.join(proc.args)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def assert_clean_failure(proc, expect):
    """A finished run (helpers.Result) refused its input: exit 2, one stderr line "error: ..." holding each of
    expect, no traceback."""
    info = describe(proc)
    assert proc.returncode == 2, info
    assert "Traceback" not in proc.stdout + proc.stderr, info
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), info
    for s in expect:
        assert s in lines[0], f"the error line should name {s!r}" + info


# ---------------------------------------------------------------- checks for refused inputs (tests/test_trust_*)

def refused(result, *needles):
    """result: (exit code, stdout, stderr) of helpers.cli. Asserts the project's error convention: exit 2, exactly
    one stderr line starting "error:" (besides "warning:" lines), no traceback, and each needle in that line.
    Returns the line."""
    code, _, err = result
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), f"exit {code}\n{err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def temp_files(folder):
    """Temporary files (files.atomic_write's .tmp_*) left anywhere under folder."""
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.startswith(".tmp_")]


def tree(folder):
    """Everything under folder, links not followed and special files not opened: {relative path: ("dir",),
    ("link", target), ("file", bytes) or ("special", mode)}. Equal before and after a refused run: nothing changed."""
    import stat
    out = {}
    for d, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(d, name)
            mode = os.lstat(path).st_mode
            rel = os.path.relpath(path, folder)
            if stat.S_ISLNK(mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read())
            else:
                out[rel] = ("special", stat.S_IFMT(mode))
    return out
