"""Files: the one writer for outputs (atomic, groups of files committed as one unit, never through a symbolic link
or over a device), one message for every failed write, JSON reports and JSON-lines logs, output checks made before
any work, and the reader of results pickles (through unpickler.py; run_folder: the run folder of a seed).
"""
import contextlib
import io
import json
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch

from humelib.runtime import HumeError, first_line
from humelib.unpickler import restricted_load


def write_error(path: str, e: OSError) -> HumeError:
    """The one message for a write that failed (disk full, read-only, no permission, a planted symlink)."""
    import errno
    fix = {errno.ENOSPC: "free some space or choose another folder", errno.EDQUOT: "free some space or choose "
           "another folder", errno.ELOOP: "it is a symbolic link: remove it"}.get(e.errno, "choose a writable folder")
    return HumeError(f"cannot write {path} ({e.strerror or e}); {fix}")


def check_replaceable(path: str, flag: str | None = None) -> None:
    """An output is written beside its target and renamed over it, so the target must be absent or a regular file:
    a symbolic link (it would be replaced, and no output is ever written through one) or a device, FIFO or socket
    (e.g. --json /dev/null, which root would turn into a regular file) is refused, never replaced."""
    import stat
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a parent that is a file: the caller says so)
        return
    except OSError as e:
        raise write_error(path, e) from None
    where = f"{flag} {path}" if flag else path
    if stat.S_ISLNK(mode):
        raise HumeError(f"{where}: is a symbolic link; outputs are never written through links: remove it or give "
                        "another name")
    if stat.S_ISDIR(mode):
        raise HumeError(f"{where}: is a folder; give a file name")
    if not stat.S_ISREG(mode):
        raise HumeError(f"{where}: is not a regular file (a device, FIFO or socket) and would be replaced; give a "
                        "file name")


