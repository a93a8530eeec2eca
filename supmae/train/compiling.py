"""How the model is called: DistributedDataParallel wrapping and `torch.compile`."""

from __future__ import annotations

import torch
from torch import nn

from supmae.errors import UserError


def resolve_compile(setting: str, device: torch.device) -> tuple[bool, str]:
    """(compile?, why not: "" when compiled) for `--train.compile auto|on|off`; auto = on for CUDA."""
    if setting not in ("auto", "on", "off"):
        raise UserError(f"--train.compile must be auto, on or off, got {setting!r}")
    if setting == "off":
        return False, "--train.compile off"
    if setting == "auto" and device.type != "cuda":
        return False, f"--train.compile auto compiles on CUDA only (device {device.type})"
    if not hasattr(torch, "compile"):
        if setting == "on":
            raise UserError("--train.compile on needs torch.compile, which this torch lacks")
        return False, "this torch has no torch.compile"
    return True, ""


def compile_backend(setting: str) -> str:
    """`auto` -> inductor (its CPU path needs a C++ compiler; `aot_eager` needs none)."""
    return "inductor" if setting in ("", "auto") else setting


def maybe_compile(model: nn.Module, enabled: bool, backend: str, device: torch.device) -> nn.Module:
    """`torch.compile(model)` with `backend` when `enabled`. Compiled after DDP wrapping, so that the
    compiler sees DDP's buckets and splits the graph at them."""
    if not enabled:
        return model
    return torch.compile(model, backend=compile_backend(backend))


def wrap_ddp(core: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """`core` in DistributedDataParallel on `device` (a process group must exist)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(core, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)
