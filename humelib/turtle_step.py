"""One outer iteration of TURTLE (Gadetsky, Jiang & Brbic, ICML 2024): the math run_turtle.py loops over.

For a batch of m points seen in every space i (rows phi_i, d_i columns) the task encoder theta labels them,
    Y = mean_i softmax(phi_i W_i^T + b_i)                       (Eq. 9; W_i = g_i v_i / ||v_i||, weight norm),
linear classifiers w_i = (V_i, c_i), one per space, take M Adam steps on sum_i CE(phi_i V_i^T + c_i, Y) with Y held
fixed (the first-order approximation, Eq. 13), and theta takes one step on the outer loss (Eq. 12)
    sum_i CE(phi_i V_i^T + c_i, Y) - gamma * sum_i H(mean_points softmax(phi_i W_i^T + b_i)).

Written for speed, computing what autograd and torch.optim.Adam would (same updates up to float rounding):
- the inner gradient in closed form, dCE/dlogits = (softmax - Y) / m, so no graph is built M times;
- every product with the batch (23 per space and iteration at M = 10) goes through products.gemms, classes first:
  on a CPU, oneDNN's kernels reading the rows in place ("onednn_raw"), gathered once per iteration (packing a batch
  costs more than its few dozen products save);
- the labels are computed once and serve both the inner loop (detached) and the outer loss;
- the inner Adam step is torch's fused one where the device has it: one kernel, no per-parameter Python loop.
"""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from humelib.products import gemms, probe, softmax
from humelib.task_encoder import mean_softmax


def gather_batch(phis: Sequence[torch.Tensor], idx: torch.Tensor, k: int) -> list[SimpleNamespace]:
    """The batch's rows of every space, gathered once for the iteration's products, classes first (products.gemms
    with km=True: logits(w) = w phi^T (k, m), grad(G) = G phi for G (k, m))."""
    kernel = "onednn_raw" if probe("onednn_raw", idx.device) is None else "blas"
    return [gemms(torch.index_select(z, 0, idx), k, kernel, km=True) for z in phis]


class TimesWT(torch.autograd.Function):
    """phi W^T through the batch's prepared products, with W's gradient G^T phi through them too."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, W: torch.Tensor, ops: SimpleNamespace) -> torch.Tensor:
        ctx.ops = ops
        return ops.logits(W).T

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, G: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.ops.grad(G.T), None


def batch_labels(theta: nn.ModuleList, batch: Sequence[SimpleNamespace]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eq. 9 on the batch: (Y, each space's softmax), differentiable w.r.t. theta."""
    return mean_softmax([TimesWT.apply(head.weight, ops) + head.bias for head, ops in zip(theta, batch)])


def init_inner(gen: torch.Generator, dims: Sequence[int], k: int, dev: str | torch.device) -> nn.ModuleList:
    """Inner classifiers, one nn.Linear(d_i, k) per space, with nn.Linear's init U(-1/sqrt(d), 1/sqrt(d)) drawn
    from gen (so a resumed run draws the same ones)."""
    inner = nn.ModuleList(nn.utils.skip_init(nn.Linear, d, k) for d in dims)
    with torch.no_grad():
        for lin, d in zip(inner, dims):
            for p in lin.parameters():
                p.copy_(torch.empty(p.shape).uniform_(-d ** -0.5, d ** -0.5, generator=gen))
    return inner.to(dev)


def inner_adam(inner: nn.ModuleList, lr: float) -> torch.optim.Adam:
    """The inner classifiers' Adam (torch's defaults), fused into one kernel on the devices that have it."""
    fused = next(inner.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(inner.parameters(), lr=lr, fused=fused)


def inner_logits(lin: nn.Linear, ops: SimpleNamespace) -> torch.Tensor:
    """An inner classifier's logits on the batch, (m, k)."""
    return ops.logits(lin.weight).T + lin.bias


@torch.no_grad()
def inner_fit(inner: nn.ModuleList, inner_opt: torch.optim.Optimizer, batch: Sequence[SimpleNamespace],
              Y: torch.Tensor, M: int) -> None:
    """M Adam steps on sum_i CE(inner_i(phi_i), Y), Y held fixed (Eq. 13). Each space's loss depends on its own
    classifier only, so its gradient is that of one mean soft-label cross-entropy: with G = (softmax(logits) - Y) / m
    (Y's rows sum to 1), dV = G^T phi and dc = sum of G's rows. Worked with classes as rows, (k, m), the layout the
    products take and give, where the softmax's reductions run along contiguous rows."""
    Yt, m = Y.detach().T.contiguous(), len(Y)  # (k, m)
    for _ in range(M):
        for lin, ops in zip(inner, batch):
            Gt = softmax(ops.logits(lin.weight).add_(lin.bias[:, None]), 0).sub_(Yt).div_(m)  # (k, m)
            lin.weight.grad, lin.bias.grad = ops.grad(Gt), Gt.sum(1)
        inner_opt.step()
    for p in inner.parameters():
        p.grad = None


def outer_loss(Y: torch.Tensor, per_space: Sequence[torch.Tensor], inner: nn.ModuleList,
               batch: Sequence[SimpleNamespace], gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 12: sum_i CE(inner_i(phi_i), Y) with the inner logits held fixed, minus gamma x sum_i H(mean label of
    space i); Y and per_space from batch_labels. Returns (loss, prediction error, entropy)."""
    with torch.no_grad():
        fixed = [inner_logits(lin, ops) for lin, ops in zip(inner, batch)]
    pred_error = sum(F.cross_entropy(lg, Y) for lg in fixed)
    entropy = sum(torch.special.entr(p.mean(0)).sum() for p in per_space)
    return pred_error - gamma * entropy, pred_error, entropy


def outer_step(theta: nn.ModuleList, opt: torch.optim.Optimizer, inner: nn.ModuleList, inner_opt: torch.optim.Optimizer,
               phis: Sequence[torch.Tensor], idx: torch.Tensor, gamma: float, M: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One outer iteration on the points idx: labels, M inner steps, one step of theta's optimizer opt on Eq. 12.
    Returns the loss and its two terms, detached: the batch and the graph are freed on return, before the next
    iteration gathers its own."""
    batch = gather_batch(phis, idx, theta[0].out_features)
    Y, per_space = batch_labels(theta, batch)
    inner_fit(inner, inner_opt, batch, Y, M)
    opt.zero_grad(set_to_none=True)
    loss, pred_error, entropy = outer_loss(Y, per_space, inner, batch, gamma)
    loss.backward()
    opt.step()
    return loss.detach(), pred_error.detach(), entropy.detach()
