"""`supmae bench step`: what each speed-up of the SupMAE training step buys, one factor at a time, in one run.

One row per factor, each added to the row before it:

    paper      the reference implementation's step: plain softmax(QK^T)V attention; fp16 autocast
               with a GradScaler and its loss scaler's unscale + gradient norm (GPU), fp32 (CPU);
               `.item()` of the three losses after the forward and `synchronize()` every step; the
               per-parameter AdamW loop of its era; no compile
    sdpa       + fused attention (`scaled_dot_product_attention`)
    bf16       + bf16 autocast instead (no scaler)
    compile    + `torch.compile`
    no_sync    + no host sync: the trainer's own call (`PretrainStep.__call__`), losses left on the device
    fused      + fused AdamW
    trainer    `supmae pretrain`'s step as the trainer resolves it on this device (auto settings)

`--rows` picks rows and their order (say `trainer,paper` when time is short: the decisive figure and its
baseline first, so a run cut short still has them); a factor row's settings stay cumulative whatever the
order. `--min-seconds` makes every timing window last at least that long (a window of a few fast
iterations measures launch jitter and clock ramps, not the step). Each row's first iteration is timed
apart and reported as its compile time (with the first step's own cost), never mixed into the figure.

Every row is built by `supmae.train.steps.build_pretrain_step` from the `supmae_vit_b16_400ep`
recipe (at `--model`'s geometry) with the row's attention, precision, compile and AdamW settings,
so what is timed is the trainer's model, optimiser and loss; the rows with a host sync run the
reference's loop body (forward, `.item()` x 3, backward, update, synchronize) on that step's parts.

A factor the trainer does not use on this device (bf16 and compile on the CPU; fused AdamW on the
CPU, where the trainer's `auto` picks foreach) is still measured, and marked "not carried": the
rows after it go on without it, so the last factor row and the trainer row describe the same step.
A factor that cannot run is marked with the reason. MFU = counted training FLOPs per image x images/s
/ this device's dense matmul peak (bf16 on GPU, fp32 on CPU), measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.timing import (
    add_run_options,
    apply_threads,
    constant_batches,
    device_name,
    environment,
    measure_matmul_peak,
    precision_name,
    resolve_device,
    synchronize,
    synthetic_batch,
    time_steps,
)
from supmae.errors import UserError

RECIPE = "supmae_vit_b16_400ep"
FACTORS = ("paper", "sdpa", "bf16", "compile", "no_sync", "fused", "trainer")


@dataclass
class Settings:
    """The knobs a factor turns: attention kernel, precision, compile, host sync, AdamW implementation."""

    attn: str = "eager"
    precision: str = "fp32"
    compile: bool = False
    host_sync: bool = True
    impl: str = "for_loop"

    def describe(self) -> dict[str, Any]:
        return {"attention": self.attn, "precision": self.precision + (" + GradScaler" if self.precision == "fp16"
                                                                         else ""),
                "compile": self.compile, "host_sync": ".item() x3 + synchronize every step" if self.host_sync
                else "none", "optimizer": f"AdamW {self.impl}"}


def step_config(model_name: str, batch_size: int, depth: int | None, mask_ratio: float, s: Settings | None,
                model_kwargs: dict[str, Any] | None = None) -> Any:
    """The pretraining config of one row: the recipe at `model_name`'s geometry with the row's settings
    (None: the recipe's own auto settings, i.e. the trainer's step)."""
    from supmae.models import model_defaults
    from supmae.recipes import get_recipe

    cfg = get_recipe(RECIPE, "pretrain")
    cfg.model.name = model_name
    cfg.model.mask_ratio = mask_ratio
    if depth is not None:
        cfg.model.kwargs = {**cfg.model.kwargs, "depth": depth}
    if model_kwargs:
        cfg.model.kwargs = {**cfg.model.kwargs, **model_kwargs}
    cfg.data.img_size = int(model_defaults(model_name)["img_size"])
    cfg.data.batch_size = batch_size
    if s is not None:
        cfg.model.attn_impl = s.attn
        cfg.train.precision = s.precision
        cfg.train.compile = "on" if s.compile else "off"
        cfg.optim.impl = s.impl
    return cfg


def reference_loop_body(ps: Any, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The reference's step on the parts of a `PretrainStep`: forward, `.item()` of the three losses (and
    stop on a non-finite one), backward through its loss scaler (unscale + gradient norm when there is a
    GradScaler), optimiser step, zero_grad, synchronize."""
    from supmae.losses import supmae_loss
    from supmae.train.precision import autocast

    params = [p for p in ps.core.parameters() if p.requires_grad]
    lw = ps.loss

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(device, ps.amp_dtype):
            out = ps.model(images, mask_ratio=ps.mask_ratio)
            total, rec, cls = supmae_loss(out, labels, rec_weight=lw.rec_weight, cls_weight=lw.cls_weight,
                                          temperature=lw.temperature)
        loss_value, _rec_value, _cls_value = total.item(), rec.item(), cls.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss is {loss_value}, stopping (as the reference does)")
        if ps.scaler is not None:
            ps.scaler.scale(total).backward()
            ps.scaler.unscale_(ps.optimizer)
            grads = [p.grad.detach() for p in params if p.grad is not None]
            grad_norm = torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)
            ps.scaler.step(ps.optimizer)
            ps.scaler.update()
            del grad_norm  # computed for its cost: the reference logs it
        else:
            total.backward()
            ps.optimizer.step()
        ps.optimizer.zero_grad()
        synchronize(device)
        return total.detach()

    return step


