"""HUME's outer loss and its exact hypergradient (the math; hume.py is the loop).

For each subset s: labels Y (paper, Eq. 3) = sparsemax(phi1 W^T / tau); a linear classifier w = [V, c] on phi2
(k x (d2+1), bias folded in as a ones column of phi2) is trained from w0 by T steps of gradient descent on the
soft-label cross-entropy over X_tr (Eq. 5, a cold start):
    w_{t+1} = w_t - lr * X_tr^T (softmax(X_tr w_t^T) - Y_tr) / m_tr
and the outer loss is  CE(w_T; X_te, Y_te) - H_reg * H(mean label of the subset)  (Eq. 7).

Three ways to differentiate it w.r.t. W (all give ordinary autograd tensors back):
- "adjoint" (default): all subsets batched; the inner loop keeps only its iterates w_t (T x S x k x (d2+1)), and the
  backward pass runs the adjoint of gradient descent, A_t = A_{t+1} - lr * H_t A_{t+1}, with the closed-form
  Hessian-vector product of softmax cross-entropy. Since dw_{t+1}/dY_tr does not depend on t, the whole label
  gradient is one product with the summed adjoints: dL/dY_tr = lr/m * X_tr (sum_t A_{t+1})^T.
- "unrolled": autograd through every inner step with create_graph=True, one subset at a time (the paper's way;
  kept as the reference for tests and bench.py).
- "first_order": the inner loop's dependence on the labels is dropped (TURTLE-style); the gradient flows only
  through the labels in the outer loss.
One outer iteration (outer_step) averages the losses over subsets and phi2 spaces, clips the gradient to norm 1.0
and takes one Adam step.
"""
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import nn

import distributed

from model import labels

SHARED_RATIO = 2.0  # use the shared (wide-GEMM) layout when the union of subsets has <= 2 x m_tr rows
KEEP_PROBS_BYTES = 256 * 2**20  # keep the inner softmax outputs for the backward pass when they fit in this


def entropy(p, eps=1e-8):
    """H(p) = -sum p log p. Clamped like the paper's code: a class with no mass in a subset would otherwise give
    an infinite gradient (d/dp p log p = log p + 1)."""
    p = p.clamp_min(eps)
    return -(p * torch.log(p)).sum(-1)


# ---------------------------------------------------------------- data layouts
# Both layouts expose the same three operations, so the inner loop below is written once:
#   logits(w) -> Z   (w: (S, k, D); Z: (S, m, k) gathered or (N, S, k) shared)
#   grad(G)   -> X^T G per subset, (S, k, D)
#   subset_sum(T) -> (S,) sums of an array shaped like Z
# "gathered" copies each subset's rows (S skinny GEMMs, m x D x k); "shared" keeps the union of rows once and puts
# the S classifiers side by side, one wide GEMM N x D x S*k with 0/1 masks. A wide GEMM runs ~3-4x faster per FLOP
# than a skinny one on a CPU (bench.py), so shared wins while N <= SHARED_RATIO x m_tr (small data sets, the demo).

def gathered_ops(X):  # X: (S, m, D)
    return SimpleNamespace(
        X=X, logits=lambda w: torch.bmm(X, w.transpose(1, 2)),
        grad=lambda G: torch.bmm(G.transpose(1, 2), X),  # G^T X beats X^T G for a row-major X
        subset_sum=lambda T: T.sum((1, 2)))


def shared_ops(X, S):  # X: (N, D)
    N, D = X.shape
    return SimpleNamespace(
        X=X, logits=lambda w: (X @ w.reshape(-1, D).T).view(N, S, -1),
        grad=lambda G: (G.reshape(N, -1).T @ X).view(S, -1, D),
        subset_sum=lambda T: T.sum((0, 2)))


