"""The inner step size: `--inner_lr auto`, its diagnosis, and the warning when the inner classifier does not train.

Gradient descent on the inner soft-label cross-entropy is stable up to a step of about 4 / lambda_max, lambda_max being
the top eigenvalue of the second moment of [phi2, 1] (the softmax Jacobian's eigenvalues are at most 1/2). The
paper's step 0.001 suits raw features with row norms in the tens; on unit-norm embeddings it barely moves the inner
classifier and the search has no signal. `auto` rescales each phi2 space to RMS row norm sqrt(d2) and steps at
1/lambda_max, so the inner problem is the same whatever the embedding's scale.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

from humelib.flags import positive_float
from humelib.runtime import log

if TYPE_CHECKING:
    import torch


class Step(NamedTuple):
    """The inner step of one phi2 space: the step size, the scale phi2 is multiplied by first (auto: to RMS row
    norm sqrt(d2); else 1), and lambda_max of the data the inner loop sees."""
    lr: float
    scale: float
    lam: float


def inner_lr_type(text: str) -> str | float:
    """argparse type of --inner_lr: a finite number > 0, or 'auto'."""
    return text if text == "auto" else positive_float(text)


def resolve(inner_lr: str | float, phi2s: Sequence[np.ndarray], quiet: bool = False) -> list[Step]:
    """One Step per phi2 space for the flag value inner_lr (a number, or 'auto'); logs each."""
    auto = inner_lr == "auto"
    steps = []
    for i, phi2 in enumerate(phi2s):
        if auto:
            scale, lr, lam = auto_inner_step(phi2)
        else:
            scale, lr, lam = 1.0, inner_lr, lambda_max(phi2)
        steps.append(Step(lr, scale, lam))
        how = f"auto: phi2 x {scale:.4g} (RMS row norm sqrt(d2)), step 1/lambda_max" if auto else "given"
        log(f"phi2 space {i}: inner_lr {lr:.4g} ({how}); lambda_max {lam:.4g}; inner_lr x lambda_max "
            f"{lr * lam:.3g} (stable below ~4)", quiet)
    return steps


def fit_summary(fit: torch.Tensor) -> dict[str, float]:
    """Mean inner diagnosis over subsets (fit: (S, 3) from hypergrad): CE before/after the inner loop, share
    lowered, train agreement."""
    ce0, ceT, agree = fit.mean(0).tolist()
    return {"ce_start": ce0, "ce_end": ceT, "ce_drop": (ce0 - ceT) / max(ce0, 1e-12), "train_agreement": agree}


def untrained(first_fit: object) -> bool:
    """Did the inner classifier barely train at the first outer iteration (a fit_summary; anything else, e.g.
    None in the paper's results or a damaged entry, counts as no)?"""
    drop = first_fit.get("ce_drop") if isinstance(first_fit, dict) else None
    return isinstance(drop, (int, float)) and drop < DROP_MIN


EXACT_MAX_DIM = 512  # up to this d2, form the (d2+1)^2 second moment and use an exact eigen-solver
MAX_ROWS = 200_000  # second moment estimated from at most this many rows (seeded sample): ~1% accurate
BLOCK_ROWS = 2048  # rows converted to float64 at a time (~13 MB at d2 = 768)


def lambda_max(phi2: np.ndarray, seed: int = 0, scale: float = 1.0) -> float:
    """Largest eigenvalue of the second moment of [phi2, 1] (the ones column is the inner bias).

    Gradient descent on the inner soft-label CE is stable up to a step of about 4 / lambda_max (the softmax
    Jacobian's eigenvalues are at most 1/2); --inner_lr auto uses 1 / lambda_max. For small d2 an exact
    eigen-solver on the second moment; otherwise Lanczos iterations (scipy eigsh) on products with the data.
    scale multiplies phi2 (not the ones column) first.
    """
    n, d = phi2.shape
    rows = np.sort(np.random.default_rng(seed).choice(n, MAX_ROWS, replace=False)) if n > MAX_ROWS else slice(None)
    X = np.asarray(phi2[rows], dtype=np.float32)
    m = len(X)

    def blocks():  # [scale X, 1] in float64, BLOCK_ROWS at a time: no float64 copy of the whole data in memory
        for i in range(0, m, BLOCK_ROWS):
            x = X[i:i + BLOCK_ROWS].astype(np.float64) * scale
            yield np.hstack([x, np.ones((len(x), 1))])
    if d + 1 <= EXACT_MAX_DIM:
        return float(np.linalg.eigvalsh(sum(xa.T @ xa for xa in blocks()) / m)[-1])

    def matvec(v):  # [sX, 1]^T [sX, 1] v / m
        v = np.ravel(v)
        return sum(xa.T @ (xa @ v) for xa in blocks()) / m

    op = LinearOperator((d + 1, d + 1), matvec=matvec, dtype=np.float64)
    v0 = sum(xa.sum(0) for xa in blocks()) / m  # the mean direction: usually close to the top eigenvector
    return float(eigsh(op, k=1, which="LA", v0=v0, tol=1e-10)[0][0])


def auto_inner_step(phi2: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """--inner_lr auto: rescale phi2 to RMS row norm sqrt(d2), then step 1/lambda_max of [phi2 * scale, 1].

    The rescaling makes the inner problem the same whatever the embedding's scale: features then have unit second
    moment per coordinate on average, the scale nn.Linear's init (which the inner classifier uses) is made for, and
    the bias's ones column no longer dominates lambda_max (with features of norm 0.01 it would, and the weights
    would barely move). Returns (scale, inner_lr, lambda_max of the rescaled data)."""
    n, d = phi2.shape
    rows = np.sort(np.random.default_rng(seed).choice(n, MAX_ROWS, replace=False)) if n > MAX_ROWS else slice(None)
    mean_sq = float(np.mean(np.sum(np.asarray(phi2[rows], dtype=np.float64) ** 2, axis=1)))
    scale = float(np.sqrt(d / mean_sq))
    lam = lambda_max(phi2, seed, scale)
    return scale, 1.0 / lam, lam


DROP_MIN = 0.1  # inner CE lowered by less than 10% over the inner loop at the first iteration: not training
LR_LAM_MIN, LR_LAM_MAX = 0.01, 4.0  # inner_lr x lambda_max outside this range: far too small / divergent


def diagnose(fit: Mapping[str, float], lr: float, lam: float) -> str | None:
    """One warning line when the inner classifier does not train (fit: fit_summary), else None."""
    rate = lr * lam
    if rate > LR_LAM_MAX:
        why = f"inner_lr x lambda_max = {rate:.3g} > {LR_LAM_MAX:g}: inner gradient descent diverges"
    elif fit["ce_drop"] < DROP_MIN or rate < LR_LAM_MIN:
        why = (f"the inner loop lowered its training loss by only {fit['ce_drop']:.1%} (train agreement "
               f"{fit['train_agreement']:.1%}; inner_lr x lambda_max = {rate:.3g}): the inner classifier barely "
               "trains, so the search has no signal")
    else:
        return None
    return f"{why}. Use --inner_lr auto (here {1 / lam:.4g}) or a step near it."
