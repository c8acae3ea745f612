"""Resumable checkpoints for hume.py: everything needed to continue a run bit for bit on the same machine.

A checkpoint holds the task encoder, Adam's state, the next iteration, the subset/inner-init generator, every
global RNG state and the settings that must not change across a resume. Written atomically, so a run killed while
writing keeps the previous one. The file name, checkpoint_{seed}.pt, never matches the paper's task/results names.
"""
import os
import random

import numpy as np
import torch

from utils import HumeError, torch_save

# settings a resumed run must share with the run it continues (the rest, e.g. --num_iters, may change)
FIXED = ("k", "tau", "H_reg", "outer_lr", "adaptation_steps", "num_subsets", "subset_size", "train_fraction",
         "no_anneal", "no_rand_init", "seed", "hypergrad", "first_order", "phi1_path", "phi2_path")


def path_for(args):
    return os.path.join(args.exp_path, f"checkpoint_{args.seed}.pt")


def save(args, iteration, encoder, opt, gen, extra):
    state = {"iteration": iteration, "encoder": encoder.state_dict(), "optimizer": opt.state_dict(),
             "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
             "python_rng": random.getstate(), "fixed": {k: getattr(args, k) for k in FIXED}, "extra": extra}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch_save(state, path_for(args))


def load(args, encoder, opt, gen):
    """Restore a checkpoint into encoder/opt/gen and the global RNGs. Returns (next iteration, extra) or None when
    there is no checkpoint yet (a fresh start)."""
    path = path_for(args)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise HumeError(f"--resume: {path} cannot be read ({type(e).__name__}); delete it to start over") from None
    changed = [k for k in FIXED if state["fixed"].get(k) != getattr(args, k)]
    if changed:
        was = ", ".join(f"--{k} {state['fixed'].get(k)!r} (now {getattr(args, k)!r})" for k in changed)
        raise HumeError(f"--resume: {path} was written with {was}; rerun with the same settings or another "
                        "--exp_path")
    encoder.load_state_dict(state["encoder"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["iteration"], state["extra"]
