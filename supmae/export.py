"""`supmae export`: the pretrained encoder alone, in the files other tools load.

    supmae export --checkpoint CK --to timm OUT.safetensors
    supmae export --checkpoint CK --to mae OUT.pth

CK is a pretraining checkpoint, ours or the reference's (`model` holds the reference state-dict
layout). Both targets keep the encoder only: the pretext parts (`decoder_*`, `mask_token`,
`cls_head.*`) are dropped, the final `norm` is kept.

- `timm`: a safetensors file of timm's `VisionTransformer` keys (ours are the same names), which
  `timm.create_model('vit_base_patch16_224', pretrained=True, pretrained_cfg_overlay=dict(file=OUT),
  num_classes=0)` loads strictly for a ViT-B/16 encoder (other sizes: the matching timm name, or
  the width / depth / patch / image size as keyword overrides). Before writing, the export is
  loaded strictly into a timm ViT of the checkpoint's shape, so a file that timm would refuse is
  never written. Our encoder hyper-parameters ride along in the safetensors metadata
  (`supmae.model_args`, JSON) so that `supmae finetune --pretrained OUT.safetensors` rebuilds the
  encoder exactly (timm ignores metadata).
- `mae`: a `.pth` holding `{"model": encoder state dict}`, what the MAE / SupMAE fine-tuning code
  reads: loaded there with `strict=False`, exactly the head keys are missing (`head.*`, plus
  `fc_norm.*` with global pooling, where the final `norm.*` is unused).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from supmae.errors import UserError, require_package
from supmae.files import write_atomically
from supmae.train.checkpoint import SAFETENSORS_METADATA_KEY

TARGETS = ("timm", "mae")
# Pretraining-only parts of a SupMAE / MAE state dict; `head.` is a downstream classifier.
DROPPED_PREFIXES = ("decoder_", "mask_token", "cls_head.", "head.")


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a pretraining state dict (pretext parts and any head dropped),
    contiguous and unshared, as safetensors requires."""
    out = {k: v.detach().clone().contiguous() for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    if "norm.weight" not in out:
        kind = "fine-tuned with global pooling (fc_norm)" if "fc_norm.weight" in out else "without a final norm"
        raise UserError(f"the checkpoint's encoder is {kind}: export the pretraining checkpoint instead")
    return out


def _timm_vit(args: dict[str, Any]) -> torch.nn.Module:
    """timm's plain ViT (cls token, final norm, no head) of the encoder's shape."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=int(args["img_size"]),
        patch_size=int(args["patch_size"]),
        embed_dim=int(args["embed_dim"]),
        depth=int(args["depth"]),
        num_heads=int(args["num_heads"]),
        mlp_ratio=float(args.get("mlp_ratio", 4.0)),
        qkv_bias=bool(args.get("qkv_bias", True)),
        num_classes=0,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )


def export(checkpoint: str, target: str, out: str, model_name: str = "", log=print) -> dict[str, Any]:
    """Write the encoder of `checkpoint` to `out` for `target` ("timm" or "mae"); return a summary
    (keys written, encoder arguments)."""
    from supmae.models.state import model_state
    from supmae.models.vit import encoder_args_from_checkpoint
    from supmae.train.checkpoint import atomic_save, load_checkpoint

    if target not in TARGETS:
        raise UserError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "timm" and not out.endswith(".safetensors"):
        # timm picks the safetensors reader by this suffix and would unpickle anything else.
        raise UserError(f"--to timm writes safetensors: OUT must end with .safetensors, got {out}")
    if os.path.abspath(out) == os.path.abspath(checkpoint):
        raise UserError("OUT must not be the checkpoint itself")
    ckpt = load_checkpoint(checkpoint)  # a .safetensors file too (read_safetensors)
    args = encoder_args_from_checkpoint(ckpt, model_name, log=log)
    args = {k: v for k, v in args.items() if k != "source"}
    state = encoder_state(model_state(ckpt))
    # The check a user would otherwise only meet in timm: every key known, every shape right.
    vit = _timm_vit(args)
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"the encoder does not fit timm's ViT: {' '.join(first[:3])}") from None
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    if target == "timm":
        st = require_package("safetensors.torch", "safetensors")
        metadata = {"format": "pt", SAFETENSORS_METADATA_KEY: json.dumps(args, sort_keys=True)}
        write_atomically(out, lambda tmp: st.save_file(state, tmp, metadata=metadata))
    else:
        atomic_save({"model": state, "model_args": args}, out)
    return {"keys": len(state), "encoder": args, "out": out, "target": target}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supmae export",
        description="Write a pretrained encoder for other tools: timm (safetensors, loads strictly into timm's "
        "ViT with num_classes=0) or mae (a .pth whose 'model' the MAE / SupMAE fine-tuning code loads).",
    )
    p.add_argument("out", metavar="OUT", help="file to write (--to timm: *.safetensors)")
    p.add_argument("--checkpoint", required=True, help="pretraining checkpoint (ours or the reference's)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target tool")
    p.add_argument("--model", default="", help="supmae model name, when the checkpoint does not describe its encoder")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    summary = export(args.checkpoint, args.to, args.out, args.model, log=log)
    enc = summary["encoder"]
    print(
        f"wrote {summary['out']} ({args.to}): {summary['keys']} encoder tensors, width {enc['embed_dim']}, "
        f"depth {enc['depth']}, patch {enc['patch_size']}, image {enc['img_size']}"
    )
    return 0
