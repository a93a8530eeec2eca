"""The doctor's report: doctor.md from the measurements `run_doctor` returns (doctor.json)."""

from __future__ import annotations

import math
from typing import Any


def _hours(h: float) -> str:
    """Hours, with seconds beside them when they are few (a tiny recipe's projection)."""
    return f"{h:.3f} h" if h >= 0.1 else f"{h:.4f} h ({h * 3600:.1f} s)"


def _f(x: Any, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_markdown(r: dict[str, Any]) -> str:
    m, s, p, v = r["machine"], r["step"], r["projection"], r["recommendation"]
    step_ips = s["images_per_sec"]
    node = r.get("node") or {}
    if r.get("bound_basis") == "the node":
        best = r["best_loader"]
        verdict_line = (f"This machine has no {node['gpu']}: it measured the loaders, and the step is the data "
                        f"sheet's (one {node['gpu']} at MFU {s['mfu']:g} consumes {step_ips:,.0f} images/s; the best "
                        f"loader here, {best['pipeline']} with {best['workers']} workers, delivers "
                        f"{best['images_per_sec']:,.0f}). On {node['gpus']} x {node['gpu']} and {node['cores']} cores: "
                        + (f"**Data-bound**, {r['factor']:.2f}x short." if r["bound"] == "data" else
                           f"**Fed**, {r['factor']:.2f}x headroom.") + " See \"The node\" below.")
    elif r["bound"] == "data":
        verdict_line = (f"**Data-bound**: the best loader ({r['best_loader']['pipeline']}, "
                        f"{r['best_loader']['workers']} workers) delivers {r['best_loader']['images_per_sec']:,.0f} "
                        f"images/s, the step could consume {step_ips:,.0f}: {r['factor']:.2f}x more.")
    else:
        verdict_line = (f"**Compute-bound**: the step consumes {step_ips:,.0f} images/s and the best loader "
                        f"({r['best_loader']['pipeline']}, {r['best_loader']['workers']} workers) delivers "
                        f"{r['best_loader']['images_per_sec']:,.0f}: {r['factor']:.2f}x headroom.")
    lines = [
        f"# supmae doctor: `{r['recipe']}` on {r['device']} x {r['devices']}",
        "",
        verdict_line,
        "",
        f"- use: `--data.pipeline {v['pipeline']} --data.num_workers {v['workers']}` ({v['why']})",
        (f"- batch that fits memory: {_f(r['memory'].get('max_batch'), ',')} per device ({r['memory']['method']}); "
        f"the recipe uses {r.get('recipe_batch_size', s['batch_size'])}"),
        (f"- FFCV os_cache: {r['page_cache']['advice']} (dataset {_f(r['page_cache']['dataset_bytes'], ',')} bytes, "
        f"{m['memory_available_bytes'] / 2**30:.1f} GiB available; the recipe says {r['page_cache']['recipe_os_cache']})"),
        (f"- projected {p['epochs']} epochs of {p['images_per_epoch']:,} images at {p['images_per_sec_per_device']:,.0f}"
         f" images/s per device: {_hours(p['wall_hours'])} wall-clock, {p['device_hours']:.4f} device-hours"
         + (f", {p['cost']:,.2f} at {r['price_per_gpu_hour']:g} per device-hour" if p["cost"] is not None else "")
         + (f" on the node ({p['devices']} GPUs)" if p.get("basis") == "the node" else " on this machine")),
        (f"- on {p['machines']} such machines: {_hours(p['wall_hours_on_machines'])} wall-clock, "
         f"{p['device_hours_on_machines']:.4f} device-hours"
         + (f", {p['cost_on_machines']:,.2f}" if p["cost_on_machines"] is not None else "")
         + " (ideal scaling: the all-reduce between machines is not measured)"
         if p["machines"] > 1 else "- on N such machines: pass --machines N"),
        _loop_line(r.get("loop_costs")),
        ("- not in the projection: evaluation, checkpointing, start-up and the first epoch's compilation "
        "(`supmae report` of a real run measures them)"),
    ]
    if r["device_type"] == "cpu" and r.get("bound_basis") != "the node":
        lines.append("- on the CPU the loader's workers and the step share the same cores; measured apart, so a "
                     "training run gets somewhat less of both")
    lines += [
        "",
        "## Machine",
        "",
        (f"{m['physical_cores']} physical cores ({m['logical_cores']} logical, {m['usable_cores']} usable by this "
         f"process), {m['memory_total_bytes'] / 2**30:.1f} GiB memory ({m['memory_available_bytes'] / 2**30:.1f} GiB "
         f"available), load average {_f(m['load_average'][0] if m['load_average'] else None, '.2f')}; dataset "
         f"{r['dataset']['images']:,} images in {r['dataset']['classes']} classes."),
        "",
        "## Loaders (images/s delivered, training augmentation, nothing consuming)",
        "",
        "| pipeline | workers | images/s | vs the step | build s | warm-up s |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["loaders"]:
        if not row["available"]:
            lines.append(f"| {row['pipeline']} | {_f(row['workers'], 'd')} | cannot run here: {row['reason']} | | | |")
            continue
        lines.append(f"| {row['pipeline']} | {row['workers']} | {row['images_per_sec']:,.1f} | "
                     f"{row['images_per_sec'] / step_ips:.2f}x | {row['build_seconds']:.1f} | "
                     f"{row['warmup_seconds']:.1f} |")
    lines += [
        "",
        "## Training step",
        "",
        step_line(s),
    ]
    if s.get("batch_note"):
        lines.append(f"Note: {s['batch_note']}.")
    if s.get("accum_note"):
        lines.append(f"Note: {s['accum_note']}")
    lines += ["", "## Read throughput of the dataset's files", "", "| pipeline's files | MB/s | images/s | bytes |",
              "|---|---|---|---|"]
    for kind, rd in r["read"].items():
        if "reason" in rd:
            lines.append(f"| {kind} | n/a: {rd['reason']} | | |")
        else:
            lines.append(f"| {kind} | {rd['mb_per_sec']:,.1f} | {rd['images_per_sec']:,.0f} | {rd['dataset_bytes']:,}"
                         f"{'' if rd['cache_dropped_first'] else ' (page cache not dropped: may be a warm read)'} |")
    if r.get("node"):
        lines += ["", *render_node(r["node"])]
    lines += ["", f"Measured in {r['doctor_seconds']:.0f} s, {r['seconds_per_measurement']:g} s per window.", ""]
    return "\n".join(lines)


def step_line(s: dict[str, Any]) -> str:
    """The training step's paragraph: from the data sheet, from `supmae bench step`, or measured here."""
    ips = s["images_per_sec"]
    if s.get("datasheet"):
        return f"{ips:,.1f} images/s per GPU, {s['source']}."
    if s.get("source"):
        head = (f"{ips:,.1f} images/s at batch {s['batch_size']}, measured by {s['source']}: "
                f"{s['micro_seconds'] * 1e3:.1f} ms per step (micro-batch and update); ")
    else:
        head = (f"{ips:,.1f} images/s at batch {s['batch_size']} x {s['accum']} accumulation "
                f"({s['micro_seconds'] * 1e3:.1f} ms per micro-batch, {s['update_seconds'] * 1e3:.1f} ms per update); ")
    return (head + f"precision {s['precision']}, compiled "
            f"{'yes' if s['compiled'] else 'no (' + s['compile_reason'] + ')'}; {s['flops_per_image'] / 1e9:.3f} "
            f"GFLOPs per image; matmul peak {s['peak_flops'] / 1e12:.3f} TFLOP/s ({s['peak_dtype']}); "
            f"MFU {s['mfu']:.1%}.")


def render_node(n: dict[str, Any]) -> list[str]:
    """The node verdict as markdown lines."""
    size = f"stored at max side {n['storage_max_side']}" if n.get("storage_max_side") else "stored as they are"
    head = (f"{n['gpus']} x {n['gpu']} and {n['cores']} cores ({n['cores_for_data']} left for data after one per GPU "
            f"for training): the GPUs consume {n['consumed_images_per_sec']:,.0f} images/s "
            f"({n['consumed_per_gpu']:,.0f} per GPU: {n['consumed_from']}).")
    if n["bound"] is None:
        verdict_line = "No pipeline's supply could be measured here, so no verdict."
    elif n["bound"] == "compute":
        verdict_line = (f"**Fed**: {n['best_pipeline']} with the images {size} supplies "
                        f"{n['supplied_images_per_sec'][n['best_pipeline']]:,.0f} images/s; it needs "
                        f"{n['cores_per_gpu_needed']} cores per GPU, the node has {n['cores_per_gpu']:g}.")
    else:
        verdict_line = (f"**Data-bound**: the best, {n['best_pipeline']} with the images {size}, supplies "
                        f"{n['supplied_images_per_sec'][n['best_pipeline']]:,.0f} images/s, "
                        f"{n['shortfall_images_per_sec']:,.0f} short; it would take {n['cores_per_gpu_needed']} "
                        f"cores per GPU (the node has {n['cores_per_gpu']:g}): store smaller images, or let DALI's "
                        "GPU decoder take part of the load.")
    ceilings = n.get("ceilings") or {}
    floor, full = ceilings.get("entropy_floor"), ceilings.get("full_c_decode")
    lines = ["## The node", "", head, "", verdict_line, "",
             "| pipeline | images/s per core (1 worker) | x full C decode | x entropy floor | scaling 1 -> 2 workers "
             "| node supplies | cores per GPU needed |",
             "|---|---|---|---|---|---|---|"]

    def frac(p: str, key: str) -> str:
        f = (n.get("per_core_fraction_of_ceilings") or {}).get(p) or {}
        return f"{f[key]:.2f}x" if key in f else "n/a"

    for p, rate in n["supplied_images_per_sec"].items():
        if rate is None:
            lines.append(f"| {p} | {n['not_measured'].get(p, 'not measured')} | | | | | |")
            continue
        lines.append(f"| {p} | {n['per_core_images_per_sec'][p]:,.0f} | {frac(p, 'full_c_decode')} | "
                     f"{frac(p, 'entropy_floor')} | {n['scaling_efficiency'][p]:.2f} | "
                     f"{rate:,.0f} | {n['cores_per_gpu_needed_by_pipeline'][p]} |")
    for p, why in n["not_measured"].items():
        if p not in n["supplied_images_per_sec"]:
            lines.append(f"| {p} | {why} | | | | | |")
    if floor and full:
        at = n.get("cores_per_gpu_at_ceiling") or {}
        lines += ["", (f"Decode ceilings of these files on one core here ({ceilings.get('images')} stored JPEGs, "
                       f"{ceilings.get('mean_kb', 0):.1f} kB each): a full libjpeg-turbo decode {full:,.0f} images/s, "
                       f"the entropy floor (Huffman decoding alone, what any decoder of these files must do) "
                       f"{floor:,.0f}. A decoder at the full-decode rate would need {at.get('full_c_decode')} cores per "
                       f"GPU, one at the floor {at.get('entropy_floor')} (with perfect scaling). A crop-window decode "
                       "passes the first; started at the window's row (the converter's restart markers) it skips "
                       "part of the entropy decoding too, and comes near the second.")]
    elif ceilings.get("reason"):
        lines += ["", f"Decode ceilings not measured: {ceilings['reason']}."]
    if (n.get("measured_on_cores") or 3) < 3:
        lines += ["", (f"This machine has {n['measured_on_cores']} usable cores: 2 workers and the process reading "
                  "their batches share them, so the scaling measured here (and the supply) is a lower bound.")]
    lines += ["", f"Loaders measured with {n['loader_dtype']} batches"
              + (" (what a worker hands a GPU: normalisation left to the device)." if n["loader_dtype"] == "uint8"
                 else ".")]
    return lines


def _loop_line(c: dict[str, Any] | None) -> str:
    """The loop's own costs at the projected rate (`loop_projection`), in one line."""
    if not c:
        return "- the loop's own costs: not measured"
    every = f"every {c['checkpoint_minutes']:g} min and at each epoch's end" if c["checkpoint_minutes"] > 0 else \
        "at each epoch's end"
    evaluation = (f"evaluation {c['eval_share']:.2%} ({c['val_images']:,} images at {c['eval_images_per_sec']:,.0f}/s "
                  f"per device, every {c['val_every']} epoch(s))" if c["val_images"] else "evaluation 0% (no val split)")
    return (f"- the loop's own costs at {c['rate']:,.0f} img/s per device on {c['devices']} device(s) (an epoch of "
            f"{c['epoch_train_seconds']:.1f} s): checkpoints {c['checkpoint_share']:.2%} ({c['snapshot_seconds']:.3f} s "
            f"stall each on {c['device']}, {every}; the files are written in the background), {evaluation}")
