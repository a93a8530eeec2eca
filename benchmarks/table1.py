"""`supmae bench table1`: the paper's Table 1 (training cost of five methods) on the hardware at hand.

For each method it times the real training step (`benchmarks.methods`) after a warm-up, counts
its FLOPs with `FlopCounterMode`, and projects the full recipe:

    iterations/epoch = floor(dataset images / (per-GPU batch x GPUs))      (drop_last, as MAE)
    wall hours       = sum over phases (pre-train, fine-tune) of epochs x iterations/epoch x s/iter
    GPU-hours        = wall hours x GPUs

assuming ideal data-parallel scaling (every GPU runs the measured per-GPU step; gradient
all-reduce and MoCo v3's all-gather are not timed). Costs are normalised to SupMAE's. The
compute-only normalised cost uses the counted training FLOPs per image instead of seconds, so
the gap between the two shows where a method runs further from compute-bound than SupMAE does.

Outputs in --out: table1.md, table1.csv, table1.json and a bar chart table1.png.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks import methods as M
from benchmarks.timing import (
    IMAGENET_TRAIN_IMAGES,
    add_run_options,
    amp_dtype,
    apply_threads,
    constant_batches,
    device_name,
    environment,
    iters_per_epoch,
    loader_batches,
    measure_matmul_peak,
    precision_name,
    resolve_device,
    synchronize,
    synthetic_batch,
    time_steps,
)
from supmae.errors import UserError


@dataclass(frozen=True)
class Row:
    """A Table 1 row: which step is pre-training, and the recipe's epochs of each phase."""

    key: str
    label: str
    pt_method: str
    pt_epochs: int
    ft_epochs: int  # 0: the row has no separate fine-tuning phase


ROWS: tuple[Row, ...] = (
    Row("mocov3", "MoCo v3", "mocov3", 300, 150),
    Row("mae", "MAE", "mae", 1600, 100),
    Row("deit", "DeiT", "deit", 300, 0),
    Row("mae_scratch", "MAE-scratch", "mae_scratch", 300, 0),
    Row("supmae", "SupMAE", "supmae", 400, 100),
)
REFERENCE_ROW = "supmae"


@dataclass(frozen=True)
class PaperRow:
    """What the sources at hand say about a row. None where no value could be found."""

    gpu_hours: float | None
    norm_cost: float | None
    top1: float | None
    source: str


# The exact GPU-hour entries of the paper's Table 1 (arXiv 2205.14540) could not be retrieved from
# the sources available while writing this (only the paper's abstract and the authors' README were
# readable), so they are left empty rather than guessed. The one cost figure that was found is the
# abstract's "comparable performance with MAE using only 30% of compute" (MAE / SupMAE = 1 / 0.3).
PAPER: dict[str, PaperRow] = {
    "mocov3": PaperRow(None, None, 83.2, "top-1: MoCo v3 README (ViT-B, 300 ep pre-training, 150 ep fine-tuning)"),
    "mae": PaperRow(None, 1.0 / 0.30, 83.6, "cost: SupMAE abstract ('30% of compute' of MAE); top-1: MAE README"),
    "deit": PaperRow(None, None, 81.8, "top-1: DeiT-B 300 ep, as quoted by the MoCo v3 README"),
    "mae_scratch": PaperRow(None, None, None, "no value found"),
    "supmae": PaperRow(None, 1.0, 83.57, "cost: reference row by definition; top-1: released fine-tuning log"),
}
PAPER_NOTE = (
    "The paper's Table 1 GPU-hour values could not be retrieved here, so the paper columns hold only the "
    "figures that were found (sources per row in table1.json); n/a means not found, not zero."
)


@dataclass
class StepResult:
    """The measurement of one method's training step."""

    method: str
    batch_size: int
    seconds_per_iter: float
    data_wait_frac: float
    spread: float
    flops_per_image: float
    flops_source: str
    step_flops_per_image: float
    params: int
    peak_mem_mb: float | None
    notes: str

    @property
    def images_per_sec(self) -> float:
        return self.batch_size / self.seconds_per_iter

    @property
    def achieved_flops(self) -> float:
        return self.flops_per_image * self.images_per_sec


