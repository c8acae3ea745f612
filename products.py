"""The inner loop's fast parts: the two products with a fixed X (logits X w^T and gradients G^T X) and the softmax
over the classes, written for the CPU kernels that run them fastest (measured on a 2-core Zen 4 with AVX-512).
"""
from types import SimpleNamespace

import torch


def softmax(Z):
    """Softmax over the last dimension (no autograd through it here). torch's CPU kernel is slow when that dimension
    is not a multiple of the vector width: over 10 classes this exp/sum form is ~5x faster (0.13 vs 0.65 ms on
    1,437 x 5 x 10); at 16 torch's wins. Exponents are clamped at -87: below that a float32 exp is subnormal or 0 and
    torch's CPU exp takes a ~6x slower path (the demo's inner loops hit it); the probabilities this changes are
    below 2e-38, against float32's resolution of 1e-7 at 1."""
    if Z.shape[-1] % 16 == 0:
        return torch.softmax(Z, -1)
    e = (Z - Z.amax(-1, keepdim=True)).clamp_min_(-87.0).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def gemms(X, width, bf16=False):
    """The inner loop's two products with a fixed X (m, D): logits(w) = X w^T (m, r) for w (r, D) and
    grad(G) = G^T X (r, D) for G (m, r), r about `width`. On a CPU (float32 or bfloat16) they run through oneDNN
    with X and X^T reordered once into its packed layout, the small operand as the batch (the kernels torch.compile
    uses for linear layers on a CPU; torch is pinned, and they are looked up, not assumed): on the 2-core Zen 4,
    9,000 x 769 x 10 products take 1.4 ms against 4.3-4.8 ms for torch's default BLAS (MKL), 1,437 x 481 x 50 (the
    demo) 0.42-0.48 vs 0.57-0.69 ms, and 14,000 x 2,049 x 1,000 270-280 vs 310-400 ms. Elsewhere, plain matmuls."""
    dtype = torch.bfloat16 if bf16 else X.dtype
    if X.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _onednn():
        lin = torch.ops.mkldnn._linear_pointwise
        Xp = torch.ops.mkldnn._reorder_linear_weight(X.to(dtype), width)
        Xtp = torch.ops.mkldnn._reorder_linear_weight(X.T.contiguous().to(dtype), width)
        return SimpleNamespace(
            logits=lambda w: lin(w.to(dtype).contiguous(), Xp, None, "none", [], "").T.contiguous().to(X.dtype),
            grad=lambda G: lin(G.T.to(dtype).contiguous(), Xtp, None, "none", [], "").to(X.dtype))
    Xg, Xt = X.to(dtype), X.T.contiguous().to(dtype)
    return SimpleNamespace(logits=lambda w: (Xg @ w.to(dtype).T).to(X.dtype),
                           grad=lambda G: (Xt @ G.to(dtype)).T.to(X.dtype))


def _onednn():
    """oneDNN's packed linear kernels are there (torch built with it, not switched off by torch.backends.mkldnn)."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
