"""Resumable checkpoints of hume.py and run_turtle.py: everything needed to continue a run bit for bit on the same
machine, and the checks that a checkpoint belongs to the run being resumed.

HUME's holds the task encoder, Adam's state, the next iteration, the subset/inner-init generator, every global RNG
state and the settings that must not change across a resume; TURTLE's the same for its task encoder and (with
--warm_start) its inner classifiers. Written atomically, so a run killed while writing keeps the previous one. The
file names (checkpoint_{seed}.pt, turtle_checkpoint_{seed}.pt: run_folder.Run.checkpoint) never match the task or
results names. Everything in them is a tensor or a plain Python value (RNG states included), so they are read with
torch.load(weights_only=True): a planted checkpoint cannot run code.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from torch import nn

from humelib.fileio import torch_save
from humelib.run_folder import SCRIPT, Run
from humelib.runtime import HumeError, first_line

if TYPE_CHECKING:
    from humelib.hume_args import Settings
Args = Union[argparse.Namespace, "Settings"]  # hume.py's settings or run_turtle.py's flags

# settings a resumed run must share with the run it continues (the rest, e.g. --num_iters, may change)
# (--inner_lr as given, a number or 'auto': auto's step follows from the data, which is checked too; --mmap changes
# nothing)
FIXED = ("k", "tau", "H_reg", "outer_lr", "adaptation_steps", "num_subsets", "subset_size", "train_fraction",
         "no_anneal", "no_rand_init", "seed", "hypergrad", "first_order", "phi1_path", "phi2_path", "inner_lr",
         "normalize", "bf16")
KEYS = ("iteration", "encoder", "optimizer", "generator", "torch_rng", "numpy_rng", "python_rng", "fixed", "extra")
# TURTLE's (--T may grow)
TURTLE_FIXED = ("k", "gamma", "inner_lr", "outer_lr", "batch_size", "M", "warm_start", "seed", "phi_paths")
TURTLE_KEYS = ("iteration", "theta", "opt", "generator", "torch_rng", "seconds", "fixed")


def not_ours(run: Run) -> str:
    return f"--resume: {run.checkpoint} is not a checkpoint written by this version of {SCRIPT[run.method]}"


def same(a: object, b: object) -> bool:
    """Settings equal, floats up to rounding (a resolved --inner_lr auto may differ in the last bit)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def read(run: Run, args: Args, fixed: tuple, keys: tuple, limit: int, limit_flag: str) -> dict | None:
    """The run's checkpoint, checked: ours, written with the same settings (names in fixed), at an iteration in
    0..limit; None when there is none yet (a fresh start). Everything else is one line naming the file."""
    path, bad = run.checkpoint, not_ours(run)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as e:
        raise HumeError(f"{bad} or is damaged ({type(e).__name__}: {first_line(e)[:200]}); nothing in it was run. "
                        "Delete it to start over") from None
    if not isinstance(state, dict) or any(k not in state for k in keys) or not isinstance(state["fixed"], dict):
        raise HumeError(f"{bad} (keys missing); delete it to start over")
    changed = [k for k in fixed if not same(state["fixed"].get(k), getattr(args, k))]
    if changed:
        was = ", ".join(f"--{k} {state['fixed'].get(k)!r} (now {getattr(args, k)!r})" for k in changed)
        raise HumeError(f"--resume: {path} was written with {was}; rerun with the same settings or another "
                        "--exp_path")
    it = state["iteration"]
    if type(it) is not int or it < 0:  # bool, float or negative: not an iteration
        raise HumeError(f"{bad} (iteration {it!r}); delete it to start over")
    if it > limit:
        raise HumeError(f"--resume: {path} is at iteration {it}, past {limit_flag} {limit}; give {limit_flag} {it} "
                        "or more, or another --exp_path")
    return state


@contextlib.contextmanager
def restoring(run: Run) -> Iterator[None]:
    """Loading a checked checkpoint's contents into the run's objects: any failure is one line."""
    try:
        yield
    except Exception as e:
        raise HumeError(f"{not_ours(run)} ({type(e).__name__}: {first_line(e)[:200]}); delete it to start "
                        "over") from None


