"""`supmae bench table1`: the paper's Table 1 (training cost of five methods) beside the same table measured here.

For each method it times the real training step (`benchmarks.methods`: for SupMAE, MAE and the
fine-tuning phase the trainer's own `supmae.train.steps`) after a warm-up, counts its FLOPs, and
projects the full recipe:

    iterations/epoch = floor(dataset images / (per-GPU batch x GPUs))      (drop_last, as MAE)
    wall hours       = sum over phases (pre-train, fine-tune) of epochs x iterations/epoch x s/iter
    GPU-hours        = wall hours x GPUs

assuming ideal data-parallel scaling (every GPU runs the measured per-GPU step; gradient
all-reduce and MoCo v3's all-gather are not timed). Every row shows the paper's PT / FT / total
hours (8 A5000 GPUs), normalised cost and top-1 beside ours; normalised costs are relative to
SupMAE on both sides, so "ours / paper" compares like with like. The compute-only normalised cost
uses counted training FLOPs per image instead of seconds.

With `--data DIR --pipeline P` every row is fed by the real pipeline and timed twice: step-only
(a device-resident batch drawn from the pipeline, reused) and fed (a new batch from the pipeline
every step); the fed rate is what an epoch costs and what the projection uses, and the row says
which of the two bounds it (input-bound when fed runs below 90 % of step-only).

Outputs in --out: table1.md, table1.csv, table1.json and a chart table1.png (paper bars beside ours).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks import methods as M
from benchmarks.timing import (
    IMAGENET_TRAIN_IMAGES,
    add_run_options,
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
from pipelines import KINDS
from supmae.errors import UserError

# Fed below this fraction of the step-only rate, a row is input-bound (the pipeline sets its pace).
INPUT_BOUND_FRACTION = 0.9


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
    """One row of the paper's Table 1 as printed (hours: wall-clock on its 8-GPU server; None = '-')."""

    pt_epochs: int
    pt_hours: float
    ft_epochs: int
    ft_hours: float | None
    total_hours: float
    norm_cost: float
    top1: float


# SupMAE (arXiv 2205.14540) Table 1, benchmarked on one server of 8 NVIDIA A5000 24 GB (Appendix A).
PAPER: dict[str, PaperRow] = {
    "mocov3": PaperRow(300, 250.0, 150, 45.7, 295.7, 2.35, 83.2),
    "mae": PaperRow(1600, 364.0, 100, 30.0, 394.0, 3.12, 83.6),
    "deit": PaperRow(300, 91.5, 0, None, 91.5, 0.73, 81.8),
    "mae_scratch": PaperRow(300, 90.0, 0, None, 90.0, 0.71, 82.3),
    "supmae": PaperRow(400, 95.9, 100, 30.0, 125.9, 1.0, 83.6),
}
PAPER_GPUS = 8
PAPER_HARDWARE = "8 x NVIDIA A5000 24 GB"
PAPER_NOTE = (
    f"Paper columns: the SupMAE paper's Table 1, wall-clock hours on one server of {PAPER_HARDWARE} (its "
    "Appendix A); top-1 is the paper's ImageNet-1k fine-tuned accuracy (not measured here). 'ours / paper' "
    "divides our normalised cost by the paper's: 1.00 means this hardware and code reproduce the paper's "
    "relative cost of that method."
)


@dataclass
class StepResult:
    """The measurement of one method's training step."""

    method: str
    batch_size: int
    seconds_per_iter: float  # what the projection uses: fed with real data, step-only with synthetic data
    data_wait_frac: float
    spread: float
    flops_per_image: float
    flops_source: str
    step_flops_per_image: float
    params: int
    peak_mem_mb: float | None
    notes: str
    precision: str = "fp32"
    compiled: bool = False
    compile_reason: str = ""
    source: str = ""
    step_only_seconds_per_iter: float | None = None
    fed_seconds_per_iter: float | None = None
    loader_seconds_per_batch: float | None = None
    bound: str | None = None  # "input" | "compute" with real data; None with synthetic data

    @property
    def images_per_sec(self) -> float:
        return self.batch_size / self.seconds_per_iter

    @property
    def achieved_flops(self) -> float:
        return self.flops_per_image * self.images_per_sec


