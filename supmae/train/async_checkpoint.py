"""Asynchronous checkpoint writing: a host snapshot taken while the loop waits, the file written by a thread.

A synchronous `atomic_save` of ViT-B/16 with its AdamW state (about 1.06 GiB) holds the training loop
for seconds: pickling, writing and fsyncing all happen while every rank waits. Here the loop waits
only for a copy of the payload into host memory (`HostSnapshot`), whose buffers are kept from one save
to the next (pinned when the source is on a GPU, so the copy is one DMA per tensor and one
synchronisation); serialising, writing, fsyncing and renaming then run on one background thread
(`CheckpointWriter`), while the next epoch trains.

One save is in flight at a time, because the host buffers are reused: a save waits for the previous
one first, and that wait is part of its reported stall. A failure of the background write is raised
in the caller at the next `save()` or `wait()`, naming the file. The file itself is still written by
`atomic_save` (temporary name, fsync, rename), so a kill at any moment leaves the previous checkpoint
under the final name; `SUPMAE_TEST_KILL_AT=snap=E` (`supmae.train.faults`) kills the process between
the snapshot and the start of the write.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from supmae.errors import UserError
from supmae.train import faults
from supmae.train.checkpoint import atomic_save, copy_checkpoint

__all__ = ["CheckpointWriteError", "CheckpointWriter", "HostSnapshot", "SaveStats"]

_Path = tuple[Hashable, ...]


class HostSnapshot:
    """Copies of a checkpoint payload in host memory, into buffers reused from one call to the next.

    `copy(payload)` walks dicts, lists and tuples; every tensor is copied into a CPU buffer kept for
    its position in the tree (its path of keys and indices), reallocated only when that position's
    shape or dtype changes (pinned when the source is on CUDA, so the copies are asynchronous DMAs
    and one synchronisation per device ends them). Everything else is deep-copied. The result is a
    new tree of the same containers holding the buffers: valid until the next `copy`, which
    overwrites them.

    Values are copied, not storage layouts: a view or a tensor sharing storage with another becomes a
    contiguous tensor of its own, with its dtype and shape (what `load_state_dict` and
    `torch.load(weights_only=True)` need).
    """

    def __init__(self) -> None:
        self._buffers: dict[_Path, tuple[torch.Tensor, bool]] = {}  # path -> (buffer, pinned)
        self.bytes = 0  # tensor bytes of the last copy
        self.allocated = 0  # buffers the last copy had to (re)allocate

    def copy(self, payload: Any) -> Any:
        """A host copy of `payload` (see the class docstring); returns once every copy has landed."""
        used: dict[_Path, tuple[torch.Tensor, bool]] = {}
        devices: set[torch.device] = set()
        self.bytes = self.allocated = 0
        with torch.no_grad():
            out = self._copy(payload, (), used, devices)
        for device in devices:
            torch.cuda.synchronize(device)  # the non_blocking copies above end here, once per device
        self._buffers = used  # positions gone from this payload free their buffers
        return out

    def _copy(self, obj: Any, path: _Path, used: dict[_Path, tuple[torch.Tensor, bool]],
              devices: set[torch.device]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path, used, devices)
        if isinstance(obj, dict):
            out = {} if type(obj) is dict else _empty_like_dict(obj)
            for key, value in obj.items():
                out[key] = self._copy(value, (*path, key), used, devices)
            return out
        if isinstance(obj, list):
            return [self._copy(v, (*path, i), used, devices) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            items = [self._copy(v, (*path, i), used, devices) for i, v in enumerate(obj)]
            if type(obj) is tuple:
                return tuple(items)
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # a namedtuple or torch.Size
        return copy.deepcopy(obj)

    def _tensor(self, t: torch.Tensor, path: _Path, used: dict[_Path, tuple[torch.Tensor, bool]],
                devices: set[torch.device]) -> torch.Tensor:
        if t.layout != torch.strided or t.is_quantized:
            return t.detach().to("cpu", copy=True)  # no plain buffer form: a fresh copy each time
        pin = t.is_cuda
        buf, pinned = self._buffers.get(path, (None, False))
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or pinned != pin:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self.allocated += 1
        buf.copy_(t, non_blocking=pin)
        if pin:
            devices.add(t.device)
        used[path] = (buf, pin)
        self.bytes += buf.nbytes
        return buf


def _empty_like_dict(obj: dict) -> dict:
    """An empty dict of `obj`'s class with its attributes (a state dict is an OrderedDict whose `_metadata`
    attribute carries the modules' versions, which `load_state_dict` reads)."""
    out = copy.copy(obj)
    out.clear()
    if getattr(obj, "__dict__", None):
        out.__dict__.update(copy.deepcopy(obj.__dict__))
    return out


