"""What the doctor measures: the machine, the dataset's files and their read rate, each pipeline's
delivered images/s, and the recipe's training step (timed on the device, taken from `supmae bench step`'s
step.json, or derived from a GPU's data sheet)."""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

from supmae.doctor.verdict import GPU_BF16_DENSE_TFLOPS, gpu_images_per_sec
from supmae.errors import UserError

# ---------------------------------------------------------------------------------------------- machine


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """Cores and memory of this machine (psutil)."""
    import psutil

    vm = psutil.virtual_memory()
    return {
        "host": platform.node(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "usable_cores": usable_cores(),
        "memory_total_bytes": int(vm.total),
        "memory_available_bytes": int(vm.available),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def default_workers(cores: int) -> list[int]:
    """1, 2, 4, ... up to `cores`, and `cores` itself."""
    out, w = [], 1
    while w < cores:
        out.append(w)
        w *= 2
    out.append(max(1, cores))
    return sorted(set(out))


def parse_workers(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--workers must be comma-separated integers, got {text!r}") from None
    if not values or values[0] < 0:
        raise UserError(f"--workers needs non-negative worker counts, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------- dataset


def dataset_files(path: str, split: str) -> dict[str, tuple[list[str], str | None]]:
    """Per pipeline: the files it reads for `split` (and None), or no files and why not."""
    from pipelines.base import ConvertedDataset, is_converted
    from pipelines.constants import beton_path, wds_dir

    def tree(root: str) -> list[str]:
        return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)

    out: dict[str, tuple[list[str], str | None]] = {}
    if not is_converted(path):
        split_dir = os.path.join(path, split)
        found = tree(split_dir) if os.path.isdir(split_dir) else []
        out["torchvision"] = (found, None if found else f"no {split}/ folder in {path}")
        for kind in ("ffcv", "dali"):
            out[kind] = ([], f"{path} is not a converted dataset (run 'supmae convert')")
        return out
    ds = ConvertedDataset(path)
    beton = beton_path(ds.root, split)
    out["ffcv"] = ([beton], None) if os.path.isfile(beton) else ([], (f"no {os.path.relpath(beton, ds.root)} "
                                                                  "(converted without the ffcv format?)"))
    shards = wds_dir(ds.root, split)
    tars = [f for f in tree(shards) if f.endswith(".tar")] if os.path.isdir(shards) else []
    out["dali"] = (tars, None) if tars else ([], f"no webdataset shards in {os.path.relpath(shards, ds.root)}")
    # The torchvision baseline reads the raw ImageFolder tree when the conversion came from one that
    # is still here, otherwise the JPEG bytes the conversion stored (its shards, else its .beton).
    from pipelines.torchvision_pipeline import choose_source

    if choose_source(ds, "auto") == "raw":
        raw = os.path.join(ds.source_root, split)
        found = tree(raw) if os.path.isdir(raw) else []
        out["torchvision"] = (found, None) if found else ([], f"no {split}/ folder in the raw tree {ds.source_root}")
    else:
        stored = out["dali"][0] or out["ffcv"][0]
        out["torchvision"] = (stored, None) if stored else ([], "the conversion stored neither shards nor a .beton")
    return out


def dataset_facts(path: str, split: str) -> tuple[int, int]:
    """(images in `split`, classes) of a converted dataset or an ImageFolder root."""
    from pipelines.base import ConvertedDataset, is_converted

    if is_converted(path):
        ds = ConvertedDataset(path)
        return ds.count(split), len(ds.classes)
    root = os.path.join(path, split)
    if not os.path.isdir(root):
        raise UserError(f"--data {path}: neither a converted dataset nor an ImageFolder root with {split}/")
    classes = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))]
    count = sum(len(files) for _, _, files in os.walk(root))
    return count, len(classes)


def measure_read(files: list[str], seconds: float) -> dict[str, Any]:
    """Sequential read throughput of `files` for about `seconds`, after asking the kernel to drop their
    cached pages (POSIX_FADV_DONTNEED; honoured for clean pages, so close to a cold read)."""
    chunk = 8 << 20
    total = sum(os.path.getsize(f) for f in files)
    dropped = hasattr(os, "posix_fadvise")
    done, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    for name in files:
        with open(name, "rb", buffering=0) as fh:
            if dropped:
                try:
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError:
                    dropped = False
            while True:
                block = fh.read(chunk)
                if not block:
                    break
                done += len(block)
                if time.perf_counter() > deadline:
                    break
        if time.perf_counter() > deadline:
            break
    elapsed = max(time.perf_counter() - t0, 1e-9)
    return {"bytes_read": done, "seconds": elapsed, "mb_per_sec": done / elapsed / 1e6, "dataset_bytes": total,
            "cache_dropped_first": dropped}


