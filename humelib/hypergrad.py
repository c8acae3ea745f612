"""HUME's outer loss and its exact hypergradient (the math; hume.py is the loop).

For each subset s: labels Y (paper, Eq. 3) = sparsemax(phi1 W^T / tau); a linear classifier w = [V, c] on phi2
(k x (d2+1), bias folded in as a ones column of phi2) is trained from w0 by T steps of gradient descent on the
soft-label cross-entropy over X_tr (Eq. 5, a cold start):
    w_{t+1} = w_t - lr * X_tr^T (softmax(X_tr w_t^T) - Y_tr) / m_tr
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

Two layouts of the subsets' data (hume.py takes the one products.plan timed faster on the machine it runs on;
layout="auto", for calls without a plan, picks by size):
- "shared", when S > 1 subsets have a union of at most SHARED_RATIO x m_tr rows (subsets covering the data, the demo):
  the union is kept once and the S classifiers sit side by side, one wide GEMM N x D x S*k per product, with 0/1
  masks selecting each subset's rows. A wide GEMM runs several times faster per FLOP than skinny ones on a CPU.
- "subset" otherwise (the paper's scale): one subset at a time with plain 2-D GEMMs (or, where the plan timed it
  faster, as many at once as torch has threads, one thread each), so only one X_tr (28 MB at the paper's defaults)
  and one subset's P_t are alive per thread. Each subset's loss CE_s depends on its own labels only, and the adjoint
  is linear in the incoming gradient g_s = dL/dCE_s, so the adjoint is run right after the subset's inner loop with
  g_s = 1 and its label gradients are scaled by g_s when autograd asks for them: nothing outlives its subset.
The products and the softmax are products.py's; `kernel` names the one that runs the products (the plan's choice;
without one, the first that runs here). A bfloat16 kernel (--bf16) reads a bfloat16 copy of X and bfloat16
roundings of w, A and the residuals; softmax, iterates and sums stay in the input's precision. An approximation:
bench.py reports its hypergradient error against float32.
outer.py averages these losses over subsets and phi2 spaces for one outer iteration.
"""
from types import SimpleNamespace

import torch

from humelib.embeddings import Rows
from humelib.products import default_kernel, gemms, run_concurrently, softmax
from humelib.task_encoder import labels

SHARED_RATIO = 1.2  # layout="auto" (no plan): shared when S > 1 subsets' union is <= 1.2 x m_tr rows (nearly all)
KEEP_PROBS_BYTES = 256 * 2**20  # keep the inner softmax outputs for the backward pass when they fit in this


def entropy(p, eps=1e-8):
    """H(p) = -sum p log p. Clamped like the paper's code: a class with no mass in a subset would otherwise give
    an infinite gradient (d/dp p log p = log p + 1)."""
    p = p.clamp_min(eps)
    return -(p * torch.log(p)).sum(-1)


# ---------------------------------------------------------------- shared layout (all subsets in wide GEMMs)
# The ops below are written for batched classifiers w (S, k, D), so the inner loop is written once for the shared
# layout and for the unrolled reference's one-subset problems:
#   logits(w) -> Z   ((N, S, k) shared, (S, m, k) gathered)
#   grad(G)   -> X^T G per subset, (S, k, D)
#   subset_sum(T) -> (S,) sums of an array shaped like Z

def gathered_ops(X):  # X: (S, m, D)
    return SimpleNamespace(
        X=X, logits=lambda w: torch.bmm(X, w.transpose(1, 2)),
        grad=lambda G: torch.bmm(G.transpose(1, 2), X),
        subset_sum=lambda T: T.sum((1, 2)))


def shared_ops(X, S, k, kernel="blas"):  # X: (N, D)
    N, D = X.shape
    g = gemms(X, S * k, kernel)
    return SimpleNamespace(
        X=X, logits=lambda w: g.logits(w.reshape(-1, D)).view(N, S, -1),
        grad=lambda G: g.grad(G.reshape(N, -1)).view(S, -1, D),
        subset_sum=lambda T: T.sum((0, 2)))


def make_problem(phi1, phi2a, W, tau, idx, m_tr, layout="auto", kernel="blas", workers=1):
    """Labels and inner-problem data for S subsets. idx: (S, m) point indices, the first m_tr of each row train.
    phi2a: phi2 with its ones column, a tensor or an inputs.Rows (which prepares the rows it is asked for).

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


def _masked(T, M):
    return T if M is None else T * M


def _sum_to(g, like):
    """Reduce a broadcast gradient back to the shape of the input it belongs to."""
    dims = tuple(i for i, (a, b) in enumerate(zip(g.shape, like.shape)) if a != b)
    return g.sum(dims, keepdim=True) if dims else g


def inner_descent(ops, Y, M, w0, lr, m, steps, keep):
    """T steps of gradient descent on the soft-label CE. Returns w_T, the iterates (if keep) and (P_0, P_T)."""
    w, iterates, probs = w0, [w0], []
    P0 = None
    for _ in range(steps):
        P = softmax(ops.logits(w))
        P0 = P if P0 is None else P0
        if keep == "probs":
            probs.append(P)
        w = torch.add(w, ops.grad(_masked(P - Y, M)), alpha=-lr / m)
        if keep:
            iterates.append(w)
    return w, iterates, probs, P0


def inner_fit(ops, Y, M, m, P0, wT):
    """Diagnosis of the inner problem per subset: training CE before and after, and the share of training
    points whose adapted prediction agrees with the label's argmax. (S, 3)."""
    PT = softmax(ops.logits(wT))
    P0 = PT if P0 is None else P0
    ce = lambda P: -ops.subset_sum(_masked(Y * torch.log(P.clamp_min(1e-30)), M)) / m
    agree = _masked((PT.argmax(-1, keepdim=True) == Y.argmax(-1, keepdim=True)).to(PT.dtype), M)
    return torch.stack([ce(P0), ce(PT), ops.subset_sum(agree) / m], 1)


