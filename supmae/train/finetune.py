"""Fine-tuning (Table 4), linear probing (Table 5) and evaluation of a pretrained encoder.

Where each part of the recipes runs:

- In the data pipeline (`DataConfig.build` -> `pipelines.build_pipeline`; FFCV, DALI or
  torchvision): decoding, RandomResizedCrop (scale 0.08-1), horizontal flip, normalisation, and
  RandAugment, which only the torchvision pipeline has (the others refuse it). Validation:
  shorter side to img_size / 0.875, centre crop.
- On the device, in this loop, so with every pipeline: random erasing (timm `RandomErasing`,
  per sample, pixel mode), then mixup / cutmix (timm `Mixup`, one lambda per batch, label
  smoothing folded into the soft targets) and the matching loss (`SoftTargetCrossEntropy`).
- In the model and optimiser: drop path (timm ViT), layer-wise lr decay (timm
  `param_groups_layer_decay`), AdamW, or timm's `Lars` for the probe; the per-iteration cosine
  schedule, distributed set-up, run-directory files and checkpoints are the pretraining loop's.

A run directory holds `config.json`, `log.jsonl` (one line per epoch with the reference's keys
`epoch, train_lr, train_loss, test_loss, test_acc1, test_acc5` plus timing), `steps.jsonl`,
`checkpoint-last.pth` (every epoch, atomic; `--resume auto` continues from it) and
`checkpoint-best.pth` (weights of the best top-1 so far).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars, param_groups_layer_decay
from timm.utils import accuracy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from supmae.config import apply_overrides, from_dict, to_dict
from supmae.errors import UserError
from supmae.models.vit import (
    build_vit,
    downstream_args_from_state,
    encoder_args_from_checkpoint,
    load_pretrained,
    registry_encoder_args,
)
from supmae.recipes import get_recipe, list_recipes
from supmae.train.checkpoint import LAST_NAME, atomic_save, find_resume_checkpoint, load_checkpoint, model_state
from supmae.train.data import DataConfig
from supmae.train.distributed import all_reduce_sum, check_in_sync, distributed
from supmae.train.finetune_config import TASKS, DownstreamConfig
from supmae.train.metrics import DeviceMeter, TimedIterator, device_name, peak_memory_mb, reset_peak_memory, synchronize
from supmae.train.optim import build_adamw
from supmae.train.pretrain import (
    NonFiniteLossError,
    capture_rng,
    config_differences,
    has_split,
    resolve_accumulation,
    resolve_precision,
    restore_rng,
)
from supmae.train.run_dir import RunDir
from supmae.train.schedule import CosineSchedule, peak_lr, set_lr

BEST_NAME = "checkpoint-best.pth"


def _print(*args: Any) -> None:
    print(*args, flush=True)


# --------------------------------------------------------------------------- optimiser


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise lr decay (timm's `param_groups_layer_decay`).

    Layer ids: 0 for the embeddings (`patch_embed`, `cls_token`, `pos_embed`), i + 1 for block i,
    depth + 1 for `fc_norm` / `head`; each group's `lr_scale` is layer_decay^(depth + 1 - id). No
    weight decay on 1-D parameters (biases, norms) nor on the model's `no_weight_decay()` names
    (`pos_embed`, `cls_token`).
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                    layer_decay=layer_decay)


def probe_param_groups(model: nn.Module, weight_decay: float, adapt_1d: bool = False) -> list[dict[str, Any]]:
    """LARS groups of the trainable (head) parameters, weight decay on all of them. The trust ratio
    adapts matrices always and 1-D parameters (biases) only with `adapt_1d`; the reference's LARS
    leaves them out (plain SGD steps at the full lr)."""
    adapt, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (adapt if p.ndim > 1 or adapt_1d else plain).append(p)
    groups = [{"params": adapt, "weight_decay": weight_decay, "always_adapt": True}]
    if plain:
        groups.append({"params": plain, "weight_decay": weight_decay, "always_adapt": False})
    return groups


def build_optimizer(cfg: DownstreamConfig, model: nn.Module, lr: float, device: torch.device
                    ) -> torch.optim.Optimizer:
    """AdamW with layer-wise decay (fine-tuning) or timm's LARS (probing), per `cfg.optim.name`."""
    o = cfg.optim
    if o.name == "adamw":
        groups = finetune_param_groups(model, o.weight_decay, o.layer_decay)
        return build_adamw(groups, lr=lr, betas=tuple(o.betas), device=device, impl=o.impl)
    if o.name == "lars":
        return Lars(probe_param_groups(model, o.weight_decay, o.lars_adapt_1d), lr=lr, momentum=o.momentum)
    raise UserError(f"unknown optimiser --optim.name {o.name!r} (expected adamw or lars)")


