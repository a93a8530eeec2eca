"""torchvision backend: the reference loader, as MAE / SupMAE pretraining runs it.

`ImageFolder` on the raw JPEG tree, PIL decode, RandomResizedCrop(bicubic) + horizontal flip
(+ ColorJitter, or timm's RandAugment via `create_transform`), ToTensor, Normalize in the worker
processes; torch's `DistributedSampler` (`set_epoch`) splits and shuffles; pinned memory when the
device is CUDA. Validation: Resize(int(img_size / 0.875), bicubic) + CenterCrop(img_size).

It is the baseline every loader benchmark compares against, so it stays plain on purpose.

`path` is a converted directory (its manifest's `source_root` names the raw tree, and its class
list must match the tree's) or an ImageFolder root: `path/<split>/<class>/...` or, for the split
"train", `path/<class>/...`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch

from pipelines.base import ConvertedDataset, Pipeline, derive_seed, is_converted, reject_unknown
from pipelines.constants import CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, SKIPPED_FILE
from pipelines.errors import DataError

BACKEND_OPTIONS = ("pin_memory",)


def image_root(path: str, split: str) -> str:
    """The ImageFolder directory of `split` under a raw tree `path`."""
    if not os.path.isdir(path):
        raise DataError(f"dataset path does not exist or is not a directory: {path}")
    candidate = os.path.join(path, split)
    if os.path.isdir(candidate):
        return candidate
    if split == "train":
        return path  # a single-split tree: path/<class>/<image>
    raise DataError(f"no '{split}' folder in {path}")


def _unescape_tsv(cell: str) -> str:
    """Undo the converter's TSV escaping (backslash, tab, CR, newline)."""
    out, i = [], 0
    while i < len(cell):
        if cell[i] == "\\" and i + 1 < len(cell):
            out.append({"t": "\t", "n": "\n", "r": "\r"}.get(cell[i + 1], cell[i + 1]))
            i += 2
        else:
            out.append(cell[i])
            i += 1
    return "".join(out)