def project_row(row: Row, pt: StepResult, ft: StepResult | None, num_images: int, gpus: int) -> dict[str, Any]:
    """Projected cost of `row`'s whole recipe from its measured steps (ideal scaling over `gpus`)."""
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    pt_ipe = iters_per_epoch(num_images, pt.batch_size * gpus)
    pt_wall_h = row.pt_epochs * pt_ipe * pt.seconds_per_iter / 3600.0
    pt_flops = row.pt_epochs * pt_ipe * pt.batch_size * gpus * pt.flops_per_image
    ft_wall_h = 0.0
    ft_flops = 0.0
    ft_ipe = 0
    if row.ft_epochs:
        if ft is None:
            raise UserError(f"row {row.label} has {row.ft_epochs} fine-tuning epochs but the fine-tuning step "
                            "was not measured")
        ft_ipe = iters_per_epoch(num_images, ft.batch_size * gpus)
        ft_wall_h = row.ft_epochs * ft_ipe * ft.seconds_per_iter / 3600.0
        ft_flops = row.ft_epochs * ft_ipe * ft.batch_size * gpus * ft.flops_per_image
    wall_h = pt_wall_h + ft_wall_h
    pt_wait = pt.data_wait_frac * pt_wall_h
    ft_wait = ft.data_wait_frac * ft_wall_h if (ft is not None and row.ft_epochs) else 0.0
    return {
        "key": row.key,
        "label": row.label,
        "pt_epochs": row.pt_epochs,
        "ft_epochs": row.ft_epochs,
        "gpus": gpus,
        "pt_iters_per_epoch": pt_ipe,
        "ft_iters_per_epoch": ft_ipe,
        "pt_seconds_per_iter": pt.seconds_per_iter,
        "ft_seconds_per_iter": ft.seconds_per_iter if (ft is not None and row.ft_epochs) else None,
        "pt_epoch_seconds": pt_ipe * pt.seconds_per_iter,
        "pt_wall_hours": pt_wall_h,
        "ft_wall_hours": ft_wall_h,
        "wall_hours": wall_h,
        "gpu_hours": wall_h * gpus,
        "train_flops": pt_flops + ft_flops,
        "pt_flops_per_image": pt.flops_per_image,
        "data_wait_frac": (pt_wait + ft_wait) / wall_h if wall_h > 0 else 0.0,
    }


def normalise(rows: list[dict[str, Any]], reference: str = REFERENCE_ROW) -> list[dict[str, Any]]:
    """Add normalised costs (measured and compute-only) relative to `reference`, and the paper's."""
    ref = next((r for r in rows if r["key"] == reference), None)
    for r in rows:
        paper = PAPER.get(r["key"])
        r["norm_cost"] = r["gpu_hours"] / ref["gpu_hours"] if ref and ref["gpu_hours"] > 0 else None
        r["compute_norm_cost"] = r["train_flops"] / ref["train_flops"] if ref and ref["train_flops"] > 0 else None
        r["paper_gpu_hours"] = paper.gpu_hours if paper else None
        r["paper_norm_cost"] = paper.norm_cost if paper else None
        r["paper_top1"] = paper.top1 if paper else None
        r["paper_source"] = paper.source if paper else ""
        if r["norm_cost"] is not None and r["paper_norm_cost"]:
            r["ratio_vs_paper"] = r["norm_cost"] / r["paper_norm_cost"]
        else:
            r["ratio_vs_paper"] = None
    return rows


def compute_boundness(steps: dict[str, StepResult], peak_flops: float) -> dict[str, dict[str, float]]:
    """Achieved FLOP/s of each step, as a fraction of the measured matmul peak and of the best step."""
    best = max((s.achieved_flops for s in steps.values()), default=0.0)
    return {
        name: {
            "achieved_tflops": s.achieved_flops / 1e12,
            "frac_of_peak": s.achieved_flops / peak_flops if peak_flops > 0 else float("nan"),
            "frac_of_best": s.achieved_flops / best if best > 0 else float("nan"),
        }
        for name, s in steps.items()
    }