def make_problem(phi1, phi2a, W, tau, idx, m_tr, layout="auto"):
    """Labels and inner-problem data for S subsets. idx: (S, m) point indices, the first m_tr of each row train.

    Returns Y_rows (labels of the union of rows, for the entropy term) and a namespace with ops/labels/masks.
    """
    S, m = idx.shape
    rows, inv = torch.unique(idx, return_inverse=True)  # inv: (S, m) positions in rows
    Y = labels(phi1[rows], W, tau)  # (N, k): each point labelled once, even if it sits in several subsets
    if layout == "auto":
        layout = "shared" if len(rows) <= SHARED_RATIO * m_tr else "gathered"
    p = SimpleNamespace(S=S, m_tr=m_tr, m_te=m - m_tr, Y_rows=Y, inv=inv, layout=layout)
    if layout == "gathered":
        p.ops_tr = gathered_ops(phi2a[idx[:, :m_tr]])
        p.ops_te = gathered_ops(phi2a[idx[:, m_tr:]])
        p.Y_tr, p.Y_te = Y[inv[:, :m_tr]], Y[inv[:, m_tr:]]
        p.M_tr = p.M_te = None
    else:
        p.ops_tr = p.ops_te = shared_ops(phi2a[rows], S)
        p.Y_tr = p.Y_te = Y.unsqueeze(1)  # (N, 1, k), broadcast over subsets
        cols = torch.arange(S, device=idx.device).unsqueeze(1)
        p.M_tr = torch.zeros(len(rows), S, 1, dtype=phi2a.dtype, device=phi2a.device)
        p.M_te = torch.zeros_like(p.M_tr)
        p.M_tr[inv[:, :m_tr], cols.expand(-1, m_tr)] = 1
        p.M_te[inv[:, m_tr:], cols.expand(-1, m - m_tr)] = 1
    return p


def _masked(T, M):
    return T if M is None else T * M


def _sum_to(g, like):
    """Reduce a broadcast gradient back to the shape of the input it belongs to."""
    dims = tuple(i for i, (a, b) in enumerate(zip(g.shape, like.shape)) if a != b)
    return g.sum(dims, keepdim=True) if dims else g


# ---------------------------------------------------------------- inner loop

def inner_descent(ops, Y, M, w0, lr, m, steps, keep):
    """T steps of gradient descent on the soft-label CE. Returns w_T, the iterates (if keep) and (P_0, P_T)."""
    w, iterates, probs = w0, [w0], []
    P0 = None
    for _ in range(steps):
        P = torch.softmax(ops.logits(w), -1)
        P0 = P if P0 is None else P0
        if keep == "probs":
            probs.append(P)
        w = w - (lr / m) * ops.grad(_masked(P - Y, M))
        if keep:
            iterates.append(w)
    return w, iterates, probs, P0


def inner_fit(ops, Y, M, m, P0, wT):
    """Diagnosis of the inner problem per subset: training CE before and after, and the share of training
    points whose adapted prediction agrees with the label's argmax. (S, 3)."""
    PT = torch.softmax(ops.logits(wT), -1)
    P0 = PT if P0 is None else P0
    ce = lambda P: -ops.subset_sum(_masked(Y * torch.log(P.clamp_min(1e-30)), M)) / m
    agree = _masked((PT.argmax(-1, keepdim=True) == Y.argmax(-1, keepdim=True)).to(PT.dtype), M)
    return torch.stack([ce(P0), ce(PT), ops.subset_sum(agree) / m], 1)


