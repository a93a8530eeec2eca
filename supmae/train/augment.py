"""The downstream jobs' on-device batch augmentation (random erasing, mixup / cutmix, both timm's) and
the loss that matches it. It runs in the step, on the device, so every pipeline gets it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from supmae.errors import UserError


def mixup_and_loss(cfg: Any, num_classes: int, device: torch.device) -> tuple[Any, Any, nn.Module]:
    """(random eraser or None, mixup or None, criterion) of `cfg` (a DownstreamConfig)."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    a = cfg.aug
    eraser = None
    if a.reprob > 0:
        eraser = RandomErasing(probability=a.reprob, mode=a.remode, max_count=a.recount, num_splits=0,
                               device=str(device))
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        if cfg.data.batch_size % 2:
            raise UserError(f"mixup / cutmix pair each batch with its mirror: --data.batch_size must be even, "
                            f"got {cfg.data.batch_size}")
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.switch_prob,
                      mode=a.mixup_mode, label_smoothing=a.smoothing, num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif a.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=a.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    return eraser, mixup, criterion
