"""HUME: search for the labeling a human would give a data set, with no labels (Gadetsky & Brbic, NeurIPS 2023).

A task encoder W (k x d1, orthonormal rows) labels the data in space phi1; a linear classifier trained on those labels
in space phi2 must generalise to held-out points. Minimising that error (plus a balance term) over W recovers the
human labeling. Labels are used only to report metrics.

    python hume.py                                     # bundled digits demo, the paper's defaults (slow on a CPU)
    python hume.py --outer_lr 0.01 --num_subsets 5 --adaptation_steps 100 --num_iters 150   # the README's demo
    python hume.py --phi1_path P1.npy --phi2_path P2.npy --gt_labels_path Y.npy --k 10 --exp_path tasks/run/ --seed 0

Writes to --exp_path: linear_task_{seed}.pt and results_{seed}.pickle (the paper's formats, see evaluate.py) and
metrics_{seed}.jsonl (one JSON object per evaluation) and checkpoint_{seed}.pt (every --ckpt_every iterations;
--resume continues from it). Bad inputs end with one line on stderr and exit code 2.
Equation numbers in comments are those of the paper (arXiv 2311.02940v1, the NeurIPS 2023 version), as its public
code cites them: Eq. 3 the task encoder, Eq. 5 the inner problem, Eq. 7 HUME's objective.
"""
import dataclasses

from humelib import distributed, hume_args, hume_loop, inner_lr
from humelib.embeddings import load_data
from humelib.fileio import ensure_dir, torch_bytes
from humelib.run_folder import Run
from humelib.runtime import large_buffers_in_huge_pages, log, release_freed_memory, run_cli, summary


def main(argv=None):
    cfg = hume_args.parse(__doc__, argv)
    world = distributed.init(cfg.num_subsets, cfg.device) if distributed.launched() else None
    if world:
        cfg = dataclasses.replace(cfg, device=world.device, quiet=cfg.quiet or world.rank != 0)
    try:
        results = run(cfg, world)
    except BaseException:
        distributed.close(world)
        raise
    distributed.close(world, wait=True)
    return results


def run(cfg, world):
    """Inputs checked, then the run folder's files, then (holding the seed's lock) training and the end."""
    data = load_data(cfg)
    ensure_dir(cfg.exp_path, "--exp_path")  # only after every input check passed: bad input writes nothing
    folder = Run(cfg.exp_path, cfg.seed, "hume")
    folder.check()  # every output, and the seed not run_turtle.py's, before any work
    if world and world.rank != 0:
        return train_and_finish(cfg, data, folder, world)
    with folder.lock():  # a second run of this seed into this folder is refused
        folder.claim()
        try:
            return train_and_finish(cfg, data, folder, world)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (SLURM): say how to continue
            e.hint = folder.resume_hint(cfg.ckpt_every)
            raise


def train_and_finish(cfg, data, folder, world):
    log(f"HUME {'inductive' if cfg.inductive else 'transductive'}: n={len(data.phi1)} d1={data.phi1.shape[1]} "
        f"d2={[p.shape[1] for p in data.phi2]} k={cfg.k} -> {cfg.exp_path}", cfg.quiet)
    steps = inner_lr.resolve(cfg.inner_lr, data.phi2, cfg.quiet)
    with hume_loop.set_up(cfg):
        search = hume_loop.prepare(cfg, data, steps, world)
        encoder, state = hume_loop.train(cfg, search, steps, folder, world)
    if world and world.rank != 0:
        return None
    del search
    release_freed_memory()  # before the CV score and, again, before interpreter shutdown pages in its share
    results = hume_loop.score(cfg, data, steps, encoder, state)
    folder.commit(torch_bytes({k: v.cpu() for k, v in encoder.state_dict().items()}), results)  # one unit
    release_freed_memory()
    log(summary(state["seconds"], results), cfg.quiet)
    return results


if __name__ == "__main__":
    large_buffers_in_huge_pages()  # this process's allocator, before its first large buffer
    run_cli(main)
