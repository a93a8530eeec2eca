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

This module holds only pretraining's own parts (config checks, set-up, the masking-noise generator,
the classification-branch evaluation); the step is `supmae.train.steps.PretrainStep` and the epoch
loop, books and checkpoints are `supmae.train.engine`'s.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from supmae.config import to_dict
from supmae.errors import UserError
from supmae.train import distributed as dist_utils
from supmae.train.compiling import resolve_compile
from supmae.train.engine import (
    Engine,
    EpochPlan,
    Job,
    JobContext,
    Log,
    NonFiniteLossError,
    StartPoint,
    decide_resume,
    describe_augmentation,
    resume_point,
)
from supmae.train.evaluation import RealBatches, real_samples  # noqa: F401  (real_samples: re-exported)
from supmae.train.job_setup import (
    JobSetup,
    config_differences,
    has_split,
    open_job,
    resolve_accumulation,
    restore_step,
    set_up_on_every_rank,
)
from supmae.train.masking_noise import sample_noise
from supmae.train.metrics import device_name
from supmae.train.precision import autocast, configure_determinism, resolve_precision
from supmae.train.pretrain_config import LossConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from supmae.train.process import process_settings, set_cpu_threads
from supmae.train.rng import capture_rng, restore_rng  # noqa: F401  (re-exported)
from supmae.train.run_dir import RunDir, job_locks, tensorboard_available
from supmae.train.schedule import CosineSchedule, peak_lr

__all__ = [
    "LossConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "PretrainConfig",
    "TrainConfig",
    "run_pretrain",
]

METER_NAMES = ("loss", "rec_loss", "cls_loss")


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
        (t.checkpoint_minutes >= 0, f"--train.checkpoint_minutes must be >= 0, got {t.checkpoint_minutes}"),
        (t.val_every >= 1, f"--train.val_every must be >= 1, got {t.val_every}"),
        (t.cpu_threads >= 0, f"--train.cpu_threads must be >= 0, got {t.cpu_threads}"),
        (t.sync_debug in ("off", "warn", "error"), f"--train.sync_debug must be off, warn or error, got {t.sync_debug!r}"),
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


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A well-mixed 63-bit seed for the masking-noise generator of (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------- run


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) the pretraining described by `cfg`; every rank of a torchrun job calls this.

    Returns a summary: `run_dir`, `final_log` (the last log.jsonl line), `start_epoch`, `epochs_run`,
    `checkpoint` (the last checkpoint written, or None), `world_size`, `rank`, `ranks_in_sync`.
    """
    validate(cfg)
    if cfg.train.deterministic:
        # cuBLAS needs this before its first handle is created to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with (process_settings(), dist_utils.distributed(cfg.train.device, cfg.train.dist_timeout_s) as info,
          job_locks()):
        return _run(cfg, info)


def _run(cfg: PretrainConfig, info: dist_utils.DistInfo) -> dict[str, Any]:
    ctx = open_job(cfg.output_dir, info)
    st = set_up_on_every_rank(lambda: _setup(cfg, info, ctx.run_dir, ctx.log), info)
    if st.done:
        ctx.log(f"nothing to do: {ctx.run_dir.path} already completed {st.start.start_epoch} of {cfg.train.epochs} "
                "epochs")
        return {"run_dir": ctx.run_dir.path, "final_log": None, "start_epoch": st.start.start_epoch, "epochs_run": 0,
                "checkpoint": st.start.ckpt_path, "world_size": info.world_size, "rank": info.rank,
                "ranks_in_sync": None}
    return _train(cfg, ctx, st)


def _setup(cfg: PretrainConfig, info: dist_utils.DistInfo, run_dir: RunDir, log: Log) -> JobSetup:
    from supmae.models import create_model
    from supmae.train.optim import freeze_fixed_pos_embed

    device = info.device
    tc = cfg.train

    # ---- where we start from (decided by rank 0 before anything is written; broadcast to the others).
    ckpt_path, ckpt = decide_resume(cfg.resume, run_dir, info, log)
    if ckpt is not None:
        missing = [k for k in ("model", "optimizer", "epoch", "step") if k not in ckpt]
        if missing:
            raise UserError(f"{ckpt_path} is not a pretraining checkpoint of this trainer (no {', '.join(missing)})")
        if int(ckpt["epoch"]) + 1 >= tc.epochs:  # a finished run: build nothing, write nothing
            return JobSetup(StartPoint(int(ckpt["epoch"]) + 1, ckpt=ckpt, ckpt_path=ckpt_path), done=True)

    # ---- precision, compile, determinism.
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
    # After the loaders: FFCV's loader constructor sets torch's thread count itself.
    set_cpu_threads(tc.cpu_threads)

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
    log(f"augmentation: {describe_augmentation(train_loader)}")
    if accum > 1 and has_bn:
        log(f"warning: gradient accumulation ({accum}) with the BatchNorm classification head: BN statistics are "
            f"computed per micro-batch of {cfg.data.batch_size}, so this is not the same as one batch of {eff_batch}")
    if cfg.optim.warmup_epochs >= tc.epochs:
        log(f"note: warmup ({cfg.optim.warmup_epochs:g} epochs) covers the whole run of {tc.epochs}: the lr only rises")
    if ckpt is not None:
        log(f"resuming from {ckpt_path} ({resume_point(ckpt)})")

    return JobSetup(
        StartPoint(start_epoch, step, prev_elapsed, ckpt, ckpt_path),
        model=model,
        plan=EpochPlan(train_loader, schedule, micro_steps, accum),
        val_loader=val_loader,
    )


class _PretrainJob(Job):
    """Pretraining's part of the engine: the masking noise, the SupMAE step, the classification-branch
    evaluation and the pretraining checkpoint's content."""

    name = "pretrain"
    meter_names = METER_NAMES
    wants_indices = True

    def __init__(self, cfg: PretrainConfig, info: dist_utils.DistInfo, step: Any, val_loader: Any):
        self.cfg, self.info, self.step, self.val_loader = cfg, info, step, val_loader
        self.gen = torch.Generator(device=info.device)
        self.num_patches = step.core.num_patches
        self.epoch = 0

    def epoch_start(self, epoch: int) -> None:
        # The masking noise of an epoch depends on (seed, epoch, rank) only: a resumed run draws the same.
        self.epoch = epoch
        self.gen.manual_seed(_epoch_seed(self.cfg.seed, epoch, self.info.rank))

    def micro(self, images: torch.Tensor, labels: torch.Tensor, sync: bool, indices: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, ...]:
        if indices is not None:
            # Per sample (seed, epoch, dataset index): the same mask on any rank count (ffcv, torchvision).
            noise = sample_noise(self.cfg.seed, self.epoch, indices, self.num_patches)  # [N, L]
        else:  # a pipeline that cannot tell its sample indices (dali): this rank's generator
            noise = torch.rand(images.shape[0], self.num_patches, generator=self.gen, device=images.device)  # [N, L]
        return self.step.micro(images, labels, noise=noise, sync=sync)

    def rank_state(self) -> Any:
        return {"mask_generator": self.gen.get_state()}

    def restore_rank_state(self, state: Any) -> None:
        if state and state.get("mask_generator") is not None:
            self.gen.set_state(state["mask_generator"])

    def loss_row(self, means: dict[str, float]) -> dict[str, Any]:
        return dict(means)

    def evaluate(self, epoch: int) -> dict[str, Any]:
        tc = self.cfg.train
        if self.val_loader is None or not (epoch == tc.epochs - 1 or (epoch + 1) % max(tc.val_every, 1) == 0):
            return {}
        return {"val_cls_acc1": evaluate_cls(self.step.core, self.val_loader, self.info.device, self.step.amp_dtype)}

    def payload(self, epoch: int) -> dict[str, Any]:
        step = self.step
        return {
            "model": step.core.state_dict(),
            "optimizer": step.optimizer.state_dict(),
            "scaler": step.scaler.state_dict() if step.scaler is not None else {},
            "model_args": dict(step.core.model_args),
        }

    def numbered(self, epoch: int) -> bool:
        tc = self.cfg.train
        return (epoch + 1) % tc.save_every == 0 or epoch + 1 == tc.epochs

    def message(self, row: dict[str, Any]) -> str:
        acc = f", val_cls_acc1 {row['val_cls_acc1']:.2f}" if "val_cls_acc1" in row else ""
        return (f"epoch {row['epoch']}: loss {row['loss']:.4f} (rec {row['rec_loss']:.4f}, cls {row['cls_loss']:.4f})"
                f"{acc}, lr {row['train_lr']:.3g}, {row['images_per_sec']:.1f} img/s, data wait "
                f"{100 * row['data_wait_frac']:.1f}%, {row['epoch_seconds']:.1f} s")


