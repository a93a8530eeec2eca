"""Crash-safe file writing and process hygiene for the converter.

Nothing the converter writes is ever visible under its final name half-written: bytes go to
`<name>.tmp-<pid>`, are fsynced, then renamed over the final name (atomic on POSIX), and the
directory is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

TMP_MARK = ".tmp-"


def tmp_name(path: str) -> str:
    return f"{path}{TMP_MARK}{os.getpid()}"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, sync_dir: bool = True) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`."""
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(os.path.dirname(path) or ".")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path for a library to write; on success fsync it and rename it to `path`."""
    tmp = tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def remove_stale_temporaries(root: str) -> int:
    """Delete the temporaries an interrupted run left under `root`; returns how many."""
    removed = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            if TMP_MARK in name:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(dirpath, name))
                    removed += 1
    return removed


def die_with_parent(parent_pid: int) -> None:
    """Make this (child) process receive SIGKILL when its parent dies, so a `kill -9` of the
    converter leaves no orphaned workers behind. Linux only; elsewhere a no-op."""
    import signal

    if os.getppid() != parent_pid:
        # Started by a fork server or spawn helper, not by the converter itself: nothing to tie to.
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os._exit(1)
