"""Named SupMAE variants and `create_model(name, **overrides)`.

A variant is a dict of `SupMAE` constructor arguments over the constructor defaults (which are the
paper's default model). `create_model(**model.model_args)` rebuilds any model, because
`model_args` holds the registry name plus every constructor argument.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from supmae.errors import UserError
from supmae.models.supmae import SupMAE

# Encoder sizes of the ViT family (width, depth, heads).
_VIT = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}
# The reference decoder: 512 wide, 16 heads (depth set per variant).
_DEC512 = {"decoder_embed_dim": 512, "decoder_num_heads": 16}
# A decoder sized for 32-64 px images on a CPU (64 patches): 128 wide, 4 heads, 1 block.
_DEC128 = {"decoder_embed_dim": 128, "decoder_num_heads": 4, "decoder_depth": 1}

_VARIANTS: dict[str, dict[str, Any]] = {
    # The bare constructor defaults (ViT-B/16, 1-block decoder): what `SupMAE()` builds.
    "supmae": {},
    # Reference names (the authors' models_supmae.py), reference defaults.
    "mae_vit_base_patch16_dec512d8b": dict(**_VIT["base"], patch_size=16, **_DEC512, decoder_depth=8),
    "mae_vit_base_patch16_dec512d1b": dict(**_VIT["base"], patch_size=16, **_DEC512, decoder_depth=1),
    "mae_vit_large_patch16_dec512d8b": dict(**_VIT["large"], patch_size=16, **_DEC512, decoder_depth=8),
    "mae_vit_huge_patch14_dec512d8b": dict(**_VIT["huge"], patch_size=14, **_DEC512, decoder_depth=8),
    # Our names at 224 px: the paper's 1-block decoder on every encoder size.
    **{f"supmae_vit_{size}_patch16": dict(**_VIT[size], patch_size=16, **_DEC512, decoder_depth=1) for size in _VIT},
    # Small images for CPU work: 32 px with patch 4 and 64 px with patch 8, both 8x8 = 64 patches.
    "supmae_vit_tiny_patch4": dict(**_VIT["tiny"], img_size=32, patch_size=4, **_DEC128),
    "supmae_vit_small_patch4": dict(**_VIT["small"], img_size=32, patch_size=4, **_DEC128),
    "supmae_vit_tiny_patch8": dict(**_VIT["tiny"], img_size=64, patch_size=8, **_DEC128),
    "supmae_vit_small_patch8": dict(**_VIT["small"], img_size=64, patch_size=8, **_DEC128),
}

_CONSTRUCTOR_ARGS = tuple(p for p in inspect.signature(SupMAE.__init__).parameters if p != "self")


def list_models() -> list[str]:
    """Every registered variant name, sorted."""
    return sorted(_VARIANTS)


def model_defaults(name: str) -> dict[str, Any]:
    """The full constructor arguments of variant `name` (constructor defaults filled in)."""
    if name not in _VARIANTS:
        close = difflib.get_close_matches(name, list(_VARIANTS), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else f"; known: {', '.join(list_models())}"
        raise UserError(f"unknown model '{name}'{hint}")
    params = inspect.signature(SupMAE.__init__).parameters
    args = {k: params[k].default for k in _CONSTRUCTOR_ARGS}
    args.update(_VARIANTS[name])
    return args


def create_model(name: str, **overrides: Any) -> SupMAE:
    """Build variant `name`, with any constructor argument overridden (e.g. `num_classes=10`,
    `depth=2`, `attn_impl="eager"`). Unknown names and arguments raise `UserError`."""
    args = model_defaults(name)
    for key in overrides:
        if key not in args:
            close = difflib.get_close_matches(key, list(args), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; known: {', '.join(args)}"
            raise UserError(f"unknown model argument '{key}' for {name}{hint}")
    args.update(overrides)
    model = SupMAE(**args)
    model.model_args["name"] = name
    return model
