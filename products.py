"""The inner loop's fast parts: the two products with a fixed X (logits X w^T and gradients G^T X) and the softmax
over the classes, written for the CPU kernels that run them fastest (measured on a 2-core Zen 4 with AVX-512).
"""
from types import SimpleNamespace

import torch


def softmax(Z, dim=-1):
    """Softmax over dimension dim, by default the last (no autograd through it here). torch's CPU kernel is slow when
    the last dimension is not a multiple of the vector width: over 10 classes this exp/sum form is ~5x faster (0.13
    vs 0.65 ms on 1,437 x 5 x 10); at 16 torch's wins. Over the first dimension of a (k, m) array (classes as rows)
    it is faster still (0.18 vs 0.50 ms for 10 x 10,000 against 10,000 x 10, one thread). Exponents are clamped at
    -87: below that a float32 exp is subnormal or 0 and torch's CPU exp takes a ~6x slower path (the demo's inner
    loops hit it); the probabilities this changes are below 2e-38, against float32's resolution of 1e-7 at 1."""
    if dim in (-1, Z.dim() - 1) and Z.shape[-1] % 16 == 0:
        return torch.softmax(Z, -1)
    e = (Z - Z.amax(dim, keepdim=True)).clamp_min_(-87.0).exp_()
    return e.div_(e.sum(dim, keepdim=True))


def gemms(X, width, bf16=False, pack=True):
    """The inner loop's two products with a fixed X (m, D): logits(w) = X w^T (m, r) for w (r, D) and
    grad(G) = G^T X (r, D) for G (m, r), r about `width`. On a CPU (float32 or bfloat16) they run through oneDNN
    with X and X^T reordered once into its packed layout, the small operand as the batch (the kernels torch.compile
    uses for linear layers on a CPU; torch is pinned, and they are looked up, not assumed): on the 2-core Zen 4,
    9,000 x 769 x 10 products take 1.4 ms against 4.3-4.8 ms for torch's default BLAS (MKL), 1,437 x 481 x 50 (the
    demo) 0.42-0.48 vs 0.57-0.69 ms, and 14,000 x 2,049 x 1,000 270-280 vs 310-400 ms. Elsewhere, plain matmuls.
    logits_t(w) = (X w^T)^T (r, m) and grad_t(Gt) = Gt X for Gt (r, m) are the same products with the small operand
    kept as r rows, as the kernels take and give it (no transposing copies).
    pack=False: the same kernels read X where it lies (X^T as a strided view), with no packed copies. For an X used
    a few dozen times (TURTLE's batches: 23 products) that is faster than packing it (one thread, 10,000 x 1,536:
    15 ms a product against 8.3 packed, but packing X and X^T takes 360 ms) and needs no memory."""
    dtype, out = torch.bfloat16 if bf16 else X.dtype, X.dtype  # the packed copies need not keep X alive
    if X.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _onednn():
        lin, reorder = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
        if pack:
            Xp, Xtp = reorder(X.to(dtype), width), reorder(X.T.contiguous().to(dtype), width)
        else:
            Xp = X.to(dtype)
            Xtp = Xp.T
        logits_t = lambda w: lin(w.to(dtype).contiguous(), Xp, None, "none", [], "").to(out)
        grad_t = lambda Gt: lin(Gt.to(dtype).contiguous(), Xtp, None, "none", [], "").to(out)
        return SimpleNamespace(logits=lambda w: logits_t(w).T.contiguous(), grad=lambda G: grad_t(G.T),
                               logits_t=logits_t, grad_t=grad_t)
    Xg, Xt = X.to(dtype), X.T.contiguous().to(dtype)
    return SimpleNamespace(logits=lambda w: (Xg @ w.to(dtype).T).to(out), grad=lambda G: (Xt @ G.to(dtype)).T.to(out),
                           logits_t=lambda w: (w.to(dtype) @ Xt).to(out), grad_t=lambda Gt: (Gt.to(dtype) @ Xg).to(out))


def _onednn():
    """oneDNN's packed linear kernels are there (torch built with it, not switched off by torch.backends.mkldnn)."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