def classify_bound(step_only_spi: float, fed_spi: float) -> str:
    """'input' when the fed step runs below INPUT_BOUND_FRACTION of the step-only rate, else 'compute'."""
    return "input" if step_only_spi < INPUT_BOUND_FRACTION * fed_spi else "compute"


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
        "pt_bound": pt.bound,
        "ft_bound": ft.bound if (ft is not None and row.ft_epochs) else None,
    }


def normalise(rows: list[dict[str, Any]], reference: str = REFERENCE_ROW) -> list[dict[str, Any]]:
    """Add normalised costs (measured and compute-only) relative to `reference`, and the paper's row beside them."""
    ref = next((r for r in rows if r["key"] == reference), None)
    ref_epoch = ref["pt_epoch_seconds"] if ref else 0.0
    paper_ref = PAPER[reference]
    for r in rows:
        paper = PAPER.get(r["key"])
        r["norm_cost"] = r["gpu_hours"] / ref["gpu_hours"] if ref and ref["gpu_hours"] > 0 else None
        r["compute_norm_cost"] = r["train_flops"] / ref["train_flops"] if ref and ref["train_flops"] > 0 else None
        # One pre-training epoch relative to SupMAE's (the paper's text: SupMAE's is ~30% of MoCo v3's).
        r["pt_epoch_norm"] = r["pt_epoch_seconds"] / ref_epoch if ref_epoch > 0 else None
        r["paper_pt_hours"] = paper.pt_hours if paper else None
        r["paper_ft_hours"] = paper.ft_hours if paper else None
        r["paper_total_hours"] = paper.total_hours if paper else None
        r["paper_gpu_hours"] = paper.total_hours * PAPER_GPUS if paper else None
        r["paper_norm_cost"] = paper.norm_cost if paper else None
        r["paper_top1"] = paper.top1 if paper else None
        r["paper_pt_epoch_norm"] = ((paper.pt_hours / paper.pt_epochs) / (paper_ref.pt_hours / paper_ref.pt_epochs)
                                    if paper else None)
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


