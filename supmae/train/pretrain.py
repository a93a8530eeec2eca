"""`supmae pretrain`: timed SupMAE / MAE pretraining, from one CPU to many GPUs through torchrun.

    supmae pretrain --recipe tiny_cpu --data.path DATA --output-dir runs/tiny [--train.epochs 5]
    torchrun --nproc_per_node 8 -m supmae.cli pretrain --recipe supmae_vit_b16_400ep ...

The step never waits for the device: the lr is set from a host-side schedule, the masking noise
comes from a device generator, losses and a finiteness flag accumulate in device tensors that
the host reads every `train.log_every` steps and at the end of each epoch. Data-wait time is the
host time blocked in the loader's `next()`.

Exact resume: a run restarts at the beginning of the epoch after its last checkpoint. The
pipeline's order within an epoch depends only on (seed, epoch) through `set_epoch`; the masking
noise comes from a generator reseeded from (seed, epoch, rank) at each epoch start; model,
optimiser, grad scaler and the global RNG states are restored from the checkpoint. In
deterministic CPU mode the final weights equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch

from supmae.config import apply_overrides, to_dict
from supmae.errors import UserError
from supmae.train import distributed as dist_utils
from supmae.train.checkpoint import LAST_NAME, atomic_save, find_resume_checkpoint, load_checkpoint
from supmae.train.engine import (
    capture_rng,
    configure_determinism,
    resolve_compile,
    resolve_precision,
    restore_rng,
)
from supmae.train.metrics import (
    DeviceMeter,
    TimedIterator,
    device_name,
    peak_memory_mb,
    reset_peak_memory,
    synchronize,
)
from supmae.train.pretrain_config import LossConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from supmae.train.run_dir import RunDir, tensorboard_available
from supmae.train.schedule import CosineSchedule, peak_lr, set_lr

__all__ = [
    "LossConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "PretrainConfig",
    "TrainConfig",
    "main",
    "run_pretrain",
]

METER_NAMES = ("loss", "rec_loss", "cls_loss")


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the run stops before writing any checkpoint after that step."""


# ---------------------------------------------------------------------------------------------- config


