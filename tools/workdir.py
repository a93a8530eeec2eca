"""A conversion's output folder OUT while it is written: the options that decide its bytes (a resume
must match them), the chunk records in `OUT/.work/` that make it resumable, and the lock that lets one
conversion or merge write it at a time. Shared by the conversion and the merge."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence

from pipelines.constants import MANIFEST_FILE, wds_dir
from pipelines.errors import DataError
from tools.files import OutLock
from tools.listing import SplitPlan

# Bump when the same options would give different output bytes (keys, layout, encoding rules).
TOOL_VERSION = 2  # 2: the .beton's crc32 field
FORMATS = ("ffcv", "wds")
DEFAULT_SHARD_SIZE = 1000
WORK_DIR = ".work"
SOURCES_DIR = "sources"
STATE_FILE = "state.json"
PART_FILE = "part.json"
LOCK_FILE = "convert.lock"  # in WORK_DIR: held by the one conversion or merge writing OUT


def conversion_identity(
    src: str,
    formats: Sequence[str],
    max_res: int,
    quality: int,
    shard_size: int,
    splits: list[str],
    seed: int,
    max_pixels: int,
    layout: str = "imagefolder",
    shard: tuple[int, int] | None = None,
) -> dict:
    """Everything that decides the output bytes; a resume must match it exactly."""
    import PIL

    identity = {
        "tool_version": TOOL_VERSION,
        "source_root": src,
        "layout": layout,
        "formats": list(formats),
        "max_res": max_res,
        "quality": quality,
        "shard_size": shard_size,
        "splits": splits,
        "seed": seed,
        "max_pixels": max_pixels,
        "pillow": PIL.__version__,
    }
    if shard is not None:
        identity["shard"] = list(shard)
    return identity


def identity_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys)


def shard_record_path(out: str, split: str, k: int) -> str:
    return os.path.join(out, WORK_DIR, split, f"{split}-{k:06d}.json")


def shard_tar_path(out: str, split: str, k: int, keep_wds: bool) -> str:
    base = wds_dir(out, split) if keep_wds else os.path.join(out, WORK_DIR, split)
    return os.path.join(base, f"{split}-{k:06d}.tar")


def load_finished(out: str, plan: SplitPlan, keep_wds: bool, chunks: range) -> dict[int, dict]:
    """Chunk records whose files are all in place; anything else is redone."""
    done = {}
    for k in chunks:
        path = shard_record_path(out, plan.name, k)
        try:
            with open(path) as f:
                rec = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        ok = True
        if rec["tar"] is not None:
            for key in ("tar", "idx"):
                if rec[key] is None:
                    continue
                full = os.path.join(out, rec[key])
                if not os.path.isfile(full) or os.path.getsize(full) != rec[f"{key}_bytes"]:
                    ok = False
        if ok and rec["tar"] is not None and (rec["idx"] is None) == keep_wds:
            ok = False
        if ok:
            done[k] = rec
    return done


def out_entries(out: str) -> list[str]:
    """What OUT holds besides our lock (`.work` counts only when it holds more than the lock)."""
    if not os.path.isdir(out):
        return []
    names = [n for n in os.listdir(out) if n != WORK_DIR]
    work = os.path.join(out, WORK_DIR)
    if os.path.isdir(work) and [n for n in os.listdir(work) if n != LOCK_FILE]:
        names.append(WORK_DIR)
    return names


@contextlib.contextmanager
def lock_out(out: str) -> Iterator[None]:
    """Hold OUT's lock for this conversion or merge, or refuse at once naming the holder. A folder
    that holds something else than a conversion is refused before anything is written into it."""
    work = os.path.join(out, WORK_DIR)
    if out_entries(out) and not os.path.isdir(work) and not os.path.isfile(os.path.join(out, MANIFEST_FILE)):
        raise DataError(f"{out} is not empty and holds no conversion; choose an empty or new folder")
    os.makedirs(work, exist_ok=True)
    lock = OutLock(os.path.join(work, LOCK_FILE))
    holder = lock.acquire()
    if holder:
        raise DataError(
            f"{out} is being written by another conversion ({holder}); wait for it to end, or choose another OUT"
        )
    try:
        yield
    finally:
        # A finished conversion keeps no work folder, also when this run refused or had nothing to do.
        if os.path.isfile(os.path.join(out, MANIFEST_FILE)) and set(_listdir(work)) <= {LOCK_FILE}:
            shutil.rmtree(work, ignore_errors=True)
        lock.release()


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
