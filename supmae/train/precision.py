"""Numeric settings of a run: autocast precision, the fp16 grad scaler, TF32 and determinism.

Every job and the benchmarks resolve these the same way, so that a benchmark times the arithmetic
the trainer runs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from supmae.errors import UserError

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    """`torch.autocast` on `device` in `amp_dtype`, or a no-op context for fp32."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def grad_scaler(device: torch.device) -> Any:
    """The fp16 gradient scaler of `device` (`torch.amp.GradScaler` where this torch has it)."""
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


def has_fp32_precision_api() -> bool:
    """Whether this torch has the per-backend `fp32_precision` settings (torch 2.9 and later), which
    replace `allow_tf32` and `set_float32_matmul_precision`: mixing the two APIs warns, and Inductor
    reads the new one."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(
        getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


def set_matmul_precision(device: torch.device, deterministic: bool) -> str:
    """TF32 matmuls and convolutions on CUDA unless deterministic (TF32 rounding differs per kernel choice).

    Returns which API set them: "fp32_precision" (the new one, wherever it exists), "legacy"
    (`allow_tf32`, on older torch), or "" when nothing was set (not CUDA, or deterministic). Setting
    the flags needs no GPU, only a CUDA-typed device.
    """
    if device.type != "cuda" or deterministic:
        return ""
    if has_fp32_precision_api():
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        return "fp32_precision"
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "legacy"


def configure_determinism(device: torch.device, deterministic: bool) -> None:
    """Deterministic kernels (exact resume on the CPU), or cudnn autotuning on CUDA."""
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
