"""What is in each cluster: one row per non-empty cluster with its size and a few of its members, chosen to be
representative and diverse (selection.pick), as thumbnails of their image files, or as their texts for data
without images. plot.py --montage draws it.

Rows follow the cluster numbers, at most ROWS_PER_PAGE to a PNG (k = 100 makes five pages of 20 rows), every
thumbnail THUMB inches square at plot.py's DPI, so a page's pixel size is fixed by its number of rows.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np
from matplotlib.figure import Figure

from humelib.images import read_image
from humelib.selection import pick

ROWS_PER_PAGE = 20
THUMB = 0.8  # inches per thumbnail (and per row)
LABEL = 1.3  # inches for the row label (cluster number and size)
TITLE = 0.4  # inches for the page title

Group = tuple[int, int, list[int]]  # a row: (cluster, size, member rows)
T = TypeVar("T")


def groups(clusters: np.ndarray, phi: np.ndarray, per_cluster: int) -> list[Group]:
    """[(cluster, size, [member rows])] of every non-empty cluster, in cluster order; the members are picked in
    space phi, most representative first."""
    ids, sizes = np.unique(clusters, return_counts=True)
    members = {int(c): [] for c in ids}
    for i, c, _ in pick(clusters, phi, np.minimum(sizes, per_cluster)):
        members[c].append(i)
    return [(int(c), int(s), members[int(c)]) for c, s in zip(ids, sizes)]


def pages(rows: Sequence[T], per_page: int = ROWS_PER_PAGE) -> list[Sequence[T]]:
    """The rows split into pages of at most per_page rows, as evenly as possible (45 rows: 15, 15, 15)."""
    n_pages = -(-len(rows) // per_page)
    bounds = np.linspace(0, len(rows), n_pages + 1).round().astype(int)
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def page_size(n_rows: int, per_cluster: int) -> tuple[float, float]:
    """(width, height) of a page in inches."""
    return LABEL + per_cluster * THUMB, TITLE + n_rows * THUMB


def thumbnail(path: str, px: int) -> np.ndarray:
    """The image at path as a px x px RGB array, aspect kept, padded with white."""
    from PIL import Image, ImageOps
    img = read_image(path)
    small = max(img.size) < px  # tiny images (icons, 8x8 digits) are enlarged pixel by pixel, not blurred
    return np.asarray(ImageOps.pad(img, (px, px), Image.NEAREST if small else Image.BICUBIC, color="white"))


def thumbnails(rows: Sequence[Group], sources: Sequence[str], dpi: float) -> dict[int, np.ndarray]:
    """{row: thumbnail} of every member shown, all read before any page is drawn (a bad file writes no page)."""
    return {i: thumbnail(sources[i], round(THUMB * dpi)) for _, _, members in rows for i in members}


def draw_page(rows: Sequence[Group], images: Mapping[int, np.ndarray], per_cluster: int, dpi: float, title: str
              ) -> Figure:
    """One page: a row per (cluster, size, members), the members' thumbnails (images[row]) left to right."""
    width, height = page_size(len(rows), per_cluster)
    fig = Figure(figsize=(width, height), dpi=dpi)
    grid = fig.add_gridspec(len(rows), 1 + per_cluster, left=0.01, right=0.99, bottom=0.0, top=1 - TITLE / height,
                            width_ratios=[LABEL / THUMB] + [1] * per_cluster, wspace=0.06, hspace=0.06)
    for r, (c, size, members) in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        ax.axis("off")
        ax.text(0.0, 0.5, f"cluster {c}\n{size} point{'s' * (size != 1)}", va="center", ha="left", fontsize=10,
                transform=ax.transAxes)
        for j, i in enumerate(members):
            ax = fig.add_subplot(grid[r, 1 + j])
            ax.imshow(images[i], interpolation="nearest")
            ax.set_axis_off()
    fig.suptitle(title, y=1 - 0.5 * TITLE / height, va="center", fontsize=10)
    return fig


def text_rows(rows: Sequence[Group], texts: Sequence[str], width: int = 100) -> list[str]:
    """Lines for the terminal: a header per cluster, then its members' texts (shortened to width characters)."""
    lines = []
    for c, size, members in rows:
        lines.append(f"cluster {c} ({size} point{'s' * (size != 1)}):")
        for i in members:
            text = " ".join(texts[i].split())
            lines.append(f"  [{i}] " + (text if len(text) <= width else text[:width - 3] + "..."))
    return lines
