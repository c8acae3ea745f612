r"""The run folder (--exp_path, --tasks_path): the one place that knows its file names. A `Run` is one seed's run
of one method there: the paths of its task, results, checkpoint and metrics log, which method owns the seed, every
file checked before any work, the per-seed lock, the log kept in step with the checkpoint, and the end of the run
committed as one unit. Readers (evaluate.py, predict.py, plot.py, annotate.py, select_k.py) find the runs of a folder
with `find_tasks` and `find_logs`.

Both methods write results_{seed}.pickle and metrics_{seed}.jsonl, so a seed belongs to one of them: a run records
its method in owner_{seed}.txt ("hume" or "turtle") before it trains, and a run of the other method on that seed is
refused. Folders without that file (written by the paper's hume.py, or before it existed) are told by their task
and checkpoint files. The name never matches linear_task_(\d+)\.pt or results_(\d+)\.pickle.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from collections.abc import Iterator

from humelib.fileio import (OutputGroup, append_jsonl, check_output_file, json_ready, read_jsonl, write_bytes,
                            write_error)
from humelib.runtime import HumeError

OWN = {"hume": ("linear_task_{}.pt", "checkpoint_{}.pt"),  # the files only that method writes
       "turtle": ("turtle_task_{}.pt", "turtle_checkpoint_{}.pt")}
SHARED = ("results_{}.pickle", "metrics_{}.jsonl")
SCRIPT = {"hume": "hume.py", "turtle": "run_turtle.py"}
TASK_FILE = re.compile(r"(?:linear|turtle)_task_(-?\d+)\.pt")  # not linear_task_{it}_{seed}.pt (--save_all)
LOG_FILE = re.compile(r"metrics_(-?\d+)\.jsonl")


class Run:
    """One seed's run of method ("hume" or "turtle") in folder: its files' paths and what may be done with them."""

    def __init__(self, folder: str, seed: int, method: str, flag: str = "--exp_path") -> None:
        self.folder, self.seed, self.method, self.flag = folder, seed, method, flag
        task, ckpt = OWN[method]
        self.task = self.path(task.format(seed))
        self.checkpoint = self.path(ckpt.format(seed))
        self.results, self.log = (self.path(name.format(seed)) for name in SHARED)
        self.owner_file = self.path(f"owner_{seed}.txt")
        self.lock_file = self.path(f"hume_{seed}.lock")  # one name for both methods: one run of a seed at a time
        self._fresh_log = False

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def snapshot(self, iteration: int) -> str:
        """--save_all's task file of an iteration (the paper's name)."""
        return self.path(f"linear_task_{iteration}_{self.seed}.pt")

    def outputs(self) -> list:
        """Every file the run writes (besides --save_all's)."""
        return [self.task, self.checkpoint, self.results, self.log, self.owner_file]

    def check(self) -> None:
        """Before any work: every output writable and not a folder, link or device, and the seed not another
        method's."""
        for path in self.outputs():
            check_output_file(path, self.flag)
        found = self.owner()
        if found not in (None, self.method):
            raise HumeError(f"{self.flag} {self.folder}: seed {self.seed} belongs to {SCRIPT[found]}, and "
                            f"{SCRIPT[self.method]} would overwrite its results; use another --seed or --exp_path")

    def owner(self) -> str | None:
        """The method that owns the seed in the folder ("hume", "turtle"), or None when no run of it has started
        there. Files of both methods, or results of no known method, are refused."""
        folder, seed, marker = self.folder, self.seed, self.owner_file
        if os.path.lexists(marker):
            try:
                with open(marker, "rb") as f:
                    method = f.read(64).decode("ascii", "replace").strip()
            except OSError as e:
                raise HumeError(f"{marker}: cannot be read ({e.strerror}); remove it if no run of seed {seed} is "
                                "there")
            if method not in OWN:
                raise HumeError(f"{marker}: names no method (expected hume or turtle); remove it if it is not a run's")
            return method
        found = {m for m, names in OWN.items() for name in names if os.path.lexists(self.path(name.format(seed)))}
        if len(found) > 1:
            raise HumeError(f"{folder}: seed {seed} holds files of both hume.py and run_turtle.py, which share "
                            f"results_{seed}.pickle; keep each method in its own folder")
        if found:
            return found.pop()
        shared = [name.format(seed) for name in SHARED if os.path.lexists(self.path(name.format(seed)))]
        if shared:
            raise HumeError(f"{folder}: seed {seed} holds {' and '.join(shared)} of no known method (no task, "
                            f"checkpoint or {os.path.basename(marker)}); move them or use another --seed or "
                            "--exp_path")
        return None

    def claim(self) -> None:
        """check() again under the lock (a run may have started since), then owner_{seed}.txt records the method."""
        self.check()
        if not os.path.isfile(self.owner_file):
            write_bytes(self.owner_file, f"{self.method}\n".encode())

    @contextlib.contextmanager
    def lock(self) -> Iterator[str]:
        """Hold an exclusive lock on hume_{seed}.lock for the block: a second run of the same seed into the same
        folder (either method) is refused with one line instead of interleaving its files. The lock dies with the
        process."""
        import fcntl
        try:  # O_NOFOLLOW: a planted symlink of that name is not followed
            f = os.fdopen(os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError as e:
            raise write_error(self.lock_file, e) from None
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise HumeError(f"{self.flag} {self.folder}: seed {self.seed} is already running there (another "
                                f"process holds {self.lock_file}); wait for it to end, or use another --seed or "
                                "--exp_path") from None
            yield self.lock_file
        finally:
            f.close()

    def resume_hint(self, ckpt_every: int) -> str:
        """What an interrupted run tells the user: continue from its checkpoint, or start over where none is written
        yet (the first comes at iteration ckpt_every)."""
        if os.path.isfile(self.checkpoint):
            return f"rerun the same command with --resume to continue from {self.checkpoint}"
        return f"no checkpoint yet (the first is written at iteration {ckpt_every}): rerun to start over"

    # ------------------------------------------------------------ the metrics log, in step with the checkpoint

    def begin_log(self, resumed_at: int | None) -> None:
        """A resumed run drops the log's records after its checkpoint; a fresh run empties the log at its first
        write, not before (a finished seed's log survives a rerun that fails before that)."""
        if resumed_at is None:
            self._fresh_log = True
        else:
            keep_log_until(self.log, resumed_at)

    def start_log(self) -> None:
        """The log belongs to this run from now on (before a checkpoint is written: they must agree)."""
        if self._fresh_log:
            write_bytes(self.log, b"")
            self._fresh_log = False

    def append_log(self, record: dict) -> None:
        self.start_log()
        append_jsonl(self.log, record)

    def commit(self, task_bytes: bytes, results: dict) -> None:
        """The end of a run as one unit: the task file, results_{seed}.pickle and the metrics log with the CV score
        and the seconds it took in its last record; all new or all old, whatever fails."""
        with OutputGroup() as group:
            group.write_bytes(self.task, task_bytes)
            group.write_bytes(self.results, pickle.dumps(results))
            scored = scored_log(self.log, {"cv_score": results["CV_Score"], "cv_seconds": results["cv_seconds"]})
            if scored is not None:
                group.write_bytes(self.log, scored)


# ---------------------------------------------------------------- reading a folder

def find_tasks(folder: str) -> dict:
    """{seed: (task path, results path)} for every HUME or TURTLE task in folder (--tasks_path); every task needs
    its results pickle."""
    if not os.path.isdir(folder):
        raise HumeError(f"--tasks_path {folder}: no such folder")
    names = sorted((int(m.group(1)), f) for f in os.listdir(folder) if (m := TASK_FILE.fullmatch(f)))
    if not names:
        raise HumeError(f"--tasks_path {folder}: no linear_task_{{seed}}.pt or turtle_task_{{seed}}.pt files; run "
                        f"hume.py or run_turtle.py with --exp_path {folder} first")
    tasks = {}
    for s, name in names:
        res = os.path.join(folder, SHARED[0].format(s))
        if s in tasks:
            raise HumeError(f"--tasks_path {folder}: seed {s} has both a HUME and a TURTLE task, which would share "
                            f"results_{s}.pickle; keep each method in its own folder")
        if not os.path.isfile(res):
            raise HumeError(f"--tasks_path {folder}: {name} has no results_{s}.pickle (its CV score); "
                            "rerun that seed or remove the task")
        tasks[s] = (os.path.join(folder, name), res)
    return tasks


def find_logs(folder: str) -> dict:
    """{seed: path} of every metrics_{seed}.jsonl in folder."""
    return {int(m.group(1)): os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if (m := LOG_FILE.fullmatch(f))}


# ---------------------------------------------------------------- the metrics log of a run

def keep_log_until(path: str, iteration: int) -> None:
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


def scored_log(path: str, fields: dict) -> bytes | None:
    """The metrics log's bytes with the end-of-run fields (the CV score, the seconds it took) added to its last
    record, for the run's files committed as one unit; the log keeps one record per evaluation. None when the run
    logged nothing."""
    records = [rec for _, rec in read_jsonl(path, required=("iteration",))] if os.path.isfile(path) else []
    if not records:
        return None
    records[-1].update(fields)
    return "".join(json.dumps(json_ready(rec), allow_nan=False) + "\n" for rec in records).encode()