class DataSource:
    """Where each row's batches come from.

    Synthetic: each method gets its own freshly made batch (a step may change its input in place:
    timm's Mixup mixes the batch it is given, random erasing erases it), so no row sees another
    row's leftovers. Real data: one pipeline for all rows, epoch after epoch; each row's step-only
    batch is a copy of a batch freshly drawn from it."""

    def __init__(self, device: torch.device, batch_size: int, img_size: int, num_classes: int, seed: int,
                 loader: Any = None, drain: int = 0, timed: int = 4):
        self.device, self.batch_size, self.img_size, self.num_classes = device, batch_size, img_size, num_classes
        self.seed, self.loader, self.drain, self.timed = seed, loader, drain, timed
        self.fed: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = (
            loader_batches(loader) if loader is not None else None)

    @property
    def real(self) -> bool:
        return self.loader is not None

    def step_only(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A new device-resident batch, reused for every step of one row."""
        if self.fed is None:
            return constant_batches(*synthetic_batch(self.batch_size, self.img_size, self.num_classes, self.device,
                                                     self.seed))
        images, labels = next(self.fed)
        return constant_batches(images.clone(), labels.clone())

    def loader_only(self) -> float:
        """Seconds per batch of the pipeline alone: `drain` batches drawn untimed first (they empty the
        prefetch queue that filled while the step-only timing ran, so neither this figure nor the fed
        timing after it is flattered by batches decoded earlier), then `timed` batches with no step."""
        assert self.fed is not None
        for _ in range(self.drain):
            next(self.fed)
        start = time.perf_counter()
        for _ in range(self.timed):
            next(self.fed)
        synchronize(self.device)
        return (time.perf_counter() - start) / self.timed


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def measure_step(
    method: str, arch: M.Arch, device: torch.device, batch_size: int, data: DataSource, warmup: int, iters: int,
    precision: str = "auto", compile: str = "auto", seed: int = 0, log: Any = print,
) -> StepResult:
    """Build `method`'s step, time it (step-only, and fed by the pipeline with real data), count its FLOPs, free it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    step = M.build_step(method, arch, device, batch_size, precision, compile)
    batches = data.step_only()
    compile_reason = step.compile_reason
    try:
        if warmup:
            time_steps(step, batches, device, warmup - 1, 1)
    except Exception as exc:  # a compiler failure must not hide the other rows
        if not step.compiled:
            raise
        # torch.compile fails at the first call: time the same step uncompiled, and say why.
        compile_reason = f"torch.compile failed ({_first_line(exc)}); timed uncompiled"
        log(f"[table1] {method}: {compile_reason}")
        del step
        gc.collect()
        torch.manual_seed(seed)
        step = M.build_step(method, arch, device, batch_size, precision, "off")
        batches = data.step_only()
        if warmup:
            time_steps(step, batches, device, warmup - 1, 1)
    timing = time_steps(step, batches, device, 0, iters)
    step_only_spi = timing.seconds_per_iter
    fed_spi = loader_spb = bound = None
    if data.real:
        loader_spb = data.loader_only()
        timing = time_steps(step, data.fed, device, 0, iters)
        fed_spi = timing.seconds_per_iter
        # Step-only again after the fed timing, the faster of the two: a row still warming up (or a
        # busy moment of a shared machine) must not make the fed rate look better than the step's own.
        step_only_spi = min(step_only_spi, time_steps(step, batches, device, 0, iters).seconds_per_iter)
        bound = classify_bound(step_only_spi, fed_spi)
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
        precision=step.precision, compiled=step.compiled, compile_reason=compile_reason, source=step.source,
        step_only_seconds_per_iter=step_only_spi, fed_seconds_per_iter=fed_spi, loader_seconds_per_batch=loader_spb,
        bound=bound,
    )
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fed = (f"  fed {batch_size / fed_spi:8.1f} img/s ({bound}-bound, pipeline alone "
           f"{batch_size / loader_spb:.1f} img/s)" if fed_spi else "")
    log(f"[table1] {method:<12} {step_only_spi * 1e3:9.1f} ms/iter  {batch_size / step_only_spi:9.1f} img/s step-only"
        f"{fed}  {fpi / 1e9:8.2f} GFLOP/img  {result.precision}{' compiled' if result.compiled else ''}")
    return result


