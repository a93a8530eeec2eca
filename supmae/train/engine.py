"""The training engine the three jobs (pretrain, finetune, linprobe) share.

Where the seam is: a job contributes its *step* (`supmae.train.steps`: forward, loss, backward of
one micro-batch and the optimiser update) and its *evaluation*; everything around them lives here
and is the same for every job:

- device and precision resolution (bf16 / fp16 + grad scaler / fp32), TF32, `torch.compile`;
- DDP wrapping (`no_sync` accumulation is the step's, through `step.ddp`);
- the epoch loop skeleton (`Engine.train_epoch`): per-iteration lr, host-side data-wait
  accounting, device-side loss sums read only at log points, the tqdm progress bar;
- per-rank RNG capture and restore (every rank's state saved, each rank restores its own);
- buffer sync (rank 0's BatchNorm statistics) before every evaluation and every save;
- evaluation sample accounting (`real_samples`: each validation sample counted once across ranks);
- the resume decision (rank 0 finds and reads the checkpoint, then broadcasts it: no shared
  filesystem needed) and checkpoint writing (rank 0 only; a numbered checkpoint is serialised once
  and hard-linked or copied);
- the run directory's books (`config.json`, `log.jsonl` with the same per-epoch keys in every job,
  `steps.jsonl`, `starts.jsonl`).
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from supmae.errors import UserError
from supmae.train import distributed as dist_utils

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA where supported (else fp16), fp32 on the CPU; fp16 needs CUDA (its scaler)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--train.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--train.precision fp16 needs a CUDA device (its grad scaler); use bf16 or fp32 on the CPU")
    return precision


def amp_dtype_of(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: no autocast)."""
    return AMP_DTYPES[precision]


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def grad_scaler(device: torch.device) -> Any:
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


def set_matmul_precision(device: torch.device, deterministic: bool) -> None:
    """TF32 matmuls and convolutions on CUDA unless deterministic (TF32 rounding differs per kernel choice)."""
    if device.type != "cuda" or deterministic:
        return
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def configure_determinism(device: torch.device, deterministic: bool) -> None:
    """Deterministic kernels (exact resume on the CPU), or cudnn autotuning on CUDA."""
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------------------------------- compile, DDP


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
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(core, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


# ---------------------------------------------------------------------------------------------- RNG state


def _to_lists(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_to_lists(x) for x in obj]
    return obj


def _to_tuples(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_to_tuples(x) for x in obj)
    return obj


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's global RNG states as tensors and plain types (loadable with weights_only)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(_to_lists(random.getstate())),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def gather_rng(device: torch.device) -> dict[str, Any]:
    """Every rank's RNG state (a collective when distributed): rank 0's at the top level (so a 1-rank
    resume of a multi-rank run works), all of them under `by_rank`."""
    states = dist_utils.all_gather_object(capture_rng(device))
    return {**states[0], "by_rank": states if len(states) > 1 else None}


def restore_rank_rng(saved: dict[str, Any], rank: int, world_size: int, device: torch.device) -> None:
    """Restore this rank's own state from `gather_rng`'s dict (rank 0's when the world size changed)."""
    per_rank = saved.get("by_rank")
    restore_rng(per_rank[rank] if per_rank and len(per_rank) == world_size else saved, device)