def measure_step(
    method: str, arch: M.Arch, device: torch.device, batch_size: int, dtype: torch.dtype | None,
    batches: Any, warmup: int, iters: int, seed: int = 0, log: Any = print,
) -> StepResult:
    """Build `method`'s step, time it, count its FLOPs, and free it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    step = M.build_step(method, arch, device, batch_size, dtype)
    timing = time_steps(step, batches, device, warmup, iters)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    # FLOPs depend on shapes only: counted on a meta-device replica of the same step (no arithmetic).
    step_fpi = M.count_step_flops(method, arch, batch_size) / batch_size
    fpi, source = step_fpi, "FlopCounterMode on the step"
    counted = M.model_flops_per_image(step, arch)  # the model's own counter, for the masked rows
    if counted is not None:
        fpi, source = counted["total"], "supmae.models.flops"
    synchronize(device)
    result = StepResult(
        method=method, batch_size=batch_size, seconds_per_iter=timing.seconds_per_iter,
        data_wait_frac=timing.data_wait_frac, spread=timing.spread, flops_per_image=fpi, flops_source=source,
        step_flops_per_image=step_fpi, params=step.num_params(), peak_mem_mb=peak_mem, notes=step.notes,
    )
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"[table1] {method:<12} {result.seconds_per_iter * 1e3:9.1f} ms/iter  {result.images_per_sec:9.1f} img/s  "
        f"{fpi / 1e9:8.2f} GFLOP/img  {result.achieved_flops / 1e12:7.3g} TFLOP/s  "
        f"data-wait {result.data_wait_frac:5.1%}")
    return result


def _fmt(x: Any, spec: str = ".2f", na: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return na
    return format(x, spec)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(result: dict[str, Any]) -> str:
    """The report as markdown (also what the command prints)."""
    cfg = result["config"]
    rows = result["rows"]
    steps = result["steps"]
    bound = result["compute_bound"]
    real_data = cfg["data"] != "synthetic"
    out = [
        "# Table 1 on this hardware",
        "",
        (f"Device: {result['device_name']} ({cfg['precision']}); scale {cfg['model_scale']} "
        f"({cfg['img_size']} px, patch {cfg['patch_size']}, width {cfg['embed_dim']}, depth {cfg['depth']}); "
        f"per-GPU batch {cfg['batch_size']} x {cfg['gpus']} GPUs = global batch {cfg['batch_size'] * cfg['gpus']}; "
        f"{cfg['num_images']:,} images per epoch; data: {cfg['data_desc']}; "
        f"{cfg['warmup']} warm-up + {cfg['iters']} timed iterations per step."),
        "",
        ("Projection assumes ideal scaling over the GPUs (each runs the measured per-GPU step; gradient "
        "all-reduce is not timed). Normalised cost = GPU-hours / SupMAE's GPU-hours; compute-only = counted "
        "training FLOPs / SupMAE's."),
        "",
    ]
    header = ["method", "PT ep", "FT ep", "s/iter PT", "s/iter FT", "wall h", "GPU-h", "norm. cost",
              "compute-only norm.", "paper GPU-h", "paper norm.", "ours/paper", "paper top-1"]
    if real_data:
        header.append("data-wait")
    body = []
    for r in rows:
        line = [
            r["label"], str(r["pt_epochs"]), str(r["ft_epochs"] or "-"), _fmt(r["pt_seconds_per_iter"], ".4f"),
            _fmt(r["ft_seconds_per_iter"], ".4f", "-"), _fmt(r["wall_hours"], ".1f"), _fmt(r["gpu_hours"], ".1f"),
            _fmt(r["norm_cost"]), _fmt(r["compute_norm_cost"]), _fmt(r["paper_gpu_hours"], ".0f"),
            _fmt(r["paper_norm_cost"]), _fmt(r["ratio_vs_paper"]), _fmt(r["paper_top1"], ".1f"),
        ]
        if real_data:
            line.append(_fmt(r["data_wait_frac"], ".1%"))
        body.append(line)
    out += [_md_table(header, body), "", PAPER_NOTE, ""]
    out += [
        "## Steps: how close to compute-bound",
        "",
        f"Measured dense matmul peak of this device ({result['peak_dtype']}): {result['peak_tflops']:.3g} TFLOP/s.",
        "",
    ]
    sheader = ["step", "ms/iter", "img/s", "GFLOP/img", "FLOPs from", "TFLOP/s", "of peak", "of best", "params (M)"]
    if real_data:
        sheader.append("data-wait")
    sbody = []
    for name, s in steps.items():
        b = bound[name]
        line = [
            name, _fmt(s["seconds_per_iter"] * 1e3, ".1f"), _fmt(s["batch_size"] / s["seconds_per_iter"], ".1f"),
            _fmt(s["flops_per_image"] / 1e9, ".2f"), s["flops_source"], _fmt(b["achieved_tflops"], ".3g"),
            _fmt(b["frac_of_peak"], ".1%"), _fmt(b["frac_of_best"], ".1%"), _fmt(s["params"] / 1e6, ".1f"),
        ]
        if real_data:
            line.append(_fmt(s["data_wait_frac"], ".1%"))
        sbody.append(line)
    out += [_md_table(sheader, sbody), ""]
    notes = [f"- {name}: {s['notes']}" for name, s in steps.items() if s["notes"]]
    if not real_data:
        notes.append("- synthetic data: one device-resident batch reused, so no decode/augmentation cost is timed "
                     "(RandAugment, random erasing and the crops run in the loader and are absent here).")
    notes.append(f"- measured in {result['elapsed_seconds']:.0f} s; timings on a shared or busy machine are indicative.")
    out += ["Notes:", "", *notes, ""]
    return "\n".join(out)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    keys = ["key", "label", "pt_epochs", "ft_epochs", "gpus", "pt_iters_per_epoch", "ft_iters_per_epoch",
            "pt_seconds_per_iter", "ft_seconds_per_iter", "pt_epoch_seconds", "wall_hours", "gpu_hours",
            "norm_cost", "train_flops", "compute_norm_cost", "paper_gpu_hours", "paper_norm_cost", "ratio_vs_paper",
            "paper_top1", "data_wait_frac"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in keys})


def write_chart(path: str, result: dict[str, Any]) -> None:
    """Bars: normalised cost measured / compute-only / paper per method, and each step's share of peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["label"] for r in rows]
    series = [
        ("measured (wall-clock)", [r["norm_cost"] for r in rows]),
        ("compute-only (FLOPs)", [r["compute_norm_cost"] for r in rows]),
        ("paper", [r["paper_norm_cost"] for r in rows]),
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.27
    for i, (name, vals) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ys = [v if v is not None else 0.0 for v in vals]
        bars = ax1.bar(xs, ys, width, label=name)
        for bar, v in zip(bars, vals):
            if v is None:
                ax1.text(bar.get_x() + bar.get_width() / 2, 0.02, "n/a", ha="center", va="bottom", fontsize=7,
                         rotation=90)
    ax1.set_xticks(range(len(rows)), labels)
    ax1.set_ylabel("cost relative to SupMAE")
    ax1.set_title(f"Table 1 cost, {result['config']['gpus']} x {result['device_name']}", fontsize=9)
    ax1.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax1.legend(fontsize=8)
    names = list(result["steps"])
    fracs = [result["compute_bound"][n]["frac_of_peak"] * 100 for n in names]
    ax2.bar(names, fracs, color="tab:green")
    ax2.set_ylabel(f"% of measured {result['peak_dtype']} matmul peak")
    ax2.set_title(f"achieved FLOP/s per step (peak {result['peak_tflops']:.3g} TFLOP/s)", fontsize=9)
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_table1(
    device: str = "auto", gpus: int = 8, data: str = "synthetic", pipeline: str = "ffcv", num_workers: int = 2,
    model_scale: str = "base", depth: int | None = None, iters: int = 10, warmup: int | None = None,
    batch_size: int | None = None, num_images: int | None = None, methods: list[str] | None = None,
    out: str | None = None, seed: int = 0, log: Any = print,
) -> dict[str, Any]:
    """Measure, project and (with `out`) write Table 1. Returns the result dict of table1.json."""
    start = time.perf_counter()
    dev = resolve_device(device)
    dtype = amp_dtype(dev)
    if batch_size is None:
        batch_size = 256 if dev.type == "cuda" else 8
    if warmup is None:
        # One CPU step is already steady (no compilation, no clock ramp); a GPU needs a few.
        warmup = 3 if dev.type == "cuda" else 1
    keys = methods or [r.key for r in ROWS]
    unknown = [k for k in keys if k not in {r.key for r in ROWS}]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(r.key for r in ROWS)}")
    rows = [r for r in ROWS if r.key in keys]

    loader = None
    if data == "synthetic":
        arch = M.arch_for_scale(model_scale, depth=depth)
        data_desc = "synthetic (one random batch on the device)"
        n_images = num_images or IMAGENET_TRAIN_IMAGES
    else:
        if not os.path.isdir(data):
            raise UserError(f"--data must be 'synthetic' or an existing dataset directory, got {data!r}")
        from pipelines import build_pipeline

        img_size = M.arch_for_scale(model_scale, depth=depth).img_size
        threads = torch.get_num_threads()
        loader = build_pipeline(pipeline, data, split="train", batch_size=batch_size, img_size=img_size,
                                device=dev, num_workers=num_workers, train=True, seed=seed)
        # A loader library may change torch's intra-op thread count (FFCV sets it to its worker
        # count); the steps are timed with this process's own setting, as the training loop does.
        torch.set_num_threads(threads)
        arch = M.arch_for_scale(model_scale, num_classes=loader.num_classes, depth=depth)
        data_desc = f"{pipeline} pipeline on {os.path.abspath(data)}"
        n_images = num_images or int(loader.num_samples)
    log(f"[table1] {device_name(dev)}, {precision_name(dtype)}, scale {model_scale}, batch {batch_size}, "
        f"{len(rows)} rows, data: {data_desc}")
    peak_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak = measure_matmul_peak(dev, peak_dtype)
    log(f"[table1] measured {precision_name(peak_dtype)} matmul peak: {peak / 1e12:.3g} TFLOP/s")

    if loader is not None:
        batches = loader_batches(loader)
    else:
        batches = constant_batches(*synthetic_batch(batch_size, arch.img_size, arch.num_classes, dev, seed))
    needed = [r.pt_method for r in rows] + (["finetune"] if any(r.ft_epochs for r in rows) else [])
    steps: dict[str, StepResult] = {}
    for name in needed:
        steps[name] = measure_step(name, arch, dev, batch_size, dtype, batches, warmup, iters, seed, log)
    # Measured again at the end, the best of the two: one short window can fall on a busy moment
    # of a shared machine (or a GPU still ramping its clocks).
    peak = max(peak, measure_matmul_peak(dev, peak_dtype))

    projected = [project_row(r, steps[r.pt_method], steps.get("finetune"), n_images, gpus) for r in rows]
    normalise(projected)
    result = {
        "config": {
            "device": str(dev), "precision": precision_name(dtype), "gpus": gpus, "data": data,
            "data_desc": data_desc, "pipeline": pipeline if loader is not None else None,
            "model_scale": model_scale, "img_size": arch.img_size, "patch_size": arch.patch_size,
            "embed_dim": arch.embed_dim, "depth": arch.depth, "num_classes": arch.num_classes,
            "batch_size": batch_size, "num_images": n_images, "iters": iters, "warmup": warmup, "seed": seed,
        },
        "device_name": device_name(dev),
        "environment": environment(),
        "peak_tflops": peak / 1e12,
        "peak_dtype": precision_name(peak_dtype),
        "steps": {k: asdict(v) for k, v in steps.items()},
        "compute_bound": compute_boundness(steps, peak),
        "rows": projected,
        "paper_note": PAPER_NOTE,
        "assumptions": "ideal data-parallel scaling; iterations/epoch = floor(images / global batch); "
        "the fine-tuning step is shared by MoCo v3, MAE and SupMAE",
    }
    result["elapsed_seconds"] = time.perf_counter() - start
    if out:
        result["files"] = write_outputs(result, out, log)
    return result