def _fmt(x: Any, spec: str = ".2f", na: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return na
    return format(x, spec)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pair(ours: Any, paper: Any, spec: str, na_paper: str = "-") -> str:
    """'ours / paper' in one cell."""
    return f"{_fmt(ours, spec, '-')} / {_fmt(paper, spec, na_paper)}"


def render_markdown(result: dict[str, Any]) -> str:
    """The report as markdown (also what the command prints)."""
    cfg = result["config"]
    rows = result["rows"]
    steps = result["steps"]
    bound = result["compute_bound"]
    real_data = cfg["data"] != "synthetic"
    gpus = cfg["gpus"]
    out = [
        "# Table 1 on this hardware, beside the paper's",
        "",
        (f"Ours: {result['device_name']} ({cfg['precision']}); scale {cfg['model_scale']} "
         f"({cfg['img_size']} px, patch {cfg['patch_size']}, width {cfg['embed_dim']}, depth {cfg['depth']}); "
         f"per-device batch {cfg['batch_size']} x {gpus} devices = global batch {cfg['batch_size'] * gpus}; "
         f"{cfg['num_images']:,} images per epoch; data: {cfg['data_desc']}; "
         f"{cfg['warmup']} warm-up + {cfg['iters']} timed iterations per step. "
         f"Paper: {PAPER_HARDWARE}, ViT-B/16, ImageNet-1k."),
        "",
        ("Each cell is ours / paper. Hours are wall-clock on the whole server (ours projected to "
         f"{gpus} devices with ideal scaling); normalised cost = cost / SupMAE's cost on the same side; "
         "compute-only = counted training FLOPs / SupMAE's (ours; it does not depend on the machine's load)."
         + ("" if gpus == PAPER_GPUS else f" Our hours are for {gpus} devices, the paper's for {PAPER_GPUS}: "
            "compare the normalised columns.")),
        "",
    ]
    header = ["method", "PT ep", "FT ep", "PT hours", "FT hours", "total hours", "norm. cost", "ours / paper norm.",
              "PT epoch vs SupMAE", "compute-only norm.", "our GPU-h", "paper top-1"]
    body = []
    for r in rows:
        body.append([
            r["label"], str(r["pt_epochs"]), str(r["ft_epochs"] or "-"),
            _pair(r["pt_wall_hours"], r["paper_pt_hours"], ".1f"),
            _pair(r["ft_wall_hours"] if r["ft_epochs"] else None, r["paper_ft_hours"], ".1f"),
            _pair(r["wall_hours"], r["paper_total_hours"], ".1f"),
            _pair(r["norm_cost"], r["paper_norm_cost"], ".2f"),
            _fmt(r["ratio_vs_paper"]),
            _pair(r["pt_epoch_norm"], r["paper_pt_epoch_norm"], ".2f"),
            _fmt(r["compute_norm_cost"]), _fmt(r["gpu_hours"], ".1f"), _fmt(r["paper_top1"], ".1f"),
        ])
    out += [_md_table(header, body), "", PAPER_NOTE, ""]
    if real_data:
        out += [
            "## Fed by the pipeline: which one bounds the epoch",
            "",
            (f"step-only: a batch from the pipeline kept on the device and reused; fed: a new batch from the "
             f"pipeline every step (what an epoch costs; the projection uses it); pipeline alone: batches drawn "
             f"with no step. Input-bound when fed runs below {INPUT_BOUND_FRACTION:.0%} of step-only."),
            "",
        ]
        fheader = ["step", "step-only img/s", "fed img/s", "pipeline alone img/s", "fed / step-only", "data-wait",
                   "bound"]
        fbody = []
        for name, s in steps.items():
            b = s["batch_size"]
            fbody.append([
                name, _fmt(b / s["step_only_seconds_per_iter"], ".1f"), _fmt(b / s["fed_seconds_per_iter"], ".1f"),
                _fmt(b / s["loader_seconds_per_batch"], ".1f"),
                _fmt(s["step_only_seconds_per_iter"] / s["fed_seconds_per_iter"], ".0%"),
                _fmt(s["data_wait_frac"], ".1%"), f"{s['bound']}-bound",
            ])
        out += [_md_table(fheader, fbody), ""]
    out += [
        "## Steps: what was timed, how close to compute-bound",
        "",
        f"Measured dense matmul peak of this device ({result['peak_dtype']}): {result['peak_tflops']:.3g} TFLOP/s.",
        "",
    ]
    sheader = ["step", "ms/iter", "img/s", "GFLOP/img", "TFLOP/s", "of peak", "of best", "params (M)", "precision",
               "compiled", "code"]
    sbody = []
    for name, s in steps.items():
        b = bound[name]
        sbody.append([
            name, _fmt(s["seconds_per_iter"] * 1e3, ".1f"), _fmt(s["batch_size"] / s["seconds_per_iter"], ".1f"),
            _fmt(s["flops_per_image"] / 1e9, ".2f"), _fmt(b["achieved_tflops"], ".3g"),
            _fmt(b["frac_of_peak"], ".1%"), _fmt(b["frac_of_best"], ".1%"), _fmt(s["params"] / 1e6, ".1f"),
            s["precision"], "yes" if s["compiled"] else f"no: {s['compile_reason']}", s["source"],
        ])
    out += [_md_table(sheader, sbody), ""]
    notes = [f"- {name}: {s['notes']}" for name, s in steps.items() if s["notes"]]
    if not real_data:
        notes.append("- synthetic data: a device-resident random batch per row, so no decode/augmentation cost is "
                     "timed (RandAugment and the crops run in the loader and are absent here); pass --data DIR to "
                     "feed every row from a real pipeline.")
    if result.get("pending"):
        notes.append(f"- not measured yet (the run is still going, or was cut short): {', '.join(result['pending'])}; "
                     "rows that need them are left out.")
    notes.append(f"- measured in {result['elapsed_seconds']:.0f} s; timings on a shared or busy machine are indicative.")
    out += ["Notes:", "", *notes, ""]
    return "\n".join(out)


CSV_KEYS = ["key", "label", "pt_epochs", "ft_epochs", "gpus", "pt_iters_per_epoch", "ft_iters_per_epoch",
            "pt_seconds_per_iter", "ft_seconds_per_iter", "pt_epoch_seconds", "pt_wall_hours", "paper_pt_hours",
            "ft_wall_hours", "paper_ft_hours", "wall_hours", "paper_total_hours", "gpu_hours", "paper_gpu_hours",
            "norm_cost", "paper_norm_cost", "ratio_vs_paper", "pt_epoch_norm", "paper_pt_epoch_norm", "train_flops",
            "compute_norm_cost", "paper_top1", "data_wait_frac", "pt_bound", "ft_bound"]


def write_csv(fh: Any, rows: list[dict[str, Any]]) -> None:
    """The projected rows as CSV into the open text file `fh`."""
    w = csv.DictWriter(fh, fieldnames=CSV_KEYS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_KEYS})


