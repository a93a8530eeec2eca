"""The converter's parallel work: a bounded, ordered process pool, and the per-sample tasks it runs,
so that the main process handles small records only and never holds image bytes.

Why not `multiprocessing.Pool.imap`: it lets workers run arbitrarily far ahead of the consumer (at
64 workers on slow storage the parent held an unbounded number of encoded JPEGs), and it pickles
and unpickles in helper threads whose time nobody can attribute. `OrderedPool` keeps at most
`max_in_flight` tasks submitted and not yet taken back, returns results in submission order, does
all of its pickling in the calling thread, and counts the time that thread waits for workers, so
the rest of the main process's time is known: it is the conversion's serial part.

What the workers do, per chunk of a split (one webdataset shard):

1. `encode_piece`: a run of consecutive samples (a piece) is read, encoded (`tools/imageio.py`)
   and written to a piece file as the tar members it becomes (`<key>.jpg`, `.cls`, `.label`);
   only sizes and skip reasons go back.
2. `stitch_chunk`: once every piece of the chunk is back, the pieces are concatenated in the
   kernel (`os.copy_file_range`) into the shard under a temporary name, the tar end is appended,
   the DALI index is computed from the member sizes, both are renamed into place, then the chunk's
   record (the resume commit point) is written and the pieces deleted.
3. After the last chunk, the `.beton` layout is computed from the sample sizes in the main process
   and the workers copy each JPEG from its shard into its place (`tools/beton.py`).

A tar member's header does not depend on where the member lies, so pieces concatenate into the
same bytes as a shard written in one go; tests compare both with `tools.shards.build_shard`.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

from tools.faults import poison_point
from tools.files import atomic_write, die_with_parent, fsync_dir, is_resource_error, tmp_name, write_all
from tools.imageio import DEFAULT_MAX_PIXELS, SkipImage, encode_bytes, read_source
from tools.shards import member_bytes, shard_index, tar_end
from tools.wids import file_md5

# Samples per encoding task. Small enough that a 1,000-image chunk keeps 16 workers busy and the
# last tasks of a run end together; large enough that a task's fixed cost (a message each way, one
# piece file) stays near 1% of encoding its images.
DEFAULT_PIECE_SIZE = 32
# Tasks in flight per worker: one running, the rest ready so that no worker waits for the main
# process; all of them small records (the JPEG bytes stay in the piece files).
IN_FLIGHT_PER_WORKER = 4


# ----------------------------------------------------------------------------------------------
# The pool


class TaskLost(RuntimeError):
    """A task whose worker never answered: the process died (`WorkerDied`) or the task ran past its
    time limit and the pool killed it (`TaskTimedOut`). The pool has started a fresh worker in its
    place and goes on; `tag` is the lost task's tag (set when `next()` raises it)."""

    tag: Any = None


class WorkerDied(TaskLost):
    """A worker process ended without answering (crashed in native code, or killed)."""

    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode
        self.signal = -exitcode if exitcode is not None and exitcode < 0 else None
        super().__init__(f"a worker process ended without answering ({self.how})")

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"

    @property
    def how(self) -> str:
        if self.signal is not None:
            return f"killed by {self.signal_name}"
        return f"exit status {self.exitcode}" if self.exitcode is not None else "exit status unknown"


class TaskTimedOut(TaskLost):
    """A task spent more than its limit on one unit of work (`task_progress`); its worker was killed."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        super().__init__(f"a task made no progress for {limit:g} s; its worker process was killed")


@dataclass
class RunStats:
    """What one conversion's pool saw; filled in by `convert(..., stats=RunStats())`."""

    max_in_flight: int = 0
    peak_in_flight: int = 0  # most tasks ever submitted and not yet taken back at once
    wait_seconds: float = 0.0  # time the main process spent blocked waiting for a worker
    elapsed_seconds: float = 0.0

    @property
    def main_busy_seconds(self) -> float:
        """The main process's own work: everything but waiting for workers (serial at any scale)."""
        return max(self.elapsed_seconds - self.wait_seconds, 0.0)


