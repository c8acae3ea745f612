"""The one reader of image files (extract.py's image folders, plot.py --montage's thumbnails): regular files only,
a pixel limit, and every failure one line naming the image, also from DataLoader worker processes.
"""
from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset, default_collate

from humelib.arrays import source_problem
from humelib.runtime import HumeError, first_line

if TYPE_CHECKING:
    from PIL.Image import Image


def shown(path: str) -> str:
    """path as a message can print it: as is, or escaped when it holds line breaks, control characters or bytes
    that are not UTF-8 (print would fail on those, or split the one line)."""
    return path if source_problem(path) is None and path.isprintable() else repr(path)


def check_image_files(paths: Iterable[str], flag: str) -> None:
    """Before any work: every path names a regular file (a FIFO named *.png would block the reader forever) whose
    name can be written to the sources file and read back as the same one line."""
    for path in paths:
        problem = source_problem(path)
        if problem:
            raise HumeError(f"{flag}: the file name {path!r} {problem}, so the sources file could not list it as "
                            "one line; rename the file")
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise HumeError(f"{flag}: {shown(path)} cannot be read ({e.strerror}); remove or fix it") from None
        if not stat.S_ISREG(mode):
            raise HumeError(f"{flag}: {shown(path)} is not a regular file (a FIFO, device or folder with an image's "
                            "name); remove it")


def read_image(path: str) -> Image:
    """The image at path as an RGB PIL image, decoded in full. Refuses a non-regular file (opened non-blocking, so
    a FIFO cannot hang us), more pixels than PIL's limit (a decompression bomb: a small file whose header claims,
    e.g., 30000 x 30000), and damaged or truncated data: a HumeError naming the image."""
    from PIL import Image
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise HumeError(f"{shown(path)}: cannot be read as an image ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HumeError(f"{shown(path)}: not a regular file (a FIFO, device or folder); remove it")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # above the limit: refuse, not warn
                with Image.open(f) as img:
                    return img.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise HumeError(f"{shown(path)}: too many pixels to decode safely ({first_line(e)}); shrink the image "
                            "or remove it") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's errors for unreadable or truncated data
            raise HumeError(f"{shown(path)}: cannot be read as an image ({type(e).__name__}: {first_line(e)}); "
                            "remove or replace it") from None


class Failed(str):
    """A read error's one line, carried back from a DataLoader worker as data: an exception raised there comes back
    wrapped in the worker's traceback."""


class CarryErrors(Dataset):
    """dataset with each item's HumeError returned as a Failed line instead of raised (see collate)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except HumeError as e:
            return Failed(str(e))


def collate(batch: list[Any]) -> Any:
    """DataLoader collate_fn for CarryErrors: the batch's first Failed line in place of the batch, if any."""
    failed = [item for item in batch if isinstance(item, Failed)]
    return failed[0] if failed else default_collate(batch)
