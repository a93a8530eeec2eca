"""`supmae bench checkpoint`: how long a checkpoint save holds the training loop, synchronous against
asynchronous, on the paper's model (ViT-B/16, 1-block decoder) with its AdamW state.

    supmae bench checkpoint --repeats 3

Three figures, each measured `--repeats` times after one first call that is reported apart (it pays
the one-off costs: the host buffers' allocation and first touch, the first file's creation):

    sync stall      `atomic_save({model, optimizer, epoch}, path)`, the trainer's save today: the loop waits
                    for pickling, writing, fsync and rename
    snapshot        `HostSnapshot.copy(payload)` alone: the copy into reused host buffers
    async stall     what `CheckpointWriter.save` blocks the caller (the wait for a previous save, none
                    here since each save is waited for before the next, plus the snapshot); its
                    background write (serialise, write, fsync, rename) is reported beside it

The snapshot alone is timed on the writer's own buffers, in turns with the writer's saves (snapshot,
save, wait for its write; again), so the two figures the target compares see the same buffers and the
same moment of a shared machine. The first snapshot allocates the buffers the first save then reuses, so
the first call of the async stall does not pay for the allocation.

The acceptance target is an async stall (median) at most 1.10 x the snapshot's median: the writer adds
almost nothing to the copy it cannot avoid. The optimizer state is made real by one AdamW step on zero
gradients (every moment buffer allocated, as after the first training step). The synchronous file is
deleted before the writer's buffers are made.

On the CPU the snapshot is a memory copy per tensor, which torch splits over its intra-op threads: on
a machine whose cores other processes share, each split waits for a descheduled thread and the copy
can run tens of times slower than on one thread (`--threads 1`); the header says the thread count.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

from benchmarks.timing import apply_threads, resolve_device, synchronize
from supmae.models import create_model
from supmae.train.async_checkpoint import CheckpointWriter
from supmae.train.checkpoint import atomic_save

TARGET_RATIO = 1.10  # async stall <= snapshot x this


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supmae bench checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed saves per figure, after one first call (default 3)")
    p.add_argument("--dir", default="", help="where the files are written (default: a temporary folder, deleted)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    # A smaller model for the tests; the figures to report are the default's.
    p.add_argument("--model", default="supmae_vit_base_patch16", help=argparse.SUPPRESS)
    p.add_argument("--decoder-depth", type=int, default=1, help=argparse.SUPPRESS)
    return p


def build_payload(model_name: str, decoder_depth: int, device: torch.device) -> dict[str, Any]:
    """{model, optimizer, epoch} as the trainer saves them, the AdamW state allocated by one step."""
    model = create_model(model_name, decoder_depth=decoder_depth).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0}


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _summary(first: float, seconds: list[float]) -> dict[str, Any]:
    return {"first": first, "seconds": seconds, "median": statistics.median(seconds), "min": min(seconds),
            "max": max(seconds)}


def _timed(device: torch.device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time_writer(payload: dict[str, Any], repeats: int, device: torch.device, path: str
                 ) -> tuple[list[float], list[float], list[float]]:
    """Seconds of the snapshot alone, of the writer's stall and of its background write, per call."""
    snaps, stalls, writes = [], [], []
    with CheckpointWriter() as writer:
        for _ in range(repeats + 1):
            snaps.append(_timed(device, functools.partial(writer.snapshot.copy, payload)))
            synchronize(device)
            stalls.append(writer.save(payload, path))
            writes.append(writer.wait().write_seconds)
    os.unlink(path)
    return snaps, stalls, writes


def run(repeats: int, out_dir: str, device: torch.device, model_name: str, decoder_depth: int) -> dict[str, Any]:
    payload = build_payload(model_name, decoder_depth, device)
    result: dict[str, Any] = {"model": model_name, "decoder_depth": decoder_depth, "device": str(device),
                              "torch_threads": torch.get_num_threads(), "repeats": repeats,
                              "payload_bytes": tensor_bytes(payload)}
    figures: dict[str, dict[str, Any]] = {}

    # (a) today's save: the loop waits for the whole write
    sync_path = os.path.join(out_dir, "sync.pth")
    times = [_timed(device, lambda: atomic_save(payload, sync_path)) for _ in range(repeats + 1)]
    figures["sync_stall"] = _summary(times[0], times[1:])
    result["file_bytes"] = os.path.getsize(sync_path)
    os.unlink(sync_path)

    # (b) the host snapshot alone and (c) the asynchronous writer's stall and background write, taken in turns
    # on the same host buffers (the writer's), so that both see the same machine: on a shared one the memory
    # bandwidth drifts between minutes. Each save is waited for before the next snapshot.
    snaps, stalls, writes = _time_writer(payload, repeats, device, os.path.join(out_dir, "async.pth"))
    gc.collect()  # the writer's buffers went with it
    figures["snapshot"] = _summary(snaps[0], snaps[1:])
    figures["async_stall"] = _summary(stalls[0], stalls[1:])
    figures["async_background_write"] = _summary(writes[0], writes[1:])

    result["figures"] = figures
    result["ratio_async_over_sync"] = figures["async_stall"]["median"] / figures["sync_stall"]["median"]
    result["async_over_snapshot"] = figures["async_stall"]["median"] / figures["snapshot"]["median"]
    result["target_met"] = figures["async_stall"]["median"] <= figures["snapshot"]["median"] * TARGET_RATIO
    return result


def render(result: dict[str, Any]) -> str:
    gib = result["payload_bytes"] / 2**30
    lines = [
        (f"model {result['model']} (decoder depth {result['decoder_depth']}) + AdamW state on {result['device']} "
         f"({result['torch_threads']} torch threads): "
         f"payload {gib:.3f} GiB of tensors, file {result['file_bytes'] / 2**30:.3f} GiB; "
         f"{result['repeats']} timed saves per figure after one first call"),
        "",
        "| figure | median s | min s | max s | first call s |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"sync_stall": "sync stall (atomic_save)", "snapshot": "host snapshot alone",
             "async_stall": "async stall (CheckpointWriter.save)",
             "async_background_write": "async background write"}
    for key, name in names.items():
        f = result["figures"][key]
        lines.append(f"| {name} | {f['median']:.3f} | {f['min']:.3f} | {f['max']:.3f} | {f['first']:.3f} |")
    lines += [
        "",
        f"stall(async) / stall(sync) = {result['ratio_async_over_sync']:.3f} (medians)",
        (f"stall(async) / snapshot = {result['async_over_snapshot']:.3f}: target <= {TARGET_RATIO:.2f} "
         f"{'met' if result['target_met'] else 'NOT met'}"),
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    if a.repeats < 1:
        build_parser().error("--repeats must be at least 1")
    apply_threads(a.threads)
    device = resolve_device(a.device)
    out_dir = a.dir or tempfile.mkdtemp(prefix="supmae-bench-checkpoint-")
    os.makedirs(out_dir, exist_ok=True)
    try:
        result = run(a.repeats, out_dir, device, a.model, a.decoder_depth)
    finally:
        if not a.dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    print(render(result))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"written: {a.json}")
    return 0
