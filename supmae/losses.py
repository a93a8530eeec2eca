"""SupMAE's losses as pure functions: reconstruction (inside the model) and the combined objective.

Legend: N batch, L patches per image, P = p*p*3 values per patch, C classes.

Nothing here reads a tensor back to the host: every result stays a device tensor, so a training
step that calls these never waits on the accelerator.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from supmae.errors import UserError

NORM_PIX_EPS = 1e-6


def normalize_patches(target: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """Per-patch standardisation of target pixels `[N, L, P]`: `(t - mean) / sqrt(var + eps)`, with the
    unbiased variance over the P values of each patch (as the reference's `norm_pix_loss`)."""
    mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
    var = target.var(dim=-1, keepdim=True)  # [N, L, 1], unbiased
    return (target - mean) / (var + eps) ** 0.5


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True
) -> torch.Tensor:
    """Mean squared error per patch, averaged over the removed patches only.

    pred, target: [N, L, P]; mask: [N, L], 1 = removed (counted), 0 = visible (ignored).
    Computed in float32 whatever the autocast dtype of `pred`. With no patch removed the loss is
    0 (the reference divides 0 by 0); the denominator is clamped on the device, without a sync.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
                         f"mask {tuple(mask.shape)}")
    target = target.float()
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [N, L]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """Cross-entropy of `logits / temperature` (logits [N, C] raw from the model, labels int64 [N]);
    the reference divides by its `--temperature` 10 before the cross-entropy. Computed in float32."""
    return F.cross_entropy(logits.float() / temperature, labels)


def supmae_loss(
    out: Any,
    labels: torch.Tensor,
    rec_weight: float = 1.0,
    cls_weight: float = 0.01,
    temperature: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training objective `rec_weight * L_rec + cls_weight * CE(logits / temperature, labels)`.

    `out` is a `SupMAEOutput` (loss_rec, pred, mask, logits). Returns `(total, loss_rec, loss_cls)`,
    where `loss_rec` and `loss_cls` are the *weighted* terms, so `total == loss_rec + loss_cls`; this
    matches the reference's logged `rec_loss` / `cls_loss` (its released log starts near cls 0.069,
    i.e. 0.01 * ln(1000)). A term whose weight is 0, or whose branch the model lacks (`logits` None:
    no cls head; `pred` None: no decoder), is an exact zero tensor and takes no part in the graph.
    """
    has_rec = rec_weight != 0.0 and out.pred is not None
    has_cls = cls_weight != 0.0 and out.logits is not None
    if not (has_rec or has_cls):
        raise UserError("nothing to train: both the reconstruction and the classification terms are off "
                        f"(rec_weight={rec_weight}, cls_weight={cls_weight}, decoder "
                        f"{'present' if out.pred is not None else 'absent'}, cls head "
                        f"{'present' if out.logits is not None else 'absent'})")
    zero = out.mask.new_zeros((), dtype=torch.float32)
    if has_rec:
        loss_rec = rec_weight * out.loss_rec.float()
    else:
        loss_rec = zero
    if has_cls:
        loss_cls = cls_weight * classification_loss(out.logits, labels, temperature)
    else:
        loss_cls = zero
    return loss_rec + loss_cls, loss_rec, loss_cls
