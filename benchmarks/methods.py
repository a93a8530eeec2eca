"""The real training step of each method of the paper's Table 1, ready to be timed.

Each step is one optimiser iteration of its method as its authors ran it on ViT-B/16 (or the
same geometry scaled down): forward, loss, backward, optimiser step, in the run's precision (bf16
autocast on GPU, fp32 on CPU). Nothing in a step reads a value back to the host.

    mocov3       MoCo v3 (Chen, Xie, He 2021), ViT recipe: two views, base encoder + projector
                 (3-layer MLP with BN) + predictor (2-layer MLP with BN), momentum encoder + projector
                 updated by EMA (m = 0.99), symmetric InfoNCE with temperature 0.2 (each term scaled
                 by 2T), frozen random patch projection, AdamW (lr 1.5e-4 x B/256, wd 0.1). The
                 ViT recipe uses AdamW; LARS is MoCo v3's ResNet recipe, so no row here uses LARS.
    mae          MAE: masked encoder (75 %), 8-block decoder, reconstruction loss only (normalised
                 pixels), AdamW (0.9, 0.95), wd 0.05.
    deit         DeiT-B: full-token supervised ViT with class token, drop path 0.1, Mixup 0.8 /
                 CutMix 1.0 on the device, label smoothing 0.1 (soft-target CE), AdamW wd 0.05.
                 RandAugment and random erasing run in the data loader, not in the step.
    mae_scratch  Supervised ViT-B from scratch with MAE's recipe (MAE paper, appendix): global
                 average pool, drop path 0.1, Mixup/CutMix, label smoothing 0.1, AdamW (0.9, 0.95)
                 wd 0.3, weight EMA 0.9999.
    supmae       SupMAE: masked encoder (75 %), 1-block decoder, classification head on the visible
                 tokens, loss rec + 0.01 x CE(logits / 10), AdamW (0.9, 0.95), wd 0.05.
    finetune     The fine-tuning step of the pre-trained rows (MoCo v3 150 epochs, MAE and SupMAE
                 100): full-token ViT with global pool, drop path 0.1, Mixup/CutMix, label
                 smoothing 0.1, AdamW with layer-wise lr decay 0.65, wd 0.05.

Geometry: `arch_for_scale(scale)` reads it from our SupMAE registry (base: ViT-B/16 at 224 px,
small: ViT-S/16, tiny: the CPU demo model at 32 px with patch 4), and the timm ViTs of the other
rows are built with the same width, depth, heads, image and patch size.

Legend: B batch, C channels, H/W image size, D embedding width, K projection dim.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import autocast, count_flops, fused_adamw
from supmae.errors import UserError

METHODS: tuple[str, ...] = ("mocov3", "mae", "deit", "mae_scratch", "supmae", "finetune")
SCALES: dict[str, str] = {
    "base": "supmae_vit_base_patch16",
    "small": "supmae_vit_small_patch16",
    "tiny": "supmae_vit_tiny_patch4",
}
MASK_RATIO = 0.75


@dataclass(frozen=True)
class Arch:
    """ViT geometry shared by every row, plus the SupMAE registry entry it came from."""

    scale: str
    supmae_name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    num_classes: int

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def arch_for_scale(scale: str, num_classes: int | None = None, depth: int | None = None) -> Arch:
    """The geometry of `scale` (base | small | tiny) from the SupMAE registry, with the number of
    classes (e.g. the dataset's) and the depth optionally overridden."""
    if scale not in SCALES:
        raise UserError(f"unknown --model-scale {scale!r}: choose one of {', '.join(SCALES)}")
    from supmae.models import model_defaults

    name = SCALES[scale]
    args = model_defaults(name)
    return Arch(
        scale=scale,
        supmae_name=name,
        img_size=int(args["img_size"]),
        patch_size=int(args["patch_size"]),
        embed_dim=int(args["embed_dim"]),
        depth=int(depth if depth is not None else args["depth"]),
        num_heads=int(args["num_heads"]),
        mlp_ratio=float(args["mlp_ratio"]),
        num_classes=int(num_classes if num_classes is not None else args["num_classes"]),
    )


@dataclass
class MethodStep:
    """One method's training step: `step(images, labels)` runs forward, loss, backward and the
    optimiser update, and returns the detached loss (still on the device: no host sync)."""

    name: str
    batch_size: int
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    modules: list[nn.Module]
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.step(images, labels)

    def num_params(self) -> int:
        """Parameters the optimiser updates."""
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])

    def flops_per_step(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        """Counted FLOPs of one real step on this batch (it does update the weights once)."""
        return count_flops(lambda: self.step(images, labels))


def count_step_flops(method: str, arch: Arch, batch_size: int) -> int:
    """FLOPs of one training step of `method`, counted on a replica built on the meta device: the
    same code path as the timed step, with shapes but no arithmetic and no memory."""
    meta = torch.device("meta")
    step = build_step(method, arch, meta, batch_size, None)
    images = torch.empty(batch_size, 3, arch.img_size, arch.img_size, device=meta)
    labels = torch.zeros(batch_size, dtype=torch.long, device=meta)
    return step.flops_per_step(images, labels)


def _timm_vit(arch: Arch, **kw: Any) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        qkv_bias=True,
        **kw,
    )


