"""The reference's per-iteration learning-rate schedule: linear warmup, then half-cosine to `min_lr`.

The lr is a function of the fractional epoch `e = epoch + step_in_epoch / steps_per_epoch`, so
curves of runs with different batch sizes line up on the epoch axis (the reference's
`epoch_1000x` idea), and it is set before every optimiser update.
"""

from __future__ import annotations

import math
from typing import Any


def peak_lr(blr: float, effective_batch: int, lr: float | None = None) -> float:
    """The absolute peak lr: `lr` when given, else the linear scaling rule `blr * effective_batch / 256`."""
    if lr is not None:
        return float(lr)
    return blr * effective_batch / 256


def lr_at(epoch: float, peak: float, warmup_epochs: float, epochs: float, min_lr: float = 0.0) -> float:
    """The lr at fractional epoch `epoch` (reference formula)::

        epoch <  warmup:  peak * epoch / warmup
        epoch >= warmup:  min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * (epoch - warmup) / (epochs - warmup)))
    """
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    span = epochs - warmup_epochs
    if span <= 0:  # no cosine phase at all (warmup covers the run): hold the peak
        return peak
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineSchedule:
    """`lr_at` bound to one run's numbers, addressed by (epoch, step in epoch)."""

    def __init__(self, peak: float, warmup_epochs: float, epochs: float, steps_per_epoch: int, min_lr: float = 0.0):
        if steps_per_epoch <= 0:
            raise ValueError("steps_per_epoch must be positive")
        self.peak = peak
        self.warmup_epochs = warmup_epochs
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.min_lr = min_lr

    def __call__(self, epoch: int, step_in_epoch: int) -> float:
        return lr_at(epoch + step_in_epoch / self.steps_per_epoch, self.peak, self.warmup_epochs, self.epochs,
                     self.min_lr)


def set_lr(optimizer: Any, lr: float) -> None:
    """Set `lr` on every param group, times the group's `lr_scale` when it has one (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