@dataclass
class SaveStats:
    """One save's figures. The stall is what the caller waited: the previous save's end plus the snapshot;
    `write_seconds` is the background part (serialise, write, fsync, rename, then the copies)."""

    path: str
    copies: tuple[str, ...] = ()
    stall_seconds: float = 0.0
    wait_previous_seconds: float = 0.0
    snapshot_seconds: float = 0.0
    snapshot_bytes: int = 0  # tensor bytes copied to the host
    write_seconds: float = 0.0
    bytes: int = 0  # size of the written file
    done: bool = False  # the files are in place (a failure after this is on_done's)


class CheckpointWriteError(UserError):
    """A background checkpoint write failed on the filesystem (disk full, permissions, a missing
    directory); the message names the file and the cause."""


class CheckpointWriter:
    """Writes checkpoints on one background thread; the caller waits only for a host snapshot.

        with CheckpointWriter() as writer:
            for epoch in ...:
                train(...)
                stall = writer.save(payload, "run/checkpoint-last.pth", copies=["run/checkpoint-0009.pth"])

    The thread is an executor's worker (not a daemon): at interpreter exit a write in flight is
    finished, not torn.
    """

    def __init__(self) -> None:
        self.snapshot = HostSnapshot()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supmae-checkpoint")
        self._future: Future | None = None
        self._pending: SaveStats | None = None
        self._last: SaveStats | None = None
        self._closed = False

    def save(self, payload: Any, path: str, copies: Iterable[str] = (),
             on_done: Callable[[SaveStats], None] | None = None) -> float:
        """Snapshot `payload` to host memory and write it to `path` (then copy it to each of `copies`) in the
        background; `on_done(stats)` runs on the background thread once the files are in place. Returns the
        seconds this call blocked. Raises the previous save's failure, if any, before doing anything."""
        if self._closed:
            raise RuntimeError("CheckpointWriter.save() after close()")
        start = time.perf_counter()
        self._finish()
        snap_start = time.perf_counter()
        host = self.snapshot.copy(payload)
        snap_end = time.perf_counter()
        faults.after_snapshot(host)  # test hook (SUPMAE_TEST_KILL_AT=snap=E): a kill before the write starts
        stats = SaveStats(path=path, copies=tuple(copies), wait_previous_seconds=snap_start - start,
                          snapshot_seconds=snap_end - snap_start, snapshot_bytes=self.snapshot.bytes)
        stats.stall_seconds = time.perf_counter() - start  # set before the thread can hand `stats` to on_done
        self._pending = stats
        self._future = self._executor.submit(self._write, host, stats, on_done)
        return stats.stall_seconds

    def wait(self) -> SaveStats | None:
        """Block until no save is in flight; the last finished save's stats (None before any). Raises the
        failure of a save that failed."""
        self._finish()
        return self._last

    def close(self) -> None:
        """Wait for the save in flight (raising its failure) and stop the thread."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)

    def __enter__(self) -> CheckpointWriter:  # noqa: PYI034 (typing.Self needs Python 3.11; we support 3.10)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as failure:  # noqa: BLE001 - the body's exception goes on; this one is still told
            print(f"error: {failure}", file=sys.stderr)

    @staticmethod
    def _write(host: Any, stats: SaveStats, on_done: Callable[[SaveStats], None] | None) -> None:
        start = time.perf_counter()
        atomic_save(host, stats.path)
        stats.bytes = os.path.getsize(stats.path)
        for dst in stats.copies:
            copy_checkpoint(stats.path, dst)
        stats.write_seconds = time.perf_counter() - start
        stats.done = True
        if on_done is not None:
            on_done(stats)

    def _finish(self) -> None:
        """Wait for the save in flight; raise its failure once (the next call goes on)."""
        future, stats = self._future, self._pending
        if future is None or stats is None:
            return
        try:
            future.result()
        except Exception as exc:
            self._future = self._pending = None
            what = "on_done callback" if stats.done else "background checkpoint write"
            message = f"{what} of {stats.path} failed: {type(exc).__name__}: {exc}"
            # the filesystem's failures are the user's to fix (one line from the CLI); anything else is a bug
            raise (CheckpointWriteError if isinstance(exc, OSError) and not stats.done else RuntimeError)(
                message) from exc
        self._future = self._pending = None
        self._last = stats
