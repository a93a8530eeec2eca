"""Data pipelines: one entry point, `build_pipeline`, three backends. `build_pipeline` describes
what to read and how as a `ReadSpec` (pipelines/spec.py), the one description every backend takes;
`open_pipeline(spec)` builds from a description made elsewhere (`DataConfig.build`).

- `ffcv`: the converter's `.beton`, crop fused into the JPEG decode on CPU threads.
- `dali`: the converter's webdataset shards; decode + crop on the GPU (nvJPEG) when the device is
  CUDA, the same pipeline definition on CPU operators otherwise.
- `torchvision`: the paper-faithful reference (PIL + torchvision transforms + DistributedSampler)
  on the raw JPEG tree of an ImageFolder conversion, or on the JPEG bytes a conversion stored
  (every layout: the official archives, Kaggle); the baseline every benchmark compares against.

Each backend imports its library only when built; `available()` reports which can be.
This package never imports `supmae`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import torch

from pipelines.base import ConvertedDataset, Pipeline, epoch_plan
from pipelines.constants import (
    CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RRC_RATIO,
    RRC_SCALE,
    SPLITS,
    beton_path,
    wds_dir,
)
from pipelines.errors import DataError
from pipelines.spec import ReadSpec

KINDS = ("ffcv", "dali", "torchvision")
_LIBRARY = {"ffcv": "ffcv", "dali": "nvidia.dali", "torchvision": "torchvision"}

__all__ = [
    "CROP_PCT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINDS",
    "RRC_RATIO",
    "RRC_SCALE",
    "SPLITS",
    "DataError",
    "Pipeline",
    "ReadSpec",
    "available",
    "beton_path",
    "build_pipeline",
    "epoch_plan",
    "open_pipeline",
    "wds_dir",
]


def available(kind: str) -> str | None:
    """None when `kind` can be built here, else the reason it cannot (its library is missing)."""
    if kind not in KINDS:
        return f"unknown pipeline '{kind}'"
    name = _LIBRARY[kind]
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"the '{name}' package is not installed"


def build_pipeline(
    kind: str,
    path: str,
    split: str = "train",
    batch_size: int = 64,
    img_size: int = 224,
    device: Any = "cpu",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 2,
    train: bool | None = None,
    scale: tuple[float, float] = RRC_SCALE,
    color_jitter: float = 0.0,
    randaugment: str | None = None,
    dtype: torch.dtype = torch.float32,
    drop_last: bool | None = None,
    os_cache: bool = True,
    batches_ahead: int = 3,
    **backend_kw: Any,
) -> Pipeline:
    """A loader yielding `(images [B, 3, img_size, img_size] normalised with the ImageNet mean/std
    in `dtype`, labels int64 [B])`, both on `device`. `dtype=torch.uint8` gives the raw pixels
    instead (0..255, not normalised; what a worker feeding a GPU hands over, the device normalising).

    `train` (default: split == "train") applies RandomResizedCrop(img_size, scale, ratio 3/4..4/3)
    + horizontal flip (+ colour jitter / RandAugment when asked); otherwise the shorter side is
    resized to img_size / 0.875 and the centre img_size square kept. `drop_last` (default: train)
    drops the last partial batch. `len()` is the number of batches per epoch, equal on every rank;
    `set_epoch(e)` selects epoch e's seeded order. Backend options (`**backend_kw`):
    ffcv `dct_scale`, `crop_decode`, `interpolation` ("linear" or "area"); dali `hw_decoder_load`, `initial_fill`,
    `preallocate_hint`; torchvision `pin_memory`,
    `source` ("auto", "raw" or "converted": see pipelines/torchvision_pipeline.py).
    Raises DataError (one line, naming the file) for a missing or unreadable dataset."""
    return open_pipeline(
        ReadSpec(
            kind,
            path,
            split=split,
            batch_size=batch_size,
            img_size=img_size,
            device=device,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_workers=num_workers,
            train=train,
            scale=scale,
            color_jitter=color_jitter,
            randaugment=randaugment,
            dtype=dtype,
            drop_last=drop_last,
            os_cache=os_cache,
            batches_ahead=batches_ahead,
            options=backend_kw,
        )
    )


def open_pipeline(spec: ReadSpec) -> Pipeline:
    """The loader `spec` describes (see `build_pipeline` for what it yields), built by the backend
    `spec.kind` names. DataError for an unknown or unavailable backend, an impossible setting, or a
    missing or unreadable dataset."""
    kind = spec.kind
    if kind not in KINDS:
        raise DataError(f"unknown pipeline '{kind}' (choose from {', '.join(KINDS)})")
    reason = available(kind)
    if reason:
        raise DataError(f"the {kind} pipeline is unavailable: {reason}")
    spec = spec.resolved()
    if kind == "torchvision":
        from pipelines.torchvision_pipeline import TorchvisionPipeline

        return TorchvisionPipeline(spec)

    dataset = ConvertedDataset(spec.path)
    num_total = dataset.count(spec.split)  # the split must exist in the manifest
    spec = replace(spec, path=dataset.root)
    if kind == "ffcv":
        from pipelines.ffcv_pipeline import FfcvPipeline

        return FfcvPipeline(spec, num_classes=len(dataset.classes))
    from pipelines.dali_pipeline import DaliPipeline

    # nvJPEG preallocates for images up to the converter's longest side.
    max_res = dataset.manifest.get("options", {}).get("max_res")
    if isinstance(max_res, int) and max_res > 0 and "preallocate_hint" not in spec.options:
        spec = replace(spec, options={**spec.options, "preallocate_hint": max_res})
    return DaliPipeline(spec, num_total=num_total, num_classes=len(dataset.classes))
