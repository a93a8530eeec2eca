"""Reading a model's weights out of a checkpoint dict: a pure helper the models may use (they must not
import the training code, which re-exports it from `supmae.train.checkpoint`)."""

from __future__ import annotations

from typing import Any

import torch

from supmae.errors import UserError


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint (ours or the reference's: both keep it under 'model')."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("checkpoint has no model state dict under 'model'")
    return state
