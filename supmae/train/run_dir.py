"""The run directory of a training run (pretrain, finetune, linprobe): `config.json`, `log.jsonl`,
`steps.jsonl`, `starts.jsonl` (one line per process start), checkpoints and `run.lock`.

Only the writer (rank 0) touches files; other ranks hold a `RunDir` with `writer=False` whose
methods do nothing. JSON-lines files are appended one flushed line at a time, so a killed run
leaves every completed line readable; on resume, lines past the resumed checkpoint are dropped
(they describe work that is about to be redone).

One job at a time: rank 0 holds an `fcntl.flock` on `run.lock` for the job's life (`RunDir.lock`,
released by `job_locks` when the job ends) and writes its pid and host into it, so a second job
started on the same directory (a double launch, a requeue while the old job still runs) stops at
once, naming the holder. The kernel drops the lock when the holder dies, kill -9 included: no
stale lock is ever left to clean up. At the start the lock is checked on the file system itself
(`flock_excludes`): one that ignores flock, or holds it on this host only, is named in one warning.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from supmae.train import faults

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
STEPS_FILE = "steps.jsonl"
SAMPLES_FILE = "samples.jsonl"
STARTS_FILE = "starts.jsonl"
LOCK_FILE = "run.lock"
TB_DIR = "tb"
# Where `--resume auto` moves the books of a run that was stopped before its first checkpoint.
INTERRUPTED_PREFIX = "interrupted-"


class RunDirLock:
    """An exclusive `flock` on `<run dir>/run.lock`, naming its holder in the file."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self, log: Callable[[str], None] = print) -> str:
        """Take the lock: "" on success, else a one-line refusal naming the holder. On a filesystem that
        cannot flock (some network mounts) the job goes on unlocked, with a warning through `log`:
        refusing would make the trainer unusable there."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC: the holder's line is in it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return (f"run directory {os.path.dirname(self.path)} is in use by another job ({self.holder()}); "
                    f"wait for it to end, or choose another --output-dir")
        except OSError as exc:
            os.close(fd)
            log(f"warning: cannot lock {self.path} ({exc.strerror}): nothing stops a second job from writing "
                f"this run directory at the same time")
            return ""
        self.fd = fd
        _HELD.append(self)
        why = flock_excludes(self.path)
        if why:
            log(f"warning: {why}: nothing stops a second job from writing {os.path.dirname(self.path)} at the same time")
        line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, line.encode(), 0)
        return ""

    def holder(self) -> str:
        """"pid N on host H" from the lock file, as its holder wrote it."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                info = json.loads(fh.readline())
            return f"pid {int(info['pid'])} on host {info['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            # The holder took the lock a moment ago and has not written its line yet.
            return "its pid is not written yet"

    def release(self) -> None:
        """Empty the file (it names a holder only while one holds it) and drop the lock."""
        if self.fd is None:
            return
        import fcntl

        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if self in _HELD:
            _HELD.remove(self)


_HELD: list[RunDirLock] = []


def mount_of(path: str) -> tuple[str, set[str]]:
    """(file system type, mount options) of the mount holding `path`, from /proc/self/mounts ("" where
    unknown)."""
    best, kind, options = "", "", set()
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 4:
                    continue
                point = fields[1].replace("\\040", " ")
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, kind, options = point, fields[2], set(fields[3].split(","))
    except OSError:
        pass
    return kind, options


def host_local_flock(kind: str, options: set[str]) -> str:
    """Why flock on a mount of `kind` with `options` excludes on this host only, or "" (a local file system,
    NFS with its default flock emulation by byte-range locks, Lustre mounted with -o flock)."""
    if kind.startswith("nfs") and (options & {"local_lock=flock", "local_lock=all", "nolock"}):
        return f"{kind} mounted with {','.join(sorted(options & {'local_lock=flock', 'local_lock=all', 'nolock'}))}"
    if kind == "lustre" and "localflock" in options:
        return "lustre mounted with localflock"
    if kind.startswith("fuse"):
        return f"{kind}, a FUSE file system"
    return ""


def flock_excludes(lock_path: str) -> str:
    """"" when the flock held on `lock_path` (by this process, through another open file) keeps a second open
    file from taking it, as it keeps a second job; else one line saying why the lock does not protect the run
    directory. Two opens of one file conflict under flock even within a process, so a file system that
    ignores flock shows here, at the job's start. A mount whose flock holds on this host only (a second job
    on another host would not be stopped) is named too."""
    import fcntl

    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        took = True
    except BlockingIOError:
        took = False
    except OSError as exc:
        return f"cannot check the lock on {lock_path} ({exc.strerror})"
    finally:
        os.close(fd)  # closing also drops a lock this open took
    if took:
        return f"the file system of {lock_path} does not enforce flock (a second open took the held lock)"
    local = host_local_flock(*mount_of(os.path.realpath(lock_path)))
    if local:
        return f"{lock_path} is on {local}: its flock holds on this host only, a job on another host is not stopped"
    return ""


def _close_in_child() -> None:
    # A flock belongs to the open file, which forked children (DataLoader workers) share: were they to
    # keep their copy, a kill -9 of the job would leave the lock held until they noticed and exited.
    # Closing the child's copy leaves the parent's lock in place.
    for held in _HELD:
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
        held.fd = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


