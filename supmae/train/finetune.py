"""Fine-tuning (Table 4), linear probing (Table 5) and evaluation of a pretrained encoder.

Where each part of the recipes runs:

- In the data pipeline (`DataConfig.build` -> `pipelines.build_pipeline`; FFCV, DALI or
  torchvision): decoding, RandomResizedCrop (scale 0.08-1), horizontal flip, normalisation, and
  RandAugment where the pipeline implements it (a pipeline that does not refuses it itself).
  Validation: shorter side to img_size / 0.875, centre crop. The augmentation the pipeline says
  it applied is logged at start and kept in starts.jsonl.
- On the device, in the step (`supmae.train.steps.DownstreamStep`), so with every pipeline: random
  erasing (timm `RandomErasing`, per sample, pixel mode), then mixup / cutmix (timm `Mixup`, one
  lambda per batch, label smoothing folded into the soft targets) and the matching loss.
- In the model and optimiser: drop path (timm ViT), layer-wise lr decay (timm
  `param_groups_layer_decay`), AdamW, or timm's `Lars` for the probe.

This module holds only the downstream jobs' own parts (model and optimiser construction, the
top-1 / top-5 evaluation, the best-weights file); the epoch loop, per-iteration cosine schedule,
distributed set-up, RNG, books and checkpoints are `supmae.train.engine`'s, shared with pretraining.

A run directory holds the books every job writes (`config.json`, `log.jsonl` with the reference's
keys `epoch, train_lr, train_loss, test_loss, test_acc1, test_acc5` plus the engine's timing keys,
`steps.jsonl`, `starts.jsonl`), `checkpoint-last.pth` (every epoch, atomic; `--resume auto`
continues from it), numbered checkpoints every `save_every` epochs and `checkpoint-best.pth`
(weights of the best top-1 so far).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from supmae.config import to_dict
from supmae.errors import UserError
from supmae.models.vit import (
    build_vit,
    downstream_args_from_state,
    encoder_args_from_checkpoint,
    load_pretrained,
    registry_encoder_args,
)
from supmae.train.augment import mixup_and_loss  # noqa: F401  (re-exported: the downstream step's augmentation)
from supmae.train.checkpoint import load_checkpoint, model_state
from supmae.train.compiling import resolve_compile
from supmae.train.distributed import all_reduce_sum, distributed
from supmae.train.engine import (
    Engine,
    EpochPlan,
    Job,
    JobContext,
    StartPoint,
    decide_resume,
    describe_augmentation,
    load_on_main,
    resume_point,
)
from supmae.train.evaluation import RealBatches
from supmae.train.finetune_config import TASKS, DownstreamConfig
from supmae.train.job_setup import (
    JobSetup,
    config_differences,
    has_split,
    open_job,
    resolve_accumulation,
    restore_step,
    set_up_on_every_rank,
)
from supmae.train.optim import (  # noqa: F401  (re-exported: the recipes' optimisers)
    build_optimizer,
    finetune_param_groups,
    probe_param_groups,
)
from supmae.train.precision import amp_dtype_of, autocast, configure_determinism, resolve_precision
from supmae.train.process import process_settings, set_cpu_threads
from supmae.train.run_dir import RunDir, job_locks
from supmae.train.schedule import CosineSchedule, peak_lr

BEST_NAME = "checkpoint-best.pth"


def _print(*args: Any) -> None:
    print(*args, flush=True)


# --------------------------------------------------------------------------- model


def build_downstream_model(cfg: DownstreamConfig, num_classes: int, log: Callable[[str], None] = _print,
                           pretrained_ckpt: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The downstream ViT of `cfg` with the pretrained encoder loaded (if any), and its `vit_args`.
    `pretrained_ckpt` is `cfg.pretrained`'s content when the caller read it already (rank 0 reads it
    and broadcasts it under torchrun)."""
    ckpt = None
    if cfg.pretrained:
        ckpt = pretrained_ckpt if pretrained_ckpt is not None else load_checkpoint(cfg.pretrained)
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