def validate(cfg: PretrainConfig) -> None:
    """Check values that no type annotation can; `UserError` naming the key."""
    t, o = cfg.train, cfg.optim
    checks = [
        (bool(cfg.output_dir), "no run directory given: set --output-dir DIR"),
        (t.epochs >= 1, f"--train.epochs must be >= 1, got {t.epochs}"),
        (t.log_every >= 1, f"--train.log_every must be >= 1, got {t.log_every}"),
        (t.save_every >= 1, f"--train.save_every must be >= 1, got {t.save_every}"),
        (t.epochs_per_run >= 0, f"--train.epochs_per_run must be >= 0, got {t.epochs_per_run}"),
        (t.max_steps_per_epoch >= 0, f"--train.max_steps_per_epoch must be >= 0, got {t.max_steps_per_epoch}"),
        (t.precision in ("auto", "fp32", "bf16", "fp16"),
         f"--train.precision must be auto, fp32, bf16 or fp16, got {t.precision!r}"),
        (t.compile in ("auto", "on", "off"), f"--train.compile must be auto, on or off, got {t.compile!r}"),
        (t.device in ("auto", "cpu", "cuda"), f"--train.device must be auto, cpu or cuda, got {t.device!r}"),
        (t.dist_timeout_s > 0, "--train.dist_timeout_s must be positive"),
        (t.cpu_threads >= 0, f"--train.cpu_threads must be >= 0, got {t.cpu_threads}"),
        (o.accum_iter >= 1, f"--optim.accum_iter must be >= 1, got {o.accum_iter}"),
        (o.effective_batch >= 0, f"--optim.effective_batch must be >= 0, got {o.effective_batch}"),
        (o.warmup_epochs >= 0, f"--optim.warmup_epochs must be >= 0, got {o.warmup_epochs}"),
        (o.blr > 0 or o.lr is not None, f"--optim.blr must be positive, got {o.blr}"),
        (o.impl in ("auto", "fused", "foreach", "for_loop"),
         f"--optim.impl must be auto, fused, foreach or for_loop, got {o.impl!r}"),
        (cfg.data.batch_size >= 1, f"--data.batch_size must be >= 1, got {cfg.data.batch_size}"),
        (0.0 <= cfg.model.mask_ratio < 1.0, f"--model.mask_ratio must be in [0, 1), got {cfg.model.mask_ratio}"),
        (cfg.loss.temperature > 0, f"--loss.temperature must be positive, got {cfg.loss.temperature}"),
        (cfg.model.attn_impl in ("sdpa", "eager"),
         f"--model.attn_impl must be sdpa or eager, got {cfg.model.attn_impl!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if not cfg.data.path:
        raise UserError("no dataset given: set --data.path DIR (a directory written by 'supmae convert')")
    if not os.path.isdir(cfg.data.path):
        raise UserError(f"dataset not found: --data.path {cfg.data.path} is not a directory")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ("resume",)) -> list[str]:
    """`key: old -> new` for every leaf that differs between two `to_dict` configs."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def has_split(path: str, split: str) -> bool:
    """Whether dataset `path` (a converted dir, or an ImageFolder root) has the split `split`."""
    from pipelines.constants import MANIFEST_FILE

    manifest = os.path.join(path, MANIFEST_FILE)
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as fh:
            return split in (json.load(fh).get("splits") or {})
    return os.path.isdir(os.path.join(path, split))


def resolve_accumulation(optim: OptimConfig, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimiser step: `optim.accum_iter`, or derived from `optim.effective_batch`."""
    if optim.effective_batch <= 0:
        return optim.accum_iter
    per_step = batch_size * world_size
    if optim.effective_batch % per_step:
        raise UserError(
            f"--optim.effective_batch {optim.effective_batch} is not a multiple of batch_size x world_size = "
            f"{batch_size} x {world_size} = {per_step}; change --data.batch_size, or set --optim.effective_batch 0 "
            f"and choose --optim.accum_iter"
        )
    derived = optim.effective_batch // per_step
    if optim.accum_iter not in (1, derived):
        raise UserError(
            f"--optim.accum_iter {optim.accum_iter} contradicts --optim.effective_batch {optim.effective_batch} "
            f"(which needs {derived} at batch_size {batch_size} x world_size {world_size}); set only one of them"
        )
    return derived


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A well-mixed 63-bit seed for the masking-noise generator of (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------- run


class _Log:
    """Messages of rank 0 on stdout (tqdm-aware, so a progress bar is not torn)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        try:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
        except ImportError:
            print(message, flush=True)
        sys.stdout.flush()


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) the pretraining described by `cfg`; every rank of a torchrun job calls this.

    Returns a summary: `run_dir`, `final_log` (the last log.jsonl line), `start_epoch`, `epochs_run`,
    `checkpoint` (the last checkpoint written, or None), `world_size`, `rank`, `ranks_in_sync`.
    """
    validate(cfg)
    if cfg.train.deterministic:
        # cuBLAS needs this before its first handle is created to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Process-wide torch settings this run changes, put back afterwards for callers of the Python API.
    saved = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    try:
        with dist_utils.distributed(cfg.train.device, cfg.train.dist_timeout_s) as info:
            return _run(cfg, info)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.set_num_threads(saved[1])


def _run(cfg: PretrainConfig, info: dist_utils.DistInfo) -> dict[str, Any]:
    from pipelines.errors import DataError

    t_start = time.perf_counter()
    device = info.device
    log = _Log(info.is_main)
    run_dir = RunDir(cfg.output_dir, writer=info.is_main)

    # ---- set-up. A user error on one rank is shared with all, so every rank stops with a message
    # instead of the others waiting in the first collective.
    error: Exception | None = None
    try:
        state = _setup(cfg, info, run_dir, log)
    except (UserError, DataError) as exc:
        error = exc
    if info.distributed and not dist_utils.agree(error is None, device):
        raise error if error is not None else UserError("another rank failed during set-up (see its message)")
    if error is not None:
        raise error
    if state["done"]:
        log(f"nothing to do: {run_dir.path} already completed {state['start_epoch']} of {cfg.train.epochs} epochs")
        return {"run_dir": run_dir.path, "final_log": None, "start_epoch": state["start_epoch"], "epochs_run": 0,
                "checkpoint": state["ckpt_path"], "world_size": info.world_size, "rank": info.rank,
                "ranks_in_sync": None}
    return _train(cfg, info, run_dir, log, state, t_start)


def _setup(cfg: PretrainConfig, info: dist_utils.DistInfo, run_dir: RunDir, log: _Log) -> dict[str, Any]:
    from supmae.models import create_model
    from supmae.train.optim import freeze_fixed_pos_embed

    device = info.device
    tc = cfg.train

    # ---- where we start from (decided before anything is written).
    ckpt: dict[str, Any] | None = None
    ckpt_path = ""
    if cfg.resume == "":
        if run_dir.holds_a_run():
            raise UserError(f"run directory {run_dir.path} already holds a run (log or checkpoints); continue it "
                            f"with --resume auto, or choose another --output-dir")
    elif cfg.resume == "auto":
        # Rank 0 decides and tells the others (an error included, so that no rank is left waiting).
        found, refusal = None, ""
        if info.is_main:
            found = find_resume_checkpoint(run_dir.path, log=log)
            if found is None and run_dir.holds_a_run():
                refusal = (f"--resume auto: no usable checkpoint in {run_dir.path}, but it holds a run; "
                           f"refusing to start over and overwrite it (choose another --output-dir)")
        chosen, refusal = dist_utils.broadcast_object((found[0] if found else "", refusal))
        if refusal:
            raise UserError(refusal)
        if chosen:
            ckpt_path = chosen
            ckpt = found[1] if info.is_main and found else load_checkpoint(chosen)
    else:
        ckpt_path = cfg.resume
        ckpt = load_checkpoint(cfg.resume)
    if ckpt is not None:
        missing = [k for k in ("model", "optimizer", "epoch", "step") if k not in ckpt]
        if missing:
            raise UserError(f"{ckpt_path} is not a pretraining checkpoint of this trainer (no {', '.join(missing)})")
        if int(ckpt["epoch"]) + 1 >= tc.epochs:  # a finished run: build nothing, write nothing
            return {"done": True, "start_epoch": int(ckpt["epoch"]) + 1, "ckpt_path": ckpt_path}

    # ---- precision, compile, determinism, threads.
    if tc.cpu_threads:
        torch.set_num_threads(tc.cpu_threads)
    precision = resolve_precision(tc.precision, device)
    use_compile, _ = resolve_compile(tc.compile, device)
    configure_determinism(device, tc.deterministic)
    if tc.tensorboard and not tensorboard_available():
        raise UserError("--train.tensorboard on needs torch.utils.tensorboard, which needs the 'tensorboard' "
                        "package (not installed)")

    # ---- data. The same seed on every rank: the pipeline shards one permutation by rank.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed + info.rank)
    random.seed(cfg.seed + info.rank)
    train_loader = cfg.data.build(cfg.data.train_split, train=True, device=device, rank=info.rank,
                                  world_size=info.world_size, seed=cfg.seed)
    accum = resolve_accumulation(cfg.optim, cfg.data.batch_size, info.world_size)
    micro_steps = len(train_loader)
    if tc.max_steps_per_epoch:
        micro_steps = min(micro_steps, tc.max_steps_per_epoch)
    micro_steps -= micro_steps % accum  # whole optimiser steps only: no gradient leaks into the next epoch
    if micro_steps < 1:
        raise UserError(f"an epoch of {len(train_loader)} batches of {cfg.data.batch_size} on this rank has no "
                        f"complete optimiser step of {accum} micro-batches; lower --data.batch_size or "
                        f"--optim.accum_iter")

    # ---- model (same init on every rank: seeded identically; DDP also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    overrides = cfg.model.overrides()
    overrides.setdefault("img_size", cfg.data.img_size)
    overrides.setdefault("num_classes", train_loader.num_classes)
    model = create_model(cfg.model.name, **overrides)
    freeze_fixed_pos_embed(model)
    if cfg.loss.cls_weight > 0 and model.cls_head is None:
        raise UserError("--loss.cls_weight > 0 but the model has no classification head (model.cls_head_layers 0); "
                        "set --loss.cls_weight 0 or give the model a head")
    if cfg.loss.rec_weight > 0 and not model.use_decoder:
        raise UserError("--loss.rec_weight > 0 but the model has no decoder (model.use_decoder false); "
                        "set --loss.rec_weight 0")
    if ckpt is not None:
        saved_args = ckpt.get("model_args")
        if saved_args is not None and saved_args != model.model_args:
            diffs = [f"{k}: {saved_args.get(k)!r} -> {model.model_args.get(k)!r}"
                     for k in sorted(set(saved_args) | set(model.model_args))
                     if saved_args.get(k) != model.model_args.get(k)]
            raise UserError(f"{ckpt_path} was trained with a different model ({'; '.join(diffs)})")
        model.load_state_dict(ckpt["model"])
    model.to(device)

    val_loader = None
    if tc.val and model.cls_head is not None and has_split(cfg.data.path, cfg.data.val_split):
        val_loader = cfg.data.build(cfg.data.val_split, train=False, device=device, rank=info.rank,
                                    world_size=info.world_size, seed=cfg.seed)

    # ---- optimiser.
    eff_batch = cfg.data.batch_size * accum * info.world_size
    peak = peak_lr(cfg.optim.blr, eff_batch, cfg.optim.lr)
    start_epoch, step, prev_elapsed = 0, 0, 0.0
    if ckpt is not None:
        start_epoch = int(ckpt["epoch"]) + 1
        step = int(ckpt["step"])
        prev_elapsed = float(ckpt.get("elapsed_seconds", 0.0))
        if "config" in ckpt:
            diffs = config_differences(ckpt["config"], to_dict(cfg))
            if diffs:
                log("warning: resuming with a config that differs from the checkpoint's: " + "; ".join(diffs))

    schedule = CosineSchedule(peak, cfg.optim.warmup_epochs, tc.epochs, micro_steps, cfg.optim.min_lr)

    # ---- messages.
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    log(f"supmae pretrain: recipe {cfg.recipe or '(none)'}, model {cfg.model.name} "
        f"({n_params / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trained), device {device_name(device)} x "
        f"{info.world_size}, precision {precision}, compile {'on' if use_compile else 'off'}")
    lr_rule = "--optim.lr" if cfg.optim.lr is not None else f"blr {cfg.optim.blr:.3g} x {eff_batch} / 256"
    log(f"effective batch {eff_batch} = {cfg.data.batch_size} per device x {accum} accumulation x "
        f"{info.world_size} devices; peak lr {peak:.4g} ({lr_rule}); {micro_steps // accum} steps per epoch; "
        f"pipeline {train_loader.kind}")
    if accum > 1 and has_bn:
        log(f"warning: gradient accumulation ({accum}) with the BatchNorm classification head: BN statistics are "
            f"computed per micro-batch of {cfg.data.batch_size}, so this is not the same as one batch of {eff_batch}")
    if cfg.optim.warmup_epochs >= tc.epochs:
        log(f"note: warmup ({cfg.optim.warmup_epochs:g} epochs) covers the whole run of {tc.epochs}: the lr only rises")
    if ckpt is not None:
        log(f"resuming from {ckpt_path} (epoch {start_epoch - 1} complete, step {step})")

    return {
        "done": False, "model": model, "schedule": schedule, "precision": precision,
        "use_compile": use_compile, "train_loader": train_loader, "val_loader": val_loader, "accum": accum,
        "micro_steps": micro_steps, "eff_batch": eff_batch, "start_epoch": start_epoch, "step": step,
        "prev_elapsed": prev_elapsed, "ckpt": ckpt, "ckpt_path": ckpt_path,
    }


def _train(cfg: PretrainConfig, info: dist_utils.DistInfo, run_dir: RunDir, log: _Log, st: dict[str, Any],
           t_start: float) -> dict[str, Any]:
    device = info.device
    tc = cfg.train
    from supmae.train.steps import build_pretrain_step

    core: torch.nn.Module = st["model"]
    schedule: CosineSchedule = st["schedule"]
    train_loader, val_loader = st["train_loader"], st["val_loader"]
    accum, micro_steps = st["accum"], st["micro_steps"]
    start_epoch, step = st["start_epoch"], st["step"]
    ckpt = st["ckpt"]
    updates_per_epoch = micro_steps // accum
    num_patches = core.num_patches
    planned = tc.planned_epochs or tc.epochs
    dev_name = device_name(device)

    # ---- the step (optimiser, DDP, compile), built after every rank agreed that set-up succeeded:
    # DDP's constructor is a collective.
    step_fn = build_pretrain_step(cfg, device, train_loader.num_classes, world_size=info.world_size, accum=accum,
                                  model=core, ddp=info.distributed)
    optimizer, scaler, amp_dtype = step_fn.optimizer, step_fn.scaler, step_fn.amp_dtype
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])

    # ---- the run directory: written from here on (rank 0 only).
    run_dir.create()
    last_done = start_epoch - 1
    if ckpt is not None:
        run_dir.truncate_after(last_done)
    run_dir.write_config(to_dict(cfg))
    if tc.tensorboard:
        run_dir.open_tensorboard()

    # Restore the global RNG last, right before the first epoch, so that everything between here and
    # the epoch loop consumes it exactly as in an uninterrupted run.
    if ckpt is not None and "rng" in ckpt:
        rng = ckpt["rng"]
        per_rank = rng.get("by_rank")
        restore_rng(per_rank[info.rank] if per_rank and len(per_rank) == info.world_size else rng, device)

    gen = torch.Generator(device=device)
    meter = DeviceMeter(METER_NAMES, device)
    show_bar = tc.progress and info.is_main and sys.stderr.isatty()
    last_ckpt: str | None = st["ckpt_path"] or None
    final_row: dict[str, Any] | None = None
    epochs_run = 0

    def save_checkpoint(epoch: int) -> str:
        rng = dist_utils.all_gather_object(capture_rng(device))
        if not info.is_main:
            return os.path.join(run_dir.path, LAST_NAME)
        payload = {
            "model": core.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": epoch,
            "step": step,
            "config": to_dict(cfg),
            "model_args": dict(core.model_args),
            "rng": {**rng[0], "by_rank": rng if info.distributed else None},
            "elapsed_seconds": elapsed(),
        }
        last = os.path.join(run_dir.path, LAST_NAME)
        atomic_save(payload, last)
        if (epoch + 1) % tc.save_every == 0 or epoch + 1 == tc.epochs:
            numbered = os.path.join(run_dir.path, f"checkpoint-{epoch:04d}.pth")
            atomic_save(payload, numbered)
            return numbered
        return last

    def elapsed() -> float:
        return st["prev_elapsed"] + time.perf_counter() - t_start

    end_epoch = tc.epochs if not tc.epochs_per_run else min(tc.epochs, start_epoch + tc.epochs_per_run)
    try:
        for epoch in range(start_epoch, end_epoch):
            train_loader.set_epoch(epoch)
            gen.manual_seed(_epoch_seed(cfg.seed, epoch, info.rank))
            core.train()
            meter.reset()
            reset_peak_memory(device)
            lr_sum = 0.0
            window = {"t": time.perf_counter(), "wait": 0.0, "sums": [0.0] * len(METER_NAMES), "count": 0,
                      "micro": 0}
            bar = None
            if show_bar:
                from tqdm import tqdm

                bar = tqdm(total=updates_per_epoch, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step",
                           dynamic_ncols=True, leave=False)
            synchronize(device)
            t_epoch = time.perf_counter()
            batches = TimedIterator(train_loader)
            try:
                for i in range(micro_steps):
                    if i % accum == 0:
                        lr = schedule(epoch, i)
                        set_lr(optimizer, lr)
                        lr_sum += lr
                        meter.set_step(step + 1)
                    try:
                        imgs, labels = next(batches)
                    except StopIteration:
                        raise RuntimeError(f"the {train_loader.kind} pipeline ended after {i} batches, but its "
                                           f"len() promised {len(train_loader)}") from None
                    noise = torch.rand(imgs.shape[0], num_patches, generator=gen, device=device)  # [N, L]
                    boundary = (i + 1) % accum == 0
                    meter.add(*step_fn.micro(imgs, labels, noise=noise, sync=boundary))
                    if not boundary:
                        continue
                    step_fn.update()
                    step += 1
                    if bar is not None:
                        bar.update(1)
                    if step % tc.log_every == 0:
                        _log_window(cfg, info, run_dir, meter, batches, window, epoch, step, lr, elapsed, bar,
                                    i + 1, last_ckpt)
            finally:
                batches.close()
                if bar is not None:
                    bar.close()

            # ---- end of epoch: one sync, then the books.
            synchronize(device)
            epoch_seconds = time.perf_counter() - t_epoch
            sums, count, first_bad = meter.read_sums()
            _check_finite(first_bad, epoch, last_ckpt)
            wait = torch.tensor([batches.wait_seconds], dtype=torch.float64, device=device)
            dist_utils.all_reduce_sum(wait)
            mem = torch.tensor([peak_memory_mb(device)], dtype=torch.float64, device=device)
            dist_utils.all_reduce_max(mem)
            images = micro_steps * cfg.data.batch_size * info.world_size
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_lr": lr_sum / updates_per_epoch,
                **{name: sums[k] / max(count, 1) for k, name in enumerate(METER_NAMES)},
            }
            # Every rank evaluates, and rank 0 saves, the same model: rank 0's BN running statistics.
            dist_utils.broadcast_buffers(core)
            if val_loader is not None:
                row["val_cls_acc1"] = evaluate_cls(core, val_loader, device, amp_dtype)
            total_elapsed = elapsed()
            row.update({
                "epoch_seconds": epoch_seconds,
                "images_per_sec": images / epoch_seconds,
                "step_time_ms": 1000.0 * epoch_seconds / updates_per_epoch,
                "data_wait_frac": float(wait.item()) / info.world_size / epoch_seconds,
                "peak_mem_mb": float(mem.item()),
                "device_hours": total_elapsed * info.world_size / 3600.0,
                "elapsed_seconds": total_elapsed,
                "world_size": info.world_size,
                "device": dev_name,
                "steps": updates_per_epoch,
                "images": images,
                "total_epochs": planned,
            })
            run_dir.log_epoch(row)
            final_row = row
            acc = f", val_cls_acc1 {row['val_cls_acc1']:.2f}" if "val_cls_acc1" in row else ""
            log(f"epoch {epoch}: loss {row['loss']:.4f} (rec {row['rec_loss']:.4f}, cls {row['cls_loss']:.4f}){acc}, "
                f"lr {row['train_lr']:.3g}, {row['images_per_sec']:.1f} img/s, data wait "
                f"{100 * row['data_wait_frac']:.1f}%, {epoch_seconds:.1f} s")
            last_ckpt = save_checkpoint(epoch)
            epochs_run += 1
    finally:
        run_dir.close()

    in_sync = None
    if info.distributed:
        in_sync = dist_utils.check_in_sync(core, device)
        if not in_sync:
            raise RuntimeError("the ranks ended with different weights (DDP went out of sync)")
        log(f"weights identical on all {info.world_size} ranks")
    return {
        "run_dir": run_dir.path,
        "final_log": final_row,
        "start_epoch": start_epoch,
        "epochs_run": epochs_run,
        "checkpoint": last_ckpt,
        "world_size": info.world_size,
        "rank": info.rank,
        "ranks_in_sync": in_sync,
    }


