"""The training step of each method of the paper's Table 1, ready to be timed.

The SupMAE and MAE rows and the fine-tuning row are **the trainer's own steps**: the harness takes
the recipe (`supmae_vit_b16_400ep`, `mae_vit_b16_1600ep`, `vit_b16_ft100`), sets its geometry,
batch, precision and compile setting, and calls `supmae.train.steps.build_pretrain_step` /
`build_downstream_step`, so what is timed is exactly what `supmae pretrain` / `supmae finetune` run
(the same model, optimiser, precision, compile decision, loss and on-device augmentation). The
methods we do not train (MoCo v3, DeiT, MAE-scratch) are written here after their authors'
recipes, with the trainer's precision and compile resolution (`supmae.train.precision`, `.compiling`) and AdamW
implementation (`supmae.train.optim.build_adamw`). Nothing in a step reads a value back to the host.

    mocov3       MoCo v3 (Chen, Xie, He 2021), ViT recipe: two views, base encoder + projector
                 (3-layer MLP with BN) + predictor (2-layer MLP with BN), momentum encoder + projector
                 updated by EMA (m = 0.99), symmetric InfoNCE with temperature 0.2 (each term scaled
                 by 2T), frozen random patch projection, AdamW (lr 1.5e-4 x B/256, wd 0.1). The
                 ViT recipe uses AdamW; LARS is MoCo v3's ResNet recipe, so no row here uses LARS.
    mae          MAE: `supmae pretrain --recipe mae_vit_b16_1600ep`'s step: masked encoder (75 %),
                 8-block decoder, normalised-pixel reconstruction loss only, AdamW (0.9, 0.95), wd 0.05.
    deit         DeiT-B: full-token supervised ViT with class token, drop path 0.1, Mixup 0.8 /
                 CutMix 1.0 on the device, label smoothing 0.1 (soft-target CE), AdamW wd 0.05.
                 RandAugment and random erasing run in the data loader, not in the step.
    mae_scratch  Supervised ViT-B from scratch with MAE's recipe (MAE paper, appendix): global
                 average pool, drop path 0.1, Mixup/CutMix, label smoothing 0.1, AdamW (0.9, 0.95)
                 wd 0.3, weight EMA 0.9999.
    supmae       SupMAE: `supmae pretrain --recipe supmae_vit_b16_400ep`'s step: masked encoder
                 (75 %), 1-block decoder, 2-layer head on the visible tokens, rec + 0.01 x CE(logits / 10).
    finetune     `supmae finetune --recipe vit_b16_ft100`'s step, used by the pre-trained rows (MoCo v3
                 150 epochs, MAE and SupMAE 100): full-token ViT with global pool + fc_norm, drop path
                 0.1, random erasing 0.25 + Mixup/CutMix on the device, label smoothing 0.1, AdamW
                 with layer-wise lr decay 0.65, wd 0.05. RandAugment is a loader augmentation.

Geometry: `arch_for_scale(scale)` reads it from our SupMAE registry (base: ViT-B/16 at 224 px,
small: ViT-S/16, tiny: the CPU demo model at 32 px with patch 4), and the ViTs of the other rows
are built with the same width, depth, heads, image and patch size.

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

from benchmarks.timing import count_flops
from supmae.errors import UserError

METHODS: tuple[str, ...] = ("mocov3", "mae", "deit", "mae_scratch", "supmae", "finetune")
SCALES: dict[str, str] = {
    "base": "supmae_vit_base_patch16",
    "small": "supmae_vit_small_patch16",
    "tiny": "supmae_vit_tiny_patch4",
}
MASK_RATIO = 0.75
# The recipes whose steps the trainer rows run.
PRETRAIN_RECIPES = {"supmae": "supmae_vit_b16_400ep", "mae": "mae_vit_b16_1600ep"}
FINETUNE_RECIPE = "vit_b16_ft100"
TRAINER_METHODS = ("supmae", "mae", "finetune")


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
    registry_depth: int = 0  # the registry entry's own encoder depth (a --depth override differs)

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
        registry_depth=int(args["depth"]),
    )


@dataclass
class MethodStep:
    """One method's training step: `step(images, labels)` runs forward, loss, backward and the
    optimiser update, and returns the detached loss (still on the device: no host sync).

    `source` names the code that builds it (the trainer's `supmae.train.steps` for the SupMAE, MAE
    and fine-tuning rows); `precision`, `compiled` and `compile_reason` are resolved as the trainer
    resolves them."""

    name: str
    batch_size: int
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    modules: list[nn.Module]
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    compiled: bool = False
    compile_reason: str = ""
    source: str = "benchmarks.methods"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.step(images, labels)

    def num_params(self) -> int:
        """Parameters the optimiser updates."""
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])

    def flops_per_step(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        """Counted FLOPs of one real step on this batch (it does update the weights once)."""
        return count_flops(lambda: self.step(images, labels))


# ---- the trainer's rows: recipe -> config at the harness's geometry -> supmae.train.steps


def pretrain_config(method: str, arch: Arch, batch_size: int, precision: str = "auto", compile: str = "auto") -> Any:
    """The PretrainConfig `supmae pretrain --recipe R` would run for row `method`, at geometry `arch`."""
    from supmae.recipes import get_recipe

    cfg = get_recipe(PRETRAIN_RECIPES[method], "pretrain")
    if arch.scale != "base":
        # The recipe's decoder depth / head / loss are kept; only the encoder geometry changes.
        cfg.model.name = arch.supmae_name
    if arch.depth != arch.registry_depth:
        cfg.model.kwargs = {**cfg.model.kwargs, "depth": arch.depth}
    cfg.data.img_size = arch.img_size
    cfg.data.batch_size = batch_size
    cfg.train.precision = precision
    cfg.train.compile = compile
    return cfg


def finetune_config(arch: Arch, batch_size: int, precision: str = "auto", compile: str = "auto") -> Any:
    """The DownstreamConfig `supmae finetune --recipe vit_b16_ft100` would run, at geometry `arch`."""
    from supmae.recipes import get_recipe

    cfg = get_recipe(FINETUNE_RECIPE, "finetune")
    cfg.data.img_size = arch.img_size
    cfg.data.batch_size = batch_size
    cfg.train.precision = precision
    cfg.train.compile = compile
    return cfg


def finetune_model(arch: Arch, cfg: Any) -> nn.Module:
    """The downstream ViT `supmae finetune` builds for this geometry (encoder args as a checkpoint gives them)."""
    from supmae.models.vit import build_vit

    return build_vit(img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
                     num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, num_classes=arch.num_classes,
                     drop_path_rate=cfg.model.drop_path, feature=cfg.model.feature)


def _pretrain_row(method: str, arch: Arch, device: torch.device, batch_size: int, precision: str,
                  compile: str) -> MethodStep:
    from supmae.train.steps import build_pretrain_step

    cfg = pretrain_config(method, arch, batch_size, precision, compile)
    step = build_pretrain_step(cfg, device, arch.num_classes)
    return MethodStep(
        method, batch_size, step, step.optimizer, [step.core], extra={"model": step.core, "step": step, "cfg": cfg},
        precision=step.precision, compiled=step.compiled, compile_reason=step.compile_reason,
        source=f"supmae.train.steps.build_pretrain_step (recipe {cfg.recipe})",
    )


def _finetune_row(arch: Arch, device: torch.device, batch_size: int, precision: str, compile: str) -> MethodStep:
    from supmae.train.steps import build_downstream_step

    _check_even(batch_size)
    cfg = finetune_config(arch, batch_size, precision, compile)
    step = build_downstream_step(cfg, finetune_model(arch, cfg), device, arch.num_classes)
    return MethodStep(
        "finetune", batch_size, step, step.optimizer, [step.core], extra={"step": step, "cfg": cfg},
        precision=step.precision, compiled=step.compiled, compile_reason=step.compile_reason,
        source=f"supmae.train.steps.build_downstream_step (recipe {cfg.recipe})",
        notes="RandAugment is a loader (CPU) augmentation, not part of the step; random erasing and "
        "Mixup/CutMix run on the device inside it",
    )


# ---- the methods we do not train: written here, resolved as the trainer resolves its own


class _Runtime:
    """Precision, compile decision, scaler and AdamW implementation of a row, as the trainer's engine
    resolves them for `device` (on the meta device, used to count FLOPs: plain fp32, no compile)."""

    def __init__(self, device: torch.device, precision: str, compile: str):
        from supmae.train.compiling import resolve_compile
        from supmae.train.precision import amp_dtype_of, grad_scaler, resolve_precision

        self.device = device
        if device.type == "meta":
            self.precision, self.compiled, self.compile_reason, self.scaler = "fp32", False, "meta device", None
        else:
            self.precision = resolve_precision(precision, device)
            self.compiled, self.compile_reason = resolve_compile(compile, device)
            self.scaler = grad_scaler(device) if self.precision == "fp16" else None
        self.amp_dtype = amp_dtype_of(self.precision)

    def autocast(self) -> Any:
        from supmae.train.precision import autocast

        return autocast(self.device, self.amp_dtype)

    def compile(self, module: nn.Module) -> nn.Module:
        from supmae.train.compiling import maybe_compile

        return maybe_compile(module, self.compiled, "auto", self.device)

    def adamw(self, groups: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999),
              weight_decay: float | None = None) -> torch.optim.AdamW:
        from supmae.train.optim import build_adamw

        if not isinstance(groups, list) or not groups or not isinstance(groups[0], dict):
            groups = [{"params": list(groups), "weight_decay": weight_decay or 0.0}]
        # The meta device has no fused or foreach kernels; its update has no matmul FLOPs either way.
        impl = "for_loop" if self.device.type == "meta" else "auto"
        return build_adamw(groups, lr=lr, betas=betas, device=self.device, impl=impl)

    def backward_update(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            opt.step()

    def describe(self) -> dict[str, Any]:
        return {"precision": self.precision, "compiled": self.compiled, "compile_reason": self.compile_reason}


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


def _check_even(batch_size: int) -> None:
    if batch_size % 2:
        raise UserError(f"Mixup/CutMix pairs images within a batch: --batch-size must be even, got {batch_size}")


def _mixup(arch: Arch, batch_size: int) -> Any:
    """DeiT's / MAE's Mixup 0.8 + CutMix 1.0 (switch prob 0.5, per batch) with label smoothing 0.1."""
    _check_even(batch_size)
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


def build_mocov3(arch: Arch, device: torch.device, batch_size: int, precision: str = "auto",
                 compile: str = "auto") -> MethodStep:
    rt = _Runtime(device, precision, compile)
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
    opt = rt.adamw(trainable, lr=1.5e-4 * batch_size / 256, weight_decay=0.1)
    base_params = list(base.parameters())
    mom_params = list(momentum_enc.parameters())
    # The EMA update reads the bare modules' parameters; the compiled wrappers share them.
    base_c, predictor_c, momentum_c = rt.compile(base), rt.compile(predictor), rt.compile(momentum_enc)

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
        with rt.autocast():
            q1 = predictor_c(base_c(x1))
            q2 = predictor_c(base_c(x2))
            with torch.no_grad():
                torch._foreach_lerp_(mom_params, base_params, 1.0 - momentum)
                k1 = momentum_c(x1)
                k2 = momentum_c(x2)
            loss = contrastive(q1, k2) + contrastive(q2, k1)
        rt.backward_update(loss, opt)
        return loss.detach()

    return MethodStep(
        "mocov3", batch_size, step, opt, [base, predictor, momentum_enc],
        notes="second view = device-side flip of the loaded crop; momentum encoder forward on both views",
        **rt.describe(),
    )


def _build_supervised(
    name: str, arch: Arch, device: torch.device, batch_size: int, precision: str, compile: str, *,
    global_pool: str, lr: float, betas: tuple[float, float], weight_decay: float, ema: float | None = None,
    notes: str = "",
) -> MethodStep:
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import param_groups_weight_decay

    rt = _Runtime(device, precision, compile)
    model = _timm_vit(arch, num_classes=arch.num_classes, global_pool=global_pool, drop_path_rate=0.1)
    model = model.to(device).train()
    groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=model.no_weight_decay())
    opt = rt.adamw(groups, lr=lr, betas=betas)
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
    forward = rt.compile(model)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images, soft = mixup(images, labels)  # mixes in place on the device; soft targets [B, classes]
        with rt.autocast():
            logits = forward(images)
        loss = criterion(logits.float(), soft)
        rt.backward_update(loss, opt)
        if ema_model is not None:
            ema_model.update(model)
        return loss.detach()

    return MethodStep(name, batch_size, step, opt, modules, notes=notes, **rt.describe())


def build_deit(arch: Arch, device: torch.device, batch_size: int, precision: str = "auto",
               compile: str = "auto") -> MethodStep:
    return _build_supervised(
        "deit", arch, device, batch_size, precision, compile, global_pool="token", lr=5e-4 * batch_size / 512,
        betas=(0.9, 0.999), weight_decay=0.05,
        notes="RandAugment and random erasing are loader (CPU) augmentations, not part of the step; they are "
        "not run here (synthetic data, or a pipeline with the pretraining crop + flip)",
    )


def build_mae_scratch(arch: Arch, device: torch.device, batch_size: int, precision: str = "auto",
                      compile: str = "auto") -> MethodStep:
    return _build_supervised(
        "mae_scratch", arch, device, batch_size, precision, compile, global_pool="avg", lr=1e-4 * batch_size / 256,
        betas=(0.9, 0.95), weight_decay=0.3, ema=0.9999,
        notes="RandAugment is a loader (CPU) augmentation, not part of the step; not run here",
    )


def build_mae(arch: Arch, device: torch.device, batch_size: int, precision: str = "auto",
              compile: str = "auto") -> MethodStep:
    return _pretrain_row("mae", arch, device, batch_size, precision, compile)


def build_supmae(arch: Arch, device: torch.device, batch_size: int, precision: str = "auto",
                 compile: str = "auto") -> MethodStep:
    return _pretrain_row("supmae", arch, device, batch_size, precision, compile)


def build_finetune(arch: Arch, device: torch.device, batch_size: int, precision: str = "auto",
                   compile: str = "auto") -> MethodStep:
    return _finetune_row(arch, device, batch_size, precision, compile)


BUILDERS: dict[str, Callable[..., MethodStep]] = {
    "mocov3": build_mocov3,
    "mae": build_mae,
    "deit": build_deit,
    "mae_scratch": build_mae_scratch,
    "supmae": build_supmae,
    "finetune": build_finetune,
}


def build_step(method: str, arch: Arch, device: torch.device, batch_size: int, precision: str = "auto",
               compile: str = "auto") -> MethodStep:
    """The training step of `method` (one of METHODS) at geometry `arch` on `device`, with the
    trainer's `--train.precision` / `--train.compile` settings (`auto`: as the trainer picks)."""
    if method not in BUILDERS:
        raise UserError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if batch_size < 2:
        raise UserError(f"batch size must be at least 2 (BatchNorm and Mixup need pairs), got {batch_size}")
    return BUILDERS[method](arch, device, batch_size, precision, compile)