class AdjointInner(torch.autograd.Function):
    """Shared layout: outer CE per subset (S,) as a function of the labels, with the adjoint backward pass described
    above. Also returns the inner fit diagnosis (S, 3), not differentiable."""

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
        g_z = grad_ce.view(1, -1, 1)  # weight of each subset in the total loss, shaped like the logits (N, S, k)
        # dL/dY_te and A_T = dL/dw_T of CE(w_T) = -sum Y_te log softmax(X_te w_T^T) / m_te
        dY_te = _masked(-logp_te * g_z, p.M_te) / p.m_te
        A = p.ops_te.grad(_masked((logp_te.exp() - Y_te) * g_z, p.M_te)) / p.m_te
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
            A = torch.add(A, p.ops_tr.grad(_masked(Q, p.M_tr)), alpha=-lr / p.m_tr)
        dY_tr = _masked(p.ops_tr.logits(A_sum), p.M_tr) * (lr / p.m_tr)
        ctx.iterates = ctx.probs = None
        return _sum_to(dY_tr, Y_tr), _sum_to(dY_te, Y_te), None, None, None, None


# ---------------------------------------------------------------- subset layout (one subset at a time)

def subset_adjoint(X_tr, Y_tr, X_te, Y_te, w0, lr, steps, order, kernel, workers=1):
    """One subset: inner loop, outer CE and, unless order is 0, its label gradients for an incoming gradient of 1
    (order 2: exact adjoint; order 1: first order, dCE/dY_tr = 0 returned as None).
    X_tr (m, D), Y_tr (m, k), w0 (k, D). Returns ce (), fit (3,), dY_tr (m, k) or None, dY_te or None.
    The loop works classes first: logits, probabilities and residuals are (k, m), as the products give and take
    them without transposes, and the softmax runs along the m contiguous values of each class. workers > 1: several
    subsets run at once, and each keeps its iterates (k x D a step), not its softmax outputs (k x m a step)."""
    m, k = Y_tr.shape
    ops, c = gemms(X_tr, k, kernel, km=True), lr / m
    Yt = Y_tr.T.contiguous()  # (k, m)
    keep_probs = order == 2 and workers == 1 and steps * m * k * X_tr.element_size() <= KEEP_PROBS_BYTES
    w, probs, iterates, P0 = w0, [], [], None
    for t in range(steps):
        if order == 2 and not keep_probs:
            iterates.append(w)
        P = softmax(ops.logits(w), 0)  # (k, m)
        P0 = P if t == 0 else P0
        if keep_probs:
            probs.append(P)
        w = torch.add(w, ops.grad(P - Yt), alpha=-c)
    logp_te = torch.log_softmax(X_te @ w.T, 1)
    ce = -(Y_te * logp_te).sum() / len(X_te)
    PT = softmax(ops.logits(w), 0)
    P0 = PT if steps == 0 else P0
    fit = torch.stack([-(Yt * torch.log(P.clamp_min(1e-30))).sum() / m for P in (P0, PT)] +
                      [(PT.argmax(0) == Yt.argmax(0)).to(PT.dtype).mean()])
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
    def forward(ctx, Y_tr, Y_te, w0, p, lr, steps, order):
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
    def backward(ctx, grad_ce, _grad_fit):
        g = grad_ce.view(-1, 1, 1)
        dY_tr = None if ctx.dY_tr is None else ctx.dY_tr * g
        return dY_tr, ctx.dY_te * g, None, None, None, None, None


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
    """Subset s of a problem as a problem of its own (batched ops with S=1)."""
    if p.layout == "subset":
        X = p.take(p.idx[s]).unsqueeze(0)
        return SimpleNamespace(ops_tr=gathered_ops(X[:, :p.m_tr]), ops_te=gathered_ops(X[:, p.m_tr:]),
                               Y_tr=p.Y_tr[s:s + 1], Y_te=p.Y_te[s:s + 1], M_tr=None, M_te=None)
    ops = shared_ops(p.ops_tr.X, 1, p.Y_rows.shape[1])
    return SimpleNamespace(ops_tr=ops, ops_te=ops, Y_tr=p.Y_tr, Y_te=p.Y_te,
                           M_tr=p.M_tr[:, s:s + 1], M_te=p.M_te[:, s:s + 1])


def outer_losses(phi1, phi2a, W, tau, idx, m_tr, w0, lr, steps, H_reg, method="adjoint", layout="auto", *,
                 kernel=None, bf16=False, workers=1):
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
            wT, _, _, P0 = inner_descent(p.ops_tr, Y_tr, p.M_tr, w0, lr, p.m_tr, steps, keep=False)
            fit = inner_fit(p.ops_tr, Y_tr, p.M_tr, p.m_tr, P0, wT)
        logp_te = torch.log_softmax(p.ops_te.logits(wT), -1)
        ce = -p.ops_te.subset_sum(_masked(p.Y_te * logp_te, p.M_te)) / p.m_te
    mean_label = p.Y_rows[p.inv].mean(1)  # (S, k) over X_tr and X_te together
    return ce - H_reg * entropy(mean_label), fit