def rng_states() -> dict:
    """torch's, numpy's and Python's global RNG states (and CUDA's), as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    states = {"torch_rng": torch.get_rng_state(),
              "numpy_rng": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
              "python_rng": [version, list(py_state), py_gauss]}
    if torch.cuda.is_available():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python_rng"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


# ---------------------------------------------------------------- HUME

def save(run: Run, args: Settings, iteration: int, encoder: nn.Module, opt: torch.optim.Optimizer,
         gen: torch.Generator, extra: dict, shapes: dict | None = None) -> None:
    """shapes: the input arrays' shapes ({"phi1": [n, d1], "phi2": [[n, d2], ...]}), checked on resume."""
    state = {"iteration": iteration, "encoder": encoder.state_dict(), "optimizer": opt.state_dict(),
             "generator": gen.get_state(), **rng_states(), "fixed": {k: getattr(args, k) for k in FIXED},
             "shapes": shapes, "extra": extra}
    torch_save(state, run.checkpoint)


def load(run: Run, args: Settings, encoder: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
         shapes: dict | None = None) -> tuple | None:
    """Restore HUME's checkpoint into encoder/opt/gen and the global RNGs. Returns (next iteration, extra) or None
    when there is no checkpoint yet. A checkpoint of another run, another data set or a foreign file is refused
    with one line."""
    state = read(run, args, FIXED, KEYS, args.num_iters, "--num_iters")
    if state is None:
        return None
    if shapes is not None and state.get("shapes") != shapes:
        raise HumeError(f"--resume: {run.checkpoint} was written for arrays of shapes {state.get('shapes')}, but the "
                        f"inputs now have {shapes}; resume on the same data or use another --exp_path")
    with restoring(run):
        encoder.load_state_dict(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        set_rng_states(state)
        check_optimizer(encoder, opt)
    extra = state["extra"]
    if not isinstance(extra, dict) or not isinstance(extra.get("seconds"), (int, float)) or \
            not 0 <= extra["seconds"] < math.inf or not valid_w0(extra.get("w0_fixed"), args, shapes):
        raise HumeError(f"{not_ours(run)} (its run state is damaged); delete it to start over")
    return state["iteration"], extra


def check_optimizer(encoder: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Adam's moments must have their parameter's shape (load_state_dict does not check; a step would fail)."""
    for p in encoder.parameters():
        for name, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"Adam state {name} has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}")


def valid_w0(w0: object, args: Settings, shapes: dict | None) -> bool:
    """The fixed inner init (--no_rand_init): None, or one (1, k, d2 + 1) tensor per phi2 space."""
    if w0 is None:
        return not args.no_rand_init
    if not isinstance(w0, list) or not all(torch.is_tensor(w) for w in w0):
        return False
    dims = [s[1] for s in shapes["phi2"]] if shapes else [w.shape[-1] - 1 for w in w0]
    return len(w0) == len(dims) and all(tuple(w.shape) == (1, args.k, d2 + 1) for w, d2 in zip(w0, dims))


# ---------------------------------------------------------------- TURTLE

def save_turtle(run: Run, args: argparse.Namespace, it: int, theta: nn.Module, opt: torch.optim.Optimizer,
                inner: nn.Module | None, inner_opt: torch.optim.Optimizer | None, gen: torch.Generator,
                seconds: float) -> None:
    state = {"iteration": it, "theta": theta.state_dict(), "opt": opt.state_dict(), "generator": gen.get_state(),
             "torch_rng": torch.get_rng_state(), "seconds": seconds,
             "fixed": {k: getattr(args, k) for k in TURTLE_FIXED}}
    if args.warm_start:
        state.update(inner=inner.state_dict(), inner_opt=inner_opt.state_dict())
    torch_save(state, run.checkpoint)


def load_turtle(run: Run, args: argparse.Namespace, theta: nn.Module, opt: torch.optim.Optimizer,
                inner: nn.Module | None, inner_opt: torch.optim.Optimizer | None,
                gen: torch.Generator) -> tuple | None:
    """Restore TURTLE's checkpoint in place; returns (next iteration, seconds so far), or None when there is none."""
    state = read(run, args, TURTLE_FIXED, TURTLE_KEYS, args.T, "--T")
    if state is None:
        return None
    with restoring(run):
        theta.load_state_dict(state["theta"])
        opt.load_state_dict(state["opt"])
        if args.warm_start:
            inner.load_state_dict(state["inner"])
            inner_opt.load_state_dict(state["inner_opt"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        seconds = float(state["seconds"])
    if not 0 <= seconds < math.inf:
        raise HumeError(f"{not_ours(run)} ({seconds!r} seconds); delete it to start over")
    return state["iteration"], seconds
