"""Sparsemax (Martins & Astudillo, 2016): the Euclidean projection of each row onto the probability simplex.

    p = sparsemax(z) = argmin_{p in simplex} ||p - z||^2 = max(z - tau(z), 0)

Unlike softmax it gives exact zeros, so HUME's labels are (near) hard while staying differentiable.
Works over the last dimension for any batch shape (a single row included) and any k; a temperature is the
caller's business (HUME passes z = phi1 W^T / tau).
"""
from __future__ import annotations

import torch


class Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor) -> torch.Tensor:
        k = z.shape[-1]
        z = z - z.max(-1, keepdim=True).values  # shift-invariant; keeps float32 cumsums exact for large offsets
        z_sorted, _ = torch.sort(z, dim=-1, descending=True)
        cumsum = z_sorted.cumsum(-1)
        ranks = torch.arange(1, k + 1, dtype=z.dtype, device=z.device)
        # support size s(z) = max{j : 1 + j z_(j) > sum_{i<=j} z_(i)}; the condition holds for a prefix of j
        support = (1 + ranks * z_sorted > cumsum).sum(-1, keepdim=True)
        threshold = (cumsum.gather(-1, support - 1) - 1) / support.to(z.dtype)
        p = torch.clamp(z - threshold, min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_p: torch.Tensor) -> torch.Tensor:
        # Jacobian is diag(s) - s s^T / |s| with s the support indicator: project the gradient onto the
        # support and remove its mean there.
        p, = ctx.saved_tensors
        on = (p > 0).to(grad_p.dtype)
        mean = (grad_p * on).sum(-1, keepdim=True) / on.sum(-1, keepdim=True)
        return on * (grad_p - mean)


def sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Row-wise sparsemax over the last dimension of z."""
    return Sparsemax.apply(z)
