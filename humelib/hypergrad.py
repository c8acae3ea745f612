"""HUME's outer loss and its exact hypergradient (the math; hume.py is the loop, inner_loop.py the inner problem).

For each subset, the inner classifier w is trained from w0 by T steps of gradient descent on the soft-label
cross-entropy of the labels Y = sparsemax(phi1 W^T / tau) (Eq. 3) over X_tr (inner_loop.py),
    w_{t+1} = w_t - lr * X_tr^T (softmax(X_tr w_t^T) - Y_tr) / m_tr,
and the outer loss is  CE(w_T; X_te, Y_te) - H_reg * H(mean label of the subset)  (Eq. 7).

Three ways to differentiate it w.r.t. W (all give ordinary autograd tensors back):
- "adjoint" (default): the inner loop keeps only what its backward pass needs (the softmax outputs P_t when they fit
  in KEEP_PROBS_BYTES, else the iterates w_t, whose logits are recomputed beside the adjoint in one GEMM of width
  2k), and the backward pass runs the adjoint of gradient descent,
      A_T = X_te^T (softmax(X_te w_T^T) - Y_te) / m_te,   A_t = A_{t+1} - lr * H_t A_{t+1},
  with the closed-form Hessian-vector product of softmax cross-entropy, H_t A = X_tr^T [P_t * (dZ - <P_t, dZ>)] / m_tr,
  dZ = X_tr A^T. Since dw_{t+1}/dY_tr = lr/m X_tr^T does not depend on t, the whole label gradient is one product with
  the summed adjoints: dL/dY_tr = lr/m * X_tr (sum_t A_{t+1})^T, and dL/dY_te = -log softmax(X_te w_T^T) / m_te.
- "unrolled": autograd through every inner step with create_graph=True, one subset at a time (the paper's way;
  kept as the reference for tests and bench.py).
- "first_order": the inner loop's dependence on the labels is dropped (TURTLE-style); the gradient flows only
  through the labels in the outer loss (dL/dY_tr = 0, dL/dY_te as above).

In the shared layout (inner_loop.py) one autograd Function runs the inner loop over all subsets in its forward pass
and the adjoint in its backward pass. In the subset layout each subset's loss CE_s depends on its own labels only,
and the adjoint is linear in the incoming gradient g_s = dL/dCE_s, so the adjoint is run right after the subset's
inner loop with g_s = 1 and its label gradients are scaled by g_s when autograd asks for them: nothing outlives its
subset. With a bfloat16 kernel (--bf16) the hypergradient is an approximation: bench.py reports its error against
float32. outer.py averages these losses over subsets and phi2 spaces for one outer iteration.
"""
from types import SimpleNamespace

import torch
from torch import Tensor

from humelib.embeddings import Rows
from humelib.inner_loop import (inner_descent, inner_fit, make_problem, masked, one_subset, subset_descent,
                                subset_fit)
from humelib.products import default_kernel, gemms, run_concurrently, softmax

KEEP_PROBS_BYTES = 256 * 2**20  # keep the inner softmax outputs for the backward pass when they fit in this


def entropy(p: Tensor, eps: float = 1e-8) -> Tensor:
    """H(p) = -sum p log p. Clamped like the paper's code: a class with no mass in a subset would otherwise give
    an infinite gradient (d/dp p log p = log p + 1)."""
    p = p.clamp_min(eps)
    return -(p * torch.log(p)).sum(-1)


def outer_ce(ops: SimpleNamespace, Y_te: Tensor, M_te: Tensor | None, m_te: int, wT: Tensor) -> tuple[Tensor, Tensor]:
    """CE(w_T; X_te, Y_te) per subset (S,) of batched ops (inner_loop.py), and the log-probabilities it used."""
    logp_te = torch.log_softmax(ops.logits(wT), -1)
    return -ops.subset_sum(masked(Y_te * logp_te, M_te)) / m_te, logp_te


def _sum_to(g, like):
    """Reduce a broadcast gradient back to the shape of the input it belongs to."""
    dims = tuple(i for i, (a, b) in enumerate(zip(g.shape, like.shape)) if a != b)
    return g.sum(dims, keepdim=True) if dims else g


# ---------------------------------------------------------------- shared layout (all subsets in wide GEMMs)