class AdjointInner(torch.autograd.Function):
    """Outer CE per subset (S,) as a function of the labels, with the adjoint backward pass described above.
    Also returns the inner fit diagnosis (S, 3), not differentiable."""

    @staticmethod
    def forward(ctx, Y_tr, Y_te, w0, p, lr, steps):
        zdim = p.ops_tr.logits(w0).numel() * w0.element_size()
        keep = "probs" if steps * zdim <= KEEP_PROBS_BYTES else "iterates"
        wT, iterates, probs, P0 = inner_descent(p.ops_tr, Y_tr, p.M_tr, w0, lr, p.m_tr, steps, keep)
        logp_te = torch.log_softmax(p.ops_te.logits(wT), -1)
        ce = -p.ops_te.subset_sum(_masked(Y_te * logp_te, p.M_te)) / p.m_te
        ctx.p, ctx.lr, ctx.steps = p, lr, steps
        ctx.iterates, ctx.probs = iterates, probs
        ctx.save_for_backward(Y_tr, Y_te, logp_te, wT)
        fit = inner_fit(p.ops_tr, Y_tr, p.M_tr, p.m_tr, P0, wT)
        ctx.mark_non_differentiable(fit)
        return ce, fit

    @staticmethod
    def backward(ctx, grad_ce, _grad_fit):
        Y_tr, Y_te, logp_te, wT = ctx.saved_tensors
        p, lr, steps = ctx.p, ctx.lr, ctx.steps
        # weight of each subset in the total loss, shaped to broadcast against the logits
        g_z = grad_ce.view(1, -1, 1) if p.layout == "shared" else grad_ce.view(-1, 1, 1)
        # dL/dY_te and A_T = dL/dw_T of CE(w_T) = -sum Y_te log softmax(X_te w_T^T) / m_te
        dY_te = _masked(-logp_te * g_z, p.M_te) / p.m_te
        A = p.ops_te.grad(_masked((logp_te.exp() - Y_te) * g_z, p.M_te)) / p.m_te
        A_sum = torch.zeros_like(A)
        for t in range(steps - 1, -1, -1):
            A_sum = A_sum + A  # A = A_{t+1}
            if t == 0:
                break  # A_0 = dL/dw0 is not needed: w0 does not depend on the task encoder
            if ctx.probs:
                P, dZ = ctx.probs[t], p.ops_tr.logits(A)
            else:  # recompute the logits of w_t beside the direction A, in one GEMM of width 2k
                k = A.shape[1]
                Z = p.ops_tr.logits(torch.cat([ctx.iterates[t], A], 1))
                P, dZ = torch.softmax(Z[..., :k], -1), Z[..., k:]
            # Hessian of the softmax CE applied to A: X^T [P * (dZ - <P, dZ>)] / m
            Q = P * (dZ - (P * dZ).sum(-1, keepdim=True))
            A = A - (lr / p.m_tr) * p.ops_tr.grad(_masked(Q, p.M_tr))
        dY_tr = _masked(p.ops_tr.logits(A_sum), p.M_tr) * (lr / p.m_tr)
        ctx.iterates = ctx.probs = None
        return _sum_to(dY_tr, Y_tr), _sum_to(dY_te, Y_te), None, None, None, None


def unrolled_inner(p, w0, lr, steps):
    """Reference: autograd through the unrolled inner loop (create_graph), subset by subset, as the paper does."""
    ces, fits = [], []
    for s in range(p.S):
        sub = _one_subset(p, s)
        w = w0[s:s + 1].clone().requires_grad_(True)
        P0 = None
        for _ in range(steps):
            logp = torch.log_softmax(sub.ops_tr.logits(w), -1)
            P0 = logp.exp().detach() if P0 is None else P0
            loss = -sub.ops_tr.subset_sum(_masked(sub.Y_tr * logp, sub.M_tr)).sum() / p.m_tr
            w = w - lr * torch.autograd.grad(loss, w, create_graph=True)[0]
        logp_te = torch.log_softmax(sub.ops_te.logits(w), -1)
        ces.append(-sub.ops_te.subset_sum(_masked(sub.Y_te * logp_te, sub.M_te)) / p.m_te)
        fits.append(inner_fit(sub.ops_tr, sub.Y_tr.detach(), sub.M_tr, p.m_tr, P0, w.detach()))
    return torch.cat(ces), torch.cat(fits)


def _one_subset(p, s):
    """Subset s of a problem as a problem of its own (same layout, S=1)."""
    if p.layout == "gathered":
        return SimpleNamespace(ops_tr=gathered_ops(p.ops_tr.X[s:s + 1]), ops_te=gathered_ops(p.ops_te.X[s:s + 1]),
                               Y_tr=p.Y_tr[s:s + 1], Y_te=p.Y_te[s:s + 1], M_tr=None, M_te=None)
    ops = shared_ops(p.ops_tr.X, 1)
    return SimpleNamespace(ops_tr=ops, ops_te=ops, Y_tr=p.Y_tr, Y_te=p.Y_te,
                           M_tr=p.M_tr[:, s:s + 1], M_te=p.M_te[:, s:s + 1])


