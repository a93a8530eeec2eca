"""Set-up checks every job makes the same way: the accumulation of an effective batch, whether a
dataset has a split, and how a resumed run's config differs from its checkpoint's."""

from __future__ import annotations

import json
import os
from typing import Any

from supmae.errors import UserError


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ("resume",)) -> list[str]:
    """`key: old -> new` for every leaf that differs between two `to_dict` configs."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def has_split(path: str, split: str) -> bool:
    """Whether dataset `path` (a converted dir, or an ImageFolder root) has the split `split`."""
    from pipelines.constants import MANIFEST_FILE

    manifest = os.path.join(path, MANIFEST_FILE)
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as fh:
            return split in (json.load(fh).get("splits") or {})
    return os.path.isdir(os.path.join(path, split))


def resolve_accumulation(optim: Any, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimiser step: `optim.accum_iter`, or derived from `optim.effective_batch`
    (`optim`: a job's optimiser config with those two keys)."""
    if optim.effective_batch <= 0:
        return optim.accum_iter
    per_step = batch_size * world_size
    if optim.effective_batch % per_step:
        raise UserError(
            f"--optim.effective_batch {optim.effective_batch} is not a multiple of batch_size x world_size = "
            f"{batch_size} x {world_size} = {per_step}; change --data.batch_size, or set --optim.effective_batch 0 "
            f"and choose --optim.accum_iter"
        )
    derived = optim.effective_batch // per_step
    if optim.accum_iter not in (1, derived):
        raise UserError(
            f"--optim.accum_iter {optim.accum_iter} contradicts --optim.effective_batch {optim.effective_batch} "
            f"(which needs {derived} at batch_size {batch_size} x world_size {world_size}); set only one of them"
        )
    return derived
