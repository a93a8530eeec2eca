"""The run directory of a training run (pretrain, finetune, linprobe): `config.json`, `log.jsonl`,
`steps.jsonl`, `starts.jsonl` (one line per process start) and checkpoints.

Only the writer (rank 0) touches files; other ranks hold a `RunDir` with `writer=False` whose
methods do nothing. JSON-lines files are appended one flushed line at a time, so a killed run
leaves every completed line readable; on resume, lines past the resumed checkpoint are dropped
(they describe work that is about to be redone).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
STEPS_FILE = "steps.jsonl"
STARTS_FILE = "starts.jsonl"


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
        """True when the directory already has a log or a checkpoint (starting afresh would overwrite them)."""
        if not os.path.isdir(self.path):
            return False
        if os.path.exists(self.file(LOG_FILE)) or os.path.exists(self.file(STEPS_FILE)):
            return True
        return bool(glob.glob(os.path.join(self.path, "checkpoint-*.pth")))

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
        if self._tb is not None:
            for key in ("lr", "loss", "images_per_sec", "data_wait_frac"):
                if key in row:
                    self._tb.add_scalar(f"step/{key}", row[key], row["step"])

    def log_start(self, row: dict[str, Any]) -> None:
        """One line of `starts.jsonl` (one per process start; kept across resumes: it is the run's history)."""
        self._append(STARTS_FILE, row)

    def truncate_after(self, epoch: int) -> None:
        """Drop log and step lines of epochs after `epoch` (-1 drops all): a resumed run redoes them."""
        if not self.writer:
            return
        for name in (LOG_FILE, STEPS_FILE):
            path = self.file(name)
            if not os.path.isfile(path):
                continue
            rows = read_jsonl(path)
            kept = [r for r in rows if int(r.get("epoch", -1)) <= epoch]
            _atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def open_tensorboard(self) -> None:
        """Also write scalars for TensorBoard under `tb/`; needs a working `torch.utils.tensorboard`."""
        if not self.writer:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported here: optional dependency

        self._tb = SummaryWriter(log_dir=self.file("tb"))

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
