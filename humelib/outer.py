"""One outer iteration of HUME: the hypergradient of the outer loss (hypergrad.outer_losses) averaged over the
subsets and phi2 spaces, clipped to norm 1.0, and one Adam step on the task encoder. Under torchrun each rank does
its share of the subsets and one all-reduce sums the gradients (distributed.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from humelib import distributed
from humelib.hypergrad import outer_losses

if TYPE_CHECKING:
    from humelib.embeddings import Rows
    from humelib.products import Plan


class Objective(NamedTuple):
    """The outer loss beside the data and tau: the inner loop (one step size per phi2 space, the number of steps,
    how it is differentiated, bf16 GEMMs or not, and one products.Plan per phi2 space: layout and kernel; none: the
    size rule and the first kernel that runs) and the weight of the balance term."""
    inner_lrs: tuple[float, ...]
    steps: int
    H_reg: float
    method: str = "adjoint"
    bf16: bool = False
    plans: tuple[Plan, ...] = ()


class Batch(NamedTuple):
    """What one outer iteration draws: the subsets (S, m) of point indices, the first m_tr of each row being X_tr,
    and one inner init w0 (S, k, d2+1) per phi2 space."""
    idx: torch.Tensor
    m_tr: int
    w0s: list[torch.Tensor]


def hypergradient(encoder: nn.Linear, phi1: Rows, phi2s: Sequence[Rows], batch: Batch, tau: float, obj: Objective,
                  total_subsets: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outer loss over the batch's subsets, averaged over subsets and phi2 spaces; its gradient is accumulated into
    the encoder's .grad. phi1, phi2s: embeddings.Rows (phi2 with its ones column). The orthogonal parametrisation is
    evaluated and back-propagated once, however many subsets. total_subsets: the S the mean is over (the batch may
    be a share of it). Returns the loss and the inner fit (S, 3)."""
    W = encoder.weight
    W_leaf = W.detach().requires_grad_(True)
    S = total_subsets or batch.idx.shape[0]
    # memory-mapped sources: the union of the subsets' rows is read once; in-memory ones are indexed in place, phi2's
    # rows prepared as the inner loops gather them
    rows, inv = torch.unique(batch.idx, return_inverse=True) if phi1.mapped else (None, batch.idx)
    phi1_r = phi1.take(rows) if phi1.mapped else phi1.all()
    chunks = [slice(s, s + 1) for s in range(batch.idx.shape[0])] if obj.method == "unrolled" else [slice(None)]
    total, fits, weight = 0.0, [], 1.0 / (S * len(phi2s))
    plans = obj.plans or [None] * len(phi2s)
    for phi2, w0, lr, plan in zip(phi2s, batch.w0s, obj.inner_lrs, plans, strict=True):
        phi2_r = phi2.take(rows) if phi2.mapped else phi2
        how = dict(layout=plan.layout, kernel=plan.kernel, workers=plan.workers) if plan else dict(bf16=obj.bf16)
        for c in chunks:  # the unrolled reference frees each subset's graph before building the next
            losses, fit = outer_losses(phi1_r, phi2_r, W_leaf, tau, inv[c], batch.m_tr, w0[c], lr, obj.steps,
                                       obj.H_reg, obj.method, **how)
            (losses.sum() * weight).backward()
            total, fits = total + losses.detach().sum() * weight, fits + [fit]
    W.backward(W_leaf.grad)
    return total, torch.cat(fits)


def share_hypergradient(encoder: nn.Linear, opt: torch.optim.Optimizer, phi1: Rows, phi2s: Sequence[Rows],
                        batch: Batch, tau: float, obj: Objective,
                        world: SimpleNamespace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The local part of an outer iteration: .grad cleared, then the hypergradient of this rank's share of the
    subsets (all of them without torchrun), averaged over all S, accumulated into it. Returns its loss and fit."""
    opt.zero_grad(set_to_none=True)
    S = batch.idx.shape[0]
    mine = distributed.share(world, S) if world else slice(None)
    share = Batch(batch.idx[mine], batch.m_tr, [w[mine] for w in batch.w0s])
    return hypergradient(encoder, phi1, phi2s, share, tau, obj, S)


def clipped_step(encoder: nn.Linear, opt: torch.optim.Optimizer) -> torch.Tensor:
    """The gradient clipped to norm 1.0 and one Adam step (none when the norm is not finite). Returns the norm
    before clipping."""
    gnorm = nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
    if torch.isfinite(gnorm):
        opt.step()
    return gnorm


def outer_step(encoder: nn.Linear, opt: torch.optim.Optimizer, phi1: Rows, phi2s: Sequence[Rows], batch: Batch,
               tau: float, obj: Objective, world: SimpleNamespace | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One outer iteration: hypergradient averaged over subsets, clipped to norm 1.0, one Adam step.
    Under torchrun each rank does its share of the subsets and one all-reduce sums the gradients.
    Returns the loss, the inner fit and the gradient norm before clipping (tensors: no host sync here)."""
    loss, fit = share_hypergradient(encoder, opt, phi1, phi2s, batch, tau, obj, world)
    if world:
        loss, fit = distributed.all_reduce(world, encoder, loss, fit)
    return loss, fit, clipped_step(encoder, opt)