def _pretrain_flops(core: torch.nn.Module, mask_ratio: float) -> int | None:
    """Counted FLOPs of one training image (forward + backward) on a meta-device replica."""
    from supmae.models.flops import training_flops_per_image

    try:
        return int(training_flops_per_image(core, mask_ratio=mask_ratio)["total"])
    except (TypeError, RuntimeError, NotImplementedError):
        return None


def _train(cfg: PretrainConfig, ctx: JobContext, st: JobSetup) -> dict[str, Any]:
    from supmae.train.steps import build_pretrain_step

    info, tc, plan, start = ctx.info, cfg.train, st.plan, st.start
    assert plan is not None
    core: torch.nn.Module = st.model
    # ---- the step (optimiser, DDP, compile), built after every rank agreed that set-up succeeded:
    # DDP's constructor is a collective.
    step = build_pretrain_step(cfg, info.device, plan.train_loader.num_classes, world_size=info.world_size,
                               accum=plan.accum, model=core, ddp=info.distributed)
    restore_step(step, start.ckpt)
    job = _PretrainJob(cfg, info, step, st.val_loader)
    engine = Engine(job, ctx, cfg=cfg, step=step, plan=plan, start=start, total_epochs=tc.planned_epochs or tc.epochs,
                    flops_per_image=_pretrain_flops(core, cfg.model.mask_ratio))
    final_row, in_sync = engine.train(start.ckpt)
    return {
        "run_dir": ctx.run_dir.path,
        "final_log": final_row,
        "start_epoch": start.start_epoch,
        "epochs_run": engine.process_epochs,
        "checkpoint": engine.last_ckpt,
        "world_size": info.world_size,
        "rank": info.rank,
        "ranks_in_sync": in_sync,
    }


@torch.no_grad()
def evaluate_cls(core: torch.nn.Module, loader: Any, device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """Top-1 (percent) of the classification branch on `loader`, every patch visible; summed over ranks,
    each validation sample counted once (`RealBatches`)."""
    was_training = core.training
    core.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for imgs, labels in RealBatches(loader):
            with autocast(device, amp_dtype):
                logits = core.classify(imgs)
            correct += (logits.argmax(dim=1) == labels).sum()
            seen += labels.shape[0]
    finally:
        core.train(was_training)
    packed = torch.stack([correct, seen])
    dist_utils.all_reduce_sum(packed)
    c, n = packed.tolist()
    return 100.0 * c / max(n, 1)