def amp_settings(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed) for `train.precision`, resolved
    the way every job resolves it (`supmae.train.precision.resolve_precision`)."""
    resolved = resolve_precision(precision, device)
    return amp_dtype_of(resolved), resolved == "fp16"


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
             max_steps: int = 0) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of `model` over `loader`, summed over every
    rank with each validation sample counted once whatever the padding (`RealBatches`), so N ranks
    give what one rank gives. Returns {"acc1", "acc5", "loss", "samples"}."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct@1, correct@5
    # The sample count is known on the host (batch shapes): adding it to a device tensor batch by batch
    # would copy a host value to the device each time, and that copy waits for the queued work.
    count = 0
    try:
        for images, labels in RealBatches(loader, max_steps):
            with autocast(device, amp_dtype):
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            # Integer counts of correct predictions (not per-batch percentages), so that the sum over
            # ranks equals a one-process evaluation exactly.
            hits = logits.topk(k, dim=1).indices.eq(labels[:, None])  # [N, k]
            loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
            sums += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
            count += labels.shape[0]
    finally:
        model.train(was_training)
    packed = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64).to(device)])  # the one copy
    all_reduce_sum(packed)
    loss_sum, c1, c5, count = packed.tolist()
    if count == 0:
        raise UserError("the evaluation split yielded no batches (is it smaller than one batch per rank?)")
    return {"acc1": 100.0 * c1 / count, "acc5": 100.0 * c5 / count, "loss": loss_sum / count, "samples": count}


# --------------------------------------------------------------------------- the run


def _check_config(cfg: DownstreamConfig) -> None:
    if cfg.task not in TASKS:
        raise UserError(f"unknown task {cfg.task!r} (expected {' or '.join(TASKS)})")
    if not cfg.output_dir:
        raise UserError("no run directory: set --output-dir DIR")
    if not (cfg.pretrained or cfg.model.name or cfg.resume):
        raise UserError("no pretrained weights: pass --pretrained CKPT (or --model NAME to start from random weights)")
    if cfg.model.feature not in ("avg", "token"):
        raise UserError(f"--model.feature must be avg or token, got {cfg.model.feature!r}")
    if cfg.task == "linprobe" and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0 or cfg.aug.reprob > 0):
        raise UserError("linear probing uses no mixup / cutmix / random erasing: set --aug.mixup 0 --aug.cutmix 0 "
                        "--aug.reprob 0")
    t = cfg.train
    checks = [
        (t.epochs > 0, "--train.epochs must be positive"),
        (cfg.optim.accum_iter >= 1, "--optim.accum_iter must be at least 1"),
        (cfg.aug.remode in ("pixel", "rand", "const"), f"--aug.remode must be pixel, rand or const, got {cfg.aug.remode!r}"),
        (t.log_every >= 1, f"--train.log_every must be >= 1, got {t.log_every}"),
        (t.save_every >= 0, f"--train.save_every must be >= 0, got {t.save_every}"),
        (t.epochs_per_run >= 0, f"--train.epochs_per_run must be >= 0, got {t.epochs_per_run}"),
        (t.max_steps_per_epoch >= 0, f"--train.max_steps_per_epoch must be >= 0, got {t.max_steps_per_epoch}"),
        (t.cpu_threads >= 0, f"--train.cpu_threads must be >= 0, got {t.cpu_threads}"),
        (t.checkpoint_minutes >= 0, f"--train.checkpoint_minutes must be >= 0, got {t.checkpoint_minutes}"),
        (t.compile in ("auto", "on", "off"), f"--train.compile must be auto, on or off, got {t.compile!r}"),
        (t.precision in ("auto", "fp32", "bf16", "fp16"),
         f"--train.precision must be auto, fp32, bf16 or fp16, got {t.precision!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def run_downstream(cfg: DownstreamConfig) -> dict[str, Any]:
    """Fine-tune or linearly probe (per `cfg.task`); returns the final / best top-1 and where the run is.
    Every rank of a torchrun job calls this."""
    _check_config(cfg)
    if cfg.train.deterministic:
        # cuBLAS needs this before its first handle is created to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with process_settings(), distributed(cfg.train.device, cfg.train.dist_timeout_s) as info, job_locks():
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
    ctx = open_job(cfg.output_dir, info)
    st = set_up_on_every_rank(lambda: _setup(cfg, info, ctx.run_dir, ctx.log), info)
    if st.done:
        ck, start_epoch = st.start.ckpt or {}, st.start.start_epoch
        ctx.log(f"nothing to do: {ctx.run_dir.path} already completed {start_epoch} of {cfg.train.epochs} epochs")
        best = float(ck.get("best_acc1", -1.0))
        last_row = ck.get("log_row") or {}  # the finished epoch's log line, kept in its checkpoint
        return {"task": cfg.task, "output_dir": ctx.run_dir.path, "epochs": cfg.train.epochs,
                "last_epoch": start_epoch - 1, "train_loss": last_row.get("train_loss"),
                "final_acc1": last_row.get("test_acc1"), "final_acc5": last_row.get("test_acc5"),
                "test_loss": last_row.get("test_loss"), "best_acc1": best if best >= 0 else None,
                "elapsed_seconds": float(ck.get("elapsed_seconds", 0.0)), "ranks_in_sync": None}
    return _train(cfg, ctx, st)


@dataclass
class DownstreamSetup(JobSetup):
    """A fine-tuning's or probe's set-up: the common parts, and the downstream ViT's arguments, its
    class count, the best top-1 so far and the trained parameter count."""

    vit_args: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 0
    best_acc1: float = -1.0
    n_params: int = 0


def _setup(cfg: DownstreamConfig, info: Any, run_dir: RunDir, log: Callable[[str], None]) -> DownstreamSetup:
    device = info.device
    tc = cfg.train

    # Which checkpoint (if any) this run continues from: rank 0 decides, reads, and broadcasts.
    ckpt_path, ckpt = decide_resume(cfg.resume, run_dir, info, log)
    if ckpt is not None:
        if ckpt.get("task") != cfg.task:
            raise UserError(f"{ckpt_path} is not a {cfg.task} checkpoint (task: {ckpt.get('task')!r})")
        if int(ckpt["epoch"]) + 1 >= tc.epochs:
            return DownstreamSetup(StartPoint(int(ckpt["epoch"]) + 1, ckpt=ckpt, ckpt_path=ckpt_path), done=True)
    # The pretrained weights, likewise read by rank 0 alone (no shared filesystem needed).
    pretrained = load_on_main(cfg.pretrained, info) if (ckpt is None and cfg.pretrained) else None

    resolve_precision(tc.precision, device)
    resolve_compile(tc.compile, device)
    configure_determinism(device, tc.deterministic)
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
    # After the loaders: FFCV's loader constructor sets torch's thread count itself.
    set_cpu_threads(tc.cpu_threads)
    num_classes = cfg.model.num_classes or int(train_loader.num_classes)

    if ckpt is not None:
        vit_args = dict(ckpt["vit_args"])
        model = build_vit(**vit_args)
        model.load_state_dict(ckpt["model"])
    else:
        model, vit_args = build_downstream_model(cfg, num_classes, log=log, pretrained_ckpt=pretrained)
    model.to(device)

    accum = resolve_accumulation(cfg.optim, cfg.data.batch_size, info.world_size)
    micro_steps = len(train_loader)
    if tc.max_steps_per_epoch:
        micro_steps = min(micro_steps, tc.max_steps_per_epoch)
    # Whole accumulation cycles only (the reference drops a trailing partial one too).
    micro_steps -= micro_steps % accum
    if micro_steps <= 0:
        raise UserError(f"an epoch has fewer batches ({len(train_loader)}) than one optimiser step needs "
                        f"({accum} x {cfg.data.batch_size} images per device): lower --data.batch_size")
    eff_batch = cfg.data.batch_size * accum * info.world_size
    lr = peak_lr(cfg.optim.blr, eff_batch, cfg.optim.lr)
    schedule = CosineSchedule(lr, cfg.optim.warmup_epochs, tc.epochs, micro_steps, cfg.optim.min_lr)

    start_epoch, global_step, best_acc1, prev_elapsed = 0, 0, -1.0, 0.0
    if ckpt is not None:
        start_epoch = int(ckpt["epoch"]) + 1
        global_step = int(ckpt.get("step", 0))
        best_acc1 = float(ckpt.get("best_acc1", -1.0))
        prev_elapsed = float(ckpt.get("elapsed_seconds", 0.0))
        if "config" in ckpt:
            diffs = config_differences(ckpt["config"], to_dict(cfg))
            if diffs:
                log("warning: resuming with a config that differs from the checkpoint's: " + "; ".join(diffs))
        log(f"resumed from {ckpt_path} ({resume_point(ckpt)})")

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{cfg.task}: {n_params:,} trainable parameters, {num_classes} classes, effective batch "
        f"{eff_batch} (accum {accum} x {info.world_size} device(s)), peak lr {lr:.3g}, epochs {tc.epochs}, "
        f"pipeline {train_loader.kind}")
    log(f"augmentation: {describe_augmentation(train_loader)}")
    return DownstreamSetup(
        StartPoint(start_epoch, global_step, prev_elapsed, ckpt, ckpt_path),
        model=model,
        plan=EpochPlan(train_loader, schedule, micro_steps, accum),
        val_loader=val_loader,
        vit_args=vit_args,
        num_classes=num_classes,
        best_acc1=best_acc1,
        n_params=n_params,
    )


class _DownstreamJob(Job):
    """Fine-tuning's / probing's part of the engine: the downstream step, the top-1 / top-5 evaluation,
    the best-weights file and the downstream checkpoint's content."""

    meter_names = ("loss",)

    def __init__(self, cfg: DownstreamConfig, info: Any, step: Any, val_loader: Any, vit_args: dict[str, Any],
                 best_acc1: float, n_params: int, run_dir: RunDir):
        self.name = cfg.task
        self.cfg, self.info, self.step, self.val_loader = cfg, info, step, val_loader
        self.vit_args, self.best_acc1, self.n_params, self.run_dir = vit_args, best_acc1, n_params, run_dir
        self.last_stats: dict[str, float] = {}
        self.train_loss = float("nan")

    def micro(self, images: torch.Tensor, labels: torch.Tensor, sync: bool, indices: torch.Tensor | None = None
              ) -> tuple[torch.Tensor]:
        return (self.step.micro(images, labels, sync=sync),)

    def loss_row(self, means: dict[str, float]) -> dict[str, Any]:
        self.train_loss = means["loss"]
        return {"train_loss": means["loss"], "n_parameters": self.n_params}

    def evaluate(self, epoch: int) -> dict[str, Any]:
        tc = self.cfg.train
        last = epoch == tc.epochs - 1
        if self.val_loader is None or not (last or (epoch + 1) % max(tc.eval_every, 1) == 0):
            return {}
        stats = evaluate(self.step.core, self.val_loader, self.info.device, self.step.amp_dtype)
        self.last_stats = stats
        self.best_acc1 = max(self.best_acc1, stats["acc1"])
        return {"test_loss": stats["loss"], "test_acc1": stats["acc1"], "test_acc5": stats["acc5"],
                "best_acc1": self.best_acc1}

    def _common(self, epoch: int) -> dict[str, Any]:
        return {"task": self.cfg.task, "vit_args": self.vit_args, "best_acc1": self.best_acc1,
                "model": self.step.core.state_dict()}

    def payload(self, epoch: int) -> dict[str, Any]:
        step = self.step
        return {**self._common(epoch), "optimizer": step.optimizer.state_dict(),
                "scaler": step.scaler.state_dict() if step.scaler is not None else None}

    def numbered(self, epoch: int) -> bool:
        tc = self.cfg.train
        return bool(tc.save_every) and ((epoch + 1) % tc.save_every == 0 or epoch == tc.epochs - 1)

    def extra_saves(self, epoch: int, row: dict[str, Any], save: Any) -> None:
        if "test_acc1" in row and row["test_acc1"] >= self.best_acc1:
            save({**self._common(epoch), "epoch": epoch, "config": to_dict(self.cfg),
                  "test_acc1": row["test_acc1"], "test_acc5": row["test_acc5"],
                  "elapsed_seconds": row["elapsed_seconds"]}, self.run_dir.file(BEST_NAME))

    def message(self, row: dict[str, Any]) -> str:
        acc = f", test top-1 {row['test_acc1']:.2f}% top-5 {row['test_acc5']:.2f}%" if "test_acc1" in row else ""
        return (f"epoch {row['epoch']}: lr {row['train_lr']:.3g}, train loss {row['train_loss']:.4f}{acc}, "
                f"{row['images_per_sec']:.1f} img/s, data wait {100 * row['data_wait_frac']:.1f}% "
                f"({row['epoch_seconds']:.1f} s)")