# ---------------------------------------------------------------------------------------------- loaders

# The torchvision baseline first: its DataLoader forks worker processes, which must not happen while
# FFCV's compiled thread pool (numba) is alive in this process (benchmarks/loaders.py measured FFCV at
# half speed in that order).
PIPELINE_ORDER = ("torchvision", "dali", "ffcv")


def _endless(pipe: Any) -> Iterator[Any]:
    while True:  # successive epochs, each with its own order, as in training
        yield from pipe


def measure_loader(kind: str, data: str, cfg: Any, device: Any, workers: int, seconds: float,
                   warmup_batches: int = 2, dtype: Any = None) -> dict[str, Any]:
    """Images/s one pipeline delivers with `workers` workers: built, warmed up, then timed for about
    `seconds` (at least 2 batches), with the recipe's batch, resolution and training augmentation."""
    import torch

    from pipelines import build_pipeline

    t0 = time.perf_counter()
    pipe = build_pipeline(kind, data, split=cfg.data.train_split, batch_size=cfg.data.batch_size,
                          img_size=cfg.data.img_size, device=device, seed=cfg.seed, num_workers=workers, train=True,
                          scale=(cfg.data.scale_min, 1.0), color_jitter=cfg.data.color_jitter,
                          randaugment=cfg.data.randaugment or None, os_cache=cfg.data.os_cache,
                          batches_ahead=cfg.data.batches_ahead,
                          **({} if dtype is None else {"dtype": dtype}))
    build = time.perf_counter() - t0
    stream = _endless(pipe)
    cuda = torch.device(device).type == "cuda"
    try:
        t0 = time.perf_counter()
        for _ in range(warmup_batches):
            next(stream)
        warm = time.perf_counter() - t0
        images, batches = 0, 0
        t0 = time.perf_counter()
        while batches < 2 or time.perf_counter() - t0 < seconds:
            _, labels = next(stream)
            images += int(labels.shape[0])
            batches += 1
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    finally:
        stream.close()
        del stream, pipe
        gc.collect()
    return {"pipeline": kind, "workers": workers, "images_per_sec": images / elapsed, "available": True,
            "reason": "", "batches": batches, "seconds": elapsed, "build_seconds": build, "warmup_seconds": warm}


def measure_loaders(data: str, cfg: Any, device: Any, kinds: list[str], workers: list[int], seconds: float,
                    log: Callable[[str], None], dtype: Any = None) -> list[dict[str, Any]]:
    """Every pipeline at every worker count; a pipeline that cannot run is one row with its reason."""
    from pipelines import available
    from pipelines.errors import DataError

    files = dataset_files(data, cfg.data.train_split)
    rows: list[dict[str, Any]] = []
    for kind in sorted(kinds, key=PIPELINE_ORDER.index):
        reason = available(kind) or files[kind][1]
        if reason:
            rows.append({"pipeline": kind, "workers": None, "images_per_sec": None, "available": False,
                         "reason": reason})
            log(f"[doctor] {kind}: cannot run here: {reason}")
            continue
        for w in workers:
            log(f"[doctor] {kind} with {w} worker(s): build, warm up, time {seconds:g} s")
            try:
                rows.append(measure_loader(kind, data, cfg, device, w, seconds, dtype=dtype))
            except (DataError, UserError) as exc:
                rows.append({"pipeline": kind, "workers": w, "images_per_sec": None, "available": False,
                             "reason": str(exc)})
                log(f"[doctor] {kind}: cannot run here: {exc}")
                break
    return rows


def measure_decode_ceilings(data: str, split: str, limit: int = 300) -> dict[str, Any]:
    """One core's decode ceilings on the first `limit` stored JPEGs of a converted dataset: the
    entropy floor (libjpeg-turbo's Huffman decoding alone, what any decoder of these files must do)
    and a full libjpeg-turbo decode in C (pipelines.ffcv_cropdecode.time_decode_ceilings), images/s;
    or {"reason": why not} (not converted, or the compiled helper is not built)."""
    import numpy as np

    from pipelines.base import is_converted
    from pipelines.errors import DataError

    if not is_converted(data):
        return {"reason": "not a converted dataset (the ceilings read its stored JPEGs)"}
    try:
        from pipelines.ffcv_cropdecode import time_decode_ceilings
        from pipelines.stored import StoredJpegs

        stored = StoredJpegs(data, split)
        blobs = [np.frombuffer(stored.read(p), np.uint8) for p in range(min(limit, stored.count))]
        if not blobs:
            return {"reason": f"split '{split}' holds no images"}
        rates = time_decode_ceilings(blobs)
    except (DataError, ValueError, OSError) as exc:
        return {"reason": str(exc)}
    return {**rates, "images": len(blobs), "mean_kb": float(np.mean([b.size for b in blobs]) / 1000)}


