r"""The run folder of hume.py and run_turtle.py (--exp_path): which method owns each seed, every file a seed's run
writes checked before any work, the per-seed lock, and the metrics log kept in step with the checkpoint.

Both methods write results_{seed}.pickle and metrics_{seed}.jsonl, so a seed belongs to one of them: a run records
its method in owner_{seed}.txt ("hume" or "turtle") before it trains, and a run of the other method on that seed is
refused. Folders without that file (written by the paper's hume.py, or before it existed) are told by their task
and checkpoint files. The name never matches linear_task_(\d+)\.pt or results_(\d+)\.pickle.
"""
import contextlib
import json
import os
import pickle

from humelib.fileio import OutputGroup, check_output_file, json_ready, read_jsonl, write_bytes, write_error
from humelib.runtime import HumeError

OWN = {"hume": ("linear_task_{}.pt", "checkpoint_{}.pt"),  # the files only that method writes
       "turtle": ("turtle_task_{}.pt", "turtle_checkpoint_{}.pt")}
SHARED = ("results_{}.pickle", "metrics_{}.jsonl")
SCRIPT = {"hume": "hume.py", "turtle": "run_turtle.py"}


def owner_path(folder, seed):
    return os.path.join(folder, f"owner_{seed}.txt")


def owner(folder, seed):
    """The method that owns seed in folder ("hume", "turtle"), or None when no run of it has started there. Files
    of both methods, or results of no known method, are refused."""
    marker = owner_path(folder, seed)
    if os.path.lexists(marker):
        try:
            with open(marker, "rb") as f:
                method = f.read(64).decode("ascii", "replace").strip()
        except OSError as e:
            raise HumeError(f"{marker}: cannot be read ({e.strerror}); remove it if no run of seed {seed} is there")
        if method not in OWN:
            raise HumeError(f"{marker}: names no method (expected hume or turtle); remove it if it is not a run's")
        return method
    found = {m for m, names in OWN.items() for name in names
             if os.path.lexists(os.path.join(folder, name.format(seed)))}
    if len(found) > 1:
        raise HumeError(f"{folder}: seed {seed} holds files of both hume.py and run_turtle.py, which share "
                        f"results_{seed}.pickle; keep each method in its own folder")
    if found:
        return found.pop()
    shared = [name.format(seed) for name in SHARED if os.path.lexists(os.path.join(folder, name.format(seed)))]
    if shared:
        raise HumeError(f"{folder}: seed {seed} holds {' and '.join(shared)} of no known method (no task, checkpoint "
                        f"or {os.path.basename(marker)}); move them or use another --seed or --exp_path")
    return None


def outputs(folder, seed, method):
    """Every file a run of method writes for seed (besides --save_all's)."""
    names = [n.format(seed) for n in OWN[method] + SHARED] + [os.path.basename(owner_path(folder, seed))]
    return [os.path.join(folder, n) for n in names]


def check(folder, seed, method, flag="--exp_path"):
    """Before any work: every output of the seed writable and not a folder, link or device, and the seed not
    another method's."""
    for path in outputs(folder, seed, method):
        check_output_file(path, flag)
    found = owner(folder, seed)
    if found not in (None, method):
        raise HumeError(f"{flag} {folder}: seed {seed} belongs to {SCRIPT[found]}, and {SCRIPT[method]} would "
                        f"overwrite its results; use another --seed or --exp_path")


def claim(folder, seed, method, flag="--exp_path"):
    """check() again under seed_lock (a run may have started since), then owner_{seed}.txt records method."""
    check(folder, seed, method, flag)
    if not os.path.isfile(owner_path(folder, seed)):
        write_bytes(owner_path(folder, seed), f"{method}\n".encode())


# ---------------------------------------------------------------- the metrics log of a run

def keep_log_until(path, iteration):
    """On resume, drop log lines written after the checkpoint's iteration (they will be written again), and a
    last line cut short by a kill or a full disk; a damaged line elsewhere is an error naming path:line."""
    if os.path.islink(path):
        raise HumeError(f"{path} is a symbolic link, not the log hume.py wrote; remove it and rerun")
    kept = []  # rewritten even when missing
    for line, rec in read_jsonl(path, required=("iteration",)) if os.path.isfile(path) else []:
        if not isinstance(rec["iteration"], int):
            raise HumeError(f"{path}:{line}: iteration {rec['iteration']!r} is not a number; delete that line")
        if rec["iteration"] <= iteration:
            kept.append(rec)
    write_bytes(path, "".join(json.dumps(rec) + "\n" for rec in kept).encode())


def commit(folder, seed, task_name, task_bytes, results):
    """The end of a run as one unit: the task file, results_{seed}.pickle and the metrics log with the CV score and
    the seconds it took in its last record; all new or all old, whatever fails."""
    with OutputGroup() as group:
        group.write_bytes(os.path.join(folder, task_name), task_bytes)
        group.write_bytes(os.path.join(folder, f"results_{seed}.pickle"), pickle.dumps(results))
        log = os.path.join(folder, f"metrics_{seed}.jsonl")
        scored = scored_log(log, {"cv_score": results["CV_Score"], "cv_seconds": results["cv_seconds"]})
        if scored is not None:
            group.write_bytes(log, scored)


def scored_log(path, fields):
    """The metrics log's bytes with the end-of-run fields (the CV score, the seconds it took) added to its last
    record, for the run's files committed as one unit; the log keeps one record per evaluation. None when the run
    logged nothing."""
    records = [rec for _, rec in read_jsonl(path, required=("iteration",))] if os.path.isfile(path) else []
    if not records:
        return None
    records[-1].update(fields)
    return "".join(json.dumps(json_ready(rec), allow_nan=False) + "\n" for rec in records).encode()


def start_log(path, fresh):
    """A fresh run empties the metrics log once, at its first write (a finished seed's log survives a rerun
    that fails before that). fresh: a one-element list, cleared here."""
    if fresh[0]:
        write_bytes(path, b"")
        fresh[0] = False


@contextlib.contextmanager
def seed_lock(folder, seed, flag="--exp_path"):
    """Hold an exclusive lock on {folder}/hume_{seed}.lock for the block: a second run of the same seed into the
    same folder (either method) is refused with one line instead of interleaving its files. The lock dies with the
    process."""
    import fcntl
    path = os.path.join(folder, f"hume_{seed}.lock")
    try:  # O_NOFOLLOW: a planted symlink of that name is not followed
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HumeError(f"{flag} {folder}: seed {seed} is already running there (another process holds {path}); "
                            "wait for it to end, or use another --seed or --exp_path") from None
        yield path
    finally:
        f.close()