@contextlib.contextmanager
def job_locks() -> Iterator[None]:
    """Release, when the block ends (normally or by an exception), the run-directory locks taken inside it:
    the job's life, also in a process that runs several jobs (the demo, the tests, the Python API)."""
    from supmae.train.process import end_job_records

    before = len(_HELD)
    try:
        yield
    finally:
        end_job_records()  # heartbeat threads stop; a record no Engine adopted is removed
        for held in list(_HELD[before:]):
            held.release()


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The complete JSON lines of `path` (a torn last line, from a killed writer, is skipped)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class RunDir:
    """Writer of one run directory (a no-op object on non-writer ranks)."""

    def __init__(self, path: str, writer: bool = True):
        self.path = os.path.abspath(path)
        self.writer = writer
        self._tb = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def holds_a_run(self) -> bool:
        """True when the directory already has the books of a run: a log, a process start (training began)
        or a checkpoint (starting afresh would overwrite or mix with them)."""
        if not os.path.isdir(self.path):
            return False
        if any(os.path.exists(self.file(name)) for name in (LOG_FILE, STEPS_FILE, STARTS_FILE)):
            return True
        return bool(self.checkpoint_files())

    def checkpoint_files(self) -> list[str]:
        """Every finished checkpoint file of the directory (numbered, last, best), usable or not."""
        return sorted(glob.glob(os.path.join(self.path, "checkpoint-*.pth")))

    def lock(self, log: Callable[[str], None] = print) -> str:
        """Rank 0: create the directory and take its lock for this job ("" on success, else the one-line
        refusal naming the holder). Other ranks take nothing and get "". Released by `job_locks`."""
        if not self.writer:
            return ""
        os.makedirs(self.path, exist_ok=True)
        return RunDirLock(self.file(LOCK_FILE)).acquire(log)

    def set_aside(self) -> str:
        """Move the books of a run stopped before its first checkpoint (config, logs, TensorBoard) into a new
        `interrupted-N/` inside the directory and return its path; `starts.jsonl` stays (it is the run's
        history, and the device time of the stopped process belongs to the run). Nothing is deleted."""
        if not self.writer:
            return ""
        n = 1
        while os.path.exists(self.file(f"{INTERRUPTED_PREFIX}{n}")):
            n += 1
        dest = self.file(f"{INTERRUPTED_PREFIX}{n}")
        os.makedirs(dest)
        names = [CONFIG_FILE, LOG_FILE, STEPS_FILE, SAMPLES_FILE, TB_DIR,
                 *(os.path.basename(p) for p in self.checkpoint_files())]
        for name in names:
            if os.path.exists(self.file(name)):
                os.replace(self.file(name), os.path.join(dest, name))
        return dest

    def create(self) -> None:
        if self.writer:
            os.makedirs(self.path, exist_ok=True)
            # Temporary files of a save interrupted by a kill: never valid checkpoints, safe to remove.
            for stale in glob.glob(os.path.join(self.path, ".checkpoint-*.tmp-*")):
                os.unlink(stale)

    def write_config(self, config: dict[str, Any]) -> None:
        if self.writer:
            _atomic_write_text(self.file(CONFIG_FILE), json.dumps(config, indent=2, sort_keys=False) + "\n")

    def _append(self, name: str, row: dict[str, Any]) -> None:
        if not self.writer:
            return
        with open(self.file(name), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One line of `log.jsonl` (one per epoch)."""
        self._append(LOG_FILE, row)
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tb.add_scalar(f"epoch/{key}", value, row["epoch"])
            self._tb.flush()

    def log_step(self, row: dict[str, Any]) -> None:
        """One line of `steps.jsonl` (one every `log_every` steps)."""
        self._append(STEPS_FILE, row)
        if self.writer:
            faults.after_step(int(row["step"]))  # test hook (SUPMAE_TEST_KILL_AT=step=N): a kill right here
        if self._tb is not None:
            for key in ("lr", "loss", "images_per_sec", "data_wait_frac"):
                if key in row:
                    self._tb.add_scalar(f"step/{key}", row[key], row["step"])

    def log_samples(self, row: dict[str, Any]) -> None:
        """One line of `samples.jsonl` (--train.trace_samples: a global step's sorted sample indices)."""
        self._append(SAMPLES_FILE, row)

    def log_start(self, row: dict[str, Any]) -> None:
        """One line of `starts.jsonl` (one per process start; kept across resumes: it is the run's history)."""
        self._append(STARTS_FILE, row)

    def truncate_after(self, epoch: int, step: int | None = None) -> None:
        """Drop the lines a resumed run redoes: log lines of epochs after `epoch` (-1 drops all), and step and
        sample lines after global step `step` (a checkpoint inside an epoch), else after epoch `epoch`."""
        if not self.writer:
            return
        for name in (LOG_FILE, STEPS_FILE, SAMPLES_FILE):
            path = self.file(name)
            if not os.path.isfile(path):
                continue
            rows = read_jsonl(path)
            if name != LOG_FILE and step is not None:
                kept = [r for r in rows if int(r.get("step", -1)) <= step]
            else:
                kept = [r for r in rows if int(r.get("epoch", -1)) <= epoch]
            _atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def open_tensorboard(self) -> None:
        """Also write scalars for TensorBoard under `tb/`; needs a working `torch.utils.tensorboard`."""
        if not self.writer:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported here: optional dependency

        self._tb = SummaryWriter(log_dir=self.file(TB_DIR))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def tensorboard_available() -> bool:
    """Whether `torch.utils.tensorboard` imports (it needs the separate `tensorboard` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True
