"""`supmae bench step`: images/s of the SupMAE training step, our configuration against a
paper-faithful one, in one run.

    ours   fused attention (SDPA), torch.compile (GPU default), bf16 autocast (GPU), fused AdamW,
           losses accumulated on the device: no host sync in the step.
    paper  the reference implementation's step: plain softmax(QK^T)V attention, fp16 autocast with
           a GradScaler (GPU), the gradient norm computed after unscaling as its loss scaler does,
           the per-parameter AdamW loop of its era, `.item()` of the three losses and a
           `torch.cuda.synchronize()` on every step, no compile.

On CPU both run in fp32 (no autocast, no scaler) and compile is off unless --compile is given.
MFU = counted training FLOPs per image x images/s / this device's measured dense matmul peak
(bf16 on GPU, fp32 on CPU), measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
from typing import Any

import torch

from benchmarks.timing import (
    add_run_options,
    amp_dtype,
    apply_threads,
    autocast,
    constant_batches,
    device_name,
    environment,
    fused_adamw,
    measure_matmul_peak,
    precision_name,
    resolve_device,
    synchronize,
    synthetic_batch,
    time_steps,
)
from supmae.errors import UserError

CONFIGS = ("ours", "paper")


def _param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    from timm.optim import param_groups_weight_decay

    return param_groups_weight_decay(model, weight_decay=0.05)


def build_ours(model_name: str, device: torch.device, batch_size: int, compile_model: bool,
               mask_ratio: float, overrides: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Our step and a description of it."""
    from supmae.losses import supmae_loss
    from supmae.models import create_model

    model = create_model(model_name, attn_impl="sdpa", **(overrides or {})).to(device).train()
    dtype = amp_dtype(device)
    opt = fused_adamw(_param_groups(model), device, lr=1.5e-4 * batch_size / 256, betas=(0.9, 0.95))
    forward = torch.compile(model) if compile_model else model
    running = torch.zeros(3, device=device)  # summed (total, rec, cls), read only at log time

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            out = forward(images, mask_ratio=mask_ratio)
            total, rec, cls = supmae_loss(out, labels)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        running.add_(torch.stack([total.detach(), rec.detach(), cls.detach()]))
        return total.detach()

    fused = bool(opt.defaults.get("fused"))
    desc = {"attention": "sdpa", "precision": precision_name(dtype), "compile": compile_model,
            "optimizer": "AdamW fused" if fused else "AdamW foreach", "host_sync": "none"}
    return (step, model), desc


def build_paper(model_name: str, device: torch.device, batch_size: int, mask_ratio: float,
                overrides: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The reference implementation's step (see the module docstring)."""
    from supmae.losses import supmae_loss
    from supmae.models import create_model

    model = create_model(model_name, attn_impl="eager", **(overrides or {})).to(device).train()
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else None
    # foreach=False: the per-parameter loop of the torch versions the reference ran on.
    opt = torch.optim.AdamW(_param_groups(model), lr=1.5e-4 * batch_size / 256, betas=(0.9, 0.95), foreach=False)
    scaler = None
    if cuda:
        # torch.amp.GradScaler is the current spelling; older builds only have torch.cuda.amp's.
        scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            out = model(images, mask_ratio=mask_ratio)
            total, rec, cls = supmae_loss(out, labels)
        loss_value, _rec_value, _cls_value = total.item(), rec.item(), cls.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss is {loss_value}, stopping (as the reference does)")
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(opt)
            grad_norm = torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in params if p.grad is not None]))
            scaler.step(opt)
            scaler.update()
        else:
            total.backward()
            grad_norm = torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in params if p.grad is not None]))
            opt.step()
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        del grad_norm  # computed for its cost, as the reference logs it
        return total.detach()

    desc = {"attention": "eager", "precision": "fp16 + GradScaler" if cuda else "fp32", "compile": False,
            "optimizer": "AdamW per-parameter loop", "host_sync": ".item() x3 + synchronize every step"}
    return (step, model), desc


