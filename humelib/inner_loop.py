"""HUME's inner loop, the forward half of hypergrad.py: the subsets' data in one of two layouts, T steps of gradient
descent on the soft-label cross-entropy, and how well the inner classifier fit.

For each subset s: labels Y (paper, Eq. 3) = sparsemax(phi1 W^T / tau); a linear classifier w = [V, c] on phi2
(k x (d2+1), bias folded in as a ones column of phi2) is trained from w0 by T steps of gradient descent on the
soft-label cross-entropy over X_tr (Eq. 5, a cold start):
    w_{t+1} = w_t - lr * X_tr^T (softmax(X_tr w_t^T) - Y_tr) / m_tr
The descent keeps, on request, what the adjoint backward pass (hypergrad.py) needs: the softmax outputs P_t or the
iterates w_t.

Two layouts of the subsets' data (hume.py takes the one products.plan timed faster on the machine it runs on;
layout="auto", for calls without a plan, picks by size):
- "shared", when S > 1 subsets have a union of at most SHARED_RATIO x m_tr rows (subsets covering the data, the demo):
  the union is kept once and the S classifiers sit side by side, one wide GEMM N x D x S*k per product, with 0/1
  masks selecting each subset's rows. A wide GEMM uses a CPU's cores and vector units better than skinny ones.
- "subset" otherwise (the paper's scale): one subset at a time with plain 2-D GEMMs (or, where the plan timed it
  faster, as many at once as torch has threads, one thread each), so only one X_tr (28 MB at the paper's defaults)
  and one subset's P_t are alive per thread.
The products and the softmax are products.py's; `kernel` names the one that runs the products (the plan's choice;
without one, the first that runs here). A bfloat16 kernel (--bf16) reads a bfloat16 copy of X and bfloat16
roundings of w, the residuals and (hypergrad.py) the adjoint A; softmax, iterates and sums stay in the input's
precision.
"""
from types import SimpleNamespace

import torch
from torch import Tensor

from humelib.embeddings import Rows
from humelib.products import gemms, softmax
from humelib.task_encoder import labels

SHARED_RATIO = 1.2  # layout="auto" (no plan): shared when S > 1 subsets' union is <= 1.2 x m_tr rows (nearly all)


# ---------------------------------------------------------------- the problem in its layout
# The ops below are written for batched classifiers w (S, k, D), so the inner loop is written once for the shared
# layout and for the unrolled reference's one-subset problems:
#   logits(w) -> Z   ((N, S, k) shared, (S, m, k) gathered)
#   grad(G)   -> X^T G per subset, (S, k, D)
#   subset_sum(T) -> (S,) sums of an array shaped like Z

def gathered_ops(X: Tensor) -> SimpleNamespace:  # X: (S, m, D)
    return SimpleNamespace(
        X=X, logits=lambda w: torch.bmm(X, w.transpose(1, 2)),
        grad=lambda G: torch.bmm(G.transpose(1, 2), X),
        subset_sum=lambda T: T.sum((1, 2)))


def shared_ops(X: Tensor, S: int, k: int, kernel: str = "blas") -> SimpleNamespace:  # X: (N, D)
    N, D = X.shape
    g = gemms(X, S * k, kernel)
    return SimpleNamespace(
        X=X, logits=lambda w: g.logits(w.reshape(-1, D)).view(N, S, -1),
        grad=lambda G: g.grad(G.reshape(N, -1)).view(S, -1, D),
        subset_sum=lambda T: T.sum((0, 2)))


def make_problem(phi1: Tensor, phi2a: Tensor | Rows, W: Tensor, tau: float, idx: Tensor, m_tr: int,
                 layout: str = "auto", kernel: str = "blas", workers: int = 1) -> SimpleNamespace:
    """Labels and inner-problem data for S subsets. idx: (S, m) point indices, the first m_tr of each row train.
    phi2a: phi2 with its ones column, a tensor or an embeddings.Rows (which prepares the rows it is asked for).

    Returns a namespace with Y_rows (labels of the union of rows, for the entropy term), the labels of each subset's
    X_tr and X_te, and the layout's data (shared: ops and masks; subset: take and idx, rows gathered when used).
    """
    S, m = idx.shape
    rows, inv = torch.unique(idx, return_inverse=True)  # inv: (S, m) positions in rows
    Y = labels(phi1, W, tau, rows)  # (N, k): each point labelled once, even if it sits in several subsets
    if layout == "auto":
        layout = "shared" if S > 1 and len(rows) <= SHARED_RATIO * m_tr else "subset"
    take = phi2a.take if isinstance(phi2a, Rows) else phi2a.__getitem__
    p = SimpleNamespace(S=S, m_tr=m_tr, m_te=m - m_tr, Y_rows=Y, inv=inv, layout=layout, kernel=kernel,
                        workers=workers)
    if layout == "subset":
        p.take, p.idx = take, idx
        p.Y_tr, p.Y_te = Y[inv[:, :m_tr]], Y[inv[:, m_tr:]]  # (S, m_tr, k), (S, m_te, k)
    elif layout == "shared":
        X = take(rows)
        p.ops_tr = p.ops_te = shared_ops(X, S, W.shape[0], kernel)
        p.Y_tr = p.Y_te = Y.unsqueeze(1)  # (N, 1, k), broadcast over subsets
        cols = torch.arange(S, device=idx.device).unsqueeze(1)
        p.M_tr = torch.zeros(len(rows), S, 1, dtype=X.dtype, device=X.device)
        p.M_te = torch.zeros_like(p.M_tr)
        p.M_tr[inv[:, :m_tr], cols.expand(-1, m_tr)] = 1
        p.M_te[inv[:, m_tr:], cols.expand(-1, m - m_tr)] = 1
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return p


