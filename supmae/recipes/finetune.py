"""Downstream recipes: fine-tuning (Table 4), linear probing (Table 5) and their CPU demos.

Each is a zero-argument function returning a fresh `DownstreamConfig`; `supmae finetune|linprobe
--recipe NAME --pretrained CKPT` starts from it and applies dotted overrides. The paper's recipes
keep its effective batch (1024 / 8192) on any number of devices by deriving gradient accumulation
(`optim.effective_batch`); the lr follows the linear scaling rule on the batch actually used.

Where each augmentation runs: RandomResizedCrop, flip and RandAugment in the data pipeline
(RandAugment runs in the dali pipeline, as graph operators on the GPU, and in the torchvision one
with timm's PIL policy; ffcv refuses it, so `--data.randaugment ''` fine-tunes from FFCV without
it); random erasing, mixup and cutmix on the device inside the step, with any pipeline. Each
recipe reads with the fastest pipeline that implements its augmentation.
"""

from __future__ import annotations

from supmae.recipes import register
from supmae.train.data import DataConfig
from supmae.train.finetune_config import (
    AugConfig,
    DownstreamConfig,
    DownstreamModelConfig,
    DownstreamOptimConfig,
    DownstreamTrainConfig,
)

__all__ = ["DownstreamConfig"]

RANDAUGMENT_T4 = "rand-m9-mstd0.5-inc1"


@register("finetune")
def vit_b16_ft100() -> DownstreamConfig:
    """Table 4: fine-tune ViT-B/16 100 epochs: AdamW (0.9, 0.999), blr 1e-3, wd 0.05, layer decay 0.65, batch 1024.

    5 warmup epochs then cosine per iteration to 1e-6; RandAugment rand-m9-mstd0.5-inc1, label
    smoothing 0.1, random erasing 0.25 (pixel), mixup 0.8, cutmix 1.0 (switch 0.5, per batch),
    drop path 0.1; global pool + fc_norm; RandomResizedCrop(224, scale 0.08-1) + flip. Reads with the
    dali pipeline, the fastest that implements RandAugment (nvJPEG decode and the policy as GPU graph
    operators; its differences from timm's policy are listed in `pipelines/dali_randaugment.py`);
    `--data.pipeline torchvision` runs timm's own policy on the CPU.
    """
    return DownstreamConfig(
        task="finetune",
        recipe="vit_b16_ft100",
        model=DownstreamModelConfig(feature="avg", drop_path=0.1),
        data=DataConfig(pipeline="dali", batch_size=128, num_workers=10, img_size=224, scale_min=0.08,
                        randaugment=RANDAUGMENT_T4),
        optim=DownstreamOptimConfig(name="adamw", blr=1e-3, min_lr=1e-6, weight_decay=0.05, layer_decay=0.65,
                                    betas=(0.9, 0.999), warmup_epochs=5.0, effective_batch=1024),
        aug=AugConfig(mixup=0.8, cutmix=1.0, mixup_prob=1.0, switch_prob=0.5, mixup_mode="batch", smoothing=0.1,
                      reprob=0.25, remode="pixel", recount=1),
        train=DownstreamTrainConfig(epochs=100, log_every=50),
    )


@register("linprobe")
def vit_b16_lin90() -> DownstreamConfig:
    """Table 5: linear probe of ViT-B/16 90 epochs: LARS, blr 0.1, wd 0, batch 8192, 10 warmup, cls token.

    Frozen encoder (eval mode, no gradient), head BatchNorm1d(affine=False, eps 1e-6) -> Linear
    (trunc normal std 0.01); RandomResizedCrop(224, scale 0.08-1) + flip, no other augmentation.
    """
    return DownstreamConfig(
        task="linprobe",
        recipe="vit_b16_lin90",
        model=DownstreamModelConfig(feature="token", drop_path=0.0),
        data=DataConfig(pipeline="ffcv", batch_size=1024, num_workers=10, img_size=224, scale_min=0.08),
        optim=DownstreamOptimConfig(name="lars", blr=0.1, min_lr=0.0, weight_decay=0.0, layer_decay=1.0,
                                    momentum=0.9, warmup_epochs=10.0, effective_batch=8192),
        aug=_no_aug(),
        train=DownstreamTrainConfig(epochs=90, log_every=20),
    )


