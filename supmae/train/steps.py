"""The training steps of the three jobs: what one micro-batch and one optimiser update do.

This is the job side of the seam described in `supmae.train.engine`: a step object owns the model
as it is called (bare, DDP-wrapped, compiled), the optimiser, the grad scaler and the job's loss;
the engine owns everything around it (epochs, lr schedule, data-wait, books, checkpoints, RNG).
`supmae pretrain`, `supmae finetune|linprobe` and the wall-clock harness all call these objects,
so the step a benchmark times is the step the trainer runs.

Nothing in a step forces a host sync: `micro` returns detached device tensors.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from supmae.train.augment import mixup_and_loss
from supmae.train.compiling import maybe_compile, resolve_compile, wrap_ddp
from supmae.train.optim import build_adamw, build_optimizer, freeze_fixed_pos_embed, param_groups
from supmae.train.precision import amp_dtype_of, autocast, grad_scaler, resolve_precision, set_matmul_precision
from supmae.train.schedule import peak_lr

__all__ = ["DownstreamStep", "PretrainStep", "build_downstream_step", "build_pretrain_step"]


class _Step:
    """What both step kinds share: DDP `no_sync` accumulation, the scaler, the update."""

    core: nn.Module
    model: nn.Module
    ddp: nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: Any
    precision: str
    amp_dtype: torch.dtype | None
    compiled: bool
    compile_reason: str
    accum: int
    clip_grad: float = 0.0

    def _sync_ctx(self, sync: bool) -> contextlib.AbstractContextManager:
        # Between accumulation boundaries DDP must not all-reduce: the gradients are summed locally
        # and reduced once, on the last micro-batch of the cycle.
        if not sync and self.ddp is not None:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.accum
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()

    def update(self) -> None:
        """Optimiser (and scaler) step, then `zero_grad(set_to_none=True)`."""
        if self.scaler is not None:
            if self.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.core.parameters(), self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.clip_grad > 0:
                nn.utils.clip_grad_norm_(self.core.parameters(), self.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class PretrainStep(_Step):
    """The pretraining step `supmae pretrain` runs.

    Attributes: core (the bare SupMAE), model (core, or DDP(core), possibly torch.compile'd),
    optimizer, scaler (GradScaler or None), precision ("fp32" | "bf16" | "fp16", resolved),
    amp_dtype, compiled, compile_reason ("" when compiled), accum, mask_ratio, loss (LossConfig),
    peak_lr.
    """

    def __init__(self, core: nn.Module, model: nn.Module, ddp: nn.Module | None, optimizer: torch.optim.Optimizer,
                 scaler: Any, precision: str, compiled: bool, compile_reason: str, accum: int, mask_ratio: float,
                 loss: Any, peak_lr: float):
        self.core, self.model, self.ddp, self.optimizer, self.scaler = core, model, ddp, optimizer, scaler
        self.precision, self.amp_dtype = precision, amp_dtype_of(precision)
        self.compiled, self.compile_reason = compiled, compile_reason
        self.accum, self.mask_ratio, self.loss, self.peak_lr = accum, mask_ratio, loss, peak_lr

    def micro(self, imgs: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None,
              sync: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward + loss + backward of one micro-batch (loss scaled by 1/accum; DDP `no_sync` unless `sync`).
        Returns the detached (total, rec, cls) device tensors."""
        from supmae.losses import supmae_loss

        lw = self.loss
        with self._sync_ctx(sync):
            with autocast(imgs.device, self.amp_dtype):
                out = self.model(imgs, mask_ratio=self.mask_ratio, noise=noise)
                total, rec, cls = supmae_loss(out, labels, rec_weight=lw.rec_weight, cls_weight=lw.cls_weight,
                                              temperature=lw.temperature)
            self._backward(total)
        return total.detach(), rec.detach(), cls.detach()

    def __call__(self, imgs: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One whole optimiser step (micro + update; meant for accum == 1); the detached total loss."""
        total, _, _ = self.micro(imgs, labels, noise=noise, sync=True)
        self.update()
        return total


def build_pretrain_step(cfg: Any, device: torch.device, num_classes: int, *, world_size: int = 1, accum: int = 1,
                        model: nn.Module | None = None, ddp: bool = False) -> PretrainStep:
    """The step of `cfg` (a PretrainConfig) on `device`.

    The model comes from `cfg.model` unless given (then it is used as is, moved to `device`);
    AdamW from `cfg.optim` (the reference's weight-decay groups, `impl`, peak lr for the effective
    batch batch_size x accum x world_size); precision, TF32 and compile resolved from `cfg.train`
    and the device exactly as `supmae pretrain` resolves them. `ddp=True` wraps the model in
    DistributedDataParallel (a process group must exist).
    """
    from supmae.models import create_model

    tc = cfg.train
    precision = resolve_precision(tc.precision, device)
    set_matmul_precision(device, tc.deterministic)
    if model is None:
        overrides = cfg.model.overrides()
        overrides.setdefault("img_size", cfg.data.img_size)
        overrides.setdefault("num_classes", num_classes)
        model = create_model(cfg.model.name, **overrides)
    freeze_fixed_pos_embed(model)
    core = model.to(device)
    eff_batch = cfg.data.batch_size * accum * world_size
    peak = peak_lr(cfg.optim.blr, eff_batch, cfg.optim.lr)
    optimizer = build_adamw(param_groups(core, cfg.optim.weight_decay), lr=peak, betas=cfg.optim.betas,
                            device=device, impl=cfg.optim.impl)
    scaler = grad_scaler(device) if precision == "fp16" else None
    wrapped: nn.Module | None = None
    called: nn.Module = core
    if ddp:
        lw = cfg.loss
        # A branch whose loss weight is 0 gets no gradient: DDP must be told, or it waits for it.
        unused = (lw.cls_weight == 0 and core.cls_head is not None) or (lw.rec_weight == 0 and core.use_decoder)
        wrapped = wrap_ddp(core, device, find_unused_parameters=unused)
        called = wrapped
    compiled, reason = resolve_compile(tc.compile, device)
    called = maybe_compile(called, compiled, getattr(tc, "compile_backend", "auto"), device)
    return PretrainStep(core, called, wrapped, optimizer, scaler, precision, compiled, reason, accum,
                        cfg.model.mask_ratio, cfg.loss, peak)


class DownstreamStep(_Step):
    """The fine-tuning / linear-probing step: on-device random erasing, then mixup / cutmix, then the
    recipe's criterion. Attributes as `PretrainStep` (core is the downstream ViT) plus eraser,
    mixup, criterion, clip_grad and peak_lr."""

    def __init__(self, core: nn.Module, model: nn.Module, ddp: nn.Module | None, optimizer: torch.optim.Optimizer,
                 scaler: Any, precision: str, compiled: bool, compile_reason: str, accum: int, eraser: Any,
                 mixup: Any, criterion: nn.Module, clip_grad: float, peak_lr: float):
        self.core, self.model, self.ddp, self.optimizer, self.scaler = core, model, ddp, optimizer, scaler
        self.precision, self.amp_dtype = precision, amp_dtype_of(precision)
        self.compiled, self.compile_reason = compiled, compile_reason
        self.accum, self.eraser, self.mixup, self.criterion = accum, eraser, mixup, criterion
        self.clip_grad, self.peak_lr = clip_grad, peak_lr

    def micro(self, images: torch.Tensor, labels: torch.Tensor, sync: bool = True) -> torch.Tensor:
        """Augment on the device, forward, criterion, backward (scaled by 1/accum); the detached loss."""
        if self.eraser is not None:
            images = self.eraser(images)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with self._sync_ctx(sync):
            with autocast(images.device, self.amp_dtype):
                logits = self.model(images)
            loss = self.criterion(logits.float(), targets)
            self._backward(loss)
        return loss.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One whole optimiser step (micro + update; meant for accum == 1); the detached loss."""
        loss = self.micro(images, labels, sync=True)
        self.update()
        return loss


def build_downstream_step(cfg: Any, model: nn.Module, device: torch.device, num_classes: int, *,
                          world_size: int = 1, accum: int = 1, ddp: bool = False) -> DownstreamStep:
    """The step of `cfg` (a DownstreamConfig) for `model` (the downstream ViT) on `device`: the optimiser
    of the recipe (AdamW with layer decay, or LARS), its peak lr for the effective batch, the
    on-device augmentation and criterion, precision / TF32 / compile as the trainer resolves them."""
    tc = cfg.train
    precision = resolve_precision(tc.precision, device)
    set_matmul_precision(device, getattr(tc, "deterministic", False))
    core = model.to(device)
    eff_batch = cfg.data.batch_size * accum * world_size
    peak = peak_lr(cfg.optim.blr, eff_batch, cfg.optim.lr)
    optimizer = build_optimizer(cfg, core, peak, device)
    scaler = grad_scaler(device) if precision == "fp16" else None
    eraser, mixup, criterion = mixup_and_loss(cfg, num_classes, device)
    wrapped: nn.Module | None = None
    called: nn.Module = core
    if ddp:
        wrapped = wrap_ddp(core, device)
        called = wrapped
    compiled, reason = resolve_compile(tc.compile, device)
    called = maybe_compile(called, compiled, tc.compile_backend, device)
    return DownstreamStep(core, called, wrapped, optimizer, scaler, precision, compiled, reason, accum, eraser,
                          mixup, criterion, cfg.optim.clip_grad, peak)