def plan(device: torch.device, compile_row: bool) -> list[dict[str, Any]]:
    """The rows: each factor's settings (cumulative over the carried ones), whether it is carried into the
    rows after it and why not, or why it is not measured at all."""
    from supmae.train.compiling import resolve_compile
    from supmae.train.optim import adamw_impl
    from supmae.train.precision import resolve_precision

    cuda = device.type == "cuda"
    trainer_precision = resolve_precision("auto", device)
    trainer_compiles, compile_reason = resolve_compile("auto", device)
    trainer_impl = adamw_impl(device, "auto")
    s = Settings(precision="fp16" if cuda else "fp32")
    rows: list[dict[str, Any]] = []

    def add(name: str, label: str, new: Settings | None, carried: bool, why: str = "", skip: str = "") -> None:
        nonlocal s
        rows.append({"name": name, "label": label, "settings": new, "carried": carried, "why_not_carried": why,
                     "skipped": skip})
        if new is not None and carried:
            s = new

    add("paper", "paper-faithful", copy.copy(s), True)
    add("sdpa", "+ SDPA attention", Settings(**{**vars(s), "attn": "sdpa"}), True)
    add("bf16", "+ bf16 autocast", Settings(**{**vars(s), "precision": "bf16"}), trainer_precision == "bf16",
        f"the trainer's auto precision on {device.type} is {trainer_precision}")
    if not compile_row:
        add("compile", "+ torch.compile", None, False, skip="not measured: --no-compile")
    elif not hasattr(torch, "compile"):
        add("compile", "+ torch.compile", None, False, skip="this torch has no torch.compile")
    else:
        add("compile", "+ torch.compile", Settings(**{**vars(s), "compile": True}), trainer_compiles,
            f"the trainer does not compile here ({compile_reason})")
    add("no_sync", "+ no host sync", Settings(**{**vars(s), "host_sync": False}), True)
    add("fused", "+ fused AdamW", Settings(**{**vars(s), "impl": "fused"}), trainer_impl == "fused",
        f"the trainer's auto AdamW on {device.type} is {trainer_impl}")
    add("trainer", "= supmae pretrain's step (auto)", None, True)
    return rows


