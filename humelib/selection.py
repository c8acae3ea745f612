"""Which members show a cluster best: a few points per cluster, representative and diverse, chosen greedily to
minimise the cluster's k-means cost in a representation space (rows L2-normalised) with the picks as centres.
annotate.py picks the samples a human labels with it, plot.py --montage the members it shows.

The first pick is the point closest to the cluster's centre (representative); each next one covers the part of the
cluster the earlier picks cover worst, so picks are never near each other (diverse).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from humelib.arrays import l2_normalize

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

MAX_POINTS = 5000  # larger clusters are represented by a fixed random sample of this many points (memory: m^2)


def allocate(sizes: ArrayLike, budget: int) -> np.ndarray:
    """Samples per cluster: one each (the largest clusters first if budget < #clusters), the rest one at a time to
    the cluster furthest below its share size * budget / n, never more than a cluster holds."""
    sizes = np.asarray(sizes)
    counts = np.zeros(len(sizes), dtype=np.int64)
    counts[np.argsort(-sizes, kind="stable")[:budget]] = 1
    share = sizes * budget / sizes.sum()
    for _ in range(budget - counts.sum()):
        counts[np.argmax(np.where(counts < sizes, share - counts, -np.inf))] += 1
    return counts


def pick_in_cluster(z: np.ndarray, count: int) -> list[int]:
    """Greedy picks (local indices, in order) minimising sum_i min_{p in picks} ||z_i - z_p||^2 over the cluster.
    With squared distances the first pick is exactly the point closest to the cluster mean."""
    sq = (z * z).sum(1)
    D = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)  # (m, m) squared distances
    cover = np.full(len(z), np.inf)  # each point's squared distance to its nearest pick so far
    picks = []
    for _ in range(count):
        cost = np.minimum(cover[:, None], D).sum(0)  # the cluster's cost if point j were picked next
        cost[picks] = np.inf
        j = int(np.argmin(cost))
        picks.append(j)
        cover = np.minimum(cover, D[:, j])
    return picks


def pick(clusters: np.ndarray, phi: ArrayLike, counts: Sequence[int] | np.ndarray, quiet: bool = True
         ) -> list[tuple[int, int, int]]:
    """[(index, cluster, rank)]: counts[i] points of the i-th cluster of np.unique(clusters) (at most its size),
    picked in space phi, ordered by cluster then rank (1 = most representative)."""
    z = l2_normalize(np.asarray(phi, dtype=np.float64))
    rows = []
    for c, count in tqdm(list(zip(np.unique(clusters), counts)), desc="picking", disable=True if quiet else None):
        members = np.flatnonzero(clusters == c)
        if len(members) > MAX_POINTS:
            members = np.sort(np.random.default_rng(0).choice(members, MAX_POINTS, replace=False))
        local = pick_in_cluster(z[members], min(int(count), len(members)))
        rows += [(int(members[j]), int(c), r + 1) for r, j in enumerate(local)]
    return rows
