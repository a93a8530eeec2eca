"""Per-rank RNG state: captured into a checkpoint (loadable with weights_only) and restored on resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from supmae.train import distributed as dist_utils


def _to_lists(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_to_lists(x) for x in obj]
    return obj


def _to_tuples(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_to_tuples(x) for x in obj)
    return obj


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's global RNG states as tensors and plain types (loadable with weights_only)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(_to_lists(random.getstate())),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Put back the states `capture_rng` returned."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def gather_rng(device: torch.device) -> dict[str, Any]:
    """Every rank's RNG state (a collective when distributed): rank 0's at the top level (so a 1-rank
    resume of a multi-rank run works), all of them under `by_rank`."""
    states = dist_utils.all_gather_object(capture_rng(device))
    return {**states[0], "by_rank": states if len(states) > 1 else None}


def restore_rank_rng(saved: dict[str, Any], rank: int, world_size: int, device: torch.device) -> None:
    """Restore this rank's own state from `gather_rng`'s dict (rank 0's when the world size changed)."""
    per_rank = saved.get("by_rank")
    restore_rng(per_rank[rank] if per_rank and len(per_rank) == world_size else saved, device)
