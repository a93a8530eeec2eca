"""Checkpoint files: atomic writes, safe loads, and finding the newest valid one.

A checkpoint is a dict of plain types and tensors. Writes go to a temporary name in the same
directory, are fsynced, then renamed, so a killed run never leaves a half-written file under a
final name. Loads use `torch.load(weights_only=True)`: only tensors and plain containers (and
the `argparse.Namespace` the reference implementation pickles as `args`) can be unpickled, so
opening a checkpoint cannot run code.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
from typing import Any

import torch

from supmae.errors import UserError, require_package
from supmae.files import write_atomically
from supmae.models.state import model_state
from supmae.train import faults

__all__ = [
    "LAST_NAME",
    "atomic_save",
    "copy_checkpoint",
    "epoch_checkpoints",
    "find_resume_checkpoint",
    "load_checkpoint",
    "model_state",
]

LAST_NAME = "checkpoint-last.pth"
_EPOCH_RE = re.compile(r"checkpoint-(\d+)\.pth$")


def atomic_save(obj: Any, path: str) -> None:
    """`torch.save` to `path` via a temporary file, fsync and rename (same directory)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            faults.in_save(obj, fh)  # test hook (SUPMAE_TEST_KILL_AT=save=E): a kill half-way through this write
            torch.save(obj, fh)

    write_atomically(path, write)


def copy_checkpoint(src: str, dst: str) -> None:
    """Make `dst` hold the bytes of the finished file `src` without serialising them again, through a
    temporary name, fsync and rename (as `atomic_save`).

    A copy, not a hard link: a numbered checkpoint is the fallback when the newest file is damaged,
    and a hard link would share that damage (one inode). `shutil.copyfile` copies in the kernel
    (sendfile / copy_file_range, a reflink where the filesystem has them), so it costs disk bandwidth
    only, not a second pickling of the state while the other ranks wait.
    """
    write_atomically(dst, lambda tmp: shutil.copyfile(src, tmp))


# Where `supmae export --to timm` keeps our encoder arguments inside a safetensors file.
SAFETENSORS_METADATA_KEY = "supmae.model_args"


def read_safetensors(path: str) -> dict[str, Any]:
    """A timm safetensors file as a checkpoint dict: `model` (the state dict) and, when the file
    was written by `supmae export`, `model_args` (our encoder arguments from its metadata)."""
    st = require_package("safetensors", "safetensors")
    try:
        with st.safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no mapping
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise UserError(f"cannot read safetensors file {path}: {type(exc).__name__}: {exc}") from None
    ckpt: dict[str, Any] = {"model": state}
    if SAFETENSORS_METADATA_KEY in meta:
        try:
            ckpt["model_args"] = json.loads(meta[SAFETENSORS_METADATA_KEY])
        except json.JSONDecodeError:
            pass  # foreign metadata under our key: the shapes still tell the encoder
    return ckpt


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; `UserError` naming the file when it is missing, corrupt or unsafe."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):  # an encoder alone, as timm stores it (`supmae export --to timm`)
        return read_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt / unsafe pickles
        text = str(exc).strip().splitlines()
        first = text[0] if text else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UserError(
                f"refusing to load {path}: it contains a pickled object that is not a plain tensor, "
                f"number or string ({first})"
            ) from None
        raise UserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first}") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def epoch_checkpoints(run_dir: str) -> list[str]:
    """Numbered checkpoints of a run directory, newest epoch first."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoint-*.pth")):
        m = _EPOCH_RE.search(path)
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(run_dir: str, log=print) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint of `run_dir` that loads, with its content. `checkpoint-last.pth` is
    written at least as often as the numbered ones, so it is tried first, then the numbered ones
    newest first; a corrupt or truncated file is reported through `log` and the next one used."""
    candidates = epoch_checkpoints(run_dir)
    last = os.path.join(run_dir, LAST_NAME)
    if os.path.isfile(last):
        candidates.insert(0, last)
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except UserError as exc:
            log(f"warning: skipping unusable checkpoint: {exc}")
    return None