class OutputGroup:
    """Files committed as one unit, all new or all old whatever fails: write() puts each file in a temporary beside
    its target (a full disk fails here, before any target changes); commit() renames them over their targets in
    order, and a rename that fails puts back every target already renamed (its old file, or none). Readers never
    see a half-written file. As a context manager: commit at the end of the block, discard on an exception."""

    def __init__(self) -> None:
        self.staged = []  # (temporary, target)

    def write(self, path: str, write_fn: Callable[[str], Any]) -> Any:
        """write_fn(tmp) writes the file; returns what it returns. A failed write raises "cannot write PATH"."""
        check_replaceable(path)
        try:
            tmp = _temporary_beside(path)
        except OSError as e:
            raise write_error(path, e) from None
        self.staged.append((tmp, path))
        try:
            result = write_fn(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        except OSError as e:
            raise write_error(path, e) from None
        return result

    def write_bytes(self, path: str, data: bytes) -> None:
        self.write(path, lambda tmp: _write_file(tmp, data))

    def remove(self, path: str) -> None:
        """Stage the removal of path (an old file the group's new ones would contradict): moved aside at commit,
        in order with the renames, put back if the group fails."""
        check_replaceable(path)
        self.staged.append((None, path))

    def commit(self) -> None:
        done, path = [], None  # (target, hard link to its old file or None), in the order renamed
        try:
            for tmp, path in self.staged:
                check_replaceable(path)  # a link or device planted since write()
                if tmp is None:  # a removal: the old file is moved aside, deleted once the group is in
                    if os.path.lexists(path):
                        aside = _temporary_beside(path)
                        os.replace(path, aside)
                        done.append((path, aside))
                    continue
                old = _keep_old(tmp, path) if len(self.staged) > 1 else None
                try:
                    os.replace(tmp, path)
                except OSError:
                    if old:
                        _remove_quietly(old)
                    raise
                done.append((path, old))
        except (OSError, HumeError) as e:
            for renamed, old in reversed(done):
                with contextlib.suppress(OSError):
                    os.replace(old, renamed) if old else os.remove(renamed)
            self.discard()
            if isinstance(e, HumeError):
                raise
            raise write_error(path, e) from None
        for _, old in done:
            if old:
                _remove_quietly(old)
        self.staged = []

    def discard(self) -> None:
        for tmp, _ in self.staged:
            if tmp:
                _remove_quietly(tmp)
        self.staged = []

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.commit()
        else:
            self.discard()


def _temporary_beside(path):
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix="_" + os.path.basename(path),
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    return tmp


def _keep_old(tmp, path):
    """A second name for path's current file (a hard link, else a copy), to put back if the group fails."""
    if not os.path.lexists(path):
        return None
    old = tmp + ".old"
    try:
        os.link(path, old)
    except OSError:
        import shutil
        shutil.copy2(path, old)
    return old


def atomic_write(path: str, write_fn: Callable[[str], Any]) -> None:
    """Write via write_fn(tmp_path) to a temporary file in the same folder, then rename over path (a group of one):
    readers never see a half-written file, a crash leaves no partial output behind, and a failed write removes the
    temporary and raises a HumeError "cannot write PATH (reason)"."""
    with OutputGroup() as group:
        group.write(path, write_fn)


def _remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def _write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


def write_bytes(path: str, data: bytes) -> None:
    """data (bytes) to path, atomically."""
    atomic_write(path, lambda tmp: _write_file(tmp, data))


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()  # serialise in memory: a full disk then fails as an OSError naming its cause
    torch.save(obj, buf)
    return buf.getvalue()


def torch_save(obj: Any, path: str) -> None:
    write_bytes(path, torch_bytes(obj))


def pickle_save(obj: Any, path: str) -> None:
    write_bytes(path, pickle.dumps(obj))


def json_ready(obj: Any) -> Any:
    """obj with every non-finite float (NaN, inf) replaced by None, so the JSON written is standard."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_save(obj: Any, path: str) -> None:
    """Pretty JSON, written atomically (reports: evaluate.py --json and friends); NaN/inf are written as null."""
    write_bytes(path, json.dumps(json_ready(obj), indent=2, allow_nan=False).encode())


def append_jsonl(path: str, record: dict) -> None:
    """One JSON object per line (DINO-style metrics log); appended whole, flushed. A failed write (disk full) is
    cut back off, so the log never ends in half a line, and raises "cannot write PATH (reason)"."""
    line = json.dumps(json_ready(record), allow_nan=False) + "\n"
    try:
        with open(path, "a") as f:
            start = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(start)
                raise
    except OSError as e:
        raise write_error(path, e) from None


def read_jsonl(path: str, required: Iterable[str] = ()) -> list[tuple[int, Any]]:
    """[(line number, record)] of a JSON-lines log. A last line cut short (a run killed or a disk filled while
    writing it) is dropped; any other line that is not a JSON object holding the keys `required` is an error
    naming path:line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise HumeError(f"{path}: cannot be read ({e.strerror})") from None
    lines = data.split(b"\n")
    out = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = i == len(lines)  # no newline after it: possibly a partial write
        try:
            rec = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            if last:
                continue
            raise HumeError(f"{path}:{i}: not a JSON line; delete that line (or the file) and rerun") from None
        missing = [k for k in required if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise HumeError(f"{path}:{i}: no {', '.join(missing)} in this record; delete that line (or the file)")
        out.append((i, rec))
    return out


def ensure_dir(path: str, flag: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise HumeError(f"{flag} {path}: a file of that name exists; it must be a folder (choose another path)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise HumeError(f"{flag} {path}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise HumeError(f"{flag} {path}: the folder is not writable")


def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, a symbolic link or a device of
    that name, a parent that is missing (and cannot be created), or a file that is not writable."""
    check_replaceable(path, flag)
    parent = os.path.dirname(os.path.abspath(path))
    ensure_dir(parent, flag)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise HumeError(f"{flag} {path}: the file is not writable")


def load_results(path: str) -> dict:
    """A results_{seed}.pickle (ours or the paper's) read through unpickler.restricted_load, so a hostile file cannot
    run code. Returns the dict, checked to hold a numeric CV_Score."""
    try:
        with open(path, "rb") as f:
            obj = restricted_load(f)
    except pickle.UnpicklingError as e:
        if str(e).startswith("refuses"):
            raise HumeError(f"{path}: {e}; this file is not a results pickle written by HUME") from None
        raise HumeError(f"{path}: damaged results pickle ({first_line(e)}); rerun that seed") from None
    except OSError as e:
        raise HumeError(f"{path}: cannot be read ({e.strerror})") from None
    except Exception as e:  # truncated (EOFError), garbage bytes, ...
        raise HumeError(f"{path}: damaged results pickle ({type(e).__name__}: {first_line(e)}); rerun that "
                        "seed") from None
    if not isinstance(obj, dict) or "CV_Score" not in obj:
        raise HumeError(f"{path}: not a HUME results pickle (expected a dict with a CV_Score)")
    try:
        obj["CV_Score"] = float(obj["CV_Score"])
    except (TypeError, ValueError):
        raise HumeError(f"{path}: CV_Score is {obj['CV_Score']!r}, not a number") from None
    return obj