def run_step_bench(
    device: str = "auto", model_name: str = "supmae_vit_base_patch16", batch_size: int = 256, iters: int = 20,
    warmup: int = 5, compile_model: bool | None = None, mask_ratio: float = 0.75, configs: tuple[str, ...] = CONFIGS,
    rounds: int = 4, depth: int | None = None, out: str | None = None, seed: int = 0, log: Any = print,
) -> dict[str, Any]:
    """Time each configuration in `configs`, `iters` iterations each spread over `rounds` interleaved
    rounds, and return the result (also written to `out`/step.json and step.md)."""
    from supmae.models import model_defaults
    from supmae.models.flops import training_flops_per_image

    start = time.perf_counter()
    dev = resolve_device(device)
    if compile_model is None:
        compile_model = dev.type == "cuda"
    if batch_size < 2:
        raise UserError(f"--batch-size must be at least 2 (the head's BatchNorm), got {batch_size}")
    if iters < 1 or rounds < 1 or warmup < 0:
        raise UserError(f"need --iters >= 1, --rounds >= 1 and --warmup >= 0 (got {iters}, {rounds}, {warmup})")
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise UserError(f"unknown configuration(s) {', '.join(bad)}: choose from {', '.join(CONFIGS)}")
    args = model_defaults(model_name)
    img_size, num_classes = int(args["img_size"]), int(args["num_classes"])
    overrides = {"depth": depth} if depth is not None else {}
    log(f"[step] {device_name(dev)}: {model_name}, batch {batch_size}, {warmup} warm-up + {iters} timed iterations")
    peak_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak = measure_matmul_peak(dev, peak_dtype)
    log(f"[step] measured {precision_name(peak_dtype)} matmul peak: {peak / 1e12:.3g} TFLOP/s")
    images, labels = synthetic_batch(batch_size, img_size, num_classes, dev, seed)

    batches = constant_batches(images, labels)

    def build(name: str, compile_ours: bool) -> tuple[Any, Any, dict[str, Any]]:
        torch.manual_seed(seed)
        if name == "ours":
            (step, model), desc = build_ours(model_name, dev, batch_size, compile_ours, mask_ratio, overrides)
        else:
            (step, model), desc = build_paper(model_name, dev, batch_size, mask_ratio, overrides)
        return step, model, desc

    def warm(step: Any) -> float | None:
        """Run the warm-up (compilation happens here); the peak memory it reached, on GPU."""
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(warmup):
            step(images, labels)
        synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None

    built: dict[str, dict[str, Any]] = {}
    flops_per_image = None
    for name in configs:
        step, model, desc = build(name, compile_model)
        if flops_per_image is None:
            flops_per_image = float(training_flops_per_image(model, mask_ratio=mask_ratio)["total"])
        t0 = time.perf_counter()
        try:
            peak_mem = warm(step)
        except Exception as exc:  # a compiler failure must not hide the other figures
            if not (name == "ours" and desc["compile"]):
                raise
            # torch.compile failures surface at the first call: time the same step uncompiled
            # instead, and say so in the result rather than printing nothing.
            first = (str(exc).splitlines() or [""])[0]
            log(f"[step] torch.compile failed ({type(exc).__name__}: {first[:200]}); "
                "timing our configuration without compile")
            del step, model
            gc.collect()
            step, model, desc = build(name, False)
            desc["compile_error"] = f"{type(exc).__name__}: {first[:500]}"
            t0 = time.perf_counter()
            peak_mem = warm(step)
        built[name] = {"step": step, "model": model, "desc": desc, "peak_mem_mb": peak_mem,
                       "warmup_seconds": time.perf_counter() - t0, "seconds": 0.0, "iters": 0, "iter_seconds": []}
        log(f"[step] {name}: warmed up in {built[name]['warmup_seconds']:.1f} s")

    # Interleave the configurations in rounds (alternating which goes first), so that a change of
    # load from other work on a shared machine, or GPU clock drift, hits both alike.
    rounds = max(1, min(rounds, iters))
    for r in range(rounds):
        chunk = iters // rounds + (1 if r < iters % rounds else 0)
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            t = time_steps(built[name]["step"], batches, dev, 0, chunk)
            built[name]["seconds"] += t.total_seconds
            built[name]["iters"] += t.iters
            built[name]["iter_seconds"] += t.iter_seconds

    # Measured again after the timing, the best of the two: one short window can fall on a busy
    # moment of a shared machine (or a GPU still ramping its clocks).
    peak = max(peak, measure_matmul_peak(dev, peak_dtype))
    results: dict[str, dict[str, Any]] = {}
    for name in configs:
        b = built[name]
        spi = b["seconds"] / b["iters"]
        ips = batch_size / spi
        spread = statistics.stdev(b["iter_seconds"]) / statistics.fmean(b["iter_seconds"]) \
            if len(b["iter_seconds"]) > 1 else 0.0
        results[name] = {
            **b["desc"],
            "ms_per_iter": spi * 1e3,
            "images_per_sec": ips,
            "achieved_tflops": flops_per_image * ips / 1e12,
            "mfu": flops_per_image * ips / peak,
            "spread": spread,
            "peak_mem_mb": b["peak_mem_mb"],
            "warmup_seconds": b["warmup_seconds"],
        }
        log(f"[step] {name:<6} {spi * 1e3:9.1f} ms/iter  {ips:9.1f} img/s  MFU {results[name]['mfu']:6.1%}")
    built.clear()
    gc.collect()
    result: dict[str, Any] = {
        "device": str(dev),
        "device_name": device_name(dev),
        "model": model_name,
        "depth": depth if depth is not None else int(args["depth"]),
        "batch_size": batch_size,
        "iters": iters,
        "warmup": warmup,
        "rounds": rounds,
        "mask_ratio": mask_ratio,
        "flops_per_image": flops_per_image,
        "peak_tflops": peak / 1e12,
        "peak_dtype": precision_name(peak_dtype),
        "configs": results,
        "speedup": (results["ours"]["images_per_sec"] / results["paper"]["images_per_sec"]
                    if "ours" in results and "paper" in results else None),
        "environment": environment(),
    }
    result["elapsed_seconds"] = time.perf_counter() - start
    if out:
        os.makedirs(out, exist_ok=True)
        paths = {"json": os.path.join(out, "step.json"), "md": os.path.join(out, "step.md")}
        with open(paths["md"], "w") as fh:
            fh.write(render_markdown(result))
        result["files"] = paths
        with open(paths["json"], "w") as fh:
            json.dump(result, fh, indent=2)
    return result


