"""Shared helpers: errors and the command line, array loading and validation, seeding, atomic files, logging.

One home for each helper; the scripts import from here and never copy.
"""
import argparse
import json
import os
import pickle
import random
import re
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = {  # the bundled digits demo (data/README.md), laid out like the paper's inputs
    "phi1_train": os.path.join(HERE, "data/representations/pca/digitstrain_l2.npy"),
    "phi1_test": os.path.join(HERE, "data/representations/pca/digitstest_l2.npy"),
    "phi2_train": os.path.join(HERE, "data/representations/ocr/digitstrain.npy"),
    "phi2_test": os.path.join(HERE, "data/representations/ocr/digitstest.npy"),
    "labels_train": os.path.join(HERE, "data/labels/digitstrain_targets.npy"),
    "labels_test": os.path.join(HERE, "data/labels/digitstest_targets.npy"),
}


class HumeError(Exception):
    """A problem the user can fix (bad file, bad flag). Scripts print it as one line and exit 2."""


def run_cli(main, argv=None):
    """Run a script's main(argv) (None: the command line); a HumeError becomes one line on stderr and exit code 2,
    never a traceback."""
    try:
        main(argv)
    except HumeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error convention: one line on stderr, exit code 2 (argparse prints usage too)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(doc):
    """A parser whose description is the first paragraph of the script's docstring; defaults shown in --help."""
    return Parser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                  allow_abbrev=False)  # a typo such as --num_iter must not silently become --num_iters


def log(msg, quiet=False):
    """The one place scripts print progress messages (through tqdm, so a running progress bar stays intact)."""
    if not quiet:
        from tqdm import tqdm
        tqdm.write(msg)


def warn(msg):
    """A warning the user must see even with --quiet: one line on stderr."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arrays

def load_array(path, flag, mmap=False):
    """Load a 2-D float array of representations from a .npy file, checked: exists, numeric, 2-D, finite."""
    arr = _load_npy(path, flag, mmap)
    if arr.ndim != 2:
        raise HumeError(f"{flag} {path}: expected a 2-D array (n_points x dim), got shape {arr.shape}; "
                        "reshape it to one row per point")
    if not np.issubdtype(arr.dtype, np.floating):
        raise HumeError(f"{flag} {path}: expected float features, got dtype {arr.dtype}; "
                        "is this a labels file passed as representations?")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HumeError(f"{flag} {path}: the array is empty (shape {arr.shape})")
    _check_finite(arr, path, flag)
    return arr if mmap else np.ascontiguousarray(arr, dtype=np.float32)


def load_labels(path, flag, n=None):
    """Load a 1-D integer label vector (any integer values) and check its length against n points."""
    y = _load_npy(path, flag, mmap=False)
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise HumeError(f"{flag} {path}: expected a 1-D label vector, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise HumeError(f"{flag} {path}: labels must be integers, got non-integer floats; "
                            "is this a representations file passed as labels?")
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.integer):
        raise HumeError(f"{flag} {path}: labels must be integers, got dtype {y.dtype}")
    if n is not None and len(y) != n:
        raise HumeError(f"{flag} {path}: {len(y)} labels for {n} points; the labels must match the "
                        "evaluation arrays row for row")
    return y.astype(np.int64)


def _load_npy(path, flag, mmap):
    if not path or not os.path.isfile(path):
        raise HumeError(f"{flag}: file not found: {path}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # corrupt file, pickled object array, not a .npy at all
        raise HumeError(f"{flag} {path}: cannot be read as a .npy array ({type(e).__name__}: {e})") from None


def _check_finite(arr, path, flag, chunk=1 << 16):
    for start in range(0, arr.shape[0], chunk):  # chunked so memory-mapped arrays are never loaded whole
        block = np.asarray(arr[start:start + chunk])
        if not np.all(np.isfinite(block)):
            row = start + int(np.nonzero(~np.all(np.isfinite(block), axis=1))[0][0])
            raise HumeError(f"{flag} {path}: contains NaN or inf (first at row {row}); clean the array")


def check_rows(arrays):
    """arrays: list of (flag, array). All must have the same number of rows."""
    rows = {flag: a.shape[0] for flag, a in arrays}
    if len(set(rows.values())) > 1:
        detail = ", ".join(f"{flag} has {r}" for flag, r in rows.items())
        raise HumeError(f"row counts differ ({detail}); every array must hold the same points in the same order")


def sources_path(npy_path):
    """Where extract.py writes the provenance of NAME.npy's rows: NAME.sources.txt beside it."""
    return npy_path[:-len(".npy")] + ".sources.txt" if npy_path.endswith(".npy") else npy_path + ".sources.txt"


