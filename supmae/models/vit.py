"""The downstream ViT (fine-tuning, linear probing) and loading a pretrained SupMAE encoder into it.

The network is timm's `VisionTransformer`; this file only chooses its options the way MAE /
SupMAE fine-tune and probe, and maps a pretraining checkpoint onto it:

- fine-tune: global average pool of the patch tokens (cls excluded), then a new `fc_norm`
  LayerNorm; the encoder's final `norm` is removed (timm drops it when `fc_norm=True`). Loading a
  pretraining checkpoint leaves exactly `head.*` and `fc_norm.*` to be trained from scratch.
- linear probe: the frozen encoder with its final `norm`, the cls token (or, optionally, the mean
  of the patch tokens) as the feature, and a head `BatchNorm1d(affine=False) -> Linear`. Only the
  head trains; the encoder stays in eval mode and no gradient flows through it.

Checkpoint keys follow the reference implementation (`patch_embed.proj.weight`, `cls_token`,
`pos_embed`, `blocks.N.attn.qkv.weight`, ...), which are also timm's ViT keys. Keys of the pretext
task (`decoder_*`, `mask_token`, `cls_head.*`) are dropped on purpose.

Legend: N batch, L patches, D width, G side of the patch grid (L = G * G).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from supmae.errors import UserError
from supmae.models.state import model_state

LN_EPS = 1e-6
# Pretraining-only parts of a SupMAE / MAE checkpoint: never part of the downstream encoder.
PRETEXT_PREFIXES = ("decoder_", "mask_token", "cls_head.")
# Head count of the standard ViT widths (the state dict cannot tell it: qkv is [3D, D] for any
# head count). ViT-H uses head width 80, the others 64.
KNOWN_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
ENCODER_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")

try:  # timm >= 0.9 keeps the resampler in timm.layers; older releases do not have it
    from timm.layers import resample_abs_pos_embed as _timm_resample
except ImportError:  # pragma: no cover - depends on the installed timm
    _timm_resample = None


def build_vit(
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    num_classes: int,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_path_rate: float = 0.0,
    probe: bool = False,
    feature: str = "avg",
) -> nn.Module:
    """The downstream ViT.

    probe=False: fine-tuning model, `feature` must be "avg" (global pool + fc_norm, no final norm)
    or "token" (cls token after the final norm). probe=True: `LinearProbeViT`, `feature` "token"
    (the reference probe) or "avg" (mean of the normed patch tokens, the feature SupMAE's
    classification branch pools). The head is re-initialised the way the reference does it
    (trunc normal std 2e-5 for fine-tuning, 0.01 for the probe; zero bias).
    """
    if feature not in ("avg", "token"):
        raise UserError(f"unknown feature '{feature}': expected 'avg' (global pool) or 'token' (cls token)")
    if img_size % patch_size:
        raise UserError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
    kwargs = {
        "img_size": img_size,
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": qkv_bias,
        "num_classes": num_classes,
        "global_pool": feature,
        "norm_layer": partial(nn.LayerNorm, eps=LN_EPS),
        "drop_path_rate": drop_path_rate,
    }
    if probe:
        model = LinearProbeViT(**kwargs, fc_norm=False)
    else:
        # fc_norm=True makes timm replace the final norm by an Identity and normalise after pooling.
        model = VisionTransformer(**kwargs, fc_norm=(feature == "avg"))
        nn.init.trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    return model


class LinearProbeViT(VisionTransformer):
    """A frozen ViT encoder with a trainable `BatchNorm1d(affine=False) -> Linear` head.

    `train()` only ever puts the head in training mode (the encoder stays in eval mode, so
    dropout and drop path are off and nothing in the encoder changes), and `forward` extracts the
    features under `torch.no_grad()`, so nothing but the head gets gradients.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        linear = nn.Linear(self.embed_dim, self.num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(self.embed_dim, affine=False, eps=LN_EPS), linear)
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("head."))
        self.train(True)

    def train(self, mode: bool = True) -> LinearProbeViT:
        super().train(False)
        self.training = mode
        self.head.train(mode)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen feature `[N, D]` of images `[N, 3, H, W]`."""
        with torch.no_grad():
            return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- architecture discovery


def infer_encoder_args(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Encoder hyper-parameters read off a (reference-layout) state dict's shapes.

    The head count is not visible in any shape; it is taken from the standard ViT widths, or
    width / 64 otherwise, and is None for other widths (the caller needs a declared value then).
    `UserError` when the state dict is not a ViT encoder.
    """
    need = ("patch_embed.proj.weight", "pos_embed", "cls_token")
    absent = [k for k in need if k not in state]
    if absent:
        raise UserError(
            f"checkpoint does not hold a ViT encoder: missing {', '.join(absent)} "
            f"(first keys: {', '.join(list(state)[:6])})"
        )
    proj = state["patch_embed.proj.weight"]  # [D, 3, p, p]
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise UserError(f"patch_embed.proj.weight has shape {tuple(proj.shape)}, expected [D, 3, p, p]")
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))}
    if not blocks:
        raise UserError("checkpoint has no transformer blocks (no 'blocks.N.*' keys)")
    depth = max(blocks) + 1
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0
    heads: int | None = None  # None: not readable off the weights; a declared value must supply it
    if embed_dim in KNOWN_HEADS:
        heads = KNOWN_HEADS[embed_dim]
    elif embed_dim % 64 == 0:
        heads = embed_dim // 64
    n_tokens = int(state["pos_embed"].shape[1]) - 1
    grid = math.isqrt(n_tokens)
    return {
        "img_size": grid * patch,
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
    }