def _check_finite(first_bad: int | None, epoch: int, last_ckpt: str | None) -> None:
    if first_bad is None:
        return
    kept = f"the last good checkpoint ({last_ckpt}) is intact" if last_ckpt else "no checkpoint was written"
    raise NonFiniteLossError(f"non-finite loss at step {first_bad} (epoch {epoch}); stopping without saving: {kept}. "
                             f"Lower the lr (--optim.blr / --optim.lr) or use --train.precision fp32")


def _log_window(cfg: PretrainConfig, info: dist_utils.DistInfo, run_dir: RunDir, meter: DeviceMeter,
                batches: TimedIterator, window: dict[str, Any], epoch: int, step: int, lr: float, elapsed: Any,
                bar: Any, micro_done: int, last_ckpt: str | None) -> None:
    """A log point: read the device sums (the only sync inside an epoch), check them, write steps.jsonl."""
    sums, count, first_bad = meter.read_sums()
    _check_finite(first_bad, epoch, last_ckpt)
    now = time.perf_counter()
    dt = max(now - window["t"], 1e-9)
    n = count - window["count"]
    loss = (sums[0] - window["sums"][0]) / max(n, 1)
    images = (micro_done - window["micro"]) * cfg.data.batch_size * info.world_size
    row = {
        "step": step,
        "epoch": epoch,
        "lr": lr,
        "loss": loss,
        "images_per_sec": images / dt,
        "data_wait_frac": (batches.wait_seconds - window["wait"]) / dt,
        "elapsed_seconds": elapsed(),
    }
    run_dir.log_step(row)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    window.update(t=now, wait=batches.wait_seconds, sums=sums, count=count, micro=micro_done)