# --------------------------------------------------------------------------- model


def build_downstream_model(cfg: DownstreamConfig, num_classes: int, log: Callable[[str], None] = _print
                           ) -> tuple[nn.Module, dict[str, Any]]:
    """The downstream ViT of `cfg` with the pretrained encoder loaded (if any), and its `vit_args`."""
    ckpt = None
    if cfg.pretrained:
        ckpt = load_checkpoint(cfg.pretrained)
        if "vit_args" in ckpt and ckpt.get("task") == "linprobe":
            raise UserError(f"{cfg.pretrained} is a linear-probe checkpoint; pass the pretraining checkpoint")
        enc = encoder_args_from_checkpoint(ckpt, cfg.model.name, log=log)
    elif cfg.model.name:
        enc = registry_encoder_args(cfg.model.name)
        log(f"no --pretrained: training {cfg.model.name}'s encoder from random weights")
    else:
        raise UserError("no pretrained weights: pass --pretrained CKPT (or --model NAME to start from random weights)")
    probe = cfg.task == "linprobe"
    vit_args = {
        "img_size": cfg.data.img_size,
        "patch_size": int(enc["patch_size"]),
        "embed_dim": int(enc["embed_dim"]),
        "depth": int(enc["depth"]),
        "num_heads": int(enc["num_heads"]),
        "mlp_ratio": float(enc.get("mlp_ratio", 4.0)),
        "qkv_bias": bool(enc.get("qkv_bias", True)),
        "num_classes": num_classes,
        "drop_path_rate": 0.0 if probe else cfg.model.drop_path,
        "probe": probe,
        "feature": cfg.model.feature,
    }
    model = build_vit(**vit_args)
    if ckpt is not None:
        missing = load_pretrained(model, model_state(ckpt), log=log)
        log(f"loaded {cfg.pretrained} (encoder from {enc['source']}); newly initialised: {', '.join(missing)}")
    return model, vit_args


