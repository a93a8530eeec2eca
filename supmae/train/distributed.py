"""Distributed set-up for `torchrun`: process group, device, rank helpers and clean shutdown.

Launched by `torchrun` (or `python -m torch.distributed.run`), each process finds RANK,
WORLD_SIZE and LOCAL_RANK in its environment; without them the run is a single process and no
process group is created. gloo serves CPU runs, nccl GPU runs. Every collective has a timeout
(set at init), so a rank that dies does not leave the others waiting forever, and
`destroy_process_group` runs in a `finally` on every exit path.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from supmae.errors import UserError


@dataclass
class DistInfo:
    """Where this process stands: its rank, the world size, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""  # "" when not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` -> this rank's CUDA device when CUDA is usable, else the CPU; `cuda` without CUDA is an error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {preference!r} (expected auto, cpu or cuda)")
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        index = local_rank % max(torch.cuda.device_count(), 1)
        return torch.device("cuda", index)
    if preference == "cuda":
        raise UserError("--train.device cuda was asked for but no CUDA device is available")
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Read the torchrun environment, pick the device and, for world size > 1, create the process group."""
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistInfo(0, 1, 0, device, "")
    if dist.is_initialized():  # a caller (e.g. a test harness) set it up already
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    # Binding the process group to this rank's GPU lets NCCL set up eagerly; newer torch only.
    if device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown() -> None:
    """Destroy the process group if one exists (safe to call on every exit path)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device_preference: str = "auto", timeout_s: float = 600.0) -> Iterator[DistInfo]:
    """`init_distributed` ... `shutdown`, the latter also when the body raises."""
    info = init_distributed(device_preference, timeout_s)
    try:
        yield info
        # On a normal exit every rank waits for the others before the group is torn down: a rank
        # that finishes early (a finished run resumed, say) and destroys its gloo group while a
        # peer still talks to it aborts the process ("terminate called without an active exception").
        # Not on an error: a peer that failed would never arrive.
        if info.world_size > 1 and dist.is_initialized():
            dist.barrier()
    finally:
        shutdown()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (no-op in a single process) and return it."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank iff `flag` is true on every rank (a collective: call it on all ranks)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    return bool(all_reduce_min(t).item())


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after an epoch's last forward every rank
    holds running statistics of its own last batch; this makes them rank `src`'s (the checkpointed ones).
    """
    if not is_dist():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=src)


def params_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Two float64 numbers summarising every parameter and buffer: sum and sum of squares weighted by position.

    Equal weights give equal fingerprints; any differing element changes them with near certainty.
    """
    total = torch.zeros(2, dtype=torch.float64)
    for i, t in enumerate(list(model.parameters()) + list(model.buffers())):
        flat = t.detach().to("cpu", torch.float64).flatten()
        if flat.numel() == 0:
            continue
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel() + i
        total[0] += (flat * weights).sum()
        total[1] += (flat * flat).sum()
    return total


def check_in_sync(model: torch.nn.Module, device: torch.device) -> bool:
    """True iff every rank holds bit-identical weights (compared through `params_fingerprint`)."""
    fp = params_fingerprint(model).to(device)
    lo, hi = fp.clone(), fp.clone()
    all_reduce_min(lo)
    all_reduce_max(hi)
    return bool(torch.equal(lo, hi))