def render_markdown(result: dict[str, Any]) -> str:
    header = ["config", "attention", "precision", "compile", "optimizer", "host sync", "ms/iter", "img/s",
              "TFLOP/s", "MFU"]
    lines = [
        "# SupMAE training step: ours vs paper-faithful",
        "",
        (f"{result['device_name']}; {result['model']} (depth {result['depth']}), batch {result['batch_size']}, mask ratio {result['mask_ratio']}; "
        f"{result['warmup']} warm-up + {result['iters']} timed iterations in {result['rounds']} interleaved rounds; "
        f"{result['flops_per_image'] / 1e9:.2f} GFLOP per image per step (fwd + bwd, counted); "
        f"measured {result['peak_dtype']} matmul peak {result['peak_tflops']:.3g} TFLOP/s."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for name, r in result["configs"].items():
        if r.get("compile_error"):
            name = f"{name} (compile failed: {r['compile_error'][:80]})"
        cells = [name, r["attention"], r["precision"], "yes" if r["compile"] else "no", r["optimizer"], r["host_sync"],
                 f"{r['ms_per_iter']:.1f}", f"{r['images_per_sec']:.1f}", f"{r['achieved_tflops']:.3g}",
                 f"{r['mfu']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    if result["speedup"] is not None:
        lines += ["", f"Speed-up ours / paper: {result['speedup']:.2f}x"]
    lines += ["", ("MFU = counted FLOPs per image x images/s / the measured matmul peak of this device (not its "
              "data-sheet figure). Timings on a shared machine are indicative."), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supmae bench step", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--model", default="supmae_vit_base_patch16", help="registry name of the SupMAE variant")
    p.add_argument("--depth", type=int, default=None, help="override the encoder depth of the model")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (compilation happens here)")
    p.add_argument("--compile", dest="compile_model", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our configuration (default: on GPU, off on CPU)")
    p.add_argument("--rounds", type=int, default=4,
                   help="interleaved timing rounds (at most --iters): each configuration's iterations are split over them")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--configs", default=",".join(CONFIGS), help="which of ours,paper to run")
    add_run_options(p, default_out="runs/bench/step")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    apply_threads(a.threads)
    result = run_step_bench(
        device=a.device, model_name=a.model, batch_size=a.batch_size, iters=a.iters, warmup=a.warmup,
        compile_model=a.compile_model, mask_ratio=a.mask_ratio, rounds=a.rounds, depth=a.depth,
        configs=tuple(c.strip() for c in a.configs.split(",") if c.strip()), out=a.out or None, seed=a.seed,
    )
    print()
    print(render_markdown(result))
    if result.get("files"):
        print("written: " + ", ".join(result["files"].values()))
    return 0
