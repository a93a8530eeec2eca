"""`supmae doctor`: what will a recipe cost on this machine, and what will slow it down.

    supmae doctor --data DIR [--recipe NAME] [--device auto|cpu|cuda] [--out DIR]
                  [--price-per-gpu-hour P] [--machines N] [--workers 1,2,4] [--seconds S]
                  [--pipelines ffcv,dali,torchvision] [--num-images N] [--step-budget S]
                  [--gpu h100 --gpus-per-node G --cores-per-node C --mfu 0.4] [--section.key VALUE ...]

It measures, in a minute or two:
- the machine (psutil): physical and usable cores, memory, whether the dataset fits in the page
  cache (so the advice on FFCV's `os_cache` rests on a number);
- every pipeline's delivered images/s at the recipe's resolution and per-device batch, at a few
  worker counts up to the cores one rank may use (`pipelines.build_pipeline`, the training
  augmentation, nothing consuming the batches); a pipeline that cannot run here is listed with why;
- the read throughput of the dataset's files (after asking the kernel to drop them from the page
  cache, so it is close to a cold read where the kernel obliges);
- the recipe's training step on the device: the trainer's own step (`build_pretrain_step`:
  precision, TF32 and compile as `supmae pretrain` resolves them) on synthetic device tensors, so
  the step's rate is the compute alone; the matmul peak of the device in the step's precision, and
  the counted FLOPs per image, hence MFU. On the CPU the step and the memory probe run at the
  largest batch that fits `--step-budget` seconds (ViT-B at batch 256 takes minutes per step
  there). With `--gpu` on a machine without a GPU (a cluster's login node) the step is not run at
  all: one such GPU consumes `--mfu` x its data-sheet bf16 peak / the counted FLOPs per image, and
  the verdict and the cost are the node's;
- the batch that fits memory, one code path on every device (`probe_batch`): after a warm step, the
  memory a step adds at two batch sizes (memory = fixed + per image x batch; CUDA's allocator
  statistics, or on the CPU the tensor bytes counted op by op), then doubling batches while that line
  says they fit, up to a limit, until one runs out of memory;

Then the verdict: data-bound exactly when the best loader delivers fewer images/s than the step
consumes; the pipeline and worker count to use; and the projected wall-clock, device-hours and
money of the recipe's full length on this machine and on N such machines (ideal scaling: the
gradient all-reduce between machines is not measured). Writes doctor.md and doctor.json.

Dotted overrides after the options change the recipe as they do for `supmae pretrain`
(`--data.batch_size 128`, `--model.kwargs '{"depth": 2}'`).

Where the code lives: the run and its command line here; the measurements in `measure.py`, the
memory probe in `memory.py`, the verdict and the projection in `verdict.py`, doctor.md in `render.py`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable
from typing import Any

from supmae.doctor.measure import (
    PIPELINE_ORDER,
    cpu_step_batch,
    dataset_facts,
    dataset_files,
    datasheet_step,
    default_workers,
    machine_info,
    measure_decode_ceilings,
    measure_loaders,
    measure_loop_costs,
    measure_read,
    measure_step,
    parse_workers,
    read_step_json,
)
from supmae.doctor.memory import MemoryMeter, predicted_added_bytes, probe_batch
from supmae.doctor.render import render_markdown
from supmae.doctor.verdict import (
    GPU_BF16_DENSE_TFLOPS,
    gpu_images_per_sec,
    loop_projection,
    node_inputs,
    node_verdict,
    projection,
    verdict,
)
from supmae.errors import UserError

# What the command line, the tests and gpu_check use, wherever it now lives.
__all__ = [
    "GPU_BF16_DENSE_TFLOPS",
    "PIPELINE_ORDER",
    "STEP_BUDGET_S",
    "MemoryMeter",
    "dataset_files",
    "gpu_images_per_sec",
    "main",
    "node_verdict",
    "parse_workers",
    "predicted_added_bytes",
    "probe_batch",
    "read_step_json",
    "run_doctor",
    "verdict",
]

# Seconds the training step and the memory probe may take together on the CPU (--step-budget): the
# recipe's ViT-B step at batch 256 takes minutes per micro-batch on a few cores, so on the CPU both run
# at the largest batch whose cost fits (the rate per image is the same or better at the recipe's batch).
STEP_BUDGET_S = 20.0


# ---------------------------------------------------------------------------------------------- the run


def _resolve_device(name: str) -> Any:
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def run_doctor(data: str, recipe: str = "supmae_vit_b16_400ep", device: str = "auto", out: str | None = None,
               price_per_gpu_hour: float | None = None, machines: int = 1, workers: list[int] | None = None,
               seconds: float = 3.0, pipelines: list[str] | None = None, num_images: int | None = None,
               overrides: list[str] | None = None, batch_limit: int | None = None,
               gpu: str | None = None, gpus_per_node: int | None = None, cores_per_node: int | None = None,
               mfu: float = 0.4, step_json: str | None = None, step_budget: float = STEP_BUDGET_S,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure this machine for `recipe` on `data`; write doctor.md and doctor.json into `out` (when
    given and not empty) and return the JSON's content.

    With `gpu` (a key of GPU_BF16_DENSE_TFLOPS), or on a CUDA device, also the node verdict: a node of
    `gpus_per_node` such GPUs (default: this machine's) and `cores_per_node` cores (default: this
    machine's physical cores), each GPU consuming `mfu` x its data-sheet bf16 peak / the recipe's
    counted FLOPs per image (or, without `gpu` on a GPU, the measured step), against what the
    measured pipelines supply per core."""
    import copy

    import torch

    from pipelines import KINDS
    from supmae.config import apply_overrides
    from supmae.models.flops import training_flops_per_image
    from supmae.recipes import get_recipe, list_recipes
    from supmae.train.job_setup import has_split, resolve_accumulation
    from supmae.train.metrics import device_name, measure_matmul_peak
    from supmae.train.precision import resolve_precision

    if not os.path.isdir(data):
        raise UserError(f"--data {data} is not a directory")
    if machines < 1:
        raise UserError(f"--machines must be >= 1, got {machines}")
    if num_images is not None and num_images < 1:
        raise UserError(f"--num-images must be positive, got {num_images}")
    if seconds <= 0:
        raise UserError(f"--seconds must be positive, got {seconds}")
    if step_budget <= 0:
        raise UserError(f"--step-budget must be positive, got {step_budget}")
    if gpu is not None and gpu not in GPU_BF16_DENSE_TFLOPS:
        raise UserError(f"--gpu {gpu}: unknown GPU (known: {', '.join(GPU_BF16_DENSE_TFLOPS)})")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise UserError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
    if cores_per_node is not None and cores_per_node < 1:
        raise UserError(f"--cores-per-node must be >= 1, got {cores_per_node}")
    if batch_limit is not None and batch_limit < 1:
        raise UserError(f"--batch-limit must be >= 1, got {batch_limit}")
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise UserError(f"--price-per-gpu-hour must not be negative, got {price_per_gpu_hour}")
    if recipe not in list_recipes("pretrain") and recipe in list_recipes():
        raise UserError(f"--recipe {recipe} is a fine-tuning / probing recipe; the doctor measures pretraining "
                        "recipes (see 'supmae pretrain --list-recipes')")
    kinds = pipelines or list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"--pipelines: unknown pipeline(s) {', '.join(unknown)} (known: {', '.join(KINDS)})")
    cfg = get_recipe(recipe, "pretrain")
    apply_overrides(cfg, list(overrides or []))
    cfg.data.path = data
    dev = _resolve_device(device)
    devices = torch.cuda.device_count() if dev.type == "cuda" else 1
    t_all = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    try:
        machine = machine_info()
        cores_per_rank = max(1, machine["usable_cores"] // devices)
        worker_counts = workers if workers is not None else default_workers(cores_per_rank)
        node_wanted = gpu is not None or dev.type == "cuda"
        loader_dtype = None
        if node_wanted:
            # The per-core supply needs rates at 1 and 2 workers (the scaling between them), taken as a
            # worker feeding a GPU works: uint8 batches, normalisation left to the device.
            worker_counts = sorted({*worker_counts, 1, 2})
            loader_dtype = torch.uint8
        count, num_classes = dataset_facts(data, cfg.data.train_split)
        files = dataset_files(data, cfg.data.train_split)

        loaders = measure_loaders(data, cfg, dev, kinds, worker_counts, seconds, log, dtype=loader_dtype)
        ceilings = None
        if node_wanted:
            log("[doctor] decode ceilings of the stored files on one core: entropy floor, full libjpeg-turbo decode")
            ceilings = measure_decode_ceilings(data, cfg.data.train_split)

        given_step = read_step_json(step_json, dev) if step_json else None
        # Asked about a GPU on a machine without one (a login node): its step comes from the data sheet.
        sheet = gpu is not None and dev.type == "cpu" and given_step is None
        log(f"[doctor] training step of {recipe} on {device_name(dev)}, batch {cfg.data.batch_size}"
            + (f": taken from {step_json}" if given_step else "")
            + (f": not run here, one {gpu} from its data sheet x --mfu {mfu:g}" if sheet else ""))
        try:
            accum = resolve_accumulation(cfg.optim, cfg.data.batch_size, devices)
            accum_note = ""
        except UserError as exc:
            accum, accum_note = cfg.optim.accum_iter, f"accumulation {cfg.optim.accum_iter} used: {exc}"
        peak_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            resolve_precision(cfg.train.precision, dev), torch.float32)
        # The peak is the best of a window before and one after the step: one window alone can meet a
        # busy moment of a shared machine, and MFU's denominator should be what the device can reach.
        step_cfg = cfg
        if given_step is not None:
            step_row = {**given_step, "accum_note": accum_note}
        elif sheet:
            step_row = {**datasheet_step(cfg, gpu, mfu, num_classes), "accum_note": accum_note}
        else:
            batch_note = ""
            if dev.type == "cpu":
                small_batch, timing = cpu_step_batch(cfg, dev, num_classes, step_budget)
                if small_batch < cfg.data.batch_size:
                    step_cfg = copy.deepcopy(cfg)
                    step_cfg.data.batch_size = small_batch
                    accum = max(1, round(accum * cfg.data.batch_size / small_batch))  # the same effective batch
                    batch_note = (f"measured at batch {small_batch}, not the recipe's {cfg.data.batch_size}: a step "
                                  f"at {cfg.data.batch_size} would not fit the {step_budget:g} s step budget "
                                  f"(--step-budget; {timing['probe_seconds_per_image']:.2f} s per image at batch 2)")
                    log(f"[doctor] {batch_note}")
            peak_before = measure_matmul_peak(dev, peak_dtype, seconds=min(0.5, seconds))
            step_row, step = measure_step(step_cfg, dev, num_classes, accum, seconds)
            step_row["batch_note"] = batch_note
            flops = training_flops_per_image(step.core, mask_ratio=cfg.model.mask_ratio)["total"]
            peak = max(peak_before, measure_matmul_peak(dev, peak_dtype, seconds=min(0.5, seconds)))
            step_row.update({"flops_per_image": flops, "peak_flops": peak,
                             "peak_dtype": str(peak_dtype).split(".")[-1],
                             "mfu": flops * step_row["images_per_sec"] / peak, "accum_note": accum_note})
            log("[doctor] the loop's own costs: a checkpoint's stall, the evaluation's rate")
            loop_costs = measure_loop_costs(step, dev, step_cfg.data.batch_size, step_cfg.data.img_size, num_classes,
                                            seconds)
            del step
            gc.collect()
        if given_step is not None or sheet:
            from supmae.train.steps import build_pretrain_step

            log("[doctor] the loop's own costs: a checkpoint's stall, the evaluation's rate (the recipe's model "
                "built here for them)")
            lc_batch = min(step_cfg.data.batch_size, 8) if dev.type == "cpu" else step_cfg.data.batch_size
            step = build_pretrain_step(step_cfg, dev, num_classes, accum=1)
            loop_costs = measure_loop_costs(step, dev, lc_batch, step_cfg.data.img_size, num_classes, seconds)
            del step
            gc.collect()
        if sheet:
            memory = {"max_batch": None, "per_image_bytes": None,
                      "method": f"not measured: this machine is not the {gpu} the verdict is about (run the doctor "
                      "on the node itself for its memory)"}
        else:
            log("[doctor] the batch that fits memory")
            memory = probe_batch(step_cfg, dev, num_classes, batch_limit, log)

        log("[doctor] read throughput of the dataset's files")
        reads: dict[str, Any] = {}
        for kind in kinds:
            names, why = files[kind]
            reads[kind] = measure_read(names, min(seconds, 5.0)) if names else {"reason": why}
            if names:
                reads[kind]["images_per_sec"] = (reads[kind]["mb_per_sec"] * 1e6 /
                                                 (reads[kind]["dataset_bytes"] / max(count, 1)))
    finally:
        torch.set_num_threads(threads)

    v = verdict(loaders, step_row["images_per_sec"])
    rec = v["recommendation"]["pipeline"]
    size = reads.get(rec, {}).get("dataset_bytes")
    fits = size is not None and size < 0.8 * machine["memory_available_bytes"]
    cache = {"dataset_bytes": size, "pipeline": rec, "fits_page_cache": fits if size is not None else None,
             "recipe_os_cache": cfg.data.os_cache,
             "advice": (("os_cache on: the files fit in memory, so FFCV maps them once and later epochs read RAM"
                         if fits else "os_cache off: the files exceed the available memory, so mapping them whole "
                         "would thrash; FFCV's own quasi-random reading with its page pool is the better path")
                        if size is not None else "n/a")}
    epochs = cfg.train.planned_epochs or cfg.train.epochs
    per_epoch = num_images if num_images is not None else (count // (cfg.data.batch_size * devices)) * \
        cfg.data.batch_size * devices
    node = None
    if node_wanted:
        if gpu is not None:
            consumed, how = gpu_images_per_sec(gpu, mfu, step_row["flops_per_image"]), (
                f"{mfu:g} x the {gpu} data sheet's dense bf16 peak {GPU_BF16_DENSE_TFLOPS[gpu]:g} TFLOP/s / "
                f"{step_row['flops_per_image'] / 1e9:.2f} GFLOP per image (counted)")
        else:
            consumed, how = step_row["images_per_sec"], "the step measured here"
        storage = None
        from pipelines.base import ConvertedDataset, is_converted

        if is_converted(data):
            manifest = ConvertedDataset(data).manifest
            storage = (manifest.get("options") or manifest.get("identity") or {}).get("max_res")
        per_core, scaling, why = node_inputs(loaders, kinds, dev.type == "cuda")
        node = node_verdict(gpu or device_name(dev), gpus_per_node or devices,
                            cores_per_node or machine["physical_cores"] or machine["usable_cores"], consumed, per_core,
                            scaling, why, storage, ceilings)
        node.update(consumed_from=how, mfu=mfu if gpu is not None else None,
                    loader_dtype="uint8" if loader_dtype is not None else "float32",
                    measured_on_cores=machine["usable_cores"])
    basis = "this machine"
    if sheet and node is not None and node["bound"] is not None:
        # This machine only measured the loaders: the verdict, the advice and the cost are the node's.
        basis = "the node"
        g, best = node["gpus"], node["best_pipeline"]
        supplied, consumed = node["supplied_images_per_sec"][best], node["consumed_images_per_sec"]
        v = {"bound": node["bound"],
             "factor": consumed / supplied if node["bound"] == "data" else supplied / consumed,
             "best": v["best"],
             "recommendation": {"pipeline": best, "workers": max(1, node["cores_for_data"] // g),
                                "images_per_sec": supplied / g,
                                "why": "the node's best pipeline, with its cores left for data shared by the GPUs"},
             "rate": min(consumed, supplied) / g}
        proj_devices = g
        # Whole global batches, as training takes them (a sample smaller than one global batch: all of it).
        per_epoch = num_images if num_images is not None else \
            (count // (cfg.data.batch_size * g)) * cfg.data.batch_size * g or count
    else:
        proj_devices = devices
    proj = projection(epochs, per_epoch, v["rate"], proj_devices, machines, price_per_gpu_hour)
    proj["basis"] = basis
    val_images = dataset_facts(data, cfg.data.val_split)[0] if has_split(data, cfg.data.val_split) else 0
    loop = loop_projection(loop_costs, v["rate"], proj_devices, per_epoch, val_images if cfg.train.val else 0,
                           cfg.train.checkpoint_minutes, cfg.train.val_every)
    result = {
        "data": os.path.abspath(data),
        "recipe": recipe,
        "overrides": list(overrides or []),
        "device": device_name(dev),
        "device_type": dev.type,
        "devices": devices,
        "machine": machine,
        "workers_tried": worker_counts,
        "seconds_per_measurement": seconds,
        "step_budget_seconds": step_budget,
        "dataset": {"images": count, "classes": num_classes, "split": cfg.data.train_split},
        "loaders": loaders,
        "read": reads,
        "page_cache": cache,
        "step": step_row,
        "recipe_batch_size": cfg.data.batch_size,
        "memory": memory,
        "bound": v["bound"],
        "bound_basis": basis,
        "factor": v["factor"],
        "best_loader": v["best"],
        "recommendation": v["recommendation"],
        "projection": proj,
        "loop_costs": loop,
        "price_per_gpu_hour": price_per_gpu_hour,
        "node": node,
        "doctor_seconds": time.perf_counter() - t_all,
    }
    if out:
        os.makedirs(out, exist_ok=True)
        result["doctor_md"] = os.path.join(out, "doctor.md")
        result["doctor_json"] = os.path.join(out, "doctor.json")
        with open(result["doctor_md"], "w", encoding="utf-8") as fh:
            fh.write(render_markdown(result))
        with open(result["doctor_json"], "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return result


# ---------------------------------------------------------------------------------------------- command line


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="supmae doctor", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data", required=True, help="a directory written by 'supmae convert' (or an ImageFolder root)")
    p.add_argument("--recipe", default="supmae_vit_b16_400ep", help="pretraining recipe (default: the paper's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="doctor",
                   help="where doctor.md and doctor.json go (default: ./doctor; '' writes no files)")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="price of one device-hour")
    p.add_argument("--machines", type=int, default=1, help="project also on N such machines")
    p.add_argument("--workers", default=None, help="worker counts to try, e.g. 1,2,4 (default: 1, 2, 4 ... cores)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each measuring window")
    p.add_argument("--pipelines", default=None, help="comma-separated subset of ffcv,dali,torchvision")
    p.add_argument("--num-images", type=int, default=None, help="images per epoch to project (default: the dataset's)")
    p.add_argument("--batch-limit", type=int, default=None,
                   help="largest batch the memory probe runs (default 4096 on CUDA, the recipe's batch on the CPU)")
    p.add_argument("--gpu", default=None, choices=tuple(GPU_BF16_DENSE_TFLOPS),
                   help="judge a node of these GPUs (their data-sheet bf16 peak x --mfu); default: this machine's")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs in the node (default: this machine's)")
    p.add_argument("--cores-per-node", type=int, default=None,
                   help="physical cores in the node (default: this machine's)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of the GPU's peak the step reaches (default 0.4)")
    p.add_argument("--step-json", default=None,
                   help="take the training step from 'supmae bench step' (its step.json or --out folder: the trainer "
                   "row, e.g. compiled at the recipe's batch) instead of measuring it again here")
    p.add_argument("--step-budget", type=float, default=STEP_BUDGET_S,
                   help=f"seconds the training step and the memory probe may take on the CPU (default "
                   f"{STEP_BUDGET_S:g}): they run at the largest batch that fits. With --gpu on a machine without "
                   "a GPU the step is not run: the data sheet x --mfu")
    a, rest = p.parse_known_args(argv)
    bad = [x for x in rest if x.startswith("-") and not x.startswith("--")]
    if bad:
        raise UserError(f"unknown option(s): {' '.join(bad)}")
    result = run_doctor(a.data, a.recipe, a.device, a.out, a.price_per_gpu_hour, a.machines,
                        parse_workers(a.workers) if a.workers else None, a.seconds,
                        [k.strip() for k in a.pipelines.split(",") if k.strip()] if a.pipelines else None,
                        a.num_images, rest, batch_limit=a.batch_limit, gpu=a.gpu, gpus_per_node=a.gpus_per_node,
                        cores_per_node=a.cores_per_node, mfu=a.mfu, step_json=a.step_json,
                        step_budget=a.step_budget)
    print(render_markdown(result))
    # --out '' asks for no files: the report above is all there is.
    if result.get("doctor_md"):
        print(f"written: {result['doctor_md']}, {result['doctor_json']}")
    return 0