def one_subset(p: SimpleNamespace, s: int) -> SimpleNamespace:
    """Subset s of a problem as a problem of its own (batched ops with S=1)."""
    if p.layout == "subset":
        X = p.take(p.idx[s]).unsqueeze(0)
        return SimpleNamespace(ops_tr=gathered_ops(X[:, :p.m_tr]), ops_te=gathered_ops(X[:, p.m_tr:]),
                               Y_tr=p.Y_tr[s:s + 1], Y_te=p.Y_te[s:s + 1], M_tr=None, M_te=None)
    ops = shared_ops(p.ops_tr.X, 1, p.Y_rows.shape[1])
    return SimpleNamespace(ops_tr=ops, ops_te=ops, Y_tr=p.Y_tr, Y_te=p.Y_te,
                           M_tr=p.M_tr[:, s:s + 1], M_te=p.M_te[:, s:s + 1])


def masked(T: Tensor, M: Tensor | None) -> Tensor:
    """T with the rows outside each subset zeroed (shared layout's 0/1 masks M; None: nothing to mask)."""
    return T if M is None else T * M


# ---------------------------------------------------------------- the descent and its fit

def inner_descent(ops: SimpleNamespace, Y: Tensor, M: Tensor | None, w0: Tensor, lr: float, m: int, steps: int,
                  keep: str | None) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:
    """T steps of gradient descent on the soft-label CE, all subsets at once (batched ops). keep: None, or what the
    backward pass reads ("probs": the P_t, and the iterates; "iterates": the iterates w_0..w_T only).
    Returns w_T, the iterates, the P_t and P_0 (None when steps is 0)."""
    w, iterates, probs = w0, [w0], []
    P0 = None
    for _ in range(steps):
        P = softmax(ops.logits(w))
        P0 = P if P0 is None else P0
        if keep == "probs":
            probs.append(P)
        w = torch.add(w, ops.grad(masked(P - Y, M)), alpha=-lr / m)
        if keep:
            iterates.append(w)
    return w, iterates, probs, P0


def inner_fit(ops: SimpleNamespace, Y: Tensor, M: Tensor | None, m: int, P0: Tensor | None, wT: Tensor) -> Tensor:
    """Diagnosis of the inner problem per subset: training CE before and after, and the share of training
    points whose adapted prediction agrees with the label's argmax. (S, 3)."""
    PT = softmax(ops.logits(wT))
    P0 = PT if P0 is None else P0
    ce = lambda P: -ops.subset_sum(masked(Y * torch.log(P.clamp_min(1e-30)), M)) / m
    agree = masked((PT.argmax(-1, keepdim=True) == Y.argmax(-1, keepdim=True)).to(PT.dtype), M)
    return torch.stack([ce(P0), ce(PT), ops.subset_sum(agree) / m], 1)


def subset_descent(ops: SimpleNamespace, Yt: Tensor, w0: Tensor, lr: float, steps: int,
                   keep: str | None) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:
    """One subset's T steps (subset layout), classes first: ops = products.gemms(X_tr, k, kernel, km=True), whose
    logits, probabilities and residuals are (k, m), as the products give and take them without transposes, so the
    softmax runs along the m contiguous values of each class. Yt: the labels (k, m); w0 (k, D). keep: None, "probs"
    (the P_t) or "iterates" (w_0..w_{T-1}). Returns w_T, the iterates, the P_t and P_0 (None when steps is 0)."""
    c = lr / Yt.shape[1]
    w, iterates, probs, P0 = w0, [], [], None
    for t in range(steps):
        if keep == "iterates":
            iterates.append(w)
        P = softmax(ops.logits(w), 0)  # (k, m)
        P0 = P if t == 0 else P0
        if keep == "probs":
            probs.append(P)
        w = torch.add(w, ops.grad(P - Yt), alpha=-c)
    return w, iterates, probs, P0


def subset_fit(ops: SimpleNamespace, Yt: Tensor, P0: Tensor | None, wT: Tensor) -> Tensor:
    """inner_fit for one subset in the classes-first form: training CE before and after, train agreement. (3,)."""
    PT = softmax(ops.logits(wT), 0)
    P0 = PT if P0 is None else P0
    m = Yt.shape[1]
    return torch.stack([-(Yt * torch.log(P.clamp_min(1e-30))).sum() / m for P in (P0, PT)] +
                       [(PT.argmax(0) == Yt.argmax(0)).to(PT.dtype).mean()])