def registry_encoder_args(name: str) -> dict[str, Any]:
    """Encoder hyper-parameters of a `supmae.models` registry name (`UserError` for an unknown one)."""
    from supmae.models import model_defaults

    args = model_defaults(name)
    return {k: args[k] for k in ("img_size", *ENCODER_KEYS) if k in args}


def encoder_args_from_checkpoint(ckpt: dict[str, Any], model_name: str = "", log: Callable[[str], None] = print
                                 ) -> dict[str, Any]:
    """Encoder hyper-parameters of a pretraining checkpoint, in this order of trust: its
    `model_args` (ours), its `vit_args` (a downstream checkpoint of ours), `model_name` (a supmae
    registry name, `--model`), its reference `args.model` when that name is in our registry, else
    the state dict's shapes. Keys: img_size (of the checkpoint's position grid), patch_size,
    embed_dim, depth, num_heads, mlp_ratio, qkv_bias, and `source` (where they came from)."""
    state = model_state(ckpt)
    inferred = infer_encoder_args(state)
    declared: dict[str, Any] | None = None
    source = "the state dict's shapes"
    if isinstance(ckpt.get("model_args"), dict):
        declared, source = ckpt["model_args"], "the checkpoint's model_args"
    elif isinstance(ckpt.get("vit_args"), dict):
        declared, source = ckpt["vit_args"], "the checkpoint's vit_args"
    elif model_name:
        declared, source = registry_encoder_args(model_name), f"--model {model_name}"
    elif getattr(ckpt.get("args"), "model", None):
        ref_name = ckpt["args"].model
        try:
            declared, source = registry_encoder_args(ref_name), f"the checkpoint's args.model ({ref_name})"
        except UserError:
            log(f"note: reference model name '{ref_name}' is not a supmae model; reading the encoder off its weights")
    out = dict(inferred)
    if declared is not None:
        out.update({k: declared[k] for k in ENCODER_KEYS if k in declared})
    if out["num_heads"] is None:
        raise UserError(
            f"cannot tell the number of attention heads of a width-{out['embed_dim']} encoder from its weights: "
            "pass --model NAME (a supmae model name) or use a checkpoint with 'model_args'"
        )
    if declared is None:  # only then was the shape read off the weights
        log(
            f"note: no model_args in the checkpoint; encoder inferred from its weights: width {out['embed_dim']}, "
            f"depth {out['depth']}, {out['num_heads']} heads, patch {out['patch_size']} (--model NAME overrides)"
        )
    out["source"] = source
    return out