def write_outputs(result: dict[str, Any], out: str, log: Any = print) -> dict[str, str]:
    """table1.md/.csv/.json and, where matplotlib is installed, table1.png; returns the written paths."""
    os.makedirs(out, exist_ok=True)
    paths = {ext: os.path.join(out, f"table1.{ext}") for ext in ("md", "csv", "json", "png")}
    # The GPU image runs this harness with torch, timm and torchvision only: no chart there.
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("[table1] matplotlib is not installed: table1.png not written")
        del paths["png"]
    with open(paths["md"], "w") as fh:
        fh.write(render_markdown(result))
    write_csv(paths["csv"], result["rows"])
    with open(paths["json"], "w") as fh:
        json.dump({**result, "files": paths}, fh, indent=2)
    if "png" in paths:
        write_chart(paths["png"], result)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supmae bench table1", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the projected run (global batch = batch x gpus)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a dataset directory read by --pipeline")
    p.add_argument("--pipeline", default="ffcv", choices=("ffcv", "dali", "torchvision"))
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers (real data only)")
    p.add_argument("--model-scale", default="base", choices=tuple(M.SCALES))
    p.add_argument("--depth", type=int, default=None, help="override the encoder depth of every row")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per step")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations before timing (default 3 on GPU, 1 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default 256 on GPU, 8 on CPU)")
    p.add_argument("--num-images", type=int, default=None,
                   help=f"images per epoch (default {IMAGENET_TRAIN_IMAGES:,} = ImageNet-1k train, or the dataset's)")
    p.add_argument("--methods", default=",".join(r.key for r in ROWS), help="comma-separated rows to measure")
    add_run_options(p, default_out="runs/bench/table1")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    apply_threads(a.threads)
    result = run_table1(
        device=a.device, gpus=a.gpus, data=a.data, pipeline=a.pipeline, num_workers=a.num_workers,
        model_scale=a.model_scale, depth=a.depth, iters=a.iters, warmup=a.warmup, batch_size=a.batch_size,
        num_images=a.num_images, methods=[m.strip() for m in a.methods.split(",") if m.strip()],
        out=a.out or None, seed=a.seed,
    )
    print()
    print(render_markdown(result))
    if result.get("files"):
        print("written: " + ", ".join(result["files"].values()))
    return 0