def write_chart(path: str, result: dict[str, Any]) -> None:
    """Bars, paper beside ours: normalised cost, total hours, and each step's share of the matmul peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["label"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.27

    def bars(ax: Any, series: list[tuple[str, list[Any], str]]) -> None:
        n = len(series)
        for i, (name, vals, colour) in enumerate(series):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name, color=colour)
        ax.set_xticks(range(len(rows)), labels)
        ax.legend(fontsize=8)

    bars(ax1, [("paper (8 x A5000)", [r["paper_norm_cost"] for r in rows], "tab:grey"),
               ("ours (wall-clock)", [r["norm_cost"] for r in rows], "tab:blue"),
               ("ours (counted FLOPs)", [r["compute_norm_cost"] for r in rows], "tab:cyan")])
    ax1.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax1.set_ylabel("cost relative to SupMAE")
    ax1.set_title("normalised cost: paper beside ours", fontsize=9)
    bars(ax2, [("paper (8 x A5000)", [r["paper_total_hours"] for r in rows], "tab:grey"),
               (f"ours ({result['config']['gpus']} x this device)", [r["wall_hours"] for r in rows], "tab:blue")])
    ax2.set_yscale("log")
    ax2.set_ylabel("total hours (PT + FT), log scale")
    ax2.set_title(f"wall-clock hours; ours on {result['device_name']}", fontsize=9)
    names = list(result["steps"])
    fracs = [result["compute_bound"][n]["frac_of_peak"] * 100 for n in names]
    ax3.bar(names, fracs, color="tab:green")
    ax3.set_ylabel(f"% of measured {result['peak_dtype']} matmul peak")
    ax3.set_title(f"achieved FLOP/s per step (peak {result['peak_tflops']:.3g} TFLOP/s)", fontsize=9)
    ax3.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_table1(
    device: str = "auto", gpus: int = 8, data: str = "synthetic", pipeline: str = "ffcv", num_workers: int = 2,
    model_scale: str = "base", depth: int | None = None, iters: int = 10, warmup: int | None = None,
    batch_size: int | None = None, num_images: int | None = None, methods: list[str] | None = None,
    precision: str = "auto", compile: str = "auto", drain: int | None = None,
    out: str | None = None, seed: int = 0, log: Any = print,
) -> dict[str, Any]:
    """Measure, project and (with `out`) write Table 1. Returns the result dict of table1.json."""
    start = time.perf_counter()
    dev = resolve_device(device)
    if batch_size is None:
        batch_size = 256 if dev.type == "cuda" else 8
    if warmup is None:
        # One CPU step is already steady (no compilation, no clock ramp); a GPU needs a few.
        warmup = 3 if dev.type == "cuda" else 1
    if iters < 1:
        raise UserError(f"--iters must be at least 1, got {iters}")
    keys = methods or [r.key for r in ROWS]
    unknown = [k for k in keys if k not in {r.key for r in ROWS}]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(r.key for r in ROWS)}")
    rows = [r for r in ROWS if r.key in keys]
    from supmae.train.precision import resolve_precision

    run_precision = resolve_precision(precision, dev)

    loader = None
    if data == "synthetic":
        arch = M.arch_for_scale(model_scale, depth=depth)
        data_desc = "synthetic (a random batch on the device per row)"
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
    if drain is None:
        # Deeper than any pipeline's prefetch queue: torchvision's 2 per worker, FFCV's / DALI's batches_ahead.
        drain = 2 * num_workers + 4
    source = DataSource(dev, batch_size, arch.img_size, arch.num_classes, seed, loader=loader, drain=drain,
                        timed=max(iters, 4))
    log(f"[table1] {device_name(dev)}, {run_precision}, scale {model_scale}, batch {batch_size}, "
        f"{len(rows)} rows, data: {data_desc}")
    peak_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak = measure_matmul_peak(dev, peak_dtype)
    log(f"[table1] measured {precision_name(peak_dtype)} matmul peak: {peak / 1e12:.3g} TFLOP/s")

    needed = measuring_order(rows)
    steps: dict[str, StepResult] = {}

    def assemble(final: bool) -> dict[str, Any]:
        """The result from the steps measured so far: the rows whose steps are all in, normalised to
        SupMAE's once it is (it is measured first)."""
        ready = [r for r in rows if r.pt_method in steps and (not r.ft_epochs or "finetune" in steps)]
        projected = [project_row(r, steps[r.pt_method], steps.get("finetune"), n_images, gpus) for r in ready]
        normalise(projected)
        return {
            "config": {
                "device": str(dev), "precision": run_precision, "precision_config": precision, "compile_config": compile,
                "gpus": gpus, "data": data, "data_desc": data_desc, "pipeline": pipeline if loader is not None else None,
                "model_scale": model_scale, "img_size": arch.img_size, "patch_size": arch.patch_size,
                "embed_dim": arch.embed_dim, "depth": arch.depth, "num_classes": arch.num_classes,
                "batch_size": batch_size, "num_images": n_images, "iters": iters, "warmup": warmup,
                "drain": drain if loader is not None else None, "seed": seed,
            },
            "device_name": device_name(dev),
            "environment": environment(),
            "peak_tflops": peak / 1e12,
            "peak_dtype": precision_name(peak_dtype),
            "steps": {k: asdict(v) for k, v in steps.items()},
            "complete": final,
            "pending": [m for m in needed if m not in steps],
            "compute_bound": compute_boundness(steps, peak),
            "rows": projected,
            "elapsed_seconds": time.perf_counter() - start,
            "paper": {"hardware": PAPER_HARDWARE, "gpus": PAPER_GPUS, "rows": {k: asdict(v) for k, v in PAPER.items()}},
            "paper_note": PAPER_NOTE,
            "assumptions": "ideal data-parallel scaling; iterations/epoch = floor(images / global batch); "
            "the fine-tuning step is shared by MoCo v3, MAE and SupMAE; with real data the fed rate is projected",
        }

    for name in needed:
        steps[name] = measure_step(name, arch, dev, batch_size, source, warmup, iters, precision, compile, seed, log)
        if out:
            # Each row as it finishes: a run cut short (a device session's time limit) keeps what it measured.
            write_outputs(assemble(final=False), out, log, chart=False)
    # Measured again at the end, the best of the two: one short window can fall on a busy moment
    # of a shared machine (or a GPU still ramping its clocks).
    peak = max(peak, measure_matmul_peak(dev, peak_dtype))
    result = assemble(final=True)
    if out:
        result["files"] = write_outputs(result, out, log)
    return result


