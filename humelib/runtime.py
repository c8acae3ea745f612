"""Running a script: errors a user can fix, signals (Ctrl-C, SIGTERM), a script's main, progress messages,
seeding and memory.

Every script runs its main through run_cli, so a bad input is one line and exit code 2, never a traceback.
"""
from __future__ import annotations

import random
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch


class HumeError(Exception):
    """A problem the user can fix (bad file, bad flag). Scripts print it as one line and exit 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (what SLURM sends at time-out or preemption), raised by the handler run_cli
    installs. at_boundary: raised between two bodies of an interruptible() loop (state is consistent); hint: how to
    continue, added by the code that caught it (printed by run_cli)."""

    def __init__(self, signum: int, at_boundary: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.at_boundary, self.hint = signum, at_boundary, None


_deferring = []  # stack of interruptible() loop bodies; a signal inside one is recorded here instead of raised


def _on_signal(signum, frame):
    if _deferring and _deferring[-1] is None:
        _deferring[-1] = signum  # the first signal waits for the end of the block; a second one raises now
        print(f"{signal.Signals(signum).name}: stopping at the end of this iteration (send it again to stop now)",
              file=sys.stderr, flush=True)
        return
    raise Interrupted(signum)


T = TypeVar("T")


def interruptible(iterable: Iterable[T], on_stop: Callable[[T], object] | None = None) -> Iterator[T]:
    """Iterate with each loop body shielded from a first Ctrl-C/SIGTERM: the signal takes effect when the body
    ends, after on_stop(item) (e.g. a final checkpoint) ran, as Interrupted(at_boundary=True). What the body
    updates (e.g. one outer iteration) is never left half-done; a second signal stops at once."""
    for item in iterable:
        _deferring.append(None)
        try:
            yield item
        finally:
            signum = _deferring.pop()
        if signum is not None:
            if on_stop is not None:
                on_stop(item)
            raise Interrupted(signum, at_boundary=True)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's main(argv) (None: the command line); a HumeError becomes one line on stderr and exit code 2,
    never a traceback. Ctrl-C and SIGTERM end the run with one line (exit 130 / 143); an OSError nobody turned
    into a HumeError (a write that failed) still ends as one line naming the file, exit 2."""
    handlers = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, _on_signal)
    except ValueError:  # not the main thread: leave the signals alone
        pass
    try:
        main(argv)
    except HumeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path, its permissions and free space", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        hint = getattr(e, "hint", None)
        print(f"interrupted ({signal.Signals(signum).name})" + (f": {hint}" if hint else ""), file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def log(msg: str, quiet: bool = False) -> None:
    """The one place scripts print progress messages (through tqdm, so a running progress bar stays intact)."""
    if not quiet:
        from tqdm import tqdm
        tqdm.write(msg)


def summary(seconds: float, results: dict[str, Any]) -> str:
    """The last line of a run: time, label-free CV score and, with labels, ACC/ARI/NMI."""
    line = f"done in {seconds:.1f}s: CV score {results['CV_Score']:.4f}"
    if "cv_seconds" in results:
        line += f" (scored in {results['cv_seconds']:.1f}s)"
    if "metrics" in results:
        line += " | " + " ".join(f"{k.upper()} {v:.4f}" for k, v in results["metrics"].items())
    return line


def warn(msg: str) -> None:
    """A warning the user must see even with --quiet: one line on stderr."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- memory

def release_freed_memory() -> bool:
    """Hand the heap the training loop freed back to the OS (glibc's malloc_trim; elsewhere nothing). glibc keeps
    freed blocks for reuse, so a run's peak is otherwise at its end, where the CV score and interpreter shutdown page
    memory in on top of them. Returns whether it ran."""
    import ctypes
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def large_buffers_in_huge_pages() -> None:
    """For a training script's process (called in its __main__, before the first large allocation): torch's CPU
    buffers of 2 MB and more in 2 MB pages (PyTorch's THP_MEM_ALLOC_ENABLE, where Linux gives transparent huge pages
    to the regions that ask, its "madvise" mode), each mapped on its own (glibc's mmap threshold fixed at 2 MB, not
    raised as buffers are freed), so that a freed one goes back to the OS at once. The inner loops stream X_tr and
    its packed copies, tens of MB, four times a step: with 4 KB pages the TLB misses slow every product. Without the
    fixed threshold, subsets run on several threads at once leave their freed buffers in the threads' heaps, now in
    2 MB pages, and the peak grows. A value the user set for either wins (THP_MEM_ALLOC_ENABLE=0: neither)."""
    import ctypes
    import os
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if os.environ["THP_MEM_ALLOC_ENABLE"] == "0" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 2 << 20)  # M_MMAP_THRESHOLD