# --------------------------------------------------------------------------- evaluation


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def amp_settings(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed) for `train.precision`, resolved
    the way pretraining resolves it (auto: bf16 on CUDA where supported, else fp16; fp32 on the CPU)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"unknown precision {precision!r} (expected auto, fp32, bf16 or fp16)")
    resolved = resolve_precision(precision, device)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolved], resolved == "fp16"


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
             max_steps: int = 0) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of `model` over `loader`, summed over every
    rank. Returns {"acc1", "acc5", "loss", "samples"}."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, correct@1, correct@5, samples
    try:
        for i, (images, labels) in enumerate(loader):
            if max_steps and i >= max_steps:
                break
            with _autocast(device, amp_dtype):
                logits = model(images)
            logits = logits.float()
            n = labels.shape[0]
            k = min(5, logits.shape[1])
            top1, topk = accuracy(logits, labels, topk=(1, k))
            loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
            sums += torch.stack([loss.double(), top1.double() * n / 100, topk.double() * n / 100,
                                 torch.tensor(float(n), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    all_reduce_sum(sums)
    loss_sum, c1, c5, count = sums.tolist()
    if count == 0:
        raise UserError("the evaluation split yielded no batches (is it smaller than one batch per rank?)")
    return {"acc1": 100.0 * c1 / count, "acc5": 100.0 * c5 / count, "loss": loss_sum / count, "samples": count}


# --------------------------------------------------------------------------- checkpoints


# --------------------------------------------------------------------------- the run


def _check_config(cfg: DownstreamConfig) -> None:
    if cfg.task not in TASKS:
        raise UserError(f"unknown task {cfg.task!r} (expected {' or '.join(TASKS)})")
    if not cfg.output_dir:
        raise UserError("no run directory: set --output-dir DIR")
    if not (cfg.pretrained or cfg.model.name or cfg.resume):
        raise UserError("no pretrained weights: pass --pretrained CKPT (or --model NAME to start from random weights)")
    if cfg.data.randaugment and cfg.data.pipeline != "torchvision":
        raise UserError(
            f"RandAugment ({cfg.data.randaugment}) runs only in the torchvision pipeline: use --data.pipeline "
            f"torchvision, or turn it off with --data.randaugment '' to read with {cfg.data.pipeline}"
        )
    if cfg.model.feature not in ("avg", "token"):
        raise UserError(f"--model.feature must be avg or token, got {cfg.model.feature!r}")
    if cfg.task == "linprobe" and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0 or cfg.aug.reprob > 0):
        raise UserError("linear probing uses no mixup / cutmix / random erasing: set --aug.mixup 0 --aug.cutmix 0 "
                        "--aug.reprob 0")
    if cfg.train.epochs <= 0:
        raise UserError("--train.epochs must be positive")
    if cfg.optim.accum_iter < 1:
        raise UserError("--optim.accum_iter must be at least 1")
    if cfg.aug.remode not in ("pixel", "rand", "const"):
        raise UserError(f"--aug.remode must be pixel, rand or const, got {cfg.aug.remode!r}")


def mixup_and_loss(cfg: DownstreamConfig, num_classes: int, device: torch.device) -> tuple[Any, Any, nn.Module]:
    """(random eraser or None, mixup or None, criterion): the on-device batch augmentation and its loss."""
    a = cfg.aug
    eraser = None
    if a.reprob > 0:
        eraser = RandomErasing(probability=a.reprob, mode=a.remode, max_count=a.recount, num_splits=0,
                               device=str(device))
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        if cfg.data.batch_size % 2:
            raise UserError(f"mixup / cutmix pair each batch with its mirror: --data.batch_size must be even, "
                            f"got {cfg.data.batch_size}")
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.switch_prob,
                      mode=a.mixup_mode, label_smoothing=a.smoothing, num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif a.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=a.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    return eraser, mixup, criterion


def _check_finite(first_bad: int | None, epoch: int) -> None:
    if first_bad is not None:
        raise NonFiniteLossError(f"the training loss became non-finite at step {first_bad} (epoch {epoch}); "
                                 f"{LAST_NAME} holds the last good state (lower the lr, or try fp32)")


def run_downstream(cfg: DownstreamConfig) -> dict[str, Any]:
    """Fine-tune or linearly probe (per `cfg.task`); returns the final / best top-1 and where the run is."""
    _check_config(cfg)
    with distributed(cfg.train.device, cfg.train.dist_timeout_s) as info:
        return _run(cfg, info)


def run_finetune(cfg: DownstreamConfig) -> dict[str, Any]:
    """Fine-tune a pretrained encoder (Table 4 by default). See `run_downstream`."""
    if cfg.task != "finetune":
        raise UserError(f"run_finetune got a {cfg.task} config")
    return run_downstream(cfg)


def run_linprobe(cfg: DownstreamConfig) -> dict[str, Any]:
    """Linearly probe a frozen pretrained encoder (Table 5 by default). See `run_downstream`."""
    if cfg.task != "linprobe":
        raise UserError(f"run_linprobe got a {cfg.task} config")
    return run_downstream(cfg)


def _run(cfg: DownstreamConfig, info: Any) -> dict[str, Any]:
    device = info.device
    log: Callable[[str], None] = _print if info.is_main else (lambda _msg: None)
    run_dir = RunDir(cfg.output_dir, writer=info.is_main)

    # Which checkpoint (if any) this run continues from.
    resume: tuple[str, dict[str, Any]] | None = None
    if cfg.resume == "auto":
        resume = find_resume_checkpoint(run_dir.path, log=log)
        if resume is None:
            log(f"--resume auto: no checkpoint in {run_dir.path}, starting afresh")
    elif cfg.resume:
        resume = (cfg.resume, load_checkpoint(cfg.resume))
    if resume is None and run_dir.holds_a_run():
        raise UserError(f"{run_dir.path} already holds a run: continue it with --resume auto, or pick another "
                        "--output-dir")
    if resume is not None and resume[1].get("task") != cfg.task:
        raise UserError(f"{resume[0]} is not a {cfg.task} checkpoint (task: {resume[1].get('task')!r})")

    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    random.seed(cfg.seed + info.rank)
    np.random.seed(cfg.seed + info.rank)
    torch.manual_seed(cfg.seed + info.rank)

    train_loader = cfg.data.build(cfg.data.train_split, train=True, device=device, rank=info.rank,
                                  world_size=info.world_size, seed=cfg.seed)
    val_loader = None
    if cfg.data.val_split:
        if not has_split(cfg.data.path, cfg.data.val_split):
            raise UserError(f"{cfg.data.path} has no '{cfg.data.val_split}' split to evaluate on: point "
                            "--data.val_split at one, or set --data.val_split '' to train without evaluation")
        val_loader = cfg.data.build(cfg.data.val_split, train=False, device=device, rank=info.rank,
                                    world_size=info.world_size, seed=cfg.seed)
    num_classes = cfg.model.num_classes or int(train_loader.num_classes)

    if resume is not None:
        vit_args = dict(resume[1]["vit_args"])
        model = build_vit(**vit_args)
        model.load_state_dict(resume[1]["model"])
    else:
        model, vit_args = build_downstream_model(cfg, num_classes, log=log)
    model.to(device)

    accum = resolve_accumulation(cfg.optim, cfg.data.batch_size, info.world_size)
    eff_batch = cfg.data.batch_size * accum * info.world_size
    lr = peak_lr(cfg.optim.blr, eff_batch, cfg.optim.lr)
    optimizer = build_optimizer(cfg, model, lr, device)
    amp_dtype, use_scaler = amp_settings(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    eraser, mixup, criterion = mixup_and_loss(cfg, num_classes, device)

    start_epoch, global_step, best_acc1, elapsed_before = 0, 0, -1.0, 0.0
    if resume is not None:
        ck = resume[1]
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch = int(ck["epoch"]) + 1
        global_step = int(ck.get("step", 0))
        best_acc1 = float(ck.get("best_acc1", -1.0))
        elapsed_before = float(ck.get("elapsed_seconds", 0.0))
        if ck.get("rng"):
            restore_rng(ck["rng"], device)
        if "config" in ck:
            diffs = config_differences(ck["config"], to_dict(cfg))
            if diffs:
                log("warning: resuming with a config that differs from the checkpoint's: " + "; ".join(diffs))
        if start_epoch >= cfg.train.epochs:
            log(f"nothing to do: {run_dir.path} already completed {start_epoch} of {cfg.train.epochs} epochs")
            return {"task": cfg.task, "output_dir": run_dir.path, "epochs": cfg.train.epochs,
                    "last_epoch": start_epoch - 1, "train_loss": None, "final_acc1": ck.get("test_acc1"),
                    "final_acc5": ck.get("test_acc5"), "test_loss": None,
                    "best_acc1": best_acc1 if best_acc1 >= 0 else None, "elapsed_seconds": elapsed_before,
                    "ranks_in_sync": None}
        run_dir.truncate_after(int(ck["epoch"]))
        log(f"resumed from {resume[0]} (epoch {ck['epoch']} done)")

    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    # Whole accumulation cycles only (the reference drops a trailing partial one too).
    steps_per_epoch -= steps_per_epoch % accum
    if steps_per_epoch <= 0:
        raise UserError(f"an epoch has fewer batches ({len(train_loader)}) than one optimiser step needs "
                        f"({accum} x {cfg.data.batch_size} images per device): lower --data.batch_size")
    schedule = CosineSchedule(lr, cfg.optim.warmup_epochs, cfg.train.epochs, steps_per_epoch, cfg.optim.min_lr)

    run_dir.create()
    run_dir.write_config(to_dict(cfg))

    ddp_model: nn.Module = model
    if info.distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{cfg.task}: {n_params:,} trainable parameters, {num_classes} classes, effective batch "
        f"{eff_batch} (accum {accum} x {info.world_size} device(s)), peak lr {lr:.3g}, epochs {cfg.train.epochs}")

    wall0 = time.perf_counter()
    last_stats: dict[str, float] = {}
    train_loss = float("nan")
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch)
        ddp_model.train()
        reset_peak_memory(device)
        window = DeviceMeter(["loss"], device)
        whole = DeviceMeter(["loss"], device)
        timed = TimedIterator(train_loader)
        t0 = time.perf_counter()
        t_window, wait_window = t0, 0.0
        current_lr = schedule(epoch, 0)
        optimizer.zero_grad(set_to_none=True)
        for it, (images, labels) in enumerate(timed):
            if it >= steps_per_epoch:
                break
            if it % accum == 0:
                current_lr = schedule(epoch, it)
                set_lr(optimizer, current_lr)
            if eraser is not None:
                images = eraser(images)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            update = (it + 1) % accum == 0
            sync = ddp_model.no_sync() if (info.distributed and not update) else contextlib.nullcontext()
            with sync:
                with _autocast(device, amp_dtype):
                    logits = ddp_model(images)
                loss = criterion(logits.float(), targets)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if update:
                if scaler is not None:
                    if cfg.optim.clip_grad > 0:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    if cfg.optim.clip_grad > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
            window.set_step(global_step)
            whole.set_step(global_step)
            window.add(loss)
            whole.add(loss)
            if cfg.train.log_every and (it + 1) % cfg.train.log_every == 0:
                means, bad = window.read()
                _check_finite(bad, epoch)
                now = time.perf_counter()
                n_img = window.count * cfg.data.batch_size * info.world_size
                run_dir.log_step({
                    "step": global_step, "epoch": epoch, "lr": current_lr, "loss": means["loss"],
                    "images_per_sec": n_img / max(now - t_window, 1e-9),
                    "data_wait_frac": (timed.wait_seconds - wait_window) / max(now - t_window, 1e-9),
                    "elapsed_seconds": elapsed_before + now - wall0,
                })
                window.reset()
                t_window, wait_window = now, timed.wait_seconds
        means, bad = whole.read()
        _check_finite(bad, epoch)
        synchronize(device)
        epoch_seconds = time.perf_counter() - t0
        train_loss = means["loss"]
        n_images = whole.count * cfg.data.batch_size * info.world_size

        last_epoch = epoch == cfg.train.epochs - 1
        row: dict[str, Any] = {"epoch": epoch, "train_lr": current_lr, "train_loss": train_loss}
        if val_loader is not None and (last_epoch or (epoch + 1) % max(cfg.train.eval_every, 1) == 0):
            last_stats = evaluate(model, val_loader, device, amp_dtype)
            row.update(test_loss=last_stats["loss"], test_acc1=last_stats["acc1"], test_acc5=last_stats["acc5"])
            best_acc1 = max(best_acc1, last_stats["acc1"])
            row["best_acc1"] = best_acc1
        elapsed = elapsed_before + time.perf_counter() - wall0
        row.update({
            "n_parameters": n_params,
            "epoch_seconds": epoch_seconds,
            "images_per_sec": n_images / max(epoch_seconds, 1e-9),
            "step_time_ms": 1000.0 * epoch_seconds / max(whole.count, 1),
            "data_wait_frac": timed.wait_seconds / max(epoch_seconds, 1e-9),
            "peak_mem_mb": peak_memory_mb(device),
            "elapsed_seconds": elapsed,
            "device_hours": elapsed * info.world_size / 3600.0,
            "world_size": info.world_size,
            "device": device_name(device),
            "steps": global_step,
            "images": n_images,
            "total_epochs": cfg.train.epochs,
        })
        if info.is_main:
            common = {"epoch": epoch, "step": global_step, "config": to_dict(cfg), "task": cfg.task,
                      "vit_args": vit_args, "best_acc1": best_acc1, "elapsed_seconds": elapsed}
            if "test_acc1" in row and row["test_acc1"] >= best_acc1:
                atomic_save({**common, "model": model.state_dict(), "test_acc1": row["test_acc1"],
                             "test_acc5": row["test_acc5"]}, os.path.join(run_dir.path, BEST_NAME))
            full = {**common, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "rng": capture_rng(device)}
            atomic_save(full, os.path.join(run_dir.path, LAST_NAME))
            if cfg.train.save_every and ((epoch + 1) % cfg.train.save_every == 0 or last_epoch):
                atomic_save(full, os.path.join(run_dir.path, f"checkpoint-{epoch:04d}.pth"))
        run_dir.log_epoch(row)
        acc = f", test top-1 {row['test_acc1']:.2f}% top-5 {row['test_acc5']:.2f}%" if "test_acc1" in row else ""
        log(f"epoch {epoch}: lr {current_lr:.3g}, train loss {train_loss:.4f}{acc} ({epoch_seconds:.1f} s)")
    run_dir.close()

    in_sync = None
    if info.distributed:
        in_sync = check_in_sync(model, device)
        if not in_sync:
            raise RuntimeError("the ranks ended with different weights (DDP went out of sync)")
        log(f"weights identical on all {info.world_size} ranks")
    result = {
        "task": cfg.task,
        "output_dir": run_dir.path,
        "epochs": cfg.train.epochs,
        "last_epoch": epoch,
        "train_loss": train_loss,
        "final_acc1": last_stats.get("acc1"),
        "final_acc5": last_stats.get("acc5"),
        "test_loss": last_stats.get("loss"),
        "best_acc1": best_acc1 if best_acc1 >= 0 else None,
        "elapsed_seconds": elapsed_before + time.perf_counter() - wall0,
        "ranks_in_sync": in_sync,
    }
    if result["final_acc1"] is not None:
        log(f"final top-1 {result['final_acc1']:.2f}% (top-5 {result['final_acc5']:.2f}%, best top-1 "
            f"{result['best_acc1']:.2f}%)")
    return result


# --------------------------------------------------------------------------- evaluation of a checkpoint


def load_downstream_checkpoint(path: str) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model, vit_args, checkpoint) of a fine-tuned or probed checkpoint: ours (with `vit_args`) or
    a reference one (the architecture read off the state dict)."""
    ckpt = load_checkpoint(path)
    state = model_state(ckpt)
    if "vit_args" in ckpt:
        vit_args = dict(ckpt["vit_args"])
    elif "model_args" in ckpt or any(k.startswith(("decoder_", "cls_head.")) for k in state):
        raise UserError(f"{path} is a pretraining checkpoint: fine-tune or probe it first "
                        "(supmae finetune / supmae linprobe), then evaluate that")
    else:
        vit_args = downstream_args_from_state(state)
    model = build_vit(**vit_args)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit the model it describes: {str(exc).splitlines()[0]}") from None
    return model, vit_args, ckpt


def _eval_data_config(ckpt: dict[str, Any], vit_args: dict[str, Any]) -> DataConfig:
    """The data section the checkpoint was trained with (so the val transform matches), if it has one."""
    saved = ckpt.get("config", {})
    if isinstance(saved, dict) and isinstance(saved.get("data"), dict):
        try:
            data = from_dict(DataConfig, saved["data"])
        except UserError:
            data = None  # a data section of another version: the plain eval transform below does
        if data is not None:
            data.randaugment = ""  # training-only augmentation; it would also pin the pipeline
            return data
    return DataConfig(pipeline="torchvision", img_size=int(vit_args["img_size"]))


# --------------------------------------------------------------------------- command line


@dataclass
class EvalConfig:
    """What `supmae eval` overrides with --data.key VALUE (defaults: the checkpoint's own data section)."""

    data: DataConfig = field(default_factory=DataConfig)


def _recipe_parser(prog: str, task: str, default_recipe: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=f"{'Fine-tune' if task == 'finetune' else 'Linearly probe'} a pretrained encoder. "
        "Any config leaf can be overridden with --section.key VALUE (e.g. --data.path DIR, --optim.blr 5e-4).",
    )
    p.add_argument("--recipe", default=default_recipe, help=f"named configuration (default {default_recipe})")
    p.add_argument("--pretrained", help="pretraining checkpoint (ours or the reference's)")
    p.add_argument("--output-dir", help="run directory (config.json, log.jsonl, checkpoints)")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint of --output-dir) or a checkpoint path")
    p.add_argument("--model", help="supmae model name: the encoder shape when the checkpoint has no model_args")
    p.add_argument("--seed", type=int)
    p.add_argument("--list-recipes", action="store_true", help="list the recipes of this command and exit")
    return p