class AdjointInner(torch.autograd.Function):
    """Shared layout: outer CE per subset (S,) as a function of the labels, with the adjoint backward pass described
    above. Also returns the inner fit diagnosis (S, 3), not differentiable."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, Y_tr: Tensor, Y_te: Tensor, w0: Tensor, p: SimpleNamespace,
                lr: float, steps: int) -> tuple[Tensor, Tensor]:
        zdim = p.ops_tr.logits(w0).numel() * w0.element_size()
        keep = "probs" if steps * zdim <= KEEP_PROBS_BYTES else "iterates"
        wT, iterates, probs, P0 = inner_descent(p.ops_tr, Y_tr, p.M_tr, w0, lr, p.m_tr, steps, keep)
        ce, logp_te = outer_ce(p.ops_te, Y_te, p.M_te, p.m_te, wT)
        ctx.p, ctx.lr, ctx.steps = p, lr, steps
        ctx.iterates, ctx.probs = iterates, probs
        ctx.save_for_backward(Y_tr, Y_te, logp_te, wT)
        fit = inner_fit(p.ops_tr, Y_tr, p.M_tr, p.m_tr, P0, wT)
        ctx.mark_non_differentiable(fit)
        return ce, fit

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_ce: Tensor, _grad_fit: Tensor | None) -> tuple:
        Y_tr, Y_te, logp_te, wT = ctx.saved_tensors
        p, lr, steps = ctx.p, ctx.lr, ctx.steps
        g_z = grad_ce.view(1, -1, 1)  # weight of each subset in the total loss, shaped like the logits (N, S, k)
        # dL/dY_te and A_T = dL/dw_T of CE(w_T) = -sum Y_te log softmax(X_te w_T^T) / m_te
        dY_te = masked(-logp_te * g_z, p.M_te) / p.m_te
        A = p.ops_te.grad(masked((logp_te.exp() - Y_te) * g_z, p.M_te)) / p.m_te
        A_sum = torch.zeros_like(A)
        for t in range(steps - 1, -1, -1):
            A_sum += A  # A = A_{t+1}
            if t == 0:
                break  # A_0 = dL/dw0 is not needed: w0 does not depend on the task encoder
            if ctx.probs:
                P, dZ = ctx.probs[t], p.ops_tr.logits(A)
            else:  # recompute the logits of w_t beside the direction A, in one GEMM of width 2k
                k = A.shape[1]
                Z = p.ops_tr.logits(torch.cat([ctx.iterates[t], A], 1))
                P, dZ = softmax(Z[..., :k]), Z[..., k:]
            Q = P * (dZ - (P * dZ).sum(-1, keepdim=True))  # H_t A = X^T Q / m
            A = torch.add(A, p.ops_tr.grad(masked(Q, p.M_tr)), alpha=-lr / p.m_tr)
        dY_tr = masked(p.ops_tr.logits(A_sum), p.M_tr) * (lr / p.m_tr)
        ctx.iterates = ctx.probs = None
        return _sum_to(dY_tr, Y_tr), _sum_to(dY_te, Y_te), None, None, None, None


# ---------------------------------------------------------------- subset layout (one subset at a time)

def subset_adjoint(X_tr: Tensor, Y_tr: Tensor, X_te: Tensor, Y_te: Tensor, w0: Tensor, lr: float, steps: int,
                   order: int, kernel: str, workers: int = 1
                   ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One subset: inner loop, outer CE and, unless order is 0, its label gradients for an incoming gradient of 1
    (order 2: exact adjoint; order 1: first order, dCE/dY_tr = 0 returned as None).
    X_tr (m, D), Y_tr (m, k), w0 (k, D). Returns ce (), fit (3,), dY_tr (m, k) or None, dY_te or None.
    Classes first, as inner_loop.subset_descent. workers > 1: several subsets run at once, and each keeps its
    iterates (k x D a step), not its softmax outputs (k x m a step)."""
    m, k = Y_tr.shape
    ops, c = gemms(X_tr, k, kernel, km=True), lr / m
    Yt = Y_tr.T.contiguous()  # (k, m)
    keep_probs = order == 2 and workers == 1 and steps * m * k * X_tr.element_size() <= KEEP_PROBS_BYTES
    keep = "probs" if keep_probs else "iterates" if order == 2 else None
    w, iterates, probs, P0 = subset_descent(ops, Yt, w0, lr, steps, keep)
    logp_te = torch.log_softmax(X_te @ w.T, 1)
    ce = -(Y_te * logp_te).sum() / len(X_te)
    fit = subset_fit(ops, Yt, P0, w)
    if order == 0:
        return ce, fit, None, None
    dY_te = -logp_te / len(X_te)
    if order == 1:
        return ce, fit, None, dY_te
    A = (logp_te.exp() - Y_te).T @ X_te / len(X_te)  # A_T = dCE/dw_T
    A_sum = torch.zeros_like(A)
    for t in range(steps - 1, -1, -1):
        A_sum += A  # A = A_{t+1}
        if t == 0:
            break  # A_0 = dL/dw0 is not needed: w0 does not depend on the task encoder
        if keep_probs:
            P, dZ = probs[t], ops.logits(A)
        else:  # recompute the logits of w_t beside the direction A, in one product of width 2k
            Z = ops.logits(torch.cat([iterates[t], A]))
            P, dZ = softmax(Z[:k], 0), Z[k:]
        Q = P * (dZ - (P * dZ).sum(0, keepdim=True))  # H_t A = Q X / m
        A = torch.add(A, ops.grad(Q), alpha=-c)
    return ce, fit, c * ops.logits(A_sum).T, dY_te