def load_sources(path, n, flag="--sources"):
    """The source of each of n rows (one line a row: an image file's path, or DATASET:SPLIT:INDEX)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HumeError(f"{flag} {path}: cannot be read as a text file ({type(e).__name__}: {e})") from None
    if len(lines) != n:
        raise HumeError(f"{flag} {path}: {len(lines)} lines for {n} rows; it must list the rows' sources one a line, "
                        "in the order of the array (was it written for another array?)")
    return lines


def check_source_files(sources, flag):
    """Refuse sources that are not files: data-set rows (extract.py's DATASET:SPLIT:INDEX) or moved files."""
    missing = [s for s in sources if not os.path.isfile(s)]
    if missing and re.fullmatch(r"[\w.-]+:\w+:\d+", missing[0]):
        raise HumeError(f"{flag}: the sources are data-set rows (e.g. {missing[0]}), not image files; this needs "
                        "images from a folder (extract.py --dataset imagefolder)")
    if missing:
        raise HumeError(f"{flag}: {len(missing)} of {len(sources)} sources are not files (first: {missing[0]}); "
                        "were they moved since the extraction?")


def find_sources(explicit, npy_path, n):
    """The rows' sources: from --sources when given, else from NAME.sources.txt beside NAME.npy, else None."""
    if explicit:
        if not os.path.isfile(explicit):
            raise HumeError(f"--sources: file not found: {explicit}")
        return load_sources(explicit, n)
    beside = sources_path(npy_path)
    return load_sources(beside, n, "sources file") if os.path.isfile(beside) else None


def l2_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- seeding

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- files

def atomic_write(path, write_fn):
    """Write via write_fn(tmp_path) to a temporary file in the same folder, then rename over path:
    readers never see a half-written file, and a crash leaves no partial output behind."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix="_" + os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def torch_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class _ResultsUnpickler(pickle.Unpickler):
    """Unpickles only what results pickles hold (builtin containers and scalars, numpy arrays, dtypes and scalars):
    a pickle can name any callable, and plain pickle.load would call it."""
    ALLOWED = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                                         "str", "bytes", "bool", "slice")} | \
        {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")} | \
        {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | \
        {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (module == "numpy" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refuses to load object {module}.{name}")


def load_results(path):
    """A results_{seed}.pickle (ours or the paper's) as a dict, read without running any code it may carry."""
    try:
        with open(path, "rb") as f:
            out = _ResultsUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise HumeError(f"{path}: {e}; this file is not a results pickle written by HUME") from None
    except Exception as e:
        raise HumeError(f"{path}: cannot be read as a results pickle ({type(e).__name__}: {e})") from None
    if not isinstance(out, dict):
        raise HumeError(f"{path}: holds a {type(out).__name__}, not the dict of a results pickle")
    return out


def pickle_save(obj, path):
    def write(tmp):
        with open(tmp, "wb") as f:
            pickle.dump(obj, f)
    atomic_write(path, write)


def json_save(obj, path):
    """Pretty JSON, written atomically (reports: evaluate.py --json and friends)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def append_jsonl(path, record):
    """One JSON object per line (DINO-style metrics log); appended whole, flushed."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def ensure_dir(path, flag):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise HumeError(f"{flag} {path}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise HumeError(f"{flag} {path}: the folder is not writable")
