"""Writing a file so that a kill never leaves a half-written one under its final name."""

from __future__ import annotations

import os
from collections.abc import Callable


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Make `path` hold what `write(tmp)` writes to a temporary name beside it: the temporary is
    fsynced and renamed over `path`, then the directory is fsynced; it is removed when `write`
    (or anything after it) fails. The directory must exist."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename inside `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