# ---------------------------------------------------------------------------------------------- step

# Micro-batches (and updates) measure_step plus probe_batch run at the chosen batch, about.
_STEP_RUNS = 12


def _sync(device: Any) -> None:
    from supmae.train.metrics import synchronize

    synchronize(device)


def synthetic_batch(batch: int, img_size: int, num_classes: int, device: Any) -> tuple[Any, Any]:
    import torch

    imgs = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    return imgs, labels


def read_step_json(path: str, device: Any) -> dict[str, Any]:
    """The training step as `supmae bench step` measured it (its step.json, or the folder holding it): the
    trainer row's figures, so the doctor judges with the compiled step it would otherwise re-measure
    (uncompiled, or in a shorter window). It must come from the same kind of device."""
    if os.path.isdir(path):
        path = os.path.join(path, "step.json")
    try:
        with open(path) as fh:
            bench = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"--step-json {path}: cannot read it ({exc})") from None
    rows = {r.get("name"): r for r in bench.get("rows", []) if isinstance(r, dict)}
    row = rows.get("trainer")
    if not row or "images_per_sec" not in row:
        why = (row or {}).get("skipped") or "no trainer row"
        raise UserError(f"--step-json {path}: no measured trainer row ({why})")
    if str(bench.get("device", "")).split(":")[0] != device.type:
        raise UserError(f"--step-json {path} was measured on {bench.get('device')}; the doctor runs on {device.type}")
    return {"images_per_sec": row["images_per_sec"], "micro_seconds": row["ms_per_iter"] / 1e3,
            "update_seconds": 0.0, "accum": 1, "batch_size": bench["batch_size"],
            "warmup_seconds": row.get("first_iter_seconds"), "precision": row["precision"],
            "compiled": bool(row["compile"]), "compile_reason": "" if row["compile"] else "not compiled",
            "flops_per_image": bench["flops_per_image"], "peak_flops": bench["peak_tflops"] * 1e12,
            "peak_dtype": bench["peak_dtype"], "mfu": row["mfu"], "source": f"supmae bench step ({path})"}


def measure_step(cfg: Any, device: Any, num_classes: int, accum: int, seconds: float) -> tuple[dict[str, Any], Any]:
    """Images/s of the trainer's step at the recipe's per-device batch, on synthetic device tensors.

    One optimiser step is `accum` micro-batches and an update; the micro-batch and the update are
    timed apart (after untimed warm-up calls, which also compile), so the rate is
    accum x batch / (accum x t_micro + t_update) without running a whole accumulation cycle."""
    from supmae.train.steps import build_pretrain_step

    batch, size = cfg.data.batch_size, cfg.data.img_size
    step = build_pretrain_step(cfg, device, num_classes, accum=accum)
    imgs, labels = synthetic_batch(batch, size, num_classes, device)
    t0 = time.perf_counter()
    step.micro(imgs, labels)
    step.update()
    _sync(device)
    warmup = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        step.micro(imgs, labels)
        n += 1
    _sync(device)
    t_micro = (time.perf_counter() - t0) / n
    updates = []
    for _ in range(2):
        _sync(device)
        t0 = time.perf_counter()
        step.update()
        _sync(device)
        updates.append(time.perf_counter() - t0)
        step.micro(imgs, labels)
    step.update()
    t_update = min(updates)
    ips = accum * batch / (accum * t_micro + t_update)
    return {"images_per_sec": ips, "micro_seconds": t_micro, "update_seconds": t_update, "micro_batches": n,
            "accum": accum, "batch_size": batch, "warmup_seconds": warmup, "precision": step.precision,
            "compiled": bool(step.compiled), "compile_reason": step.compile_reason}, step