def downstream_flops(vit_args: dict[str, Any]) -> int | None:
    """Counted FLOPs of one training image (forward + backward) of the downstream ViT `vit_args`, on a
    meta-device replica: no memory, no arithmetic, and the run's model and RNG streams untouched."""
    from torch.utils.flop_counter import FlopCounterMode

    import supmae.models.flops  # noqa: F401  (registers the CPU SDPA formulas)

    try:
        with torch.random.fork_rng(devices=[]):
            with torch.device("meta"):
                replica = build_vit(**vit_args)
            replica.train()
            size = int(vit_args["img_size"])
            images = torch.empty(2, 3, size, size, device="meta")
            counter = FlopCounterMode(display=False)
            with counter:
                replica(images).float().sum().backward()
        return int(counter.get_total_flops()) // 2
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _train(cfg: DownstreamConfig, ctx: JobContext, st: DownstreamSetup) -> dict[str, Any]:
    from supmae.train.steps import build_downstream_step

    info, tc, plan, start = ctx.info, cfg.train, st.plan, st.start
    assert plan is not None
    # Built after every rank agreed that set-up succeeded: DDP's constructor is a collective.
    step = build_downstream_step(cfg, st.model, info.device, st.num_classes, world_size=info.world_size,
                                 accum=plan.accum, ddp=info.distributed)
    restore_step(step, start.ckpt)
    job = _DownstreamJob(cfg, info, step, st.val_loader, st.vit_args, st.best_acc1, st.n_params, ctx.run_dir)
    engine = Engine(job, ctx, cfg=cfg, step=step, plan=plan, start=start, total_epochs=tc.epochs,
                    flops_per_image=downstream_flops(st.vit_args))
    final_row, in_sync = engine.train(start.ckpt)
    stats = job.last_stats
    result = {
        "task": cfg.task,
        "output_dir": ctx.run_dir.path,
        "epochs": tc.epochs,
        "last_epoch": final_row["epoch"] if final_row else start.start_epoch - 1,
        "train_loss": job.train_loss,
        "final_acc1": stats.get("acc1"),
        "final_acc5": stats.get("acc5"),
        "test_loss": stats.get("loss"),
        "best_acc1": job.best_acc1 if job.best_acc1 >= 0 else None,
        "elapsed_seconds": engine.elapsed(),
        "ranks_in_sync": in_sync,
        "checkpoint": engine.last_ckpt,
    }
    if result["final_acc1"] is not None:
        ctx.log(f"final top-1 {result['final_acc1']:.2f}% (top-5 {result['final_acc5']:.2f}%, best top-1 "
            f"{result['best_acc1']:.2f}%)")
    return result


# --------------------------------------------------------------------------- evaluation of a checkpoint


def load_downstream_checkpoint(path: str, ckpt: dict[str, Any] | None = None
                               ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model, vit_args, checkpoint) of a fine-tuned or probed checkpoint: ours (with `vit_args`) or
    a reference one (the architecture read off the state dict). `ckpt`: the file's content, when the
    caller read it already."""
    if ckpt is None:
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
