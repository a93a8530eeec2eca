"""The doctor's judgement, pure arithmetic on what it measured: data- or compute-bound and what to use
(`verdict`), what the recipe costs (`projection`), and whether a node of data-sheet GPUs feeds itself
(`node_verdict`)."""

from __future__ import annotations

import math
from typing import Any

from supmae.errors import UserError

# ---------------------------------------------------------------------------------------------- verdict

# A loader must deliver this much more than the step consumes to count as keeping up with fewer
# workers: epoch-to-epoch jitter and the cores the step itself needs on a CPU.
HEADROOM = 1.2


def verdict(loaders: list[dict[str, Any]], step_ips: float) -> dict[str, Any]:
    """bound ("data" exactly when the best loader delivers fewer images/s than the step consumes), by how
    much, and the pipeline and worker count to use: the fewest workers (then the fastest) that deliver
    HEADROOM x the step's rate, else the best loader."""
    ok = [r for r in loaders if r.get("available") and r.get("images_per_sec")]
    if not ok:
        raise UserError("no pipeline could run here (see the reasons in the loader table)")
    best = max(ok, key=lambda r: r["images_per_sec"])
    bound = "data" if best["images_per_sec"] < step_ips else "compute"
    keeping_up = [r for r in ok if r["images_per_sec"] >= HEADROOM * step_ips]
    if keeping_up:
        rec = min(keeping_up, key=lambda r: (r["workers"], -r["images_per_sec"]))
        why = (f"the fewest workers that deliver {HEADROOM:g}x what the step consumes "
               f"({rec['images_per_sec']:.0f} >= {HEADROOM:g} x {step_ips:.0f} images/s)")
    else:
        rec = best
        why = "the fastest loader measured" + (" (none keeps up with the step)" if bound == "data" else
                                               f" (none has {HEADROOM:g}x headroom)")
    factor = step_ips / best["images_per_sec"] if bound == "data" else best["images_per_sec"] / step_ips
    return {"bound": bound, "factor": factor, "best": {"pipeline": best["pipeline"], "workers": best["workers"],
                                                       "images_per_sec": best["images_per_sec"]},
            "recommendation": {"pipeline": rec["pipeline"], "workers": rec["workers"],
                               "images_per_sec": rec["images_per_sec"], "why": why},
            "rate": min(rec["images_per_sec"], step_ips)}


def projection(epochs: int, images_per_epoch: int, rate: float, devices: int, machines: int,
               price: float | None) -> dict[str, Any]:
    """Wall-clock and device-hours of `epochs` epochs at `rate` images/s per device."""
    wall = epochs * images_per_epoch / (rate * devices) / 3600.0
    device_hours = wall * devices
    n_wall = wall / machines
    return {"epochs": epochs, "images_per_epoch": images_per_epoch, "images_per_sec_per_device": rate,
            "devices": devices, "wall_hours": wall, "device_hours": device_hours,
            "cost": device_hours * price if price is not None else None, "machines": machines,
            "wall_hours_on_machines": n_wall, "device_hours_on_machines": device_hours,
            "cost_on_machines": device_hours * price if price is not None else None}


def loop_projection(costs: dict[str, Any], rate: float, devices: int, images_per_epoch: int, val_images: int,
                    checkpoint_minutes: float, val_every: int) -> dict[str, Any]:
    """The loop's own costs as shares of the projected wall: an epoch at `rate` images/s per device on
    `devices` devices, a checkpoint stall (`costs["snapshot_seconds"]`) every `checkpoint_minutes` and at
    each epoch's end, and an evaluation of `val_images` at the measured evaluation rate every `val_every`
    epochs (all devices evaluate their share)."""
    epoch = images_per_epoch / (rate * devices)
    saves = (epoch / (60.0 * checkpoint_minutes) if checkpoint_minutes > 0 else 0.0) + 1.0
    ckpt = saves * costs["snapshot_seconds"]
    evaluation = val_images / (costs["eval_images_per_sec"] * devices) / max(val_every, 1) if val_images else 0.0
    total = epoch + ckpt + evaluation
    return {"epoch_train_seconds": epoch, "checkpoints_per_epoch": saves, "checkpoint_seconds_per_epoch": ckpt,
            "eval_seconds_per_epoch": evaluation, "checkpoint_share": ckpt / total, "eval_share": evaluation / total,
            "rate": rate, "devices": devices, "checkpoint_minutes": checkpoint_minutes, "val_every": val_every,
            "val_images": val_images, **costs}


# ---------------------------------------------------------------------------------------------- node verdict

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from each GPU's data sheet. The sheets print
# the sparse figure first; the dense one is half of it.
GPU_BF16_DENSE_TFLOPS: dict[str, float] = {
    # NVIDIA H100 Tensor Core GPU data sheet, SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity.
    "h100": 989.4,
    # NVIDIA H200 Tensor Core GPU data sheet, SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity.
    "h200": 989.4,
    # NVIDIA A100 Tensor Core GPU data sheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity).
    "a100": 312.0,
    # NVIDIA RTX A5000 data sheet: Tensor Performance 222.2 TFLOPS (with sparsity).
    "a5000": 111.1,
    # NVIDIA L40S data sheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity).
    "l40s": 362.05,
}


