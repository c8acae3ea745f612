"""The task encoder (paper, Eq. 3): building it, its labels, its predictions, and the task folders it is saved in.

A task is a linear map W (k x d1) with orthonormal rows in space phi1. Training labels are sparsemax(phi1 W^T / tau);
a point's predicted class is argmax(phi1 W^T). Saved as the state_dict of
orthogonal(nn.Linear(d1, k, bias=False)) in linear_task_{seed}.pt, beside results_{seed}.pickle (its CV_Score): the
layout of the paper's code, so folders of either implementation load here.
TURTLE's task encoder (run_turtle.py) is one weight-normalised linear head per space, its labels the mean softmax;
saved as turtle_task_{seed}.pt in TURTLE's own layout, {"phi1": state_dict, ...} of plain nn.Linear heads.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from humelib.fileio import load_results
from humelib.metrics import ensemble
from humelib.runtime import HumeError
from humelib.sparsemax import sparsemax

if TYPE_CHECKING:
    from humelib.embeddings import Rows



def make_task_encoder(d1: int, k: int) -> nn.Linear:
    """The paper's task encoder: a linear map with orthonormal rows (the saved state_dict has this layout)."""
    return nn.utils.parametrizations.orthogonal(nn.Linear(d1, k, bias=False))


def labels(phi1: torch.Tensor, W: torch.Tensor, tau: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: the task encoder's labeling, row-wise sparsemax of phi1 W^T / tau; of phi1[rows] if rows are given."""
    return sparsemax((phi1 @ W.T if rows is None else RowsTimesWT.apply(phi1, rows, W)) / tau)


class RowsTimesWT(torch.autograd.Function):
    """phi1[rows] W^T without keeping the gathered rows for the backward pass (at the paper's defaults, 20 subsets
    cover nearly all 50,000 points: a 100 MB copy alive through every inner loop); the backward gathers them again,
    when the inner loops' memory is free."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, phi1: torch.Tensor, rows: torch.Tensor,
                W: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(phi1, rows)
        return phi1[rows] @ W.T

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> tuple:
        phi1, rows = ctx.saved_tensors
        return None, None, g.T @ phi1[rows]


@torch.no_grad()
def predict(W: torch.Tensor, phi1: Rows, chunk: int = 1 << 16) -> np.ndarray:
    """argmax(phi1 W^T) over an inputs.Rows source, in chunks (memory-mapped arrays are never read whole)."""
    return np.concatenate([(phi1.range(i, i + chunk) @ W.T).argmax(1).cpu().numpy()
                           for i in range(0, len(phi1), chunk)])


def sample_subsets(gen: torch.Generator, n: int, S: int, m: int) -> torch.Tensor:
    """S subsets of m distinct points each (indices (S, m)); the first train_fraction of each row is X_tr."""
    return torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(S)])


def init_inner(gen: torch.Generator, S: int, k: int, d2: int, dtype: torch.dtype) -> torch.Tensor:
    """Inner classifiers [V, c] (S, k, d2+1), drawn like nn.Linear's default init: U(-1/sqrt(d2), 1/sqrt(d2))."""
    bound = 1 / np.sqrt(d2)
    return (torch.rand(S, k, d2 + 1, generator=gen, dtype=dtype) * 2 - 1) * bound


# ---------------------------------------------------------------- task files

def is_turtle(task_path: str) -> bool:
    return os.path.basename(task_path).startswith("turtle_task_")


def check_finite(path: str, state: object) -> None:
    """A task whose weights hold NaN or inf would label every point alike (argmax of NaN): refused, not scored."""
    tensors = [v for v in state.values() if torch.is_tensor(v)] if isinstance(state, dict) else []
    if any(v.is_floating_point() and not torch.isfinite(v).all() for v in tensors):
        raise HumeError(f"{path}: the task's weights hold NaN or inf (a diverged or damaged run); remove that task "
                        "or rerun its seed")


def load_task(path: str, d1: int) -> torch.Tensor:
    """Task encoder weight W (k x d1) from a saved state_dict of orthogonal(nn.Linear(d1, k, bias=False))."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        k, d = state["parametrizations.weight.original"].shape
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HumeError(f"{path}: not a HUME task file ({type(e).__name__}: {first})") from None
    check_finite(path, state)
    if d != d1:
        raise HumeError(f"{path}: task encoder expects phi1 of dimension {d}, but --phi1_path has {d1}; "
                        "evaluate with the phi1 space the tasks were trained in")
    encoder = make_task_encoder(d1, k)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HumeError(f"{path}: does not load into orthogonal(nn.Linear({d1}, {k})): {str(e).splitlines()[0]}") \
            from None
    W = encoder.weight.detach()
    check_finite(path, {"W": W})  # finite parameters whose orthogonalisation is not (e.g. 1e38)
    return W


def check_one_kind(tasks: dict, values: dict, name: str, what: str) -> None:
    """A folder mixing tasks of different shapes ({seed: value of name}) is refused, naming the seeds."""
    by = {}
    for s, v in values.items():
        by.setdefault(v, []).append(str(s))
    if len(by) > 1:
        mix = "; ".join(f"{name}={v}: seeds {', '.join(seeds)}" for v, seeds in sorted(by.items()))
        raise HumeError(f"--tasks_path {os.path.dirname(next(iter(tasks.values()))[0])}: mixes tasks of different "
                        f"{what} ({mix}); keep one per folder")


# ---------------------------------------------------------------- TURTLE's task encoder

def make_turtle_encoder(dims: list[int], k: int) -> nn.ModuleList:
    """theta: one weight-normalised nn.Linear(d_i, k) per space (TURTLE's task encoder)."""
    return nn.ModuleList(nn.utils.parametrizations.weight_norm(nn.Linear(d, k)) for d in dims)


def turtle_labels(theta: nn.ModuleList, phis: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TURTLE's labels: the mean over spaces of softmax(theta_i(phi_i)); also each space's own labels."""
    return mean_softmax([head(z) for head, z in zip(theta, phis)])


def mean_softmax(logits: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The mean over spaces of softmax(logits_i), and each space's softmax (each (n, k))."""
    per_space = [F.softmax(z, dim=1) for z in logits]
    return torch.stack(per_space).mean(0), per_space


@torch.no_grad()
def turtle_predict(heads: nn.ModuleList, phis: list[torch.Tensor]) -> np.ndarray:
    """argmax of the mean softmax over spaces (heads: theta, or the plain heads of a saved task)."""
    return turtle_labels(heads, phis)[0].argmax(1).cpu().numpy()


def export_turtle_task(theta: nn.ModuleList) -> dict:
    """TURTLE's checkpoint layout: {"phi1": state_dict, ...} of plain nn.Linear heads (weight norm folded in)."""
    return {f"phi{i + 1}": {"weight": head.weight.detach().cpu().clone(), "bias": head.bias.detach().cpu().clone()}
            for i, head in enumerate(theta)}


def load_turtle_task(path: str, dims: list[int]) -> nn.ModuleList:
    """The plain nn.Linear(d_i, k) heads of a turtle_task file (ours or TURTLE's released ones), checked against
    the spaces given."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        k = state["phi1"]["weight"].shape[0]
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise HumeError(f"{path}: not a TURTLE task file ({type(e).__name__}: {first})") from None
    for head in state.values():
        check_finite(path, head)
    if len(state) != len(dims):
        raise HumeError(f"{path}: a task over {len(state)} space(s) but {len(dims)} --phi_paths given; give one "
                        "array per space, in the order it was trained with")
    heads = nn.ModuleList()
    for i, d in enumerate(dims):
        head = nn.Linear(d, k)
        try:
            head.load_state_dict(state[f"phi{i + 1}"], strict=True)
        except (KeyError, RuntimeError) as e:
            raise HumeError(f"{path}: space phi{i + 1} does not load into nn.Linear({d}, {k}) "
                            f"({type(e).__name__}: {str(e).splitlines()[0]}); is --phi_paths in the training "
                            "order?") from None
        heads.append(head)
    return heads


# ---------------------------------------------------------------- predictions of a folder

def task_predictions(phi1: np.ndarray | None, tasks: dict, phis: list[np.ndarray] | None = None) -> tuple:
    """{seed: predictions}, {seed: CV score} and k. HUME tasks predict argmax(phi1 W^T) (phi1: a float array),
    TURTLE tasks the argmax of their mean softmax over phis (every space's array). Tasks of different k or phi1
    dimension in one folder are refused."""
    d1s = {}
    for s, (path, _) in tasks.items():
        try:
            if not is_turtle(path):
                d1s[s] = torch.load(path, map_location="cpu", weights_only=True)[
                    "parametrizations.weight.original"].shape[1]
        except Exception:
            continue  # load_task reports a damaged task file
    check_one_kind(tasks, d1s, "d1", "phi1 dimension")
    preds, ks = {}, {}
    for s, (path, _) in tasks.items():
        if is_turtle(path):
            if phis is None:
                raise HumeError(f"{path} is a TURTLE task: give --phi_paths, every space's array of the points")
            heads = load_turtle_task(path, [a.shape[1] for a in phis])
            preds[s] = turtle_predict(heads, [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in phis])
            ks[s] = heads[0].out_features
        else:
            if phi1 is None:
                raise HumeError(f"{path} is a HUME task: give --phi1_path, phi1 of the points to label")
            W = load_task(path, phi1.shape[1])
            preds[s] = (torch.from_numpy(np.asarray(phi1, dtype=np.float32)) @ W.T).argmax(1).numpy()
            ks[s] = W.shape[0]
    check_one_kind(tasks, ks, "k", "k")
    cv = {s: load_results(res_path)["CV_Score"] for s, (_, res_path) in tasks.items()}  # a hostile pickle runs nothing
    return preds, cv, max(ks.values())


def task_ensemble(phi1: np.ndarray | None, tasks: dict, phis: list[np.ndarray] | None = None
                  ) -> tuple[dict, dict, int, np.ndarray, int]:
    """The paper's ensemble of a folder's tasks (evaluate.py's headline): task_predictions, then every task aligned to
    the best-CV task and a per-point majority vote (metrics.ensemble). Returns preds, cv, the best-CV seed, the vote
    and k."""
    preds, cv, k = task_predictions(phi1, tasks, phis)
    best, vote = ensemble(preds, cv)
    return preds, cv, best, vote, k