def measuring_order(rows: list[Row] | tuple[Row, ...]) -> list[str]:
    """The steps to time, SupMAE's first (every row is normalised to it) and the fine-tuning step next
    (SupMAE's row needs it): a run cut short after two steps already has a normalised row."""
    needed = [r.pt_method for r in rows] + (["finetune"] if any(r.ft_epochs for r in rows) else [])
    first = [m for m in (REFERENCE_ROW, "finetune") if m in needed]
    return first + [m for m in needed if m not in first]


def _replace(path: str, write: Any) -> None:
    """Write through `write(fh)` into a temporary file, then rename it over `path` (atomic on POSIX)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        write(fh)
    os.replace(tmp, path)


def write_outputs(result: dict[str, Any], out: str, log: Any = print, chart: bool = True) -> dict[str, str]:
    """table1.md/.csv/.json (each replaced atomically) and, with `chart` where matplotlib is installed,
    table1.png; returns the written paths."""
    os.makedirs(out, exist_ok=True)
    paths = {ext: os.path.join(out, f"table1.{ext}") for ext in ("md", "csv", "json", "png")}
    if not chart:
        del paths["png"]
    else:
        # The GPU image runs this harness with torch, timm and torchvision only: no chart there.
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log("[table1] matplotlib is not installed: table1.png not written")
            del paths["png"]
    _replace(paths["md"], lambda fh: fh.write(render_markdown(result)))
    _replace(paths["csv"], lambda fh: write_csv(fh, result["rows"]))
    _replace(paths["json"], lambda fh: json.dump({**result, "files": paths}, fh, indent=2))
    if "png" in paths:
        write_chart(paths["png"], result)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supmae bench table1", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--gpus", type=int, default=8, help="devices of the projected run (global batch = batch x gpus)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a dataset directory read by --pipeline")
    p.add_argument("--pipeline", default="ffcv", choices=KINDS)
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers (real data only)")
    p.add_argument("--model-scale", default="base", choices=tuple(M.SCALES))
    p.add_argument("--depth", type=int, default=None, help="override the encoder depth of every row")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per step (and per mode with --data)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations before timing (default 3 on GPU, 1 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch (default 256 on GPU, 8 on CPU)")
    p.add_argument("--num-images", type=int, default=None,
                   help=f"images per epoch (default {IMAGENET_TRAIN_IMAGES:,} = ImageNet-1k train, or the dataset's)")
    p.add_argument("--methods", default=",".join(r.key for r in ROWS), help="comma-separated rows to measure")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="every row's precision, as --train.precision (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile every row, as --train.compile (auto: on CUDA only)")
    p.add_argument("--drain", type=int, default=None,
                   help="with --data: batches drawn untimed before each pipeline-alone and fed timing, to empty the "
                   "prefetch queue (default 2 x workers + 4)")
    add_run_options(p, default_out="runs/bench/table1")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    apply_threads(a.threads)
    result = run_table1(
        device=a.device, gpus=a.gpus, data=a.data, pipeline=a.pipeline, num_workers=a.num_workers,
        model_scale=a.model_scale, depth=a.depth, iters=a.iters, warmup=a.warmup, batch_size=a.batch_size,
        num_images=a.num_images, methods=[m.strip() for m in a.methods.split(",") if m.strip()],
        precision=a.precision, compile=a.compile, drain=a.drain, out=a.out or None, seed=a.seed,
    )
    print()
    print(render_markdown(result))
    if result.get("files"):
        print("written: " + ", ".join(result["files"].values()))
    return 0
