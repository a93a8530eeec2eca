"""FLOP counts from `torch.utils.flop_counter` (2 FLOPs per multiply-add, matmuls and convolutions only).

`count_flops(fn, *args)` counts any callable (a whole training step, a benchmark's step of another
method); `training_flops_per_image(model)` counts one SupMAE training step (forward, loss, backward)
and splits it into encoder, decoder and head.

The per-model count runs on a replica of the architecture built on the `meta` device: no memory,
no arithmetic, so even ViT-H at 224 px costs well under a second and the caller's model (its
gradients, its BatchNorm statistics) is never touched.

PyTorch's counter has no formula for the CPU flash-attention kernel that
`F.scaled_dot_product_attention` dispatches to on a CPU, so attention would count as zero there;
importing this module registers the standard SDPA formulas for that kernel when they are missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

from supmae.losses import supmae_loss


def _register_cpu_sdpa_formulas() -> None:
    """Give the CPU flash-attention ops the same formulas as the CUDA SDPA kernels (feature-detected)."""
    aten = torch.ops.aten
    register = getattr(flop_counter, "register_flop_formula", None)
    fwd_count = getattr(flop_counter, "sdpa_flop_count", None)
    bwd_count = getattr(flop_counter, "sdpa_backward_flop_count", None)
    if register is None or fwd_count is None or bwd_count is None:
        return
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        op = aten._scaled_dot_product_flash_attention_for_cpu
        if op not in flop_counter.flop_registry:

            @register(op)
            def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
                return fwd_count(query, key, value)

    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        op = aten._scaled_dot_product_flash_attention_for_cpu_backward
        if op not in flop_counter.flop_registry:

            @register(op)
            def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
                return bwd_count(grad_out, query, key, value)


_register_cpu_sdpa_formulas()


def flops_by_module(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """Run `fn(*args, **kwargs)` once under `FlopCounterMode`: FLOPs per module path (as the
    counter names them, e.g. "SupMAE.blocks.0"; a parent includes its children) and "Global"
    for the whole call. A backward pass inside `fn` is counted too."""
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    counts = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    counts["Global"] = int(counter.get_total_flops())
    return counts


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs of one call `fn(*args, **kwargs)` (forward and any backward inside it)."""
    return flops_by_module(fn, *args, **kwargs)["Global"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The SupMAE inside a DDP or `torch.compile` wrapper."""
    while True:
        inner = next((m for m in (getattr(model, a, None) for a in ("module", "_orig_mod")) if isinstance(m, nn.Module)),
                     None)
        if inner is None:
            return model
        model = inner


def _child_flops(counts: dict[str, int], root: str, model: nn.Module, names: tuple[str, ...]) -> int:
    """FLOPs of the named direct children of `model` (a ModuleList counts as its members)."""
    total = 0
    for name in names:
        child = getattr(model, name, None)
        if child is None:
            continue
        members = [f"{name}.{i}" for i in range(len(child))] if isinstance(child, nn.ModuleList) else [name]
        total += sum(counts.get(f"{root}.{m}", 0) for m in members)
    return total


def training_flops_per_image(
    model: nn.Module, img_size: int | None = None, mask_ratio: float = 0.75, batch_size: int = 2
) -> dict[str, int]:
    """FLOPs per image of one training step of `model`'s architecture at `mask_ratio`.

    Returns a dict:
      total          forward + loss + backward (weights' and activations' gradients; none for the images),
                     attention counted as its explicit matmuls
      forward        the forward pass and the loss only
      encoder        patch embedding + blocks + final norm (fwd + bwd)
      encoder_blocks the encoder's transformer blocks alone (fwd + bwd)
      decoder        decoder_embed + blocks + norm + pred (fwd + bwd)
      head           classification head (fwd + bwd)
    `img_size` (default: the model's) rebuilds the architecture at another resolution. `batch_size`
    only needs to exceed 1 (BatchNorm in training mode); the counts are linear in it.
    """
    from supmae.models.registry import create_model

    model = _unwrap(model)
    args = dict(getattr(model, "model_args", {}))
    if "name" not in args:
        raise TypeError("training_flops_per_image needs a SupMAE built by create_model (it has model_args)")
    if img_size is not None:
        args["img_size"] = img_size
    # Explicit attention matmuls: the algorithm's FLOPs, whichever fused kernel a device would pick
    # (a flash backward also recomputes QK^T, which MFU conventions do not count).
    args["attn_impl"] = "eager"
    if batch_size < 2:
        raise ValueError("batch_size must be >= 2: the head's BatchNorm needs more than one sample in training")
    with torch.device("meta"):
        replica = create_model(**args)
    replica.train()
    size = replica.grid_size * replica.patch_size
    imgs = torch.empty(batch_size, 3, size, size, device="meta")
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta")

    # One counted pass; the running total read between forward and backward is the forward's share.
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
        loss = supmae_loss(replica(imgs, mask_ratio=mask_ratio), labels)[0]
        fwd = counter.get_total_flops()
        loss.backward()
    counts = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    counts["Global"] = int(counter.get_total_flops())
    root = type(replica).__name__
    encoder_blocks = _child_flops(counts, root, replica, ("blocks",))
    per_batch = {
        "total": counts["Global"],
        "forward": fwd,
        "encoder": _child_flops(counts, root, replica, ("patch_embed", "blocks", "norm")),
        "encoder_blocks": encoder_blocks,
        "decoder": _child_flops(counts, root, replica, ("decoder_embed", "decoder_blocks", "decoder_norm",
                                                        "decoder_pred")),
        "head": _child_flops(counts, root, replica, ("cls_head",)),
    }
    return {k: v // batch_size for k, v in per_batch.items()}