def cpu_step_batch(cfg: Any, device: Any, num_classes: int, budget: float) -> tuple[int, dict[str, Any]]:
    """The largest batch (the recipe's, halved until it fits) at which the step and the memory probe fit
    `budget` seconds on the CPU, from two micro-batches at batch 2 timed first; and what was timed."""
    import copy

    from supmae.train.steps import build_pretrain_step

    small = copy.deepcopy(cfg)
    small.data.batch_size = 2
    small.train.compile = "off"
    step = build_pretrain_step(small, device, num_classes)
    imgs, labels = synthetic_batch(2, cfg.data.img_size, num_classes, device)
    step.micro(imgs, labels)  # first call: allocations, lazy initialisation
    t0 = time.perf_counter()
    step.micro(imgs, labels)
    t_micro = time.perf_counter() - t0
    t0 = time.perf_counter()
    step.update()
    t_update = time.perf_counter() - t0
    del step
    gc.collect()
    per_image = t_micro / 2  # an overestimate at larger batches: per-call overheads are shared
    batch = cfg.data.batch_size
    while batch > 2 and _STEP_RUNS * (batch * per_image + t_update) > budget:
        batch //= 2
    return max(batch, 1), {"probe_seconds_per_image": per_image, "probe_update_seconds": t_update,
                           "budget_seconds": budget}


def flops_per_image(cfg: Any, num_classes: int) -> float:
    """The recipe's counted training FLOPs per image, on a model built without memory (meta device)."""
    import torch

    from supmae.models import create_model
    from supmae.models.flops import training_flops_per_image

    overrides = cfg.model.overrides()
    overrides.setdefault("img_size", cfg.data.img_size)
    overrides.setdefault("num_classes", num_classes)
    with torch.device("meta"):
        model = create_model(cfg.model.name, **overrides)
    return float(training_flops_per_image(model, mask_ratio=cfg.model.mask_ratio)["total"])


def datasheet_step(cfg: Any, gpu: str, mfu: float, num_classes: int) -> dict[str, Any]:
    """The step one `gpu` would run, from its data sheet: `mfu` x the dense bf16 peak / the counted FLOPs
    per image. For a machine without that GPU (a cluster's login node), where timing the recipe's step
    on the CPU would take many minutes and say nothing about the GPU."""
    flops = flops_per_image(cfg, num_classes)
    ips = gpu_images_per_sec(gpu, mfu, flops)
    return {"images_per_sec": ips, "micro_seconds": cfg.data.batch_size / ips, "update_seconds": 0.0, "accum": 1,
            "batch_size": cfg.data.batch_size, "warmup_seconds": None, "precision": "bf16", "compiled": False,
            "compile_reason": "not run", "flops_per_image": flops, "peak_flops": GPU_BF16_DENSE_TFLOPS[gpu] * 1e12,
            "peak_dtype": "bfloat16 (data sheet)", "mfu": mfu, "datasheet": True,
            "source": (f"not measured (this machine has no {gpu}): --mfu {mfu:g} x the {gpu} data sheet's dense "
                       f"bf16 peak {GPU_BF16_DENSE_TFLOPS[gpu]:g} TFLOP/s / {flops / 1e9:.2f} GFLOP per image "
                       "(counted)")}


def measure_loop_costs(step: Any, device: Any, batch: int, img_size: int, num_classes: int,
                       seconds: float) -> dict[str, Any]:
    """What the training loop spends on its own books, per event, on this device with `step`'s model and
    optimiser state: the stall of one checkpoint (the host snapshot the trainer takes before writing in the
    background: its second call, the first allocates the reused buffers) and the evaluation's rate
    (forward of the classification branch, every patch visible, no gradient)."""
    import torch

    from supmae.train.async_checkpoint import HostSnapshot

    if not step.optimizer.state:  # AdamW's moments exist after a first update
        imgs, labels = synthetic_batch(batch, img_size, num_classes, device)
        step.micro(imgs, labels)
        step.update()
    payload = {"model": step.core.state_dict(), "optimizer": step.optimizer.state_dict()}
    snap = HostSnapshot()
    times = []
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        snap.copy(payload)
        times.append(time.perf_counter() - t0)
    core = step.core
    was_training = core.training
    core.eval()
    imgs, _ = synthetic_batch(batch, img_size, num_classes, device)
    try:
        with torch.no_grad():
            core.classify(imgs)
            _sync(device)
            n, t0 = 0, time.perf_counter()
            while n < 2 or time.perf_counter() - t0 < min(seconds, 2.0):
                core.classify(imgs)
                n += 1
            _sync(device)
            eval_ips = n * batch / (time.perf_counter() - t0)
    finally:
        core.train(was_training)
    return {"snapshot_seconds": min(times[1:]), "first_snapshot_seconds": times[0], "snapshot_bytes": snap.bytes,
            "eval_images_per_sec": eval_ips, "eval_batch": batch, "device": str(device)}
