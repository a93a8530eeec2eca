"""Optimiser construction: weight-decay parameter groups and AdamW with the fastest implementation.

The pretraining rule follows the reference (timm's `add_weight_decay`): every trainable parameter
is decayed except 1-D ones (norm weights, all biases of 1-D shape) and anything named `*.bias`;
tokens such as `cls_token` and `mask_token` ([1, 1, D]) *are* decayed. Fixed sin-cos position
embeddings are not trained at all: they never reach the optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

FIXED_POS_EMBED_NAMES = ("pos_embed", "decoder_pos_embed")


def freeze_fixed_pos_embed(model: nn.Module, names: Iterable[str] = FIXED_POS_EMBED_NAMES) -> list[str]:
    """Make sure the fixed sin-cos position tables of a pretraining model are not trainable; returns the
    names frozen here (empty when the model already stores them as non-trainable, as it should)."""
    frozen = []
    wanted = set(names)
    for name, param in model.named_parameters():
        if name in wanted and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed (>= 2-D weights) and not decayed (1-D params, biases, names in `skip`).

    Parameters with `requires_grad=False` are left out entirely.
    """
    skip = set(skip)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def adamw_impl(device: torch.device | str, impl: str = "auto") -> str:
    """Pick the AdamW kernel: `fused` on CUDA (one kernel for all parameters), `foreach` elsewhere."""
    if impl not in ("auto", "fused", "foreach", "for_loop"):
        raise ValueError(f"unknown AdamW implementation {impl!r}")
    if impl != "auto":
        return impl
    return "fused" if torch.device(device).type == "cuda" else "foreach"


def build_adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], device: torch.device | str,
                impl: str = "auto") -> torch.optim.AdamW:
    """AdamW over `groups` with the chosen implementation (see `adamw_impl`)."""
    kind = adamw_impl(device, impl)
    kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(betas)}
    if kind == "fused":
        kwargs["fused"] = True
    elif kind == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return torch.optim.AdamW(groups, **kwargs)