def _no_aug() -> AugConfig:
    return AugConfig(mixup=0.0, cutmix=0.0, smoothing=0.0, reprob=0.0)


@register("finetune")
def tiny_cpu_ft() -> DownstreamConfig:
    """CPU demo: fine-tune a `tiny_cpu` pretraining checkpoint (supmae_vit_tiny_patch4, 32x32) for a few epochs.

    Every part of Table 4 is on (layer decay 0.65, AdamW, RandAugment, random erasing, mixup /
    cutmix, label smoothing, drop path, global pool + fc_norm); what differs and why: batch 32
    and a higher base lr (blr 1e-2, one warmup epoch), because a few hundred steps of a small
    model need them; RandomResizedCrop scale 0.35-1 instead of 0.08-1, RandAugment magnitude 5
    and mixup / cutmix at half strength, because the generated classes are shapes that a 8% crop
    of a 64 px image no longer shows. `--model supmae_vit_tiny_patch4` without --pretrained
    trains that encoder from random weights instead.
    """
    return DownstreamConfig(
        task="finetune",
        recipe="tiny_cpu_ft",
        model=DownstreamModelConfig(feature="avg", drop_path=0.1),
        data=DataConfig(pipeline="torchvision", batch_size=32, num_workers=2, img_size=32, scale_min=0.35,
                        randaugment="rand-m5-mstd0.5-inc1"),
        optim=DownstreamOptimConfig(name="adamw", blr=1e-2, min_lr=1e-6, weight_decay=0.05, layer_decay=0.65,
                                    betas=(0.9, 0.999), warmup_epochs=1.0),
        aug=AugConfig(mixup=0.4, cutmix=0.5, mixup_prob=1.0, switch_prob=0.5, mixup_mode="batch", smoothing=0.1,
                      reprob=0.25, remode="pixel", recount=1),
        train=DownstreamTrainConfig(epochs=8, log_every=5, device="auto"),
    )


@register("linprobe")
def tiny_cpu_lin() -> DownstreamConfig:
    """CPU demo: linear probe of a `tiny_cpu` pretraining checkpoint (supmae_vit_tiny_patch4, 32x32).

    As Table 5 (LARS with momentum 0.9 and trust coefficient 1e-3, wd 0, frozen encoder,
    BatchNorm -> Linear head) except, and why: the mean of the patch tokens as the feature (the
    one tiny_cpu's classification branch pools; its cls token is never trained by the pretext
    task); batch 32 and blr 128 (lr 16, one warmup epoch), because LARS moves each weight by about
    lr x 1e-3 of its norm per step and a few hundred steps must do; the trust ratio also on the
    bias (`lars_adapt_1d`), because with 10 classes plain SGD steps on it at that lr diverge;
    RandomResizedCrop scale 0.35-1, as in tiny_cpu_ft. It reads FFCV (`supmae convert` output);
    set --data.pipeline torchvision to read an ImageFolder tree directly.
    """
    return DownstreamConfig(
        task="linprobe",
        recipe="tiny_cpu_lin",
        model=DownstreamModelConfig(feature="avg", drop_path=0.0),
        data=DataConfig(pipeline="ffcv", batch_size=32, num_workers=2, img_size=32, scale_min=0.35),
        optim=DownstreamOptimConfig(name="lars", blr=128.0, min_lr=0.0, weight_decay=0.0, layer_decay=1.0,
                                    momentum=0.9, lars_adapt_1d=True, warmup_epochs=1.0),
        aug=_no_aug(),
        train=DownstreamTrainConfig(epochs=8, log_every=5, device="auto"),
    )
