"""What every job's set-up does the same way: open the process's context (`open_job`), run the
set-up so that a user error on one rank stops every rank (`set_up_on_every_rank`), hand its
result over typed (`JobSetup`), put a resumed step's optimiser back (`restore_step`); and the
checks: the accumulation of an effective batch, whether a dataset has a split, how a resumed
run's config differs from its checkpoint's."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from supmae.errors import UserError
from supmae.train import distributed as dist_utils
from supmae.train.energy import EnergyMeter
from supmae.train.engine import EpochPlan, JobContext, Log, StartPoint
from supmae.train.run_dir import RunDir

T = TypeVar("T")


@dataclass
class JobSetup:
    """What a job's set-up built for its training loop. `done`: the run had already finished (only
    `start` is set then, and nothing was built or written)."""

    start: StartPoint
    done: bool = False
    model: Any = None  # the module, on the device, weights loaded
    plan: EpochPlan | None = None
    val_loader: Any = None


def open_job(output_dir: str, info: dist_utils.DistInfo) -> JobContext:
    """The process's context, opened first: its start time and the energy meter from here on (set-up,
    evaluation and checkpoints included), the log (rank 0 prints) and the run directory (rank 0 writes)."""
    t_start = time.perf_counter()
    energy = EnergyMeter(info.device)
    energy.start()
    return JobContext(info=info, run_dir=RunDir(output_dir, writer=info.is_main), log=Log(info.is_main),
                      t_start=t_start, energy=energy)


def set_up_on_every_rank(set_up: Callable[[], T], info: dist_utils.DistInfo) -> T:
    """`set_up()`, with a user error on one rank shared with all, so that every rank stops with a
    message instead of the others waiting in the first collective (the set-up's own collectives
    share their errors)."""
    from pipelines.errors import DataError

    error: Exception | None = None
    try:
        result = set_up()
    except (UserError, DataError) as exc:
        error = exc
    if info.distributed and not dist_utils.agree(error is None, info.device):
        raise error if error is not None else UserError("another rank failed during set-up (see its message)")
    if error is not None:
        raise error
    return result


def restore_step(step: Any, ckpt: dict[str, Any] | None) -> None:
    """A resumed run's optimiser and grad-scaler state, into the step built for it."""
    if ckpt is None:
        return
    step.optimizer.load_state_dict(ckpt["optimizer"])
    if step.scaler is not None and ckpt.get("scaler"):
        step.scaler.load_state_dict(ckpt["scaler"])


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ("resume",)) -> list[str]:
    """`key: old -> new` for every leaf that differs between two `to_dict` configs."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def has_split(path: str, split: str) -> bool:
    """Whether dataset `path` (a converted dir, or an ImageFolder root) has the split `split`."""
    from pipelines.constants import MANIFEST_FILE

    manifest = os.path.join(path, MANIFEST_FILE)
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as fh:
            return split in (json.load(fh).get("splits") or {})
    return os.path.isdir(os.path.join(path, split))


def resolve_accumulation(optim: Any, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimiser step: `optim.accum_iter`, or derived from `optim.effective_batch`
    (`optim`: a job's optimiser config with those two keys)."""
    if optim.effective_batch <= 0:
        return optim.accum_iter
    per_step = batch_size * world_size
    if optim.effective_batch % per_step:
        raise UserError(
            f"--optim.effective_batch {optim.effective_batch} is not a multiple of batch_size x world_size = "
            f"{batch_size} x {world_size} = {per_step}; change --data.batch_size, or set --optim.effective_batch 0 "
            f"and choose --optim.accum_iter"
        )
    derived = optim.effective_batch // per_step
    if optim.accum_iter not in (1, derived):
        raise UserError(
            f"--optim.accum_iter {optim.accum_iter} contradicts --optim.effective_batch {optim.effective_batch} "
            f"(which needs {derived} at batch_size {batch_size} x world_size {world_size}); set only one of them"
        )
    return derived