def _config_from_argv(argv: list[str], task: str, default_recipe: str) -> DownstreamConfig | None:
    parser = _recipe_parser(f"supmae {task}", task, default_recipe)
    args, rest = parser.parse_known_args(argv)
    if args.list_recipes:
        for name, doc in list_recipes(task).items():
            _print(f"{name:<16} {doc}")
        return None
    cfg = get_recipe(args.recipe, kind=task)
    apply_overrides(cfg, rest)
    for key, value in (("pretrained", args.pretrained), ("output_dir", args.output_dir), ("resume", args.resume),
                       ("seed", args.seed)):
        if value is not None:
            setattr(cfg, key, value)
    if args.model is not None:
        cfg.model.name = args.model
    if cfg.task != task:
        raise UserError(f"recipe {args.recipe} is a {cfg.task} recipe; use 'supmae {cfg.task}'")
    return cfg


def main_finetune(argv: list[str]) -> int:
    """`supmae finetune --recipe vit_b16_ft100 --pretrained CKPT --data.path DIR --output-dir DIR`."""
    cfg = _config_from_argv(argv, "finetune", "vit_b16_ft100")
    if cfg is not None:
        run_finetune(cfg)
    return 0


def main_linprobe(argv: list[str]) -> int:
    """`supmae linprobe --recipe vit_b16_lin90 --pretrained CKPT --data.path DIR --output-dir DIR`."""
    cfg = _config_from_argv(argv, "linprobe", "vit_b16_lin90")
    if cfg is not None:
        run_linprobe(cfg)
    return 0


