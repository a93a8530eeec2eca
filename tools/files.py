"""Crash-safe file writing and process hygiene for the converter.

Nothing the converter writes is ever visible under its final name half-written: bytes go to
`<name>.tmp-<pid>`, are fsynced, then renamed over the final name (atomic on POSIX), and the
directory is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

TMP_MARK = ".tmp-"

# Errors that say nothing about the input being read but that this machine ran out of something
# (descriptors, disk, memory): the conversion fails (resumable), never skips an image for them.
RESOURCE_ERRNOS = frozenset(
    e
    for e in (errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOMEM, getattr(errno, "EDQUOT", None), errno.EFBIG)
    if e is not None
)


def is_resource_error(exc: BaseException) -> bool:
    """MemoryError, or an OSError for a resource of this machine (file descriptors, disk, quota)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS)


def write_all(fd: int, data: bytes | memoryview) -> int:
    """`os.write` until every byte is written: a write may write fewer bytes than asked (a full
    disk, a file-size limit), and a byte left out would shift everything written after it."""
    view = memoryview(data)
    total = len(view)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, f"write wrote {n} of {len(view)} bytes")
        view = view[n:]
    return total


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    """`os.pwrite` until every byte is written at `offset` (see `write_all`)."""
    view = memoryview(data)
    total = len(view)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite wrote {n} of {len(view)} bytes at {offset}")
        view = view[n:]
        offset += n
    return total


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


class OutLock:
    """An exclusive `flock` on a file (the converter's `OUT/.work/convert.lock`) naming its holder,
    as the trainer locks its run directories: a second conversion or merge into the same OUT
    would delete the first one's pieces and temporaries as leftovers of a dead run. The kernel
    drops the lock when the holder dies (kill -9 included), so no stale lock is ever left."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> str:
        """Take the lock: "" on success, else a one-line refusal naming the holder. On a filesystem
        that cannot flock (some network mounts) the conversion goes on unlocked: refusing would
        make the converter unusable there."""
        import fcntl
        import json
        import socket
        import time

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC: the holder's line is in it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return self.holder()
            except OSError:
                os.close(fd)
                return ""
            # The holder may have deleted the file (a finished conversion removes OUT/.work) between
            # our open and our flock: a lock on a deleted file guards nothing; take the new file's.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        _HELD_LOCKS.append(self)
        line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n"
        os.ftruncate(fd, 0)
        pwrite_all(fd, line.encode(), 0)
        return ""

    def holder(self) -> str:
        """ "pid N on host H" from the lock file, as its holder wrote it."""
        import json

        try:
            with open(self.path, encoding="utf-8") as fh:
                info = json.loads(fh.readline())
            return f"pid {int(info['pid'])} on host {info['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its pid yet"

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if self in _HELD_LOCKS:
            _HELD_LOCKS.remove(self)


_HELD_LOCKS: list[OutLock] = []


def _close_locks_in_child() -> None:
    # A flock belongs to the open file, which forked workers share: were they to keep their copy, a
    # kill -9 of the converter would leave OUT locked until they noticed and exited.
    for held in _HELD_LOCKS:
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
        held.fd = None
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)
