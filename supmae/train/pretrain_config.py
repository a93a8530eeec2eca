"""The configuration of a pretraining run: small dataclasses, one per component, nested in `PretrainConfig`.

Recipes (`supmae/recipes/pretrain.py`) return filled-in instances; the command line changes any
leaf with a dotted override (`--optim.blr 1e-4`, `--model.decoder_depth 8`). No torch import
here, so listing recipes stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from supmae.train.data import DataConfig


@dataclass
class ModelConfig:
    """Which network to build: a registry name plus constructor overrides (None keeps the registry's value).

    `img_size` comes from `data.img_size` and `num_classes` from the dataset; `kwargs` passes any other
    constructor argument (e.g. `{"embed_dim": 64, "depth": 2}` for a smaller test model)."""

    name: str = "supmae_vit_base_patch16"
    mask_ratio: float = 0.75  # fraction of patches removed (a forward argument, not a constructor one)
    decoder_depth: int | None = None
    norm_pix_loss: bool | None = None
    global_pool: bool | None = None
    cls_head_layers: int | None = None  # 0 = no classification branch (MAE)
    cls_hidden_dim: int | None = None
    use_decoder: bool | None = None  # False = classification-only ablation
    attn_impl: str = "sdpa"  # sdpa | eager
    kwargs: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        """Constructor keyword arguments set by this config (None fields left to the registry)."""
        out = dict(self.kwargs)
        for key in ("decoder_depth", "norm_pix_loss", "global_pool", "cls_head_layers", "cls_hidden_dim",
                    "use_decoder"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["attn_impl"] = self.attn_impl
        return out


@dataclass
class OptimConfig:
    """AdamW and its schedule. The peak lr is `lr` when set, else `blr * effective_batch / 256`."""

    blr: float = 1.5e-4
    lr: float | None = None  # absolute peak lr; overrides blr
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    min_lr: float = 0.0
    warmup_epochs: float = 20.0
    accum_iter: int = 1  # micro-batches per optimiser step
    # The recipe's effective batch; when > 0 and accum_iter is 1, accum_iter is derived from it as
    # effective_batch / (batch_size * world_size) so the recipe's batch holds on any number of devices.
    effective_batch: int = 0
    impl: str = "auto"  # auto | fused | foreach | for_loop (auto: fused on CUDA, foreach on CPU)


@dataclass
class LossConfig:
    """`L = rec_weight * L_rec + cls_weight * CE(logits / temperature, y)`."""

    rec_weight: float = 1.0
    cls_weight: float = 0.01
    temperature: float = 10.0


@dataclass
class TrainConfig:
    """How the loop runs."""

    epochs: int = 400  # epochs of the lr schedule, and epochs this run trains
    planned_epochs: int = 0  # the recipe's full length (logged as total_epochs); 0 = epochs
    # Stop after this many epochs in one invocation (0 = run to `epochs`); the lr schedule still spans
    # `epochs`, and --resume auto continues: for job time limits, or timing a few epochs of a long recipe.
    epochs_per_run: int = 0
    log_every: int = 20  # steps between reads of the device-side loss sums (steps.jsonl lines)
    save_every: int = 50  # epochs between numbered checkpoints (checkpoint-last.pth is written every epoch)
    # checkpoint-last.pth also inside epochs, every this many minutes (0: at epoch ends only). Written in the
    # background (the loop waits for a host snapshot, ~0.1 s for ViT-B with AdamW on a GPU), so a kill loses
    # at most this much; 10 keeps the stall under 0.02% of the run. A float: a test can use a fraction.
    checkpoint_minutes: float = 10.0
    # samples.jsonl: each global step's sorted sample indices (compare runs on different rank counts)
    trace_samples: bool = False
    val_every: int = 1  # epochs between evaluations of the classification branch (the last one always)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (CUDA, with a grad scaler)
    compile: str = "auto"  # auto (on for CUDA) | on | off
    compile_backend: str = "auto"  # torch.compile backend: auto (inductor) | aot_eager (no C++ compiler needed) | ...
    deterministic: bool = False  # deterministic kernels (and exact resume on the CPU)
    device: str = "auto"  # auto | cpu | cuda
    max_steps_per_epoch: int = 0  # micro-batches per epoch; 0 = the whole epoch
    val: bool = True  # top-1 of the classification branch on the val split each epoch, when there is one
    tensorboard: bool = False  # also write TensorBoard scalars (needs the tensorboard package)
    progress: bool = True  # tqdm progress bar (only when stderr is a terminal)
    dist_timeout_s: float = 600.0  # timeout of distributed init and collectives
    cpu_threads: int = 0  # torch intra-op threads on the CPU; 0 = torch's default (one per core)
    # CUDA: torch.cuda.set_sync_debug_mode over the steps between log reads (after the first 3): "warn"
    # reports each host sync the step makes, "error" stops at the first; "off" (default) watches nothing.
    sync_debug: str = "off"


@dataclass
class PretrainConfig:
    """A whole pretraining run."""

    recipe: str = ""
    seed: int = 0
    output_dir: str = ""
    resume: str = ""  # "" = fresh run, "auto" = newest valid checkpoint of output_dir, or a checkpoint path
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