class SubsetAdjoint(torch.autograd.Function):
    """Subset layout: outer CE per subset (S,), each subset's adjoint run in the forward pass (see the docstring),
    its label gradients scaled by the incoming gradient in the backward pass. Also returns the fit (S, 3)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, Y_tr: Tensor, Y_te: Tensor, w0: Tensor, p: SimpleNamespace,
                lr: float, steps: int, order: int) -> tuple[Tensor, Tensor]:
        def one(s):
            X = p.take(p.idx[s])  # (m, D): this subset's rows, X_tr then X_te
            return subset_adjoint(X[:p.m_tr], Y_tr[s], X[p.m_tr:], Y_te[s], w0[s], lr, steps, order, p.kernel,
                                  p.workers)
        out = run_concurrently([lambda s=s: one(s) for s in range(p.S)], p.workers)
        ce, fit, dY_tr, dY_te = zip(*out)
        ctx.dY_tr = torch.stack(dY_tr) if order == 2 else None
        ctx.dY_te = torch.stack(dY_te) if order else None
        fit = torch.stack(fit)
        ctx.mark_non_differentiable(fit)
        return torch.stack(ce), fit

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_ce: Tensor, _grad_fit: Tensor | None) -> tuple:
        g = grad_ce.view(-1, 1, 1)
        dY_tr = None if ctx.dY_tr is None else ctx.dY_tr * g
        return dY_tr, ctx.dY_te * g, None, None, None, None, None


def unrolled_inner(p: SimpleNamespace, w0: Tensor, lr: float, steps: int) -> tuple[Tensor, Tensor]:
    """Reference: autograd through the unrolled inner loop (create_graph), subset by subset, as the paper does."""
    ces, fits = [], []
    for s in range(p.S):
        sub = one_subset(p, s)
        w = w0[s:s + 1].clone().requires_grad_(True)
        P0 = None
        for _ in range(steps):
            logp = torch.log_softmax(sub.ops_tr.logits(w), -1)
            P0 = logp.exp().detach() if P0 is None else P0
            loss = -sub.ops_tr.subset_sum(masked(sub.Y_tr * logp, sub.M_tr)).sum() / p.m_tr
            w = w - lr * torch.autograd.grad(loss, w, create_graph=True)[0]
        ces.append(outer_ce(sub.ops_te, sub.Y_te, sub.M_te, p.m_te, w)[0])
        fits.append(inner_fit(sub.ops_tr, sub.Y_tr.detach(), sub.M_tr, p.m_tr, P0, w.detach()))
    return torch.cat(ces), torch.cat(fits)


def outer_losses(phi1: Tensor, phi2a: Tensor | Rows, W: Tensor, tau: float, idx: Tensor, m_tr: int, w0: Tensor,
                 lr: float, steps: int, H_reg: float, method: str = "adjoint", layout: str = "auto", *,
                 kernel: str | None = None, bf16: bool = False, workers: int = 1) -> tuple[Tensor, Tensor]:
    """Eq. 7 per subset: CE of the adapted inner classifier on X_te minus H_reg x entropy of the subset's mean
    label. Returns the losses (S,), differentiable w.r.t. W, and the inner fit diagnosis (S, 3).
    kernel: products.py's kernel for the inner products (None: the first that runs here, bfloat16 if bf16; the
    unrolled reference always uses plain matmuls). workers: subsets run at once in the subset layout."""
    if method == "unrolled":  # the reference: autograd through plain matmuls
        kernel = "blas"
    p = make_problem(phi1, phi2a, W, tau, idx, m_tr, layout, kernel or default_kernel(idx.device, bf16), workers)
    if method not in ("adjoint", "unrolled", "first_order"):
        raise ValueError(f"unknown hypergradient method {method!r}")
    if p.layout == "subset" and method != "unrolled":
        order = 0 if not (torch.is_grad_enabled() and p.Y_tr.requires_grad) else 2 if method == "adjoint" else 1
        ce, fit = SubsetAdjoint.apply(p.Y_tr, p.Y_te, w0, p, lr, steps, order)
    elif method == "adjoint":
        ce, fit = AdjointInner.apply(p.Y_tr, p.Y_te, w0, p, lr, steps)
    elif method == "unrolled":
        ce, fit = unrolled_inner(p, w0, lr, steps)
    else:
        with torch.no_grad():
            Y_tr = p.Y_tr.detach()
            wT, _, _, P0 = inner_descent(p.ops_tr, Y_tr, p.M_tr, w0, lr, p.m_tr, steps, keep=None)
            fit = inner_fit(p.ops_tr, Y_tr, p.M_tr, p.m_tr, P0, wT)
        ce = outer_ce(p.ops_te, p.Y_te, p.M_te, p.m_te, wT)[0]
    mean_label = p.Y_rows[p.inv].mean(1)  # (S, k) over X_tr and X_te together
    return ce - H_reg * entropy(mean_label), fit