def _skipped_files(root: str, source_root: str) -> set[str]:
    """Absolute paths the converter listed in skipped.tsv (unreadable inputs), so that the baseline
    reads the same samples as the converted formats instead of failing on a broken file."""
    listing = os.path.join(root, SKIPPED_FILE)
    skipped: set[str] = set()
    if not os.path.isfile(listing):
        return skipped
    with open(listing, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if "path" not in header:
            raise DataError(f"{listing} has no 'path' column")
        col = header.index("path")
        for line in f:
            cells = line.rstrip("\n").split("\t")
            if len(cells) > col and cells[col]:
                skipped.add(os.path.normpath(os.path.join(source_root, _unescape_tsv(cells[col]))))
    return skipped


def build_transform(
    train: bool, img_size: int, scale: tuple[float, float], color_jitter: float, randaugment: str | None
) -> Any:
    """The reference transform: PIL image -> normalised float32 [3, S, S]."""
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    bicubic = T.InterpolationMode.BICUBIC
    if not train:
        return T.Compose(
            [T.Resize(int(img_size / CROP_PCT), interpolation=bicubic), T.CenterCrop(img_size), T.ToTensor(), normalize]
        )
    if randaugment:
        if color_jitter > 0:
            raise DataError(
                "color_jitter and randaugment cannot be combined (timm skips colour jitter under "
                "RandAugment); set one of them"
            )
        from timm.data import create_transform

        try:
            return create_transform(
                img_size,
                is_training=True,
                scale=tuple(scale),
                ratio=RRC_RATIO,
                hflip=0.5,
                color_jitter=0.0,
                auto_augment=randaugment,
                interpolation="bicubic",
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                re_prob=0.0,
            )
        except (AssertionError, ValueError, KeyError, IndexError) as exc:
            raise DataError(f"not a timm RandAugment spec: {randaugment!r} ({exc})") from None
    steps = [
        T.RandomResizedCrop(img_size, scale=tuple(scale), ratio=RRC_RATIO, interpolation=bicubic),
        T.RandomHorizontalFlip(),
    ]
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    return T.Compose([*steps, T.ToTensor(), normalize])


class TorchvisionPipeline(Pipeline):
    kind = "torchvision"

    def __init__(
        self,
        path: str,
        *,
        split: str,
        batch_size: int,
        img_size: int,
        device: torch.device,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
        train: bool,
        scale: tuple[float, float],
        color_jitter: float,
        randaugment: str | None,
        dtype: torch.dtype,
        drop_last: bool,
        batches_ahead: int,
        os_cache: bool = True,
        **backend_kw: Any,
    ) -> None:
        reject_unknown(self.kind, backend_kw, BACKEND_OPTIONS)
        if not os_cache:
            raise DataError(
                "os_cache=False applies to the ffcv and dali pipelines; torchvision always reads the "
                "JPEG files through the OS page cache"
            )
        from torch.utils.data import DataLoader, DistributedSampler
        from torchvision.datasets import ImageFolder

        skipped: set[str] = set()
        expected_classes: list[str] | None = None
        expected_count: int | None = None
        if os.path.exists(path) and is_converted(path):
            converted = ConvertedDataset(path)
            source = converted.source_root
            if not source:
                raise DataError(
                    f"manifest of {converted.root} has no 'source_root': the torchvision pipeline "
                    "reads the raw JPEG tree"
                )
            if not os.path.isdir(source):
                raise DataError(f"raw JPEG tree named by {converted.root}'s manifest is missing: {source}")
            skipped = _skipped_files(converted.root, source)
            expected_classes = converted.classes
            expected_count = converted.count(split)
            folder = image_root(source, split)
        else:
            folder = image_root(os.path.abspath(path), split)

        # The converter decides a file's format by its content, whatever its extension; for a converted
        # dataset read exactly the files it converted (all but those in skipped.tsv).
        valid = None
        if expected_classes is not None:

            def valid(p: str) -> bool:
                return os.path.normpath(p) not in skipped

        transform = build_transform(train, img_size, scale, color_jitter, randaugment)
        # An empty class folder keeps its index (the converter does the same); older torchvision has no
        # allow_empty and raises on one, which is then reported as a DataError below.
        extra = {"allow_empty": True} if "allow_empty" in inspect.signature(ImageFolder.__init__).parameters else {}
        dataset_cls = ImageFolder
        if expected_classes is not None:
            # Label by the converted class list, not by the folders this split happens to have: a class
            # missing from val must not shift the indices of the classes after it.
            fixed = list(expected_classes)

            class _ConvertedClasses(ImageFolder):
                def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
                    return fixed, {name: i for i, name in enumerate(fixed)}

            dataset_cls = _ConvertedClasses
        try:
            dataset = dataset_cls(folder, transform=transform, is_valid_file=valid, **extra)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"no images in {folder}: {exc}") from None
        if expected_count is not None and len(dataset) != expected_count:
            raise DataError(
                f"{folder} now holds {len(dataset)} images but {path} converted {expected_count}; "
                "the raw tree changed since the conversion"
            )
        super().__init__(
            num_total=len(dataset),
            num_classes=len(dataset.classes),
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            seed=seed,
            device=device,
            dtype=dtype,
        )
        self.folder = folder
        self.dataset = dataset
        self.train = train
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=drop_last
        )
        # Seeds the workers' augmentation RNGs; re-seeded per epoch so an epoch replays exactly.
        self._generator = torch.Generator()
        pin = bool(backend_kw.get("pin_memory", device.type == "cuda"))
        extra: dict[str, Any] = {"prefetch_factor": batches_ahead} if num_workers > 0 else {}
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=pin,
            drop_last=drop_last,
            generator=self._generator,
            **extra,
        )
        assert len(self.loader) == len(self), (len(self.loader), len(self))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._start_epoch()
        self.sampler.set_epoch(epoch)
        self._generator.manual_seed(derive_seed(self.seed, epoch, self.rank))
        non_blocking = self.device.type == "cuda"
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=non_blocking)  # [B, 3, S, S] float32, normalised
            if images.dtype != self.dtype:
                images = images.to(self.dtype)
            yield images, labels.to(self.device, non_blocking=non_blocking)
