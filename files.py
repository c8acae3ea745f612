"""Files: atomic writes with one message for every failed write, JSON reports and the JSON-lines metrics log, output
checks made before any work, the per-seed lock, and the restricted unpickler every pickle we read goes through.
"""
import contextlib
import io
import json
import math
import os
import pickle
import tempfile

import torch

from utils import HumeError, first_line


def write_error(path, e):
    """The one message for a write that failed (disk full, read-only, no permission, a planted symlink)."""
    import errno
    fix = {errno.ENOSPC: "free some space or choose another folder", errno.EDQUOT: "free some space or choose "
           "another folder", errno.ELOOP: "it is a symbolic link: remove it"}.get(e.errno, "choose a writable folder")
    return HumeError(f"cannot write {path} ({e.strerror or e}); {fix}")


def atomic_write(path, write_fn):
    """Write via write_fn(tmp_path) to a temporary file in the same folder, then rename over path:
    readers never see a half-written file, and a crash leaves no partial output behind. A failed write (disk
    full, read-only folder) removes the temporary file and raises a HumeError "cannot write PATH (reason)"."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix="_" + os.path.basename(path), dir=folder)
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise write_error(path, e) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def write_bytes(path, data):
    """data (bytes) to path, atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def torch_save(obj, path):
    buf = io.BytesIO()  # serialise in memory: a full disk then fails as an OSError naming its cause
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def pickle_save(obj, path):
    write_bytes(path, pickle.dumps(obj))


def json_ready(obj):
    """obj with every non-finite float (NaN, inf) replaced by None, so the JSON written is standard."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_save(obj, path):
    """Pretty JSON, written atomically (reports: evaluate.py --json and friends); NaN/inf are written as null."""
    write_bytes(path, json.dumps(json_ready(obj), indent=2, allow_nan=False).encode())


def append_jsonl(path, record):
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


def read_jsonl(path, required=()):
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


def start_log(path, fresh):
    """A fresh run empties the metrics log once, at its first write (a finished seed's log survives a rerun
    that fails before that). fresh: a one-element list, cleared here."""
    if fresh[0]:
        write_bytes(path, b"")
        fresh[0] = False


def ensure_dir(path, flag):
    if os.path.exists(path) and not os.path.isdir(path):
        raise HumeError(f"{flag} {path}: a file of that name exists; it must be a folder (choose another path)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise HumeError(f"{flag} {path}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise HumeError(f"{flag} {path}: the folder is not writable")


def check_output_file(path, flag):
    """Refuse, before any work, an output file that cannot be written: a folder of that name, a parent that is
    missing (and cannot be created), a file, or is not writable."""
    if os.path.isdir(path):
        raise HumeError(f"{flag} {path}: is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    ensure_dir(parent, flag)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise HumeError(f"{flag} {path}: the file is not writable")


@contextlib.contextmanager
def seed_lock(folder, seed, flag="--exp_path"):
    """Hold an exclusive lock on {folder}/hume_{seed}.lock for the block: a second run of the same seed into the
    same folder is refused with one line instead of interleaving its files. The lock dies with the process."""
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


# ---------------------------------------------------------------- results pickles

_RESULTS_GLOBALS = {  # what pickles of dicts of builtins, numpy arrays, dtypes and scalars need, nothing more
    ("builtins", n) for n in ("set", "frozenset", "complex", "bytearray", "slice")} | {
    ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")} | {
    (f"numpy.{core}.{mod}", n) for core in ("core", "_core")
    for mod, n in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}


class _ResultsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _RESULTS_GLOBALS:
            raise pickle.UnpicklingError(f"refuses to load object {module}.{name}")
        return super().find_class(module, name)


def restricted_load(f, encoding="ASCII"):
    """Unpickle from an open binary file, building only builtins containers and scalars and numpy arrays, dtypes
    and scalars: every pickle the project reads goes through this, so a hostile file cannot run code."""
    return _ResultsUnpickler(f, encoding=encoding).load()


def load_results(path):
    """A results_{seed}.pickle (ours or the paper's) read by a restricted unpickler: only builtins containers and
    scalars and numpy arrays/dtypes/scalars can be built, so a hostile file cannot run code. Returns the dict,
    checked to hold a numeric CV_Score."""
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
