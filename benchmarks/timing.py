"""Shared timing tools of the benchmarks: device and precision choice, warm-up then synchronised
timing of a training step, the device's measured matmul peak, and FLOP counting.

Timing rule: the accelerator runs asynchronously, so a timed region starts and ends with a
device synchronisation and nothing inside it forces one (the training loop does not either).
Per-iteration times are host-side; they equal device time on CPU and are only indicative on GPU,
where the mean over the synchronised region is the figure to use.
"""

from __future__ import annotations

import contextlib
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from supmae.errors import UserError
from supmae.train.metrics import measure_matmul_peak  # noqa: F401  (re-exported: the harness and the trainer share it)

IMAGENET_TRAIN_IMAGES = 1_281_167


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`; `UserError` when CUDA is asked for and absent."""
    if name in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but no CUDA GPU is visible; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}: use cpu or cuda")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (a no-op on CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The run's autocast dtype: bf16 on GPU, none (fp32) on CPU, as in the training loop."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or nothing when `dtype` is None (plain fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    names = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, str(dtype))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fused_adamw(params: Any, device: torch.device, **kw: Any) -> torch.optim.AdamW:
    """AdamW with the fused kernel where this torch build has it for `device`, else the foreach one.

    Feature-detected by constructing it: the fused CPU kernel exists only in newer torch builds.
    On the meta device (FLOP counting without arithmetic) the plain loop is used: its update has no
    matmul FLOPs either way."""
    if device.type == "meta":
        return torch.optim.AdamW(params, foreach=False, **kw)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kw)


@dataclass
class Timing:
    """Result of `time_steps`: the synchronised wall time of `iters` iterations and host detail."""

    iters: int
    total_seconds: float  # device-synchronised wall time of the timed region
    iter_seconds: list[float] = field(default_factory=list)  # host-side, per iteration
    data_seconds: float = 0.0  # host time blocked waiting for the next batch

    @property
    def seconds_per_iter(self) -> float:
        return self.total_seconds / self.iters

    @property
    def data_wait_frac(self) -> float:
        return self.data_seconds / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def spread(self) -> float:
        """Relative standard deviation of the host-side iteration times (0 with one iteration)."""
        if len(self.iter_seconds) < 2:
            return 0.0
        mean = statistics.fmean(self.iter_seconds)
        return statistics.stdev(self.iter_seconds) / mean if mean > 0 else 0.0


def time_steps(
    step: Callable[[torch.Tensor, torch.Tensor], Any],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    warmup: int,
    iters: int,
) -> Timing:
    """Run `warmup` untimed then `iters` timed calls of `step(images, labels)` on batches drawn from
    `batches`. Time spent inside `next(batches)` is the data wait (zero for a constant synthetic
    batch). The step must not synchronise; the region is synchronised at both ends only."""
    if iters < 1:
        raise UserError(f"--iters must be at least 1, got {iters}")
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    for _ in range(warmup):
        images, labels = next(batches)
        step(images, labels)
    synchronize(device)
    iter_seconds: list[float] = []
    data_seconds = 0.0
    start = time.perf_counter()
    last = start
    for _ in range(iters):
        t0 = time.perf_counter()
        images, labels = next(batches)
        data_seconds += time.perf_counter() - t0
        step(images, labels)
        now = time.perf_counter()
        iter_seconds.append(now - last)
        last = now
    synchronize(device)
    total = time.perf_counter() - start
    return Timing(iters=iters, total_seconds=total, iter_seconds=iter_seconds, data_seconds=data_seconds)


def constant_batches(images: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same device-resident batch forever: synthetic data costs nothing to load."""
    while True:
        yield images, labels


def loader_batches(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of a `pipelines` loader, epoch after epoch (calling `set_epoch` as a loop would)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        produced = False
        for images, labels in loader:
            produced = True
            yield images, labels
        if not produced:
            raise UserError("the data pipeline yielded no batch: the dataset is smaller than one batch")
        epoch += 1


def synthetic_batch(
    batch_size: int, img_size: int, num_classes: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking random images `[B, 3, H, W]` and labels `[B]` made on `device`."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=gen)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    return images.to(device), labels.to(device)


def _cpu_sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> Any:
    """A `FlopCounterMode` that also counts the CPU flash-attention kernels, which torch's own
    table leaves out (so fused attention on CPU would otherwise count as zero FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    custom: dict[Any, Any] = {}
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return FlopCounterMode(display=False, custom_mapping=custom)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (multiply-add = 2) of the matmuls, convolutions and attention that `fn()` runs."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


def iters_per_epoch(num_images: int, global_batch: int, drop_last: bool = True) -> int:
    """Optimiser steps per epoch. The training loops drop the last partial batch, as MAE's does."""
    if num_images < 1 or global_batch < 1:
        raise UserError(f"need positive dataset size and batch, got {num_images} images, batch {global_batch}")
    steps = num_images // global_batch if drop_last else math.ceil(num_images / global_batch)
    if steps < 1:
        raise UserError(f"the global batch {global_batch} is larger than the dataset ({num_images} images)")
    return steps


def environment() -> dict[str, Any]:
    """Versions and hardware, written beside every benchmark result."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def add_run_options(parser: Any, default_out: str) -> None:
    """The options every timing command shares: where to write, CPU threads, seed."""
    parser.add_argument("--out", default=default_out, help="output directory ('' to write nothing)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads on the CPU (default 0: torch's default, one per core)")
    parser.add_argument("--seed", type=int, default=0)


def apply_threads(threads: int) -> None:
    """Set torch's CPU thread count from --threads (0 keeps torch's default)."""
    if threads < 0:
        raise UserError(f"--threads must be 0 (torch's default) or positive, got {threads}")
    if threads:
        torch.set_num_threads(threads)
