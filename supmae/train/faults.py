"""Fault injection for the kill -9 tests: the process SIGKILLs itself at a chosen point.

A TEST HOOK, not a feature. The kill tests need kills that land at exact points (inside epoch 0,
before any checkpoint; half-way through writing a checkpoint), which a poller outside the process
can only hit by luck. Setting the environment variable `SUPMAE_TEST_KILL_AT` arms one point:

- `step=N`: rank 0 SIGKILLs itself right after writing global step N's line to `steps.jsonl`;
- `save=S`: rank 0 writes the first half of the checkpoint taken after global optimiser step S (at an
  epoch's end or inside an epoch) to its temporary file, flushes and fsyncs it (so the torn file is
  really on disk, as after a kill by the kernel), then SIGKILLs itself before the rename (the write
  runs on the checkpoint writer's background thread; the SIGKILL still takes the whole process);
- `done=S`: rank 0 SIGKILLs itself as soon as the checkpoint of global step S is in place (from the
  writer's thread, right after its rename: the kill lands just after a save, before the next step);
- `snap=S`: the asynchronous checkpoint writer (`supmae.train.async_checkpoint`) SIGKILLs the process
  right after its host snapshot of step S's checkpoint, before the background write starts.

The kill is a real SIGKILL of the process (no cleanup, no `finally`), exactly what a preemption
does; under torchrun the agent then tears the other ranks down. Unset, every check is one
environment lookup.
"""

from __future__ import annotations

import io
import os
import signal
from typing import IO, Any

from supmae.errors import UserError

ENV = "SUPMAE_TEST_KILL_AT"
_POINTS = ("step", "save", "snap", "done")


def armed(point: str) -> int | None:
    """The value `SUPMAE_TEST_KILL_AT` arms for `point` ("step", "save" or "snap"), None when not armed for it."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    name, _, value = raw.partition("=")
    if name not in _POINTS or not value.strip().isdigit():
        raise UserError(f"{ENV}={raw!r}: expected step=N, save=STEP, snap=STEP or done=STEP "
                        "(a test hook; unset it to train normally)")
    return int(value) if name == point else None


def kill_self() -> None:
    """SIGKILL this process: no handler, no cleanup, as a preemption or the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int) -> None:
    """Test hook: die here when armed with `step=<step>` (called after the step's line is written)."""
    if armed("step") == step:
        kill_self()


def after_saved(step: int) -> None:
    """Test hook: die here when armed with `done=<step>` (called once the checkpoint of that step is in place)."""
    if armed("done") == step:
        kill_self()


def after_snapshot(obj: Any) -> None:
    """Test hook: die here when armed with `snap=S` and `obj` is the checkpoint of global step S (called by the
    asynchronous writer between its host snapshot and the start of the background write)."""
    target = armed("snap")
    if target is not None and isinstance(obj, dict) and obj.get("step") == target:
        kill_self()


def in_save(obj: Any, fh: IO[bytes]) -> None:
    """Test hook: when armed with `save=S` and `obj` is the checkpoint of global step S, write half of its bytes
    to the temporary file `fh`, make them durable and die (the caller's rename never happens)."""
    target = armed("save")
    if target is None or not isinstance(obj, dict) or obj.get("step") != target:
        return
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    fh.write(data[: len(data) // 2])
    fh.flush()
    os.fsync(fh.fileno())
    kill_self()
