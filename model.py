"""The task encoder (paper, Eq. 3): building it, its labels, its predictions, and the task folders it is saved in.

A task is a linear map W (k x d1) with orthonormal rows in space phi1. Training labels are sparsemax(phi1 W^T / tau);
a point's predicted class is argmax(phi1 W^T). Saved as the state_dict of
orthogonal(nn.Linear(d1, k, bias=False)) in linear_task_{seed}.pt, beside results_{seed}.pickle (its CV_Score): the
layout of the paper's code, so folders of either implementation load here.
"""
import os
import re

import numpy as np
import torch
from torch import nn

from sparsemax import sparsemax
from utils import HumeError, load_results

TASK_FILE = re.compile(r"linear_task_(-?\d+)\.pt")  # linear_task_{iter}_{seed}.pt (--save_all) does not match


def make_task_encoder(d1, k):
    """The paper's task encoder: a linear map with orthonormal rows (the saved state_dict has this layout)."""
    return nn.utils.parametrizations.orthogonal(nn.Linear(d1, k, bias=False))


def labels(phi1, W, tau):
    """Eq. 3: the task encoder's labeling, row-wise sparsemax of phi1 W^T / tau."""
    return sparsemax(phi1 @ W.T / tau)


@torch.no_grad()
def predict(W, phi1, chunk=1 << 16):
    """argmax(phi1 W^T) over an inputs.Rows source, in chunks (memory-mapped arrays are never read whole)."""
    return np.concatenate([(phi1.range(i, i + chunk) @ W.T).argmax(1).cpu().numpy()
                           for i in range(0, len(phi1), chunk)])


def sample_subsets(gen, n, S, m):
    """S subsets of m distinct points each (indices (S, m)); the first train_fraction of each row is X_tr."""
    return torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(S)])


def init_inner(gen, S, k, d2, dtype):
    """Inner classifiers [V, c] (S, k, d2+1), drawn like nn.Linear's default init: U(-1/sqrt(d2), 1/sqrt(d2))."""
    bound = 1 / np.sqrt(d2)
    return (torch.rand(S, k, d2 + 1, generator=gen, dtype=dtype) * 2 - 1) * bound


# ---------------------------------------------------------------- task folders

def find_tasks(folder):
    """{seed: (task path, results path)} for every task in folder; every task needs its results pickle."""
    if not os.path.isdir(folder):
        raise HumeError(f"--tasks_path {folder}: no such folder")
    seeds = sorted(int(m.group(1)) for f in os.listdir(folder) if (m := TASK_FILE.fullmatch(f)))
    if not seeds:
        raise HumeError(f"--tasks_path {folder}: no linear_task_{{seed}}.pt files; run hume.py with --exp_path "
                        f"{folder} first")
    tasks = {}
    for s in seeds:
        res = os.path.join(folder, f"results_{s}.pickle")
        if not os.path.isfile(res):
            raise HumeError(f"--tasks_path {folder}: linear_task_{s}.pt has no results_{s}.pickle (its CV score); "
                            "rerun that seed or remove the task")
        tasks[s] = (os.path.join(folder, f"linear_task_{s}.pt"), res)
    return tasks


def load_task(path, d1):
    """Task encoder weight W (k x d1) from a saved state_dict of orthogonal(nn.Linear(d1, k, bias=False))."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        k, d = state["parametrizations.weight.original"].shape
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HumeError(f"{path}: not a HUME task file ({type(e).__name__}: {first})") from None
    if d != d1:
        raise HumeError(f"{path}: task encoder expects phi1 of dimension {d}, but --phi1_path has {d1}; "
                        "evaluate with the phi1 space the tasks were trained in")
    encoder = make_task_encoder(d1, k)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HumeError(f"{path}: does not load into orthogonal(nn.Linear({d1}, {k})): {str(e).splitlines()[0]}") \
            from None
    return encoder.weight.detach()


def check_one_kind(tasks, values, name, what):
    """A folder mixing tasks of different shapes ({seed: value of name}) is refused, naming the seeds."""
    by = {}
    for s, v in values.items():
        by.setdefault(v, []).append(str(s))
    if len(by) > 1:
        mix = "; ".join(f"{name}={v}: seeds {', '.join(seeds)}" for v, seeds in sorted(by.items()))
        raise HumeError(f"--tasks_path {os.path.dirname(next(iter(tasks.values()))[0])}: mixes tasks of different "
                        f"{what} ({mix}); keep one per folder")


def task_predictions(phi1, tasks):
    """{seed: argmax(phi1 W^T)}, {seed: CV score} and k (phi1: a float array). Tasks of different k or phi1
    dimension in one folder are refused."""
    phi1 = torch.from_numpy(np.asarray(phi1, dtype=np.float32))
    d1s = {}
    for s, (path, _) in tasks.items():
        try:
            d1s[s] = torch.load(path, map_location="cpu", weights_only=True)["parametrizations.weight.original"].shape[1]
        except Exception:
            continue  # load_task reports a damaged task file
    check_one_kind(tasks, d1s, "d1", "phi1 dimension")
    W = {s: load_task(task_path, phi1.shape[1]) for s, (task_path, _) in tasks.items()}
    check_one_kind(tasks, {s: w.shape[0] for s, w in W.items()}, "k", "k")
    preds = {s: (phi1 @ W[s].T).argmax(1).numpy() for s in tasks}
    cv = {s: load_results(res_path)["CV_Score"] for s, (_, res_path) in tasks.items()}  # a hostile pickle runs nothing
    return preds, cv, max(w.shape[0] for w in W.values())
