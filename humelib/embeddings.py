"""HUME's inputs: loading and cross-checking the arrays of a run, and reading rows of them for an outer step.

Arrays are loaded into memory (float32, on the device) or, with --mmap, left memory-mapped on disk: then only the
rows of the current outer iteration's subsets are read, so phi arrays larger than RAM work. Either way the loop
reads them through one type, Rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from humelib.arrays import check_rows, load_array, load_labels
from humelib.runtime import HumeError, warn

if TYPE_CHECKING:
    from humelib.hume_args import Settings


class Rows:
    """Rows of one phi array as float32 tensors on a device, prepared as they are read (L2-normalised, scaled, a ones
    column for the inner bias). The array is held as given, in memory or memory-mapped: an outer step reads only its
    subsets' rows, so no prepared copy of the whole array is ever made (at ImageNet's size phi2 is 10 GB)."""

    def __init__(self, arr: np.ndarray | torch.Tensor, device: str | torch.device, normalize: bool = False,
                 scale: float = 1.0, ones: bool = False) -> None:
        """arr: a numpy array (made float32), a np.memmap (read on demand) or a tensor (its dtype kept)."""
        self.device, self.normalize, self.scale, self.ones = torch.device(device), normalize, scale, ones
        self.mapped = isinstance(arr, np.memmap)
        if not self.mapped and not torch.is_tensor(arr):
            arr = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        self.data = arr if self.mapped else arr.to(self.device)
        self._all = None

    def _prepare(self, x):
        x = x.to(self.device)
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=1)
        if self.scale != 1.0:  # --inner_lr auto: phi2 at RMS row norm sqrt(d2)
            x = x * self.scale
        if self.ones:  # the inner classifier's bias as a ones column
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
        return x

    def __len__(self) -> int:
        return self.data.shape[0]

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The given rows (a LongTensor; sorted, for sequential disk reads when memory-mapped), prepared."""
        if not self.mapped:
            return self._prepare(self.data[rows.to(self.device)])
        return self._prepare(torch.from_numpy(np.asarray(self.data[rows.cpu().numpy()], dtype=np.float32)))

    def range(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 (stop capped at the length), prepared."""
        x = self.data[start:min(stop, len(self))]
        return self._prepare(torch.from_numpy(np.array(x, dtype=np.float32)) if self.mapped else x)

    def all(self) -> torch.Tensor:
        """Every row, prepared: the array itself when there is nothing to prepare, else a prepared copy kept for
        the next call (phi1's labels read every row at every outer step)."""
        if self._all is None:
            plain = not (self.mapped or self.normalize or self.scale != 1.0 or self.ones)
            self._all = self.data if plain else self.range(0, len(self))
        return self._all


class Data(NamedTuple):
    """The arrays of one run: phi2 and phi2_val hold one array per phi2 space; the evaluation arrays are the training
    arrays themselves when the run is transductive; y_val is None without --gt_labels_path."""
    phi1: np.ndarray
    phi2: list[np.ndarray]
    phi1_val: np.ndarray
    phi2_val: list[np.ndarray]
    y_val: np.ndarray | None


def load_data(cfg: Settings) -> Data:
    """The arrays named by the Settings cfg, checked against each other and against k and the subset size."""
    load = lambda path, flag: load_array(path, flag, mmap=cfg.mmap)
    phi1, phi2 = load(cfg.phi1_path, "--phi1_path"), [load(p, "--phi2_path") for p in cfg.phi2_path]
    phi1_val, phi2_val = phi1, phi2
    if cfg.inductive:
        phi1_val = load(cfg.phi1_path_val, "--phi1_path_val")
        phi2_val = [load(p, "--phi2_path_val") for p in cfg.phi2_path_val]
    y_val = load_labels(cfg.gt_labels_path, "--gt_labels_path", len(phi1_val)) if cfg.gt_labels_path else None
    names = {"phi1": ("--phi1_path", cfg.phi1_path), "phi2": [("--phi2_path", p) for p in cfg.phi2_path],
             "phi1_val": ("--phi1_path_val", cfg.phi1_path_val),
             "phi2_val": [("--phi2_path_val", p) for p in cfg.phi2_path_val or cfg.phi2_path]}
    return check_data(cfg, Data(phi1, phi2, phi1_val, phi2_val, y_val), names)


def check_data(cfg: Settings, data: Data, names: dict | None = None) -> Data:
    """The arrays of a run checked against each other, against k and the subset size, and for the variance and row
    norms HUME needs (y_val comes checked, its count too, from load_labels or check_labels). names: (flag, path) of
    each array, as the errors name them (None: arrays given in memory)."""
    phi1, phi2, phi1_val, phi2_val = data.phi1, data.phi2, data.phi1_val, data.phi2_val
    names = names or {"phi1": ("phi1", "array"), "phi2": [(f"phi2[{i}]", "array") for i in range(len(phi2))],
                      "phi1_val": ("phi1_val", "array"), "phi2_val": [(f"phi2_val[{i}]", "array")
                                                                      for i in range(len(phi2_val))]}
    label = lambda flag, path: f"{flag} {path}" if flag.startswith("--phi2") else flag
    check_rows([(label(*names["phi1"]), phi1)] + [(label(*f), a) for f, a in zip(names["phi2"], phi2)])
    if phi1_val is not phi1:
        check_rows([(label(*names["phi1_val"]), phi1_val)] +
                   [(label(*f), a) for f, a in zip(names["phi2_val"], phi2_val)])
        for train, val, name in [(phi1, phi1_val, names["phi1_val"])] + list(zip(phi2, phi2_val, names["phi2_val"])):
            if train.shape[1] != val.shape[1]:
                raise HumeError(f"{label(*name)} has dimension {val.shape[1]} but its training array has "
                                f"{train.shape[1]}; both must come from the same representation")
    n, d1 = phi1.shape
    if cfg.k > n:
        raise HumeError(f"--k {cfg.k} is larger than the number of training points ({n})")
    if cfg.k > d1:
        raise HumeError(f"--k {cfg.k} is larger than phi1's dimension ({d1}): a task encoder's k rows cannot be "
                        "orthonormal; use a richer phi1 or a smaller --k")
    m = min(cfg.subset_size, n)
    if not 1 <= int(cfg.train_fraction * m) < m:
        raise HumeError(f"--train_fraction {cfg.train_fraction} of a subset of {m} points leaves an empty "
                        "train or test part; use a larger --subset_size or a fraction nearer 0.5")
    check_variance(phi1, *names["phi1"])
    for (flag, path), a in zip(names["phi2"], phi2):
        check_variance(a, flag, path)
    lo, hi = row_norm_range(phi1)
    if cfg.normalize and lo == 0:
        zero = int(sum(np.count_nonzero(np.linalg.norm(np.asarray(phi1[i:i + (1 << 16)]), axis=1) == 0)
                       for i in range(0, phi1.shape[0], 1 << 16)))
        raise HumeError(f"{' '.join(names['phi1'])}: {zero} row(s) are all zeros and cannot be normalised "
                        "(--normalize); remove those points from every array")
    if not cfg.normalize and max(abs(lo - 1), abs(hi - 1)) > 1e-3:
        warn(f"{names['phi1'][0]} rows are not unit norm (norms {lo:.3g} to {hi:.3g}); HUME's phi1 is L2-normalised: "
             "pass --normalize to do it here")
    return data


def check_variance(x: np.ndarray, flag: str, path: str, chunk: int = 1 << 16) -> None:
    """Refuse an array whose rows are all the same (zero included): it separates nothing, and --inner_lr auto
    would divide by zero."""
    first = np.asarray(x[:1], dtype=np.float64)
    for i in range(0, x.shape[0], chunk):
        if np.any(np.asarray(x[i:i + chunk], dtype=np.float64) != first):
            return
    raise HumeError(f"{flag} {path}: every row is the same (no variance); this is not a representation of the points")


def row_norm_range(x: np.ndarray, chunk: int = 1 << 16) -> tuple[float, float]:
    norms = np.concatenate([np.linalg.norm(np.asarray(x[i:i + chunk], dtype=np.float32), axis=1)
                            for i in range(0, x.shape[0], chunk)])
    return float(norms.min()), float(norms.max())
