"""Arrays a run reads: the bundled demo's paths, .npy loading checked (2-D, numeric, finite, never a pickle),
labels, row counts, the image-source lists that go with extracted features, and L2 normalisation.
"""
from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from humelib.runtime import HumeError, first_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: data/ lies beside the package
DEMO = {  # the bundled digits demo (data/README.md), laid out like the paper's inputs
    "phi1_train": os.path.join(ROOT, "data/representations/pca/digitstrain_l2.npy"),
    "phi1_test": os.path.join(ROOT, "data/representations/pca/digitstest_l2.npy"),
    "phi2_train": os.path.join(ROOT, "data/representations/ocr/digitstrain.npy"),
    "phi2_test": os.path.join(ROOT, "data/representations/ocr/digitstest.npy"),
    "labels_train": os.path.join(ROOT, "data/labels/digitstrain_targets.npy"),
    "labels_test": os.path.join(ROOT, "data/labels/digitstest_targets.npy"),
}


def load_array(path: str, flag: str, mmap: bool = False) -> np.ndarray:
    """Load a 2-D float array of representations from a .npy file, checked: exists, numeric, 2-D, finite."""
    return check_array(_load_npy(path, flag, mmap), f"{flag} {path}", mmap)


def check_array(arr: ArrayLike, name: str, mmap: bool = False) -> np.ndarray:
    """arr (a numpy array, memory-mapped or not) checked as representations: numeric, 2-D, non-empty, finite;
    float32 and contiguous unless memory-mapped. name: how errors name it ("--flag path", or the argument)."""
    arr = arr if isinstance(arr, np.ndarray) else np.asarray(arr)
    if arr.ndim != 2:
        raise HumeError(f"{name}: expected a 2-D array (n_points x dim), got shape {arr.shape}; "
                        "reshape it to one row per point")
    if not np.issubdtype(arr.dtype, np.floating):
        raise HumeError(f"{name}: expected float features, got dtype {arr.dtype}; "
                        "is this a labels file passed as representations?")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HumeError(f"{name}: the array is empty (shape {arr.shape})")
    _check_finite(arr, name)
    return arr if mmap else np.ascontiguousarray(arr, dtype=np.float32)


def load_labels(path: str, flag: str, n: int | None = None) -> np.ndarray:
    """Load a 1-D integer label vector (any integer values) and check its length against n points."""
    return check_labels(_load_npy(path, flag, mmap=False), f"{flag} {path}", n)


def check_labels(y: ArrayLike, name: str, n: int | None = None) -> np.ndarray:
    """y checked as labels: 1-D (or one column), integers (integer-valued floats taken), n of them; int64."""
    y = np.asarray(y)
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise HumeError(f"{name}: expected a 1-D label vector, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise HumeError(f"{name}: labels must be integers, got non-integer floats; "
                            "is this a representations file passed as labels?")
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.integer):
        raise HumeError(f"{name}: labels must be integers, got dtype {y.dtype}")
    if n is not None and len(y) != n:
        raise HumeError(f"{name}: {len(y)} labels for {n} points; the labels must match the "
                        "evaluation arrays row for row")
    return y.astype(np.int64)


NPY_MAGIC = b"\x93NUMPY"


def _load_npy(path, flag, mmap):
    """np.load with allow_pickle=False, and errors that say what the file is (never "use allow_pickle")."""
    if not path or not os.path.isfile(path):
        raise HumeError(f"{flag}: file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as e:
        raise HumeError(f"{flag} {path}: cannot be read ({e.strerror})") from None
    if head != NPY_MAGIC:
        what = "it is empty" if not head else f"it starts with {head!r}"
        raise HumeError(f"{flag} {path}: not a .npy file ({what}); save the array with numpy.save")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise HumeError(f"{flag} {path}: holds a pickled object array: refusing to load it (it could run code); "
                            "save a numeric array instead") from None
        raise HumeError(f"{flag} {path}: damaged .npy file ({first_line(e)})") from None
    except Exception as e:  # truncated data, unreadable header
        raise HumeError(f"{flag} {path}: damaged .npy file ({type(e).__name__}: {first_line(e)})") from None


def _check_finite(arr, name, chunk=1 << 16):
    for start in range(0, arr.shape[0], chunk):  # chunked so memory-mapped arrays are never loaded whole
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf where HUME computes
            block = np.asarray(arr[start:start + chunk], dtype=np.float32)
        if not np.all(np.isfinite(block)):
            row = start + int(np.nonzero(~np.all(np.isfinite(block), axis=1))[0][0])
            raise HumeError(f"{name}: contains NaN or inf, or values beyond float32's range (first at row "
                            f"{row}); clean the array")


def check_rows(arrays: Sequence[tuple[str, np.ndarray]]) -> None:
    """arrays: list of (flag, array). All must have the same number of rows."""
    rows = {flag: a.shape[0] for flag, a in arrays}
    if len(set(rows.values())) > 1:
        detail = ", ".join(f"{flag} has {r}" for flag, r in rows.items())
        raise HumeError(f"row counts differ ({detail}); every array must hold the same points in the same order")


def sources_path(npy_path: str) -> str:
    """Where extract.py writes the provenance of NAME.npy's rows: NAME.sources.txt beside it."""
    return npy_path[:-len(".npy")] + ".sources.txt" if npy_path.endswith(".npy") else npy_path + ".sources.txt"


def load_sources(path: str, n: int, flag: str = "--sources") -> list[str]:
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


def source_problem(name: str) -> str | None:
    """Why name cannot round-trip through a sources file (UTF-8, one name a line, read back with splitlines), or
    None: bytes that are not UTF-8, line breaks (also U+2028, U+0085 and the others splitlines splits on),
    control characters."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "holds bytes that are not UTF-8"
    if not name:
        return "is empty"
    if name.splitlines() != [name]:
        return "holds a line break"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "holds a control character"
    return None


def check_source_files(sources: Sequence[str], flag: str) -> None:
    """Refuse sources that are not files: data-set rows (extract.py's DATASET:SPLIT:INDEX) or moved files."""
    missing = [s for s in sources if not os.path.isfile(s)]
    if missing and re.fullmatch(r"[\w.-]+:\w+:\d+", missing[0]):
        raise HumeError(f"{flag}: the sources are data-set rows (e.g. {missing[0]}), not image files; this needs "
                        "images from a folder (extract.py --dataset imagefolder)")
    if missing:
        raise HumeError(f"{flag}: {len(missing)} of {len(sources)} sources are not files (first: {missing[0]}); "
                        "were they moved since the extraction?")


def find_sources(explicit: str | None, npy_path: str, n: int) -> list[str] | None:
    """The rows' sources: from --sources when given, else from NAME.sources.txt beside NAME.npy, else None."""
    if explicit:
        if not os.path.isfile(explicit):
            raise HumeError(f"--sources: file not found: {explicit}")
        return load_sources(explicit, n)
    beside = sources_path(npy_path)
    return load_sources(beside, n, "sources file") if os.path.isfile(beside) else None


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- seeding
