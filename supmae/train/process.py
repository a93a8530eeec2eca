"""This process: when it started, the torch settings it changes, and its record in the run directory.

The record is how device time is counted honestly. Rank 0 keeps one small JSON file per process in
`<run>/processes/` and rewrites it (atomically: a temporary file and a rename) at every log point,
epoch end and checkpoint, and every `HEARTBEAT_SECONDS` of training: its start, the world size it
ran at, the epoch it began at, when each checkpoint it wrote was complete, and its latest heartbeat.
A process killed with SIGKILL leaves its record as of its last heartbeat, so its span (start to
last heartbeat, times its own world size) still counts, and the report can tell how much of it was
redone after the resume (the work after the checkpoint the next process resumed from).

From the first second: rank 0 writes the record as soon as it holds the run directory's lock
(`open_early_record`, before the loaders, DDP and the model are built; the Engine adopts it), and
a background thread rewrites it every `HEARTBEAT_SECONDS` whatever the main thread is doing (set-up,
compilation, a long first step, an evaluation, a save), so a kill at any moment hides at most that
much device time. A record no Engine adopted (the job found nothing to do, or its set-up raised) is
removed when the job ends normally: only a process that was killed keeps such a record.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import threading
import time
from typing import Any

import torch

PROCESSES_DIR = "processes"
# Seconds of training between two heartbeats inside an epoch (besides those at log points): the
# device time a SIGKILL can hide from the books is at most this, plus one log window.
HEARTBEAT_SECONDS = 10.0


@contextlib.contextmanager
def process_settings() -> Any:
    """Put back the process-wide torch settings a run changes (deterministic algorithms, intra-op
    threads), for callers of the Python API that run several jobs in one process."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.set_num_threads(saved[1])


def set_cpu_threads(threads: int) -> None:
    """`--train.cpu_threads`, applied after the loaders are built: FFCV's loader constructor sets torch's
    thread count itself, and the user's value must win."""
    if threads:
        torch.set_num_threads(threads)


_JOBS_STARTED_IN_THIS_PROCESS = 0


def process_start_time(run_call: float | None = None) -> tuple[float, str]:
    """(unix time this process started, "process") from /proc on Linux, so that startup_seconds includes
    the interpreter start and imports; (`run_call` or now, "run_call") where that cannot be read, and for
    every job after the first one of a process (the demo runs pretraining, then a probe, in one
    process: the probe's start-up must not include the whole pretraining)."""
    global _JOBS_STARTED_IN_THIS_PROCESS
    _JOBS_STARTED_IN_THIS_PROCESS += 1
    fallback = (run_call if run_call is not None else time.time(), "run_call")
    if _JOBS_STARTED_IN_THIS_PROCESS > 1:
        return fallback
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after the ")" that ends the command
        with open("/proc/stat", encoding="ascii") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK"), "process"
    except (OSError, ValueError, IndexError, StopIteration):
        return fallback


def read_process_records(run_dir: str) -> list[dict[str, Any]]:
    """Every process record of `run_dir`, oldest start first (unreadable files are skipped: a record
    is replaced by a rename, so a complete file is always there unless someone else damaged it)."""
    records = []
    for path in glob.glob(os.path.join(run_dir, PROCESSES_DIR, "*.json")):
        try:
            with open(path, encoding="utf-8") as fh:
                row = json.load(fh)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(row, dict) and isinstance(row.get("start"), (int, float)):
            records.append(row)
    return sorted(records, key=lambda r: float(r["start"]))


def process_span(record: dict[str, Any]) -> float:
    """Seconds from a process's start to its last heartbeat."""
    return max(0.0, float(record.get("heartbeat", record["start"])) - float(record["start"]))


