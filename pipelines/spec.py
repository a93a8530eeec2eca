"""What to read and how: `ReadSpec`, the one description every backend takes.

`pipelines.build_pipeline(kind, path, ...)` and `supmae.train.data.DataConfig.build` each make one,
`ReadSpec.resolved()` fills its defaults and checks it, and `pipelines.open_pipeline` hands the
resolved description to the backend it names; the backends read their settings from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pipelines.constants import RRC_SCALE
from pipelines.errors import DataError

# What a pipeline can deliver. uint8 is the raw [B, 3, S, S] pixels, not normalised: what a worker
# feeding a GPU hands over (a quarter of float32's bytes to copy), the device normalising in its
# first op; `supmae bench loaders` measures the per-core supply this way.
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)


@dataclass(frozen=True)
class ReadSpec:
    """Which backend reads what, for whom, and how it augments; see `pipelines.build_pipeline` for
    what each field means. `options` are the backend's own settings (ffcv `dct_scale`,
    `crop_decode`, `interpolation`; dali `hw_decoder_load`, `initial_fill`, `preallocate_hint`;
    torchvision `pin_memory`, `source`). `train` and `drop_last` left None follow the split and
    `train`; `resolved()` fills them."""

    kind: str
    path: str
    split: str = "train"
    batch_size: int = 64
    img_size: int = 224
    device: Any = "cpu"
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_workers: int = 2
    train: bool | None = None
    scale: tuple[float, float] = RRC_SCALE
    color_jitter: float = 0.0
    randaugment: str | None = None
    dtype: torch.dtype = torch.float32
    drop_last: bool | None = None
    os_cache: bool = True
    batches_ahead: int = 3
    options: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> ReadSpec:
        """A copy with the defaults filled in (train: split == "train"; drop_last: train), every
        number as its type and the device a `torch.device`. DataError naming an impossible setting."""
        train = (self.split == "train") if self.train is None else bool(self.train)
        drop_last = train if self.drop_last is None else bool(self.drop_last)
        spec = replace(self, train=train, drop_last=drop_last, scale=(float(self.scale[0]), float(self.scale[1])))
        spec.check()
        return replace(
            spec,
            batch_size=int(spec.batch_size),
            img_size=int(spec.img_size),
            device=resolve_device(spec.device),
            rank=int(spec.rank),
            world_size=int(spec.world_size),
            seed=int(spec.seed),
            num_workers=int(spec.num_workers),
            color_jitter=float(spec.color_jitter),
            randaugment=spec.randaugment or None,
            batches_ahead=int(spec.batches_ahead),
            os_cache=bool(spec.os_cache),
            options=dict(spec.options),
        )

    def check(self) -> None:
        """Reject impossible settings with a message naming the setting."""
        if self.batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.img_size < 8:
            raise DataError(f"img_size must be >= 8, got {self.img_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DataError(
                "rank must be in [0, world_size) with world_size >= 1, "
                f"got rank={self.rank}, world_size={self.world_size}"
            )
        if self.num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {self.num_workers}")
        scale = self.scale
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise DataError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(scale)}")
        if self.color_jitter < 0:
            raise DataError(f"color_jitter must be >= 0, got {self.color_jitter}")
        if self.dtype not in OUTPUT_DTYPES:
            raise DataError(
                f"dtype must be torch.float32, torch.bfloat16, torch.float16 or torch.uint8, got {self.dtype}"
            )
        if self.batches_ahead < 1:
            raise DataError(f"batches_ahead must be >= 1, got {self.batches_ahead}")


def resolve_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DataError(f"not a device: {device!r} (use 'cpu', 'cuda' or 'cuda:N')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise DataError(f"unsupported device {device!r}: the pipelines deliver to 'cpu' or 'cuda'")
    return dev