def _mixup(arch: Arch, batch_size: int) -> Any:
    """DeiT's / MAE's Mixup 0.8 + CutMix 1.0 (switch prob 0.5, per batch) with label smoothing 0.1."""
    if batch_size % 2:
        raise UserError(f"Mixup/CutMix pairs images within a batch: --batch-size must be even, got {batch_size}")
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
        label_smoothing=0.1, num_classes=arch.num_classes,
    )


def _moco_mlp(num_layers: int, in_dim: int, hidden: int, out: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's MLP: Linear(no bias)-BN-ReLU repeated, the last Linear optionally followed by a
    non-affine BN (the projector has it, the predictor does not)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden
        d_out = out if i == num_layers - 1 else hidden
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def _moco_dims(arch: Arch) -> tuple[int, int]:
    """(MLP hidden, output dim): MoCo v3 uses 4096 / 256 for ViT-S and ViT-B; scaled below that."""
    if arch.embed_dim >= 384:
        return 4096, 256
    return 4 * arch.embed_dim, arch.embed_dim


def build_mocov3(arch: Arch, device: torch.device, batch_size: int, dtype: torch.dtype | None) -> MethodStep:
    temperature, momentum = 0.2, 0.99
    hidden, dim = _moco_dims(arch)
    # num_classes=0 leaves the class-token feature [B, D]; MoCo v3 puts its projector there.
    encoder = _timm_vit(arch, num_classes=0)
    # MoCo v3's stability trick for ViT: the random patch projection stays frozen.
    for p in encoder.patch_embed.parameters():
        p.requires_grad_(False)
    projector = _moco_mlp(3, arch.embed_dim, hidden, dim, last_bn=True)
    predictor = _moco_mlp(2, dim, hidden, dim, last_bn=False)
    base = nn.Sequential(encoder, projector).to(device).train()
    predictor = predictor.to(device).train()
    momentum_enc = copy.deepcopy(base)
    for p in momentum_enc.parameters():
        p.requires_grad_(False)
    trainable = [p for p in list(base.parameters()) + list(predictor.parameters()) if p.requires_grad]
    opt = fused_adamw(trainable, device, lr=1.5e-4 * batch_size / 256, weight_decay=0.1)
    base_params = list(base.parameters())
    mom_params = list(momentum_enc.parameters())

    def contrastive(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q.float(), dim=1)  # [B, K]
        k = F.normalize(k.float(), dim=1)  # [B, K]
        logits = q @ k.t() / temperature  # [B, B]: positives on the diagonal
        targets = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, targets) * (2 * temperature)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Two augmented views. The synthetic batch and a loader give one crop per image; the second
        # view is its mirror image, made on the device (MoCo v3's own second crop is CPU work).
        x1, x2 = images, images.flip(3)
        with autocast(device, dtype):
            q1 = predictor(base(x1))
            q2 = predictor(base(x2))
            with torch.no_grad():
                torch._foreach_lerp_(mom_params, base_params, 1.0 - momentum)
                k1 = momentum_enc(x1)
                k2 = momentum_enc(x2)
            loss = contrastive(q1, k2) + contrastive(q2, k1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return MethodStep(
        "mocov3", batch_size, step, opt, [base, predictor, momentum_enc],
        notes="second view = device-side flip of the loaded crop; momentum encoder forward on both views",
    )


def _masked_model(arch: Arch, device: torch.device, decoder_depth: int, cls_head_layers: int) -> nn.Module:
    from supmae.models import create_model

    model = create_model(
        arch.supmae_name,
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        num_classes=arch.num_classes,
        decoder_depth=decoder_depth,
        cls_head_layers=cls_head_layers,
        norm_pix_loss=True,
        attn_impl="sdpa",
    )
    return model.to(device).train()


def _build_masked(
    name: str, arch: Arch, device: torch.device, batch_size: int, dtype: torch.dtype | None,
    decoder_depth: int, cls_head_layers: int, cls_weight: float,
) -> MethodStep:
    from timm.optim import param_groups_weight_decay

    from supmae.losses import supmae_loss

    model = _masked_model(arch, device, decoder_depth, cls_head_layers)
    # Reference grouping: no decay on 1-D parameters and biases (so cls/mask tokens are decayed).
    groups = param_groups_weight_decay(model, weight_decay=0.05)
    opt = fused_adamw(groups, device, lr=1.5e-4 * batch_size / 256, betas=(0.9, 0.95))

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            out = model(images, mask_ratio=MASK_RATIO)
            total, _, _ = supmae_loss(out, labels, rec_weight=1.0, cls_weight=cls_weight, temperature=10.0)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return total.detach()

    return MethodStep(name, batch_size, step, opt, [model], extra={"model": model})


def build_mae(arch: Arch, device: torch.device, batch_size: int, dtype: torch.dtype | None) -> MethodStep:
    return _build_masked("mae", arch, device, batch_size, dtype, decoder_depth=8, cls_head_layers=0, cls_weight=0.0)


def build_supmae(arch: Arch, device: torch.device, batch_size: int, dtype: torch.dtype | None) -> MethodStep:
    return _build_masked(
        "supmae", arch, device, batch_size, dtype, decoder_depth=1, cls_head_layers=2, cls_weight=0.01
    )


def _build_supervised(
    name: str, arch: Arch, device: torch.device, batch_size: int, dtype: torch.dtype | None, *,
    global_pool: str, lr: float, betas: tuple[float, float], weight_decay: float,
    layer_decay: float | None = None, ema: float | None = None, notes: str = "",
) -> MethodStep:
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    model = _timm_vit(arch, num_classes=arch.num_classes, global_pool=global_pool, drop_path_rate=0.1)
    model = model.to(device).train()
    skip = model.no_weight_decay()
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
        # timm's lr_scale is for a scheduler; the timed step applies it once so the groups differ.
        for g in groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)
    opt = fused_adamw(groups, device, lr=lr, betas=betas)
    mixup = _mixup(arch, batch_size)
    criterion = SoftTargetCrossEntropy()
    ema_model = None
    # On the meta device (FLOP counting) the EMA is left out: its lerp has no counted FLOPs, and
    # timm's EMA does not run on meta tensors.
    if ema is not None and device.type != "meta":
        import timm.utils

        ema_cls = getattr(timm.utils, "ModelEmaV3", None) or timm.utils.ModelEmaV2
        ema_model = ema_cls(model, decay=ema)
    modules: list[nn.Module] = [model] + ([ema_model] if ema_model is not None else [])

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images, soft = mixup(images, labels)  # mixes in place on the device; soft targets [B, classes]
        with autocast(device, dtype):
            loss = criterion(model(images), soft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema_model is not None:
            ema_model.update(model)
        return loss.detach()

    return MethodStep(name, batch_size, step, opt, modules, notes=notes)


def build_deit(arch: Arch, device: torch.device, batch_size: int, dtype: torch.dtype | None) -> MethodStep:
    return _build_supervised(
        "deit", arch, device, batch_size, dtype, global_pool="token", lr=5e-4 * batch_size / 512,
        betas=(0.9, 0.999), weight_decay=0.05,
        notes="RandAugment and random erasing are loader (CPU) augmentations, not part of the step; they are "
        "not run here (synthetic data, or a pipeline with the pretraining crop + flip)",
    )


def build_mae_scratch(arch: Arch, device: torch.device, batch_size: int, dtype: torch.dtype | None) -> MethodStep:
    return _build_supervised(
        "mae_scratch", arch, device, batch_size, dtype, global_pool="avg", lr=1e-4 * batch_size / 256,
        betas=(0.9, 0.95), weight_decay=0.3, ema=0.9999,
        notes="RandAugment is a loader (CPU) augmentation, not part of the step; not run here",
    )


def build_finetune(arch: Arch, device: torch.device, batch_size: int, dtype: torch.dtype | None) -> MethodStep:
    return _build_supervised(
        "finetune", arch, device, batch_size, dtype, global_pool="avg", lr=1e-3 * batch_size / 256,
        betas=(0.9, 0.999), weight_decay=0.05, layer_decay=0.65,
        notes="RandAugment and random erasing are loader (CPU) augmentations, not part of the step; not run here",
    )


BUILDERS: dict[str, Callable[[Arch, torch.device, int, torch.dtype | None], MethodStep]] = {
    "mocov3": build_mocov3,
    "mae": build_mae,
    "deit": build_deit,
    "mae_scratch": build_mae_scratch,
    "supmae": build_supmae,
    "finetune": build_finetune,
}


def build_step(
    method: str, arch: Arch, device: torch.device, batch_size: int, dtype: torch.dtype | None
) -> MethodStep:
    """The training step of `method` (one of METHODS) at geometry `arch` on `device`."""
    if method not in BUILDERS:
        raise UserError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if batch_size < 2:
        raise UserError(f"batch size must be at least 2 (BatchNorm and Mixup need pairs), got {batch_size}")
    return BUILDERS[method](arch, device, batch_size, dtype)


def model_flops_per_image(step: MethodStep, arch: Arch) -> dict[str, float] | None:
    """FLOPs per image from `supmae.models.flops` for the masked rows (None for the others)."""
    model = step.extra.get("model")
    if model is None:
        return None
    from supmae.models.flops import training_flops_per_image

    counts = training_flops_per_image(model, img_size=arch.img_size, mask_ratio=MASK_RATIO)
    return {k: float(v) for k, v in counts.items()}