def run_step_bench(
    device: str = "auto", model_name: str = "supmae_vit_base_patch16", batch_size: int = 256, iters: int = 20,
    warmup: int = 5, compile_row: bool = True, mask_ratio: float = 0.75, rounds: int = 4, depth: int | None = None,
    out: str | None = None, seed: int = 0, compile_backend: str = "auto", trainer_compile: str = "auto",
    row_names: list[str] | None = None, min_seconds: float = 0.0, log: Any = print,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time every factor row and return the result (also written to `out`/step.json and step.md after
    every row, so a run cut short keeps the rows it finished).

    Rows run one after another, each alone on the device: built, warmed up (compilation happens here),
    timed in `rounds` windows of its `iters` iterations (the row's figure is the median window, so one
    window that meets a busy moment of a shared machine does not set it), then freed before the next
    row is built, so each row's peak memory is its own. A row that fails (a compiler error, running
    out of memory) records why, and the rows after it still run."""
    from supmae.models import model_defaults
    from supmae.models.flops import training_flops_per_image
    from supmae.train.compiling import resolve_compile
    from supmae.train.steps import build_pretrain_step

    start = time.perf_counter()
    dev = resolve_device(device)
    if batch_size < 2:
        raise UserError(f"--batch-size must be at least 2 (the head's BatchNorm), got {batch_size}")
    if iters < 1 or rounds < 1 or warmup < 0:
        raise UserError(f"need --iters >= 1, --rounds >= 1 and --warmup >= 0 (got {iters}, {rounds}, {warmup})")
    resolve_compile(trainer_compile, dev)  # a bad value is a one-line error before anything is measured
    if min_seconds < 0:
        raise UserError(f"--min-seconds must not be negative, got {min_seconds}")
    if row_names is not None:
        unknown = [n for n in row_names if n not in FACTORS]
        if unknown or not row_names or len(set(row_names)) != len(row_names):
            raise UserError(f"--rows {','.join(row_names)}: give each of {', '.join(FACTORS)} at most once "
                            f"(unknown: {', '.join(unknown) or 'none'})")
    args = model_defaults(model_name)
    img_size, num_classes = int(args["img_size"]), int(args["num_classes"])
    log(f"[step] {device_name(dev)}: {model_name}, batch {batch_size}, {warmup} warm-up + {iters} timed iterations")
    peak_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak = measure_matmul_peak(dev, peak_dtype)
    log(f"[step] measured {precision_name(peak_dtype)} matmul peak: {peak / 1e12:.3g} TFLOP/s")
    images, labels = synthetic_batch(batch_size, img_size, num_classes, dev, seed)
    batches = constant_batches(images, labels)
    rounds = max(1, min(rounds, iters))

    def build(s: Settings | None) -> tuple[Any, Callable[[torch.Tensor, torch.Tensor], Any]]:
        torch.manual_seed(seed)
        cfg = step_config(model_name, batch_size, depth, mask_ratio, s, model_kwargs)
        cfg.train.compile_backend = compile_backend
        if s is None:
            cfg.train.compile = trainer_compile
        ps = build_pretrain_step(cfg, dev, num_classes)
        return ps, (reference_loop_body(ps, dev) if s is not None and s.host_sync else ps)

    def free() -> None:
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)

    rows = plan(dev, compile_row)
    if row_names is not None:
        by_name = {r["name"]: r for r in rows}
        rows = [by_name[n] for n in row_names]
    flops: list[float] = []
    measured: dict[str, dict[str, Any]] = {}

    def result_so_far(final: bool) -> dict[str, Any]:
        result = {
            "device": str(dev), "device_name": device_name(dev), "model": model_name, "recipe": RECIPE,
            "depth": depth if depth is not None else int(args["depth"]), "batch_size": batch_size, "iters": iters,
            "warmup": warmup, "rounds": rounds, "mask_ratio": mask_ratio, "compile_backend": compile_backend,
            "trainer_compile": trainer_compile, "min_seconds": min_seconds, "model_kwargs": dict(model_kwargs or {}),
            "flops_per_image": flops[0] if flops else None,
            "peak_tflops": peak / 1e12, "peak_dtype": precision_name(peak_dtype),
            "rows": _entries(rows, measured, flops[0] if flops else 0.0, peak, batch_size),
            "complete": final, "environment": environment(), "elapsed_seconds": time.perf_counter() - start,
        }
        result["speedup"] = _speedup(result["rows"])
        return result

    for row in rows:
        if row["skipped"]:
            log(f"[step] {row['name']}: {row['skipped']}")
            continue
        t0 = time.perf_counter()
        ps = fn = None
        free()
        try:
            ps, fn = build(row["settings"])
            # The first call compiles (when the row compiles): timed alone, reported apart.
            fn(images, labels)
            synchronize(dev)
            first_s = time.perf_counter() - t0
            for _ in range(max(0, warmup - 1)):
                fn(images, labels)
            synchronize(dev)
            warm_s = time.perf_counter() - t0
            windows: list[float] = []
            window_totals: list[float] = []
            iter_seconds: list[float] = []
            per_iter = None
            for r in range(rounds):
                chunk = iters // rounds + (1 if r < iters % rounds else 0)
                if per_iter is not None and min_seconds > 0:
                    chunk = max(chunk, math.ceil(min_seconds / per_iter))
                t = time_steps(fn, batches, dev, 0, chunk)
                if r == 0 and min_seconds > 0 and t.total_seconds < min_seconds:
                    # Too short to count: it only sizes the windows that follow, then it is run again.
                    per_iter = t.total_seconds / t.iters
                    chunk = max(chunk, math.ceil(min_seconds / max(per_iter, 1e-9)))
                    t = time_steps(fn, batches, dev, 0, chunk)
                per_iter = t.total_seconds / t.iters
                windows.append(per_iter)
                window_totals.append(t.total_seconds)
                iter_seconds += t.iter_seconds
            peak_mem = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
            if not flops:
                flops.append(float(training_flops_per_image(ps.core, mask_ratio=mask_ratio)["total"]))
            if row["settings"] is None:
                desc = {"attention": ps.core.attn_impl,
                        "precision": ps.precision + (" + GradScaler" if ps.scaler is not None else ""),
                        "compile": ps.compiled, "host_sync": "none"}
            else:
                desc = row["settings"].describe()
            desc["optimizer"] = "AdamW " + _adamw_kind(ps.optimizer)
            measured[row["name"]] = {"desc": desc, "seconds_per_iter": statistics.median(windows),
                                     "iter_seconds": iter_seconds, "peak_mem_mb": peak_mem, "warmup_seconds": warm_s,
                                     "first_iter_seconds": first_s, "window_seconds": window_totals}
            log(f"[step] {row['name']:<8} {measured[row['name']]['seconds_per_iter'] * 1e3:9.1f} ms/iter "
                f"(warm-up {warm_s:.1f} s; its first iteration, compilation included, {first_s:.1f} s)")
        except Exception as exc:  # noqa: BLE001 (a compiler error or an OOM must not hide the other rows' figures)
            row["skipped"] = f"failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            row["carried"] = False
            log(f"[step] {row['name']}: {row['skipped']}")
        finally:
            del ps, fn
            free()
        if out:
            _write(result_so_far(final=False), out)

    # Measured again after the timing, the best of the two: one short window can fall on a busy
    # moment of a shared machine (or a GPU still ramping its clocks).
    peak = max(peak, measure_matmul_peak(dev, peak_dtype))
    result = result_so_far(final=True)
    for entry in result["rows"]:
        if "images_per_sec" in entry:
            log(f"[step] {entry['name']:<8} {entry['ms_per_iter']:9.1f} ms/iter  {entry['images_per_sec']:9.1f} img/s"
                f"  MFU {entry['mfu']:6.1%}")
    if out:
        result["files"] = _write(result, out)
    return result


def _entries(rows: list[dict[str, Any]], measured: dict[str, dict[str, Any]], flops_per_image: float, peak: float,
             batch_size: int) -> list[dict[str, Any]]:
    """One table entry per row: its settings and figures, or why it has none."""
    results: list[dict[str, Any]] = []
    base_ips = batch_size / measured["paper"]["seconds_per_iter"] if "paper" in measured else None
    prev_ips = None
    for row in rows:
        entry = {k: row[k] for k in ("name", "label", "carried", "why_not_carried", "skipped")}
        b = measured.get(row["name"])
        if b is None:
            results.append(entry)
            continue
        spi = b["seconds_per_iter"]
        ips = batch_size / spi
        its = b["iter_seconds"]
        spread = statistics.stdev(its) / statistics.fmean(its) if len(its) > 1 else 0.0
        entry.update({
            **b["desc"],
            "ms_per_iter": spi * 1e3,
            "images_per_sec": ips,
            "vs_previous": ips / prev_ips if prev_ips else None,
            "vs_paper": ips / base_ips if base_ips else None,
            "achieved_tflops": flops_per_image * ips / 1e12,
            "mfu": flops_per_image * ips / peak,
            "spread": spread,
            "peak_mem_mb": b["peak_mem_mb"],
            "warmup_seconds": b["warmup_seconds"],
            "first_iter_seconds": b["first_iter_seconds"],
            "timed_iters": len(its),
            "timed_seconds": float(sum(its)),
            "window_seconds": b["window_seconds"],
        })
        # The next row's "vs previous" is against the row it was built on: the last carried one.
        if row["carried"] or row["name"] == "paper":
            prev_ips = ips
        results.append(entry)
    return results


def _write(result: dict[str, Any], out: str) -> dict[str, str]:
    """step.md and step.json, each replaced atomically (a reader never sees half a file)."""
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "step.json"), "md": os.path.join(out, "step.md")}
    for path, text in ((paths["md"], render_markdown(result)),
                       (paths["json"], json.dumps({**result, "files": paths}, indent=2))):
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return paths


def _adamw_kind(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for_loop"


def _speedup(rows: list[dict[str, Any]]) -> float | None:
    """The trainer's step against the paper-faithful one."""
    by = {r["name"]: r for r in rows}
    if "images_per_sec" in by.get("trainer", {}) and "images_per_sec" in by.get("paper", {}):
        return by["trainer"]["images_per_sec"] / by["paper"]["images_per_sec"]
    return None


