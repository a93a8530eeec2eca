"""Measuring a training run without slowing it down.

Losses stay on the device: each step adds into device tensors (no `.item()`), and the host reads
them only at log points. Data-wait time is the host time spent blocked in `next()` on the
loader, measured with the host clock, so measuring it never forces a device sync either.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from supmae.train import distributed as dist_utils


class DeviceMeter:
    """Running sums of a few named scalars on the device, plus a finiteness flag and the first bad step.

    `add` only queues device ops. `read` (a sync point, and a collective when distributed) returns the
    global means since the last `reset` and whether every value was finite.
    """

    def __init__(self, names: Iterable[str], device: torch.device):
        self.names = list(names)
        self.device = device
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.count = 0
        # Index of the first step whose values were not all finite; a large sentinel means "none yet".
        self._sentinel = 2**62
        self.first_bad = torch.full((), self._sentinel, dtype=torch.int64, device=device)
        # The step number lives on the device too: building it from a Python int each step would be a
        # host-to-device copy, which synchronises the stream.
        self._step = torch.zeros((), dtype=torch.int64, device=device)

    def set_step(self, step: int) -> None:
        """Label the values added from now on with `step` (a kernel launch, no sync)."""
        self._step.fill_(step)

    def add(self, *values: torch.Tensor) -> None:
        v = torch.stack([x.detach().reshape(()).to(torch.float64) for x in values])  # [K]
        self.sums += v
        self.count += 1
        bad = ~torch.isfinite(v).all()
        self.first_bad = torch.where(bad, torch.minimum(self.first_bad, self._step), self.first_bad)

    def reset(self) -> None:
        self.sums.zero_()
        self.count = 0

    def restore(self, sums: list[float], count: int) -> None:
        """Start from this rank's sums and count as a checkpoint inside an epoch saved them."""
        self.sums.copy_(torch.tensor(sums, dtype=torch.float64))
        self.count = int(count)

    def read_sums(self) -> tuple[list[float], int, int | None]:
        """Global sums and count since the last reset (summed over ranks), and the first step whose values
        were not finite on any rank (None if all were). A sync point, and a collective when distributed."""
        packed = torch.cat([self.sums, torch.tensor([float(self.count)], dtype=torch.float64).to(self.device)])
        dist_utils.all_reduce_sum(packed)
        first_bad = dist_utils.all_reduce_min(self.first_bad.clone())
        values = packed.tolist()
        bad = int(first_bad.item())
        return values[:-1], int(values[-1]), (None if bad >= self._sentinel else bad)

    def read(self) -> tuple[dict[str, float], int | None]:
        """Global means since the last reset, and the first non-finite step (see `read_sums`)."""
        sums, count, bad = self.read_sums()
        return {name: sums[i] / max(count, 1) for i, name in enumerate(self.names)}, bad


class TimedIterator:
    """Wraps an iterator and accumulates the host seconds spent waiting in `next()`."""

    def __init__(self, iterable: Iterable[Any]):
        self._it = iter(iterable)
        self.wait_seconds = 0.0
        self.first_wait: float | None = None  # the first next(): the loader's start (workers, threads)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self._it)
        finally:
            waited = time.perf_counter() - t0
            self.wait_seconds += waited
            if self.first_wait is None:
                self.first_wait = waited

    def close(self) -> None:
        """Close the underlying iterator when it can be closed (a generator runs its cleanup)."""
        close = getattr(self._it, "close", None)
        if callable(close):
            close()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (used only at epoch and log boundaries, never inside a step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated CUDA memory on a GPU; on the CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def device_name(device: torch.device) -> str:
    """"cpu", or the CUDA device's marketing name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def measure_matmul_peak(device: torch.device, dtype: torch.dtype | None = None, seconds: float = 1.0) -> float:
    """Best achieved dense matmul rate in FLOP/s on `device` in `dtype` (default: bf16 on GPU, fp32
    on CPU), from square matmuls repeated for about `seconds`. It is the denominator of MFU: what
    this device actually reaches, not its data-sheet number."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 1024
    # A generator of its own: measuring at a run's start must not move the run's global RNG streams
    # (a resumed run would otherwise draw differently from an uninterrupted one).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    flops_each = 2.0 * n**3
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    reps = 1
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - start
        best = max(best, flops_each * reps / elapsed)
        if time.perf_counter() >= deadline:
            break
        # Grow the batch of matmuls until one timing takes ~50 ms, so timer and launch noise vanish.
        if elapsed < 0.05:
            reps = min(reps * 2, 1 << 12)
    del a, b
    return best