# Set in each worker process: (the pool's shared array of start times, this worker's slot in it).
_PROGRESS: tuple[Any, int] | None = None


def task_progress() -> None:
    """Called by a task as it starts each unit of its work (an image): a task with a time limit is
    lost when one unit takes longer than the limit, however many units it holds. A no-op outside a
    pool's worker process."""
    if _PROGRESS is not None:
        started, slot = _PROGRESS
        started[slot] = time.monotonic()


def _worker_main(
    conn: multiprocessing.connection.Connection,
    slot: int,
    started: Any,
    initializer: Callable | None,
    initargs: tuple,
) -> None:
    global _PROGRESS
    _PROGRESS = (started, slot)
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        seq, fn, arg = message
        try:
            reply = (seq, True, fn(arg))
        except BaseException as exc:  # noqa: BLE001 - handed to the main process, which raises it
            try:
                reply = (seq, False, exc)
                conn.send(reply)
                continue
            except Exception:  # noqa: BLE001 - an exception that does not pickle goes back as text
                reply = (seq, False, RuntimeError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        conn.send(reply)


@dataclass
class _Worker:
    proc: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    used: bool = False  # has run a task (a `fresh` task gets a new process instead)


class OrderedPool:
    """Tasks run in `workers` processes (0: in the calling process, at submission); results come
    back from `next()` in submission order; `submit` refuses a task while `max_in_flight` are out.

    A worker that dies (a crash in native code, a signal) or a task that passes its time limit
    (`submit(..., limit=)`, per `task_progress` unit; the worker is killed) loses only the task it
    was running: `next()` raises `WorkerDied` / `TaskTimedOut` for that task, with its tag, and a
    fresh worker takes the slot. A task submitted with `fresh=True` runs in a process that has run
    nothing before, so that what an earlier task did to a worker's state cannot touch it. With
    `workers=0` nothing is isolated: `limit` and `fresh` are ignored and a crash is the caller's.

    Use as a context manager: leaving it normally stops the workers, leaving it with an exception
    kills them."""

    def __init__(
        self,
        workers: int,
        max_in_flight: int | None = None,
        initializer: Callable | None = None,
        initargs: tuple = (),
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self.max_in_flight = max_in_flight if max_in_flight is not None else max(1, IN_FLIGHT_PER_WORKER * workers)
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        self.peak_in_flight = 0
        self.wait_seconds = 0.0
        self.replaced_workers = 0  # workers started in place of a dead, stuck or used one
        self._submitted = 0
        self._returned = 0
        self._queue: deque[tuple[int, Callable, Any, float | None, bool]] = deque()
        self._done: dict[int, tuple[bool, Any]] = {}
        self._tags: dict[int, Any] = {}
        self._initializer = initializer
        self._initargs = initargs
        self._slots: list[_Worker] = []
        self._idle: list[int] = []  # slots
        self._busy: dict[int, tuple[int, float | None]] = {}  # slot -> (seq, limit)
        if workers == 0:
            if initializer is not None:
                initializer(*initargs)
            return
        self._ctx = multiprocessing.get_context()
        # Per slot, when its task started its current unit of work (time.monotonic, which is one
        # clock for every process of the machine): written by the worker, read here.
        self._started = self._ctx.RawArray("d", workers)
        for slot in range(workers):
            self._slots.append(self._start(slot))
            self._idle.append(slot)

    def _start(self, slot: int) -> _Worker:
        mine, theirs = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(theirs, slot, self._started, self._initializer, self._initargs), daemon=True
        )
        proc.start()
        theirs.close()
        return _Worker(proc, mine)

    def _replace(self, slot: int, how: str) -> int | None:
        """End the worker in `slot` and start a fresh one there; returns the old one's exit code.
        `how`: "kill" (SIGKILL), "dead" (it is exiting: reap it), "stop" (idle: ask it to return)."""
        old = self._slots[slot]
        if how == "kill":
            old.proc.kill()
        elif how == "stop":
            with contextlib.suppress(OSError):
                old.conn.send(None)
        old.proc.join(timeout=5)
        if old.proc.exitcode is None:  # it did not end when asked, or its pipe broke while it lives on
            old.proc.kill()
            # A process stuck in uninterruptible I/O (a hung network mount) dies only when the I/O
            # returns: it is left to die on its own (PDEATHSIG ties it to this process), never waited for.
            old.proc.join(timeout=5)
        old.conn.close()
        self._slots[slot] = self._start(slot)
        self.replaced_workers += 1
        return old.proc.exitcode

    def _lose(self, slot: int, error: TaskLost, how: str) -> None:
        """The busy worker in `slot` will not answer: its task fails with `error`, a fresh worker
        takes the slot."""
        seq, _ = self._busy.pop(slot)
        exitcode = self._replace(slot, how)
        if isinstance(error, WorkerDied) and error.exitcode is None:
            error = WorkerDied(exitcode)
        self._done[seq] = (False, error)
        self._idle.append(slot)

    @property
    def in_flight(self) -> int:
        return self._submitted - self._returned

    def has_room(self) -> bool:
        return self.in_flight < self.max_in_flight

    def submit(
        self, fn: Callable[[Any], Any], arg: Any, tag: Any = None, limit: float | None = None, fresh: bool = False
    ) -> None:
        """Queue `fn(arg)` (a module-level function: it is pickled by name). `limit`: seconds the
        task may spend on one unit of its work (see `task_progress`; None: no limit); `fresh`: run
        it in a process that ran nothing before."""
        if not self.has_room():
            raise RuntimeError(f"{self.max_in_flight} tasks already in flight; take a result back first")
        seq = self._submitted
        self._submitted += 1
        self._tags[seq] = tag
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        if self.workers == 0:
            self._done[seq] = (True, fn(arg))
            return
        self._queue.append((seq, fn, arg, limit if limit else None, fresh))
        self._dispatch()

    def next(self) -> tuple[Any, Any]:
        """(tag, result) of the oldest task not yet taken back; raises what the task raised, or
        `TaskLost` (with `.tag`) when its worker died or it passed its limit."""
        if self.in_flight == 0:
            raise RuntimeError("no task in flight")
        seq = self._returned
        while seq not in self._done:
            self._dispatch()
            conns = {self._slots[slot].conn: slot for slot in self._busy}
            timeout = self._until_first_deadline()
            t0 = time.perf_counter()
            ready = multiprocessing.connection.wait(list(conns), timeout)
            self.wait_seconds += time.perf_counter() - t0
            for conn in ready:
                slot = conns[conn]
                try:
                    got, ok, value = conn.recv()
                except (EOFError, OSError):
                    self._lose(slot, WorkerDied(None), "dead")
                    continue
                del self._busy[slot]
                self._idle.append(slot)
                self._done[got] = (ok, value)
            self._kill_overdue()
        self._dispatch()
        ok, value = self._done.pop(seq)
        self._returned += 1
        tag = self._tags.pop(seq)
        if not ok:
            if isinstance(value, TaskLost):
                value.tag = tag
            raise value
        return tag, value

    def _until_first_deadline(self) -> float | None:
        deadlines = [self._started[slot] + limit for slot, (_, limit) in self._busy.items() if limit is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic()) + 0.01

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for slot, (_, limit) in list(self._busy.items()):
            if limit is None or now - self._started[slot] <= limit:
                continue
            if self._slots[slot].conn.poll(0):
                continue  # it answered (or died) just now: read that first
            self._lose(slot, TaskTimedOut(limit), "kill")

    def run_all(self, fn: Callable[[Any], Any], args: Iterable[Any]) -> list[Any]:
        """`fn` over `args`, results in order, never more than `max_in_flight` out at once."""
        assert self.in_flight == 0, "run_all needs an idle pool"
        results: list[Any] = []
        for arg in args:
            if not self.has_room():
                results.append(self.next()[1])
            self.submit(fn, arg)
        while self.in_flight:
            results.append(self.next()[1])
        return results

    def _dispatch(self) -> None:
        # One task per worker at a time: a worker is sent work only after its answer was read,
        # so neither side can block writing into a pipe the other is not reading.
        while self._idle and self._queue:
            seq, fn, arg, limit, fresh = self._queue.popleft()
            slot = self._idle.pop()
            if fresh and self._slots[slot].used:
                self._replace(slot, "stop")
            for attempt in (0, 1):
                worker = self._slots[slot]
                self._started[slot] = time.monotonic()
                try:
                    worker.conn.send((seq, fn, arg))
                    break
                except OSError:  # it died while idle: one fresh try
                    if attempt:
                        raise
                    self._replace(slot, "dead")
            worker.used = True
            self._busy[slot] = (seq, limit)

    def close(self, kill: bool = False) -> None:
        if not kill:
            for worker in self._slots:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        for worker in self._slots:
            if kill:
                worker.proc.kill()
            worker.proc.join(timeout=None if not kill else 5)
        for worker in self._slots:
            worker.conn.close()
        self._slots, self._idle, self._busy = [], [], {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(kill=exc_type is not None)


# ----------------------------------------------------------------------------------------------
# Worker state


_WORKER_ARGS: tuple[int, int, int] = (256, 90, DEFAULT_MAX_PIXELS)


def init_worker(max_res: int, quality: int, max_pixels: int, parent_pid: int) -> None:
    """Each worker's start: the encoding options, and its ties to the converter process."""
    global _WORKER_ARGS
    _WORKER_ARGS = (max_res, quality, max_pixels)
    if os.getpid() != parent_pid:
        # Ctrl-C is the parent's to handle (it stops the pool); workers would only print tracebacks.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        die_with_parent(parent_pid)


# Archives a worker keeps open, least recently read closed first. Samples come in a random order,
# so a worker reads from every archive of its split sooner or later: one descriptor per archive
# would pass the usual soft limit of 1,024 on imagenet-1k-wds alone (1,088 tars). A chunk of 1,000
# samples drawn from a thousand tars reopens most of them either way; an open costs microseconds.
MAX_OPEN_ARCHIVES = 32
_ARCHIVE_FDS: OrderedDict[str, int] = OrderedDict()


def _archive_fd(path: str) -> int:
    fd = _ARCHIVE_FDS.get(path)
    if fd is not None:
        _ARCHIVE_FDS.move_to_end(path)
        return fd
    while len(_ARCHIVE_FDS) >= MAX_OPEN_ARCHIVES:
        os.close(_ARCHIVE_FDS.popitem(last=False)[1])
    fd = _ARCHIVE_FDS[path] = os.open(path, os.O_RDONLY)
    return fd


def _read_range(path: str, offset: int, size: int) -> bytes:
    """The bytes of one archive member: one pread of its range (at most MAX_OPEN_ARCHIVES stay open)."""
    data = os.pread(_archive_fd(path), size, offset)
    if len(data) != size:
        raise SkipImage("truncated", f"archive ended after {len(data)} of the member's {size} bytes")
    return data


def encode_source(path: str, offset: int, size: int) -> tuple:
    """("ok", jpeg, width, height, source bytes) or ("skip", code, detail, source bytes).

    (path, -1, -1) is a plain file, (archive path, offset, size) an archive member. A shortage of
    this machine (descriptors, disk, memory: `is_resource_error`) is raised, never a skip."""
    max_res, quality, max_pixels = _WORKER_ARGS
    poison_point(path, offset)  # a test hook (tools/faults.py): inert unless SUPMAE_TEST_POISON is set
    try:
        data = read_source(path) if offset < 0 else _read_range(path, offset, size)
    except SkipImage as exc:
        return ("skip", exc.code, exc.detail, 0)
    except OSError as exc:
        if is_resource_error(exc):
            raise
        return ("skip", "unreadable", exc.strerror or str(exc), 0)
    try:
        enc = encode_bytes(data, max_res, quality, max_pixels)
    except SkipImage as exc:
        return ("skip", exc.code, exc.detail, len(data))
    return ("ok", enc.jpeg, enc.width, enc.height, len(data))


# ----------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class PieceTask:
    path: str  # the piece file to write (a temporary name: a resume deletes leftovers)
    items: list[tuple[str, int, int, str, int]]  # per sample: (path, offset, size, key, label)


@dataclass(frozen=True)
class PieceResult:
    path: str | None  # None when every sample of the piece was skipped
    nbytes: int
    # Per sample: ("ok", jpeg bytes, width, height, source bytes, CRC-32 of the JPEG) or
    # ("skip", code, detail, source bytes).
    results: list[tuple]


def encode_piece(task: PieceTask) -> PieceResult:
    """Encode a run of samples and write the tar members they become to the piece file."""
    parts: list[bytes] = []
    results = []
    for path, offset, size, key, label in task.items:
        task_progress()  # the time limit (--decode-timeout) counts per image
        res = encode_source(path, offset, size)
        if res[0] == "ok":
            _, jpeg, width, height, nbytes = res
            parts.append(member_bytes(key, jpeg, label))
            results.append(("ok", len(jpeg), width, height, nbytes, zlib.crc32(jpeg)))
        else:
            results.append(res)
    if not parts:
        return PieceResult(None, 0, results)
    data = b"".join(parts)
    path = tmp_name(task.path)
    with open(path, "wb") as f:
        f.write(data)
    return PieceResult(path, len(data), results)


@dataclass(frozen=True)
class StitchTask:
    out: str
    tar_path: str  # final name of the shard (absolute)
    idx_path: str | None  # final name of its DALI index, None when the shard is only a .beton source
    record_path: str
    pieces: list[str]  # piece files, in order
    keys: list[str]  # per converted sample
    jpeg_sizes: list[int]
    record: dict  # the chunk record without its file entries and offsets


def copy_file(src: str, dst_fd: int) -> int:
    """Append all of `src` to `dst_fd` in the kernel (no copy through Python); returns bytes copied."""
    total = 0
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        use_kernel = hasattr(os, "copy_file_range")
        while total < size:
            if use_kernel:
                try:
                    n = os.copy_file_range(f.fileno(), dst_fd, size - total)
                except OSError:
                    # Filesystems or kernels without it (EXDEV, ENOSYS, EINVAL): plain copy.
                    use_kernel = False
                    f.seek(total)
                    continue
            else:
                chunk = f.read(min(size - total, 8 << 20))
                n = len(chunk)
                if n:
                    write_all(dst_fd, chunk)
            if n == 0:
                raise OSError(f"{src}: ended after {total} of {size} bytes")
            total += n
    return total


def stitch_chunk(task: StitchTask) -> dict:
    """Join a chunk's pieces into its shard and index under their final names, then write its
    record (the commit point a resume trusts); returns the record."""
    rec = dict(task.record)
    rec["samples"] = [list(row) for row in rec["samples"]]
    if task.pieces:
        labels = [row[2] for row in rec["samples"]]
        index, jpeg_offsets = shard_index(task.keys, task.jpeg_sizes, labels)
        os.makedirs(os.path.dirname(task.tar_path), exist_ok=True)
        tmp = tmp_name(task.tar_path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            length = sum(copy_file(piece, fd) for piece in task.pieces)
            end = tar_end(length)
            write_all(fd, end)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, task.tar_path)
        rec["tar"] = os.path.relpath(task.tar_path, task.out)
        rec["tar_bytes"] = length + len(end)
        if task.idx_path is not None:
            atomic_write(task.idx_path, index, sync_dir=False)
            rec["idx"] = os.path.relpath(task.idx_path, task.out)
            rec["idx_bytes"] = len(index)
            # The wids index lists each shard's md5: taken here, in parallel, from the page cache,
            # rather than by the main process re-reading every shard at the end.
            rec["md5"] = file_md5(task.tar_path)
        fsync_dir(os.path.dirname(task.tar_path))
        for row, offset, size in zip(rec["samples"], jpeg_offsets, task.jpeg_sizes):
            row.extend([offset, size])
    os.makedirs(os.path.dirname(task.record_path), exist_ok=True)
    atomic_write(task.record_path, json.dumps(rec).encode())
    for piece in task.pieces:
        os.remove(piece)
    return rec