def real_samples(loader: Any) -> int:
    """How many of this rank's validation samples are not repeats.

    Without drop_last every rank reads ceil(N / S) samples; to even the ranks out the backends repeat
    a few (fewer than S in all) at the *end* of some ranks' unshuffled order. Which ranks depends on
    how each backend splits the N samples: torchvision's DistributedSampler deals them out in turn
    (rank r gets r, r + S, ...), FFCV's order (pipelines.base.rank_order) cuts the padded list into
    contiguous pieces, DALI's reader cuts the unpadded list into contiguous shards. Counting only
    these samples, the ranks together count each validation sample exactly once.
    """
    n, s, r, per = loader.num_total, loader.world_size, loader.rank, loader.num_samples
    if s == 1:
        return per
    if loader.kind == "torchvision":
        real = len(range(r, n, s))
    elif loader.kind == "dali":
        real = (r + 1) * n // s - r * n // s
    else:
        real = n - r * per
    return max(0, min(per, real))


@torch.no_grad()
def evaluate_cls(core: torch.nn.Module, loader: Any, device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """Top-1 (percent) of the classification branch on `loader`, every patch visible; summed over ranks."""
    was_training = core.training
    core.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    real = real_samples(loader)
    done = 0
    try:
        for imgs, labels in loader:
            keep = max(0, min(labels.shape[0], real - done))
            done += labels.shape[0]
            if keep == 0:
                continue
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = core.classify(imgs[:keep])
            correct += (logits.argmax(dim=1) == labels[:keep]).sum()
            seen += keep
    finally:
        core.train(was_training)
    packed = torch.stack([correct, seen])
    dist_utils.all_reduce_sum(packed)
    c, n = packed.tolist()
    return 100.0 * c / max(n, 1)


# ---------------------------------------------------------------------------------------------- CLI


def build_config(recipe: str, overrides: list[str]) -> PretrainConfig:
    """Recipe `recipe` with dotted command-line overrides applied (strict: unknown keys are errors)."""
    from supmae.recipes import get_recipe

    cfg = get_recipe(recipe, "pretrain")
    apply_overrides(cfg, overrides)
    return cfg


_EPILOG = """\
common overrides (any config key works as --section.key VALUE or --section.key=VALUE):
  --data.path DIR            dataset written by 'supmae convert' (or an ImageFolder root for torchvision)
  --output-dir DIR           run directory: config.json, log.jsonl, steps.jsonl, checkpoints
  --resume auto|PATH         continue from the newest valid checkpoint of --output-dir, or from PATH
  --seed S                   seed of initialisation, data order and masking
  --train.epochs N           epochs to train (also the length of the lr schedule)
  --data.pipeline NAME       ffcv | dali | torchvision
  --optim.blr / --optim.lr   base lr (scaled by effective batch / 256) / absolute peak lr
  --model.decoder_depth N, --loss.cls_weight W, --train.precision bf16, --train.compile off, ...

'supmae pretrain --recipe NAME --print-config' shows every key with its value.
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="supmae pretrain",
        description="Timed SupMAE / MAE pretraining (one CPU to many GPUs; launch multi-GPU runs with torchrun).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--recipe", help="named configuration to start from (see --list-recipes)")
    parser.add_argument("--list-recipes", action="store_true", help="list the pretraining recipes and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    args, rest = parser.parse_known_args(argv)

    if args.list_recipes:
        from supmae.recipes import list_recipes

        recipes = list_recipes("pretrain")
        width = max(len(n) for n in recipes)
        for name, doc in recipes.items():
            print(f"{name:<{width}}  {doc}")
        return 0
    if not args.recipe:
        raise UserError("--recipe NAME is required (see 'supmae pretrain --list-recipes')")
    cfg = build_config(args.recipe, rest)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    summary = run_pretrain(cfg)
    if summary["rank"] == 0 and summary["final_log"] is not None:
        row = summary["final_log"]
        print(f"done: {summary['epochs_run']} epochs in {summary['run_dir']}; final loss {row['loss']:.4f}; "
              f"{row['images_per_sec']:.1f} img/s; last checkpoint {summary['checkpoint']}")
    return 0
