"""The data section of a run config and how it becomes a pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from supmae.errors import UserError


@dataclass
class DataConfig:
    """Where the data is and how it is read. `path` is a directory written by `supmae convert`
    (ffcv / dali read it; torchvision reads the raw ImageFolder tree its manifest names when that is
    still there, else the JPEG bytes it stored) or, for the torchvision pipeline only, an ImageFolder
    root."""

    path: str = ""
    pipeline: str = "ffcv"  # ffcv | dali | torchvision
    batch_size: int = 64  # per device
    num_workers: int = 2
    img_size: int = 224
    train_split: str = "train"
    val_split: str = "val"
    scale_min: float = 0.2  # RandomResizedCrop scale lower bound (paper: 0.2 pretrain, 0.08 downstream)
    color_jitter: float = 0.0  # Table 2c ablation; 0 disables
    randaugment: str = ""  # timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1"; "" disables
    os_cache: bool = True  # ffcv: memory-map the whole file (fits ImageNet at 256 px in RAM)
    batches_ahead: int = 3  # ffcv / dali prefetch depth

    def check_available(self) -> None:
        """A pipeline whose library is missing here (a recipe's default, say: the fine-tuning recipes read
        with dali) stops the job in one line naming the pipelines that do work here."""
        from pipelines import KINDS, available

        reason = available(self.pipeline)
        if not reason or self.pipeline not in KINDS:
            return  # an unknown name is refused by the pipelines themselves, with the list of names
        # ffcv before torchvision (the faster where both are installed), unless RandAugment is on: ffcv refuses it.
        working = [k for k in ("ffcv", "torchvision", "dali") if k != self.pipeline and not available(k)
                   and not (k == "ffcv" and self.randaugment)]
        hint = {"dali": " (scripts/setup.sh installs the DALI wheel matching torch's CUDA)",
                "ffcv": " (scripts/setup.sh builds it; see the README's install section)"}.get(self.pipeline, "")
        raise UserError(f"the {self.pipeline} pipeline is unavailable here: {reason}{hint}; "
                        + (f"use --data.pipeline {working[0]}" + (f" (also available: {', '.join(working[1:])})"
                                                                  if working[1:] else "")
                           if working else "no other pipeline is available either"))

    def build(self, split: str, train: bool, device: Any, rank: int = 0, world_size: int = 1, seed: int = 0,
              batch_size: int | None = None) -> Any:
        """A `pipelines` loader for `split`; train=True applies the training augmentation."""
        if not self.path:
            raise UserError("no dataset given: set --data.path DIR (a directory written by 'supmae convert')")
        from pipelines import ReadSpec, open_pipeline

        self.check_available()
        spec = ReadSpec(
            self.pipeline,
            self.path,
            split=split,
            batch_size=batch_size or self.batch_size,
            img_size=self.img_size,
            device=device,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_workers=self.num_workers,
            train=train,
            scale=(self.scale_min, 1.0),
            color_jitter=self.color_jitter,
            randaugment=self.randaugment or None,
            os_cache=self.os_cache,
            batches_ahead=self.batches_ahead,
        )
        return open_pipeline(spec)