def main_eval(argv: list[str]) -> int:
    """`supmae eval --checkpoint CKPT --data.path DIR [--output-dir DIR]`: top-1 / top-5 on the val split."""
    p = argparse.ArgumentParser(
        prog="supmae eval",
        allow_abbrev=False,
        description="Top-1 / top-5 of a fine-tuned or probed checkpoint on a val split. The data section "
        "defaults to the one the checkpoint was trained with; override it with --data.key VALUE.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by supmae finetune / linprobe")
    p.add_argument("--output-dir", help="also append the result to DIR/log.jsonl")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
    args, rest = p.parse_known_args(argv)

    model, vit_args, ckpt = load_downstream_checkpoint(args.checkpoint)

    cfg = apply_overrides(EvalConfig(data=_eval_data_config(ckpt, vit_args)), rest)
    if cfg.data.randaugment:
        raise UserError("evaluation uses no RandAugment: drop --data.randaugment")
    if cfg.data.img_size != vit_args["img_size"]:
        raise UserError(f"the model was trained at {vit_args['img_size']} px; --data.img_size {cfg.data.img_size} "
                        "would not fit its position embeddings")
    with distributed(args.device) as info:
        amp_dtype, _ = amp_settings(args.precision, info.device)
        model.to(info.device)
        loader = cfg.data.build(cfg.data.val_split, train=False, device=info.device, rank=info.rank,
                                world_size=info.world_size)
        t0 = time.perf_counter()
        stats = evaluate(model, loader, info.device, amp_dtype)
        seconds = time.perf_counter() - t0
        if info.is_main:
            row = {"checkpoint": os.path.abspath(args.checkpoint), "epoch": ckpt.get("epoch"),
                   "test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "test_loss": stats["loss"],
                   "samples": int(stats["samples"]), "eval_seconds": seconds, "split": cfg.data.val_split,
                   "pipeline": cfg.data.pipeline}
            if args.output_dir:
                run_dir = RunDir(args.output_dir)
                run_dir.create()
                run_dir.log_epoch(row)
            _print(f"top-1 {stats['acc1']:.2f}% top-5 {stats['acc5']:.2f}% loss {stats['loss']:.4f} "
                   f"on {int(stats['samples'])} images ({seconds:.1f} s)")
    return 0