DALI_NOT_MEASURED = ("not measured: DALI's nvJPEG / hardware JPEG decoder runs on the GPU, and this run has none "
                     "(its CPU rate here says nothing about it)")


def gpu_images_per_sec(gpu: str, mfu: float, flops_per_image: float) -> float:
    """Images/s one GPU of the table consumes at `mfu` of its data-sheet bf16 peak."""
    return mfu * GPU_BF16_DENSE_TFLOPS[gpu] * 1e12 / flops_per_image


def node_verdict(gpu: str, gpus: int, cores: int, consumed_per_gpu: float, per_core: dict[str, float | None],
                 scaling: dict[str, float | None], not_measured: dict[str, str] | None = None,
                 storage_max_side: int | None = None, ceilings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Does a node of `gpus` GPUs and `cores` cores feed itself? Pure arithmetic on measured inputs.

    Each GPU's training process takes one core; the rest decode. A pipeline supplies its measured
    one-worker rate x the scaling efficiency measured between 1 and 2 workers (capped at 1: a
    superlinear pair is noise, not a promise) x those cores. Bound "data" exactly when the best
    supply is below what the GPUs consume; cores per GPU needed = 1 for training + the decoding
    cores one GPU's share takes, with the best pipeline. With the one-core decode `ceilings` of the
    same files (measure_decode_ceilings: "entropy_floor", "full_c_decode" images/s), each pipeline's
    per-core rate as a fraction of them, and the cores per GPU a decoder at each would need."""
    cores_for_data = max(cores - gpus, 0)
    consumed = consumed_per_gpu * gpus
    supplied: dict[str, float | None] = {}
    needed: dict[str, int | None] = {}
    eff: dict[str, float | None] = {}
    for p, rate in per_core.items():
        e = scaling.get(p)
        eff[p] = None if e is None else min(1.0, e)
        if rate is None or rate <= 0 or eff[p] is None or eff[p] <= 0:
            supplied[p], needed[p] = None, None
            continue
        per_core_scaled = rate * eff[p]
        supplied[p] = per_core_scaled * cores_for_data
        needed[p] = 1 + math.ceil(consumed_per_gpu / per_core_scaled)
    ranked = sorted((r, p) for p, r in supplied.items() if r is not None)
    best = ranked[-1][1] if ranked else None
    best_rate = ranked[-1][0] if ranked else None
    bound = None if best_rate is None else ("data" if best_rate < consumed else "compute")
    ceiling_rates = {k: v for k, v in (ceilings or {}).items() if k in ("entropy_floor", "full_c_decode") and v}
    fractions = {p: ({k: rate / v for k, v in ceiling_rates.items()} if rate else None) for p, rate in per_core.items()}
    at_ceiling = {k: 1 + math.ceil(consumed_per_gpu / v) for k, v in ceiling_rates.items()}
    return {
        "gpu": gpu, "gpus": gpus, "cores": cores, "cores_for_data": cores_for_data,
        "consumed_images_per_sec": consumed, "consumed_per_gpu": consumed_per_gpu,
        "per_core_images_per_sec": dict(per_core), "scaling_efficiency": eff,
        "supplied_images_per_sec": supplied, "not_measured": dict(not_measured or {}),
        "best_pipeline": best, "bound": bound,
        "shortfall_images_per_sec": (consumed - best_rate) if bound == "data" else 0.0 if bound else None,
        "cores_per_gpu_needed": needed.get(best) if best else None,
        "cores_per_gpu_needed_by_pipeline": needed, "cores_per_gpu": cores / gpus,
        "storage_max_side": storage_max_side,
        "ceilings": dict(ceilings) if ceilings else None, "per_core_fraction_of_ceilings": fractions,
        "cores_per_gpu_at_ceiling": at_ceiling,
    }


def node_inputs(loaders: list[dict[str, Any]], kinds: list[str], on_gpu: bool) -> tuple[
        dict[str, float | None], dict[str, float | None], dict[str, str]]:
    """(one-worker rate, scaling efficiency 1 -> 2 workers, why not measured) per pipeline, from the loader rows."""
    per_core: dict[str, float | None] = {}
    scaling: dict[str, float | None] = {}
    why: dict[str, str] = {}
    for kind in kinds:
        if kind == "dali" and not on_gpu:
            per_core[kind], scaling[kind], why[kind] = None, None, DALI_NOT_MEASURED
            continue
        rates = {r["workers"]: r["images_per_sec"] for r in loaders
                 if r["pipeline"] == kind and r.get("available") and r.get("images_per_sec")}
        per_core[kind] = rates.get(1)
        scaling[kind] = rates[2] / (2 * rates[1]) if 1 in rates and 2 in rates else None
        if per_core[kind] is None or scaling[kind] is None:
            reason = next((r["reason"] for r in loaders if r["pipeline"] == kind and not r.get("available")), "")
            why[kind] = "not measured: " + (reason or "needs rates at 1 and 2 workers")
    return per_core, scaling, why
