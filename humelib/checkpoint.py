"""Resumable checkpoints for hume.py: everything needed to continue a run bit for bit on the same machine.

A checkpoint holds the task encoder, Adam's state, the next iteration, the subset/inner-init generator, every
global RNG state and the settings that must not change across a resume. Written atomically, so a run killed while
writing keeps the previous one. The file name, checkpoint_{seed}.pt, never matches the paper's task/results names.
Everything in it is a tensor or a plain Python value (RNG states included), so it is read with
torch.load(weights_only=True): a planted checkpoint cannot run code.
"""
import math
import os
import random

import numpy as np
import torch

from humelib.fileio import torch_save
from humelib.runtime import HumeError

# settings a resumed run must share with the run it continues (the rest, e.g. --num_iters, may change)
# (--inner_lr as given, a number or 'auto': auto's step follows from the data, which is checked too; --mmap changes
# nothing)
FIXED = ("k", "tau", "H_reg", "outer_lr", "adaptation_steps", "num_subsets", "subset_size", "train_fraction",
         "no_anneal", "no_rand_init", "seed", "hypergrad", "first_order", "phi1_path", "phi2_path", "inner_lr",
         "normalize", "bf16")
KEYS = ("iteration", "encoder", "optimizer", "generator", "torch_rng", "numpy_rng", "python_rng", "fixed", "extra")


def path_for(args):
    return os.path.join(args.exp_path, f"checkpoint_{args.seed}.pt")


def save(args, iteration, encoder, opt, gen, extra, shapes=None):
    """shapes: the input arrays' shapes ({"phi1": [n, d1], "phi2": [[n, d2], ...]}), checked on resume."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"iteration": iteration, "encoder": encoder.state_dict(), "optimizer": opt.state_dict(),
             "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "numpy_rng": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "python_rng": [version, list(py_state), py_gauss],
             "fixed": {k: getattr(args, k) for k in FIXED}, "shapes": shapes, "extra": extra}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch_save(state, path_for(args))


def same(a, b):
    """Settings equal, floats up to rounding (a resolved --inner_lr auto may differ in the last bit)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def load(args, encoder, opt, gen, shapes=None):
    """Restore a checkpoint into encoder/opt/gen and the global RNGs. Returns (next iteration, extra) or None when
    there is no checkpoint yet (a fresh start). A checkpoint of another run, another data set or a foreign file is
    refused with one line."""
    path = path_for(args)
    if not os.path.isfile(path):
        return None
    bad = f"--resume: {path} is not a checkpoint written by this version of hume.py"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise HumeError(f"{bad} or is damaged ({type(e).__name__}: {first}); nothing in it was run. Delete it to "
                        "start over") from None
    if not isinstance(state, dict) or any(k not in state for k in KEYS) or not isinstance(state["fixed"], dict):
        raise HumeError(f"{bad} (keys missing); delete it to start over")
    changed = [k for k in FIXED if not same(state["fixed"].get(k), getattr(args, k))]
    if changed:
        was = ", ".join(f"--{k} {state['fixed'].get(k)!r} (now {getattr(args, k)!r})" for k in changed)
        raise HumeError(f"--resume: {path} was written with {was}; rerun with the same settings or another "
                        "--exp_path")
    if shapes is not None and state.get("shapes") != shapes:
        raise HumeError(f"--resume: {path} was written for arrays of shapes {state.get('shapes')}, but the inputs "
                        f"now have {shapes}; resume on the same data or use another --exp_path")
    it = state["iteration"]
    if type(it) is not int or it < 0:  # bool, float or negative: not an iteration
        raise HumeError(f"{bad} (iteration {it!r}); delete it to start over")
    if it > args.num_iters:
        raise HumeError(f"--resume: {path} is at iteration {it}, past --num_iters {args.num_iters}; give "
                        f"--num_iters {it} or more, or another --exp_path")
    try:
        encoder.load_state_dict(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, py_state, py_gauss = state["python_rng"]
        random.setstate((version, tuple(py_state), py_gauss))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        check_optimizer(encoder, opt)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise HumeError(f"{bad} ({type(e).__name__}: {first}); delete it to start over") from None
    extra = state["extra"]
    if not isinstance(extra, dict) or not isinstance(extra.get("seconds"), (int, float)) or \
            not 0 <= extra["seconds"] < math.inf or not valid_w0(extra.get("w0_fixed"), args, shapes):
        raise HumeError(f"{bad} (its run state is damaged); delete it to start over")
    return it, extra


def check_optimizer(encoder, opt):
    """Adam's moments must have their parameter's shape (load_state_dict does not check; a step would fail)."""
    for p in encoder.parameters():
        for name, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"Adam state {name} has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}")


def valid_w0(w0, args, shapes):
    """The fixed inner init (--no_rand_init): None, or one (1, k, d2 + 1) tensor per phi2 space."""
    if w0 is None:
        return not args.no_rand_init
    if not isinstance(w0, list) or not all(torch.is_tensor(w) for w in w0):
        return False
    dims = [s[1] for s in shapes["phi2"]] if shapes else [w.shape[-1] - 1 for w in w0]
    return len(w0) == len(dims) and all(tuple(w.shape) == (1, args.k, d2 + 1) for w, d2 in zip(w0, dims))
