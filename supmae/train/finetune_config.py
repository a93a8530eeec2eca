"""The configuration of a fine-tuning or linear-probing run (Tables 4 and 5), as nested dataclasses.

Recipes (`supmae/recipes/finetune.py`) return filled-in instances; the command line changes any
leaf with a dotted override (`--optim.blr 5e-4`, `--aug.mixup 0`). No torch import here, so
listing recipes stays fast. Field names follow the pretraining config where they mean the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from supmae.train.data import DataConfig

TASKS = ("finetune", "linprobe")


@dataclass
class DownstreamModelConfig:
    """The downstream ViT. Its encoder shape comes from the pretrained checkpoint's `model_args`;
    for a checkpoint without them (the reference's) from `name` (a supmae model name, `--model`),
    else from the state dict's shapes. Without `--pretrained`, `name` is the architecture trained
    from random weights. `img_size` comes from `data.img_size` (position embeddings are resampled
    when it differs from the checkpoint's grid)."""

    name: str = ""
    feature: str = "avg"  # avg: global pool of patch tokens (fine-tune: + fc_norm) | token: cls token
    drop_path: float = 0.1  # stochastic depth rate (fine-tuning only; the probe's encoder is in eval mode)
    num_classes: int = 0  # 0 = the dataset's number of classes


@dataclass
class DownstreamOptimConfig:
    """Optimiser and schedule. Peak lr = `lr` when set, else `blr * effective batch / 256`, where the
    effective batch is batch_size x accum_iter x world_size."""

    name: str = "adamw"  # adamw (fine-tuning) | lars (linear probing; timm's Lars)
    blr: float = 1e-3
    lr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float = 0.05  # none on 1-D params, biases, pos_embed, cls_token
    # Layer-wise lr decay: layer id 0 = embeddings, i + 1 = block i, depth + 1 = head; lr scale =
    # layer_decay^(depth + 1 - id). 1.0 disables.
    layer_decay: float = 0.65
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    momentum: float = 0.9  # LARS
    # LARS: False is the reference's rule (the trust ratio scales matrices only; biases take plain SGD
    # steps at the full lr); True adapts every parameter, as timm's Lars does with weight decay on.
    lars_adapt_1d: bool = False
    warmup_epochs: float = 5.0
    accum_iter: int = 1
    # The recipe's effective batch; when > 0 and accum_iter is 1, accum_iter is derived from it as
    # effective_batch / (batch_size * world_size), so the recipe's batch holds on any number of devices.
    effective_batch: int = 0
    clip_grad: float = 0.0  # max gradient norm; 0 = no clipping (the reference's default)
    impl: str = "auto"  # AdamW kernel: auto | fused | foreach | for_loop


@dataclass
class AugConfig:
    """Batch-level augmentation applied on the device inside the loop (works with every pipeline):
    random erasing (timm `RandomErasing`, per sample) then mixup / cutmix (timm `Mixup`, one lambda
    per batch) with label smoothing folded into the soft targets."""

    mixup: float = 0.8  # mixup alpha; 0 disables
    cutmix: float = 1.0  # cutmix alpha; 0 disables
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"  # batch | pair | elem
    smoothing: float = 0.1  # label smoothing
    reprob: float = 0.25  # random erasing probability; 0 disables
    remode: str = "pixel"  # random erasing fill: pixel | rand | const
    recount: int = 1  # erased boxes per image


@dataclass
class DownstreamTrainConfig:
    """How the loop runs."""

    epochs: int = 100
    log_every: int = 20  # steps between reads of the device-side loss sums (steps.jsonl lines)
    save_every: int = 0  # epochs between numbered checkpoints; 0 = only checkpoint-last / checkpoint-best
    # checkpoint-last.pth also inside epochs, every this many minutes (0: at epoch ends only); see pretraining's
    checkpoint_minutes: float = 10.0
    trace_samples: bool = False  # samples.jsonl: each global step's sorted sample indices
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (CUDA, with a grad scaler)
    device: str = "auto"  # auto | cpu | cuda
    compile: str = "auto"  # auto (on for CUDA) | on | off
    compile_backend: str = "auto"  # torch.compile backend: auto (inductor) | aot_eager (no C++ compiler needed) | ...
    deterministic: bool = False  # deterministic kernels (and exact resume on the CPU)
    eval_every: int = 1  # epochs between evaluations on the val split (the last epoch is always evaluated)
    max_steps_per_epoch: int = 0  # micro-batches per epoch; 0 = the whole epoch
    # Stop after this many epochs in one invocation (0 = run to `epochs`); the lr schedule still spans
    # `epochs`, and --resume auto continues.
    epochs_per_run: int = 0
    progress: bool = True  # tqdm progress bar (only when stderr is a terminal)
    cpu_threads: int = 0  # torch intra-op threads on the CPU; 0 = torch's default (one per core)
    dist_timeout_s: float = 600.0


@dataclass
class DownstreamConfig:
    """A whole fine-tuning or linear-probing run."""

    task: str = "finetune"  # finetune | linprobe
    recipe: str = ""
    pretrained: str = ""  # pretraining checkpoint (ours or the reference's); "" = random init (needs model.name)
    seed: int = 0
    output_dir: str = ""
    resume: str = ""  # "" = fresh run, "auto" = newest valid checkpoint of output_dir, or a checkpoint path
    model: DownstreamModelConfig = field(default_factory=DownstreamModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: DownstreamOptimConfig = field(default_factory=DownstreamOptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: DownstreamTrainConfig = field(default_factory=DownstreamTrainConfig)