def outer_losses(phi1, phi2a, W, tau, idx, m_tr, w0, lr, steps, H_reg, method="adjoint", layout="auto"):
    """Eq. 7 per subset: CE of the adapted inner classifier on X_te minus H_reg x entropy of the subset's mean
    label. Returns the losses (S,), differentiable w.r.t. W, and the inner fit diagnosis (S, 3)."""
    p = make_problem(phi1, phi2a, W, tau, idx, m_tr, layout)
    if method == "adjoint":
        ce, fit = AdjointInner.apply(p.Y_tr, p.Y_te, w0, p, lr, steps)
    elif method == "unrolled":
        ce, fit = unrolled_inner(p, w0, lr, steps)
    elif method == "first_order":
        with torch.no_grad():
            Y_tr = p.Y_tr.detach()
            wT, _, _, P0 = inner_descent(p.ops_tr, Y_tr, p.M_tr, w0, lr, p.m_tr, steps, keep=False)
            fit = inner_fit(p.ops_tr, Y_tr, p.M_tr, p.m_tr, P0, wT)
        logp_te = torch.log_softmax(p.ops_te.logits(wT), -1)
        ce = -p.ops_te.subset_sum(_masked(p.Y_te * logp_te, p.M_te)) / p.m_te
    else:
        raise ValueError(f"unknown hypergradient method {method!r}")
    mean_label = p.Y_rows[p.inv].mean(1)  # (S, k) over X_tr and X_te together
    return ce - H_reg * entropy(mean_label), fit


# ---------------------------------------------------------------- one outer iteration

class Objective(NamedTuple):
    """The outer loss beside the data and tau: the inner loop (one step size per phi2 space, the number of steps,
    how it is differentiated) and the weight of the balance term."""
    inner_lrs: tuple
    steps: int
    H_reg: float
    method: str = "adjoint"


class Batch(NamedTuple):
    """What one outer iteration draws: the subsets (S, m) of point indices, the first m_tr of each row being X_tr,
    and one inner init w0 (S, k, d2+1) per phi2 space."""
    idx: torch.Tensor
    m_tr: int
    w0s: list


def hypergradient(encoder, phi1, phi2s, batch, tau, obj, total_subsets=None):
    """Outer loss over the batch's subsets, averaged over subsets and phi2 spaces; its gradient is accumulated into
    the encoder's .grad. phi1, phi2s: inputs.Rows (phi2 with its ones column). The orthogonal parametrisation is
    evaluated and back-propagated once, however many subsets. total_subsets: the S the mean is over (the batch may
    be a share of it). Returns the loss and the inner fit (S, 3)."""
    W = encoder.weight
    W_leaf = W.detach().requires_grad_(True)
    S = total_subsets or batch.idx.shape[0]
    rows, inv = torch.unique(batch.idx, return_inverse=True)  # labels and features of each point are read once
    phi1_r = phi1.take(rows)
    chunks = [slice(s, s + 1) for s in range(batch.idx.shape[0])] if obj.method == "unrolled" else [slice(None)]
    total, fits, weight = 0.0, [], 1.0 / (S * len(phi2s))
    for phi2, w0, lr in zip(phi2s, batch.w0s, obj.inner_lrs, strict=True):
        phi2_r = phi2.take(rows)
        for c in chunks:  # the unrolled reference frees each subset's graph before building the next
            losses, fit = outer_losses(phi1_r, phi2_r, W_leaf, tau, inv[c], batch.m_tr, w0[c], lr, obj.steps,
                                       obj.H_reg, obj.method)
            (losses.sum() * weight).backward()
            total, fits = total + losses.detach().sum() * weight, fits + [fit]
    W.backward(W_leaf.grad)
    return total, torch.cat(fits)


def outer_step(encoder, opt, phi1, phi2s, batch, tau, obj, world=None):
    """One outer iteration: hypergradient averaged over subsets, clipped to norm 1.0, one Adam step.
    Under torchrun each rank does its share of the subsets and one all-reduce sums the gradients.
    Returns the loss, the inner fit and the gradient norm before clipping (tensors: no host sync here)."""
    opt.zero_grad(set_to_none=True)
    S = batch.idx.shape[0]
    mine = distributed.share(world, S) if world else slice(None)
    share = Batch(batch.idx[mine], batch.m_tr, [w[mine] for w in batch.w0s])
    loss, fit = hypergradient(encoder, phi1, phi2s, share, tau, obj, S)
    if world:
        loss, fit = distributed.all_reduce(world, encoder, loss, fit)
    gnorm = nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
    if torch.isfinite(gnorm):
        opt.step()
    return loss, fit, gnorm
