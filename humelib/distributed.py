"""One HUME search over several processes (GPUs, nodes) with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node 4 hume.py --exp_path tasks/run/ ...              # one node, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT hume.py ...

The S subsets of an outer iteration are independent until their gradients are averaged. Every rank draws the
same subsets and inner inits from the same seeded generator (indices only: cheap), computes the hypergradient of
its share, and one all-reduce per outer iteration sums gradients, loss and inner diagnosis. Every rank then takes
the same clipped Adam step, so the task encoders stay identical (checked by a checksum every --eval_every
iterations). Only rank 0 prints and writes files. hume.py imports this module only under torchrun.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from humelib.runtime import HumeError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True when torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(num_subsets: int, device: str) -> SimpleNamespace:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and bind this rank's GPU. Returns the world: rank, size
    and the device this rank computes on."""
    import torch.distributed as dist
    missing = [v for v in ENV if v not in os.environ]
    if missing:
        raise HumeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; launch with "
                        "torchrun (see README, several GPUs), or unset WORLD_SIZE for a single process")
    size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if size > num_subsets:
        raise HumeError(f"{size} processes but --num_subsets {num_subsets}: every rank needs at least one "
                        "subset; use fewer processes or more subsets")
    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo")
    return SimpleNamespace(rank=rank, size=size, dist=dist, device=device)


def share(world: SimpleNamespace, S: int) -> slice:
    """This rank's contiguous block of the S subsets; blocks differ by at most one subset (S need not divide)."""
    base, extra = divmod(S, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def all_reduce(world: SimpleNamespace, encoder: torch.nn.Module, loss: torch.Tensor, fit: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum gradients, loss and the inner-fit sums over ranks in one all-reduce. fit comes back as (1, 3): the
    mean over all subsets (the share sizes differ, so sums and a count travel together)."""
    grads = [p.grad for p in encoder.parameters()]
    flat = torch.cat([g.flatten() for g in grads] +
                     [loss.reshape(1), fit.sum(0), torch.tensor([len(fit)], dtype=fit.dtype, device=fit.device)])
    world.dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    loss, fit_sum, count = flat[offset], flat[offset + 1:offset + 4], flat[offset + 4]
    return loss, (fit_sum / count).unsqueeze(0)


def check_in_sync(world: SimpleNamespace, encoder: torch.nn.Module, iteration: int) -> None:
    """Stop every rank with a clear error if the task encoders have drifted apart (they must be identical)."""
    local = torch.stack([p.detach().double().sum() for p in encoder.parameters()]).sum().reshape(1)
    every = [torch.zeros_like(local) for _ in range(world.size)]
    world.dist.all_gather(every, local)
    if any(not torch.equal(every[0], e) for e in every):
        raise HumeError(f"ranks diverged at iteration {iteration}: task-encoder checksums "
                        f"{[e.item() for e in every]}; check that every rank reads the same data and flags")


def close(world: SimpleNamespace | None, wait: bool = False) -> None:
    """Leave the process group. wait: after a run that succeeded, every rank waits for the others first (rank 0
    still computes the CV score and writes the files); a rank that tears down while its peers are still connected
    can be aborted by gloo ("terminate called without an active exception", exit -6)."""
    if world is not None:
        if wait:
            world.dist.barrier()
        world.dist.destroy_process_group()