class ProcessRecord:
    """Rank 0's record of this process in `<run>/processes/` (a no-op object on the other ranks)."""

    def __init__(self, run_dir: str, writer: bool, *, job: str, world_size: int, device: str, start_epoch: int,
                 started: float, started_from: str):
        self.writer = writer
        self.row: dict[str, Any] = {
            "job": job, "pid": os.getpid(), "host": socket.gethostname(), "start": started,
            "start_from": started_from, "world_size": world_size, "device": device, "start_epoch": start_epoch,
            "first_step": None, "heartbeat": started, "saves": [], "ended": False, "energy_kwh": None,
        }
        self.name = f"{int(started * 1000)}-{socket.gethostname()}-{os.getpid()}"
        self.path = os.path.join(run_dir, PROCESSES_DIR, f"{self.name}.json")
        self.last_beat = 0.0  # perf_counter of the latest write
        self._lock = threading.Lock()  # the main thread and the heartbeat thread both write
        self._stop: threading.Event | None = None

    def beat(self, **updates: Any) -> None:
        """Rewrite the record with `updates` and the heartbeat set to now. Host-side file work only."""
        if not self.writer:
            return
        with self._lock:
            self.row.update(updates)
            self.row["heartbeat"] = time.time()
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.tmp"
            # No fsync: the rename is atomic against a killed process, which is what the record must
            # survive; an fsync per heartbeat would cost more than the heartbeat is worth.
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(self.row) + "\n")
            os.replace(tmp, self.path)
            self.last_beat = time.perf_counter()

    def start_heartbeat(self, interval: float = HEARTBEAT_SECONDS) -> None:
        """Beat every `interval` seconds on a daemon thread until `stop_heartbeat` (or the job's end)."""
        if not self.writer or self._stop is not None:
            return
        stop = self._stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                try:
                    self.beat()
                except OSError:  # a full disk must not kill the job from a side thread; the next beat retries
                    pass

        threading.Thread(target=run, name="supmae-heartbeat", daemon=True).start()
        _BEATING.append(self)

    def stop_heartbeat(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self in _BEATING:
            _BEATING.remove(self)

    def due(self) -> bool:
        """Whether HEARTBEAT_SECONDS have passed since the last write."""
        return self.writer and time.perf_counter() - self.last_beat >= HEARTBEAT_SECONDS

    def saved(self, epoch: int, step: int | None = None) -> None:
        """The checkpoint after global step `step` (last complete epoch `epoch`) is on disk: the work up to it
        survives a kill. Called from the checkpoint writer's thread; `beat` holds the lock."""
        if self.writer:
            with self._lock:
                self.row["saves"].append([epoch, time.time(), step])
            self.beat()

    def span(self) -> float:
        """Seconds from this process's start to now."""
        return max(0.0, time.time() - float(self.row["start"]))


_BEATING: list[ProcessRecord] = []
_EARLY: dict[str, ProcessRecord] = {}


def open_early_record(run_dir: str, *, world_size: int, start_epoch: int) -> None:
    """Rank 0, right after taking the run directory's lock: write this process's record now and keep
    it beating, so a kill during set-up still counts (see the module docstring)."""
    started, source = process_start_time()
    record = ProcessRecord(
        run_dir,
        True,
        job="",
        world_size=world_size,
        device="",
        start_epoch=start_epoch,
        started=started,
        started_from=source,
    )
    record.beat()
    record.start_heartbeat()
    _EARLY[os.path.abspath(run_dir)] = record


def take_early_record(run_dir: str) -> ProcessRecord | None:
    """The record `open_early_record` wrote for `run_dir` in this process, now the caller's."""
    return _EARLY.pop(os.path.abspath(run_dir), None)


def end_job_records() -> None:
    """At a job's end (normal or by an exception): stop every heartbeat thread, and remove the records
    that no Engine adopted (nothing to do, or a set-up error): that process trained nothing."""
    while _BEATING:
        _BEATING[-1].stop_heartbeat()
    for record in _EARLY.values():
        with record._lock, contextlib.suppress(OSError):  # after a beat the thread may be finishing
            os.remove(record.path)
        with contextlib.suppress(OSError):  # the folder too, when this record was all it held
            os.rmdir(os.path.dirname(record.path))
    _EARLY.clear()


def previous_processes(run_dir: str, this: ProcessRecord) -> list[dict[str, Any]]:
    """The records of the run's earlier processes (every one but `this`)."""
    return [
        r
        for r in read_process_records(run_dir)
        if (r.get("pid"), r.get("start")) != (this.row["pid"], this.row["start"])
    ]