def render_markdown(result: dict[str, Any]) -> str:
    header = ["row", "attention", "precision", "compile", "host sync", "optimizer", "ms/iter", "img/s", "x previous",
              "x paper", "MFU", "first iter (s)", "carried on"]
    lines = [
        "# SupMAE training step: one factor at a time",
        "",
        (f"{result['device_name']}; {result['model']} (depth {result['depth']}, recipe {result['recipe']}), batch "
         f"{result['batch_size']}, mask ratio {result['mask_ratio']}; {result['warmup']} warm-up + {result['iters']} "
         f"timed iterations per row in {result['rounds']} windows (the median window counts), each row alone "
         f"on the device; "
         f"{(result['flops_per_image'] or 0) / 1e9:.2f} GFLOP per image per step (fwd + bwd, counted); "
         f"measured {result['peak_dtype']} matmul peak {result['peak_tflops']:.3g} TFLOP/s."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for r in result["rows"]:
        if "images_per_sec" not in r:
            lines.append("| " + " | ".join([r["label"], *(["-"] * (len(header) - 2)), r["skipped"]]) + " |")
            continue
        carried = "yes" if r["carried"] else f"no: {r['why_not_carried']}"
        if r["name"] == "trainer":
            carried = "-"
        cells = [r["label"], r["attention"], r["precision"], "yes" if r["compile"] else "no", r["host_sync"],
                 r["optimizer"], f"{r['ms_per_iter']:.1f}", f"{r['images_per_sec']:.1f}",
                 f"{r['vs_previous']:.2f}" if r["vs_previous"] else "-",
                 f"{r['vs_paper']:.2f}" if r["vs_paper"] else "-", f"{r['mfu']:.1%}",
                 f"{r['first_iter_seconds']:.1f}", carried]
        lines.append("| " + " | ".join(cells) + " |")
    if result["speedup"] is not None:
        lines += ["", f"Speed-up of supmae pretrain's step over the paper-faithful one: {result['speedup']:.2f}x"]
    lines += ["", ("Each row adds its factor to the last carried row ('x previous' compares against that row). A "
                   "factor the trainer does not use on this device is measured but not carried on. MFU = counted "
                   "FLOPs per image x images/s / the measured matmul peak of this device (not its data-sheet "
                   "figure). Timings on a shared machine are indicative."), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supmae bench step", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--model", default="supmae_vit_base_patch16", help="registry name of the SupMAE variant")
    p.add_argument("--depth", type=int, default=None, help="override the encoder depth of the model")
    p.add_argument("--model-kwargs", default="{}",
                   help="JSON of model arguments over the variant's (as --model.kwargs: width, heads, ...), e.g. "
                   "'{\"embed_dim\": 64, \"num_heads\": 2}'")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (compilation happens here)")
    p.add_argument("--no-compile", dest="compile_row", action="store_false",
                   help="do not measure the torch.compile row (compiling takes tens of seconds on a CPU)")
    p.add_argument("--rounds", type=int, default=4,
                   help="timing windows per row (at most --iters): its iterations are split over them and the "
                   "median window is the row's figure")
    p.add_argument("--rows", default=None,
                   help=f"rows to measure, in this order (default: {','.join(FACTORS)}); e.g. trainer,paper")
    p.add_argument("--min-seconds", type=float, default=0.0,
                   help="each timing window lasts at least this long (more iterations than --iters if need be)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--compile-backend", default="auto",
                   help="torch.compile backend of the compiled rows, as --train.compile_backend (auto: inductor)")
    p.add_argument("--trainer-compile", default="auto", choices=("auto", "on", "off"),
                   help="the trainer row's --train.compile (auto: on CUDA only, as supmae pretrain resolves it)")
    add_run_options(p, default_out="runs/bench/step")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        model_kwargs = json.loads(a.model_kwargs)
    except json.JSONDecodeError as exc:
        raise UserError(f"--model-kwargs is not JSON: {exc}") from None
    if not isinstance(model_kwargs, dict):
        raise UserError(f"--model-kwargs must be a JSON object, got {a.model_kwargs!r}")
    apply_threads(a.threads)
    result = run_step_bench(
        device=a.device, model_name=a.model, batch_size=a.batch_size, iters=a.iters, warmup=a.warmup,
        compile_row=a.compile_row, mask_ratio=a.mask_ratio, rounds=a.rounds, depth=a.depth, out=a.out or None,
        model_kwargs=model_kwargs,
        seed=a.seed, compile_backend=a.compile_backend, trainer_compile=a.trainer_compile,
        row_names=[n.strip() for n in a.rows.split(",") if n.strip()] if a.rows is not None else None,
        min_seconds=a.min_seconds,
    )
    print()
    print(render_markdown(result))
    if result.get("files"):
        print("written: " + ", ".join(result["files"].values()))
    return 0
