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


# --------------------------------------------------------------------------- downstream optimisers


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise lr decay (timm's `param_groups_layer_decay`).

    Layer ids: 0 for the embeddings (`patch_embed`, `cls_token`, `pos_embed`), i + 1 for block i,
    depth + 1 for `fc_norm` / `head`; each group's `lr_scale` is layer_decay^(depth + 1 - id). No
    weight decay on 1-D parameters (biases, norms) nor on the model's `no_weight_decay()` names
    (`pos_embed`, `cls_token`).
    """
    from timm.optim import param_groups_layer_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                    layer_decay=layer_decay)


def probe_param_groups(model: nn.Module, weight_decay: float, adapt_1d: bool = False) -> list[dict[str, Any]]:
    """LARS groups of the trainable (head) parameters.

    Matrices: trust ratio always adapted, `weight_decay` applied. 1-D parameters (biases): by the
    reference's rule (`adapt_1d` False) a group of their own that is never adapted and never decayed
    (timm's Lars adapts whenever a group's weight decay is non-zero, so that group's decay is 0 and
    `always_adapt` False: plain momentum SGD at the full lr); with `adapt_1d` they join the matrices.
    """
    adapt, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (adapt if p.ndim > 1 or adapt_1d else plain).append(p)
    groups = [{"params": adapt, "weight_decay": weight_decay, "always_adapt": True}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "always_adapt": False})
    return groups


def build_optimizer(cfg: Any, model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with layer-wise decay (fine-tuning) or timm's LARS (probing), per `cfg.optim.name`
    (`cfg`: a DownstreamConfig)."""
    from timm.optim import Lars

    from supmae.errors import UserError

    o = cfg.optim
    if o.name == "adamw":
        groups = finetune_param_groups(model, o.weight_decay, o.layer_decay)
        return build_adamw(groups, lr=lr, betas=tuple(o.betas), device=device, impl=o.impl)
    if o.name == "lars":
        return Lars(probe_param_groups(model, o.weight_decay, o.lars_adapt_1d), lr=lr, momentum=o.momentum)
    raise UserError(f"unknown optimiser --optim.name {o.name!r} (expected adamw or lars)")