def count_step_flops(method: str, arch: Arch, batch_size: int) -> int:
    """FLOPs of one training step of `method`, counted on a replica on the meta device (shapes, no
    arithmetic, no memory). The trainer's rows count their network's forward + loss + backward (the
    optimiser update has no matmuls); the others run their whole step there."""
    meta = torch.device("meta")
    images = torch.empty(batch_size, 3, arch.img_size, arch.img_size, device=meta)
    labels = torch.zeros(batch_size, dtype=torch.long, device=meta)
    if method in PRETRAIN_RECIPES:
        from supmae.losses import supmae_loss
        from supmae.models import create_model

        cfg = pretrain_config(method, arch, batch_size)
        with meta:
            model = create_model(cfg.model.name, img_size=arch.img_size, num_classes=arch.num_classes,
                                 **cfg.model.overrides()).train()
        lw = cfg.loss

        def fwd_bwd() -> None:
            out = model(images, mask_ratio=cfg.model.mask_ratio)
            total, _, _ = supmae_loss(out, labels, rec_weight=lw.rec_weight, cls_weight=lw.cls_weight,
                                      temperature=lw.temperature)
            total.backward()

        return count_flops(fwd_bwd)
    if method == "finetune":
        cfg = finetune_config(arch, batch_size)
        with meta:
            model = finetune_model(arch, cfg).train()
        soft = torch.empty(batch_size, arch.num_classes, device=meta)
        return count_flops(lambda: torch.sum(-soft * F.log_softmax(model(images), dim=-1), dim=-1).mean().backward())
    step = build_step(method, arch, meta, batch_size)
    return step.flops_per_step(images, labels)


def model_flops_per_image(step: MethodStep, arch: Arch) -> dict[str, float] | None:
    """FLOPs per image from `supmae.models.flops` for the masked rows (None for the others)."""
    model = step.extra.get("model")
    if model is None:
        return None
    from supmae.models.flops import training_flops_per_image

    counts = training_flops_per_image(model, img_size=arch.img_size, mask_ratio=MASK_RATIO)
    return {k: float(v) for k, v in counts.items()}