# --------------------------------------------------------------------------- loading pretrained weights


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of `[1, 1 + G*G, D]` position embeddings to `new_grid`; the cls row is kept."""
    n_tokens = pos_embed.shape[1] - 1
    old = math.isqrt(n_tokens)
    if old * old != n_tokens:
        raise UserError(f"pos_embed has {n_tokens} patch positions, not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    if _timm_resample is not None:
        # antialias off: the reference interpolates with plain bicubic (align_corners=False).
        return _timm_resample(pos_embed, list(new_grid), [old, old], num_prefix_tokens=1,
                              interpolation="bicubic", antialias=False)
    cls_row, grid = pos_embed[:, :1], pos_embed[:, 1:]  # [1, 1, D], [1, G*G, D]
    d = grid.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2)  # [1, D, G, G]
    grid = nn.functional.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos_embed.dtype)  # [1, G'*G', D]
    return torch.cat([cls_row, grid], dim=1)


def _fmt_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], log: Callable[[str], None] = print
                    ) -> list[str]:
    """Load a pretraining state dict into a downstream ViT non-strictly; return the missing keys.

    Dropped on purpose: the pretext parts (`decoder_*`, `mask_token`, `cls_head.*`), any `head.*`
    (the downstream head is new) and, when the model pools into `fc_norm`, the final `norm.*`.
    Position embeddings are resampled bicubically when the grid differs. What is left must fit:
    a key the model lacks or a shape that differs raises `UserError` listing them (a checkpoint
    of another architecture), and only the head (plus `fc_norm` for fine-tuning) may stay missing.
    """
    own = model.state_dict()
    uses_fc_norm = not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity)
    keep: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(PRETEXT_PREFIXES) or k.startswith("head."):
            continue
        if uses_fc_norm and k.startswith("norm."):
            continue
        keep[k] = v
    if "pos_embed" in keep and "pos_embed" in own and keep["pos_embed"].shape != own["pos_embed"].shape:
        src = keep["pos_embed"]
        if src.ndim == 3 and src.shape[-1] == own["pos_embed"].shape[-1]:
            grid = tuple(model.patch_embed.grid_size)
            keep["pos_embed"] = resample_pos_embed(src, grid)
            log(f"resampled pos_embed {tuple(src.shape)} -> {tuple(keep['pos_embed'].shape)} (bicubic, cls row kept)")
    unexpected = [k for k in keep if k not in own]  # checkpoint order: the embeddings come first
    mismatched = [k for k in keep if k in own and keep[k].shape != own[k].shape]
    if unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("shape mismatch: " + _fmt_keys(
                [f"{k} {tuple(keep[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]))
        if unexpected:
            parts.append("unexpected encoder keys: " + _fmt_keys(unexpected))
        raise UserError(
            "the checkpoint is of another architecture than the model built for it "
            f"({'; '.join(parts)}); pass --model NAME if the checkpoint's own description is wrong"
        )
    allowed_missing = ("head.", "fc_norm.") if uses_fc_norm else ("head.",)
    missing = sorted(k for k in own if k not in keep)
    bad_missing = [k for k in missing if not k.startswith(allowed_missing)]
    if bad_missing:
        raise UserError(f"the checkpoint lacks encoder weights the model needs: {_fmt_keys(bad_missing)}")
    result = model.load_state_dict(keep, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return list(result.missing_keys)


def downstream_args_from_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`build_vit` arguments of a downstream (fine-tuned or probed) state dict without `vit_args`,
    e.g. a reference fine-tuned checkpoint: a probe has `head.1.weight` behind a BatchNorm, a
    fine-tuned global-pool model has `fc_norm.*`."""
    enc = infer_encoder_args(state)
    if enc["num_heads"] is None:
        raise UserError(
            f"cannot tell the number of attention heads of a width-{enc['embed_dim']} encoder from its weights: "
            "use a checkpoint with 'vit_args' (ours) or a standard ViT width"
        )
    probe = "head.1.weight" in state
    head_w = state.get("head.1.weight" if probe else "head.weight")
    if head_w is None:
        raise UserError("checkpoint has no classification head ('head.weight'): is it a pretraining checkpoint?")
    feature = "avg" if "fc_norm.weight" in state else "token"
    return {**{k: enc[k] for k in ("img_size", *ENCODER_KEYS)}, "num_classes": int(head_w.shape[0]),
            "probe": probe, "feature": feature}
