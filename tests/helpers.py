"""Small shared test fixtures: a tiny synthetic HUME problem written as .npy files, the paper's task-file format
built by hand with plain torch, an independent clustering accuracy, and a way to run the scripts as real
subprocesses (several at once, since each one pays for `import torch`).

Nothing here imports the project's modules: the tests that use it check the scripts from the outside.
"""
import collections
import itertools
import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny budgets: a hume.py run is then dominated by `import torch` and the CV score.
FAST = ["--num_iters", "3", "--num_subsets", "2", "--adaptation_steps", "5", "--subset_size", "100",
        "--device", "cpu", "--quiet"]


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

def cli(main, argv):
    """Run a script's main(argv) in this process exactly as its `__main__` does (utils.run_cli): returns
    (exit code, stdout, stderr). An exception that run_cli lets through (a traceback) propagates to the test."""
    import contextlib
    import io
    from utils import run_cli
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(main, [str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()

# Two ways, same result object (returncode, stdout, stderr, args):
# - "exec": `sys.executable script args...` from the repo root, one fresh interpreter per run;
# - "fork": one server process (`sys.executable tests/helpers.py --serve`) imports torch/numpy/scipy/sklearn once
#   and forks a child per run; the child points fds 1 and 2 at its own files, sets sys.argv and sys.path[0] as the
#   interpreter would, and runs the script with runpy as __main__ (the project's modules are imported fresh in
#   every child). An uncaught exception prints its traceback and exits 1, as the interpreter does. This saves the
#   `import torch` (3-4 CPU-seconds) of every run; set HUME_TEST_EXEC=1 to run everything the "exec" way.
PREIMPORT = ("torch", "numpy", "scipy.optimize", "sklearn.linear_model", "sklearn.metrics", "sklearn.model_selection",
             "sklearn.exceptions", "tqdm")
STEP_TIMEOUT = 300  # seconds, per script run


class Result:
    """A finished run: args (the command line), returncode, stdout, stderr, cpu (seconds; forked runs only)."""

    def __init__(self, args, returncode, stdout, stderr, cpu=None):
        self.args, self.returncode, self.stdout, self.stderr, self.cpu = args, returncode, stdout, stderr, cpu


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


def run_chain(steps, timeout=STEP_TIMEOUT):
    """steps: [(script, args), ...] run one after the other; stops after the first that fails."""
    procs = []
    for script, args in steps:
        procs.append(run_script(script, args, timeout))
        if procs[-1].returncode != 0:
            break
    return procs


def run_forked(jobs, timeout=1200):
    """jobs: {key: [(script, args), ...]} (chains, see run_chain) run by one fork server; returns
    {key: [Result, ...]}."""
    if not jobs:
        return {}
    keys = list(jobs)
    payload = json.dumps([[[script, [str(a) for a in args]] for script, args in jobs[key]] for key in keys])
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--serve"], input=payload, cwd=REPO,
                       env=child_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"fork server failed (exit {p.returncode}):\n{p.stderr}")
    results = json.loads(p.stdout)
    return {key: [Result(command(script, args), **r) for (script, args), r in zip(jobs[key], res)]
            for key, res in zip(keys, results)}


def run_many(jobs, exec_keys=(), timeout=STEP_TIMEOUT, workers=None):
    """jobs: {key: [(script, args), ...]} (chains, see run_chain), all run at the same time: the keys in
    exec_keys the "exec" way (one thread each), the others by one fork server (all of them "exec" under
    HUME_TEST_EXEC=1). Returns {key: [Result, ...]}."""
    every = bool(os.environ.get("HUME_TEST_EXEC"))
    execs = {k: v for k, v in jobs.items() if every or k in exec_keys}
    forked = {k: v for k, v in jobs.items() if k not in execs}
    workers = workers or max(2, min(len(execs) + 1, 2 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers) as pool:
        server = pool.submit(run_forked, forked)
        futures = {key: pool.submit(run_chain, steps, timeout) for key, steps in execs.items()}
        out = {key: f.result() for key, f in futures.items()}
        out.update(server.result())
    return out


def describe(proc):
    """Everything a failing assertion should show about a finished run."""
    return f"\n$ {' '.join(proc.args)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def _fork_run(script, args, out, err):
    """In a forked child: behave like `python script args...` run from the repo root; never returns."""
    import runpy
    import signal
    import traceback
    code = 1
    try:
        signal.alarm(STEP_TIMEOUT)  # a run that hangs dies of SIGALRM (exit -14) instead of blocking the server
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        sys.stdin = open(os.devnull)
        os.chdir(REPO)
        path = os.path.join(REPO, script)
        sys.argv = [path] + args
        sys.path[0] = REPO
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException as e:  # as the interpreter prints it: from the script's own frame on
            tb = e.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename != path:
                tb = tb.tb_next
            traceback.print_exception(type(e), e, tb or e.__traceback__)
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve():
    """The fork server (see above): a JSON list of chains on stdin, a JSON list of their results on stdout.
    Up to cpu_count runs at a time; a chain's next step is forked when its previous one succeeded."""
    import importlib
    import shutil
    import tempfile
    chains = json.loads(sys.stdin.read())
    for name in PREIMPORT:
        importlib.import_module(name)
    tmp = tempfile.mkdtemp(prefix="hume_cli_")
    limit = max(2, os.cpu_count() or 1)
    results = [[] for _ in chains]
    ready = [(i, 0) for i in range(len(chains)) if chains[i]]  # (chain, step) that may start now
    running = {}
    while ready or running:
        while ready and len(running) < limit:
            i, j = ready.pop(0)
            script, args = chains[i][j]
            out, err = os.path.join(tmp, f"{i}_{j}.out"), os.path.join(tmp, f"{i}_{j}.err")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _fork_run(script, args, out, err)
            running[pid] = (i, j, out, err)
        pid, status, usage = os.wait4(-1, 0)
        i, j, out, err = running.pop(pid)
        with open(out) as fo, open(err) as fe:
            results[i].append({"returncode": os.waitstatus_to_exitcode(status), "stdout": fo.read(),
                               "stderr": fe.read(), "cpu": usage.ru_utime + usage.ru_stime})
        if results[i][-1]["returncode"] == 0 and j + 1 < len(chains[i]):
            ready.insert(0, (i, j + 1))
    shutil.rmtree(tmp)
    sys.stdout.write(json.dumps(results))

if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()


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
    """Temporary files (utils.atomic_write's .tmp_*) left anywhere under folder."""
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.startswith(".tmp_")]
