"""torchvision backend: the reference loader, as MAE / SupMAE pretraining runs it.

`ImageFolder` on the raw JPEG tree, PIL decode, RandomResizedCrop(bicubic) + horizontal flip
(+ ColorJitter, or timm's RandAugment), ToTensor, Normalize in the worker processes; torch's
`DistributedSampler` (`set_epoch`) splits and shuffles; pinned memory when the device is CUDA.
Validation: Resize(int(img_size / 0.875), bicubic) + CenterCrop(img_size).

Determinism: a training sample's augmentation is drawn from a torch.Generator seeded by
(seed, epoch, dataset index) alone (`sample_seed`), not from the worker processes' RNG state; the
sampler hands each index to the workers together with its epoch. So the same seed gives the same
batches with any worker count, after a resume (`set_epoch(e)` on a fresh pipeline), and on every
rank (DistributedSampler's permutation depends on (seed, epoch) only; in training it is dealt out in
blocks of a batch, `pipelines.base.rank_order`'s rule, so that an optimiser step reads the same
micro-batches on any rank count).

It is the baseline every loader benchmark compares against, so it stays plain on purpose.

`path` is a converted directory or an ImageFolder root (`path/<split>/<class>/...` or, for the
split "train", `path/<class>/...`). A converted directory is read one of two ways (`source`):
  "raw":       the raw JPEG tree its manifest names (`source_root`), minus the files the converter
               skipped; only a conversion made from an ImageFolder tree has one.
  "converted": the JPEG bytes the converter stored (its webdataset shards, or its `.beton`), read
               in place by byte range (pipelines/stored.py): works for every layout the converter
               accepts (ImageFolder, the official archives, Kaggle) and reads exactly the files the
               ffcv and dali pipelines read. Samples come in ImageFolder's order of the source
               images (the manifest's permutation undone), so index i, its label and its
               augmentation are those of the raw tree's i-th converted image.
  "auto" (default): "raw" when the conversion came from an ImageFolder tree that is still there,
               else "converted".
`dtype=torch.uint8` replaces ToTensor + Normalize by PILToTensor: raw uint8 pixels, for the device
to normalise.
"""

from __future__ import annotations

import inspect
import math
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from pipelines.base import ConvertedDataset, Pipeline, counter_hash, deal, derive_seed, is_converted, reject_unknown
from pipelines.constants import CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, SKIPPED_FILE
from pipelines.errors import DataError
from pipelines.spec import ReadSpec

BACKEND_OPTIONS = ("pin_memory", "source")
SOURCES = ("auto", "raw", "converted")


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


# Stream of the counter draw (pipelines.base.counter_hash) that seeds a training sample's generator.
_STREAM_SAMPLE_SEED = 0


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit seed of sample `index`'s augmentation in `epoch`: a function of these alone."""
    return counter_hash(seed, epoch, index, _STREAM_SAMPLE_SEED)


def random_resized_crop_params(
    generator: torch.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `generator` instead of torch's
    global RNG (get_params takes no generator): (top, left, height, width) of the window."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class SeededTrainTransform:
    """The training transform of a PIL image given its sample seed: RandomResizedCrop(bicubic) +
    horizontal flip + (ColorJitter(s, s, s), or timm's RandAugment) + ToTensor + Normalize, with
    every random number drawn from a torch.Generator seeded by the sample seed, so a sample's
    augmentation is the same in any worker process, with any worker count, after any resume.

    Colour jitter: brightness, contrast and saturation factors uniform in [max(0, 1 - s), 1 + s],
    applied in a random order (drawn from the generator), as torchvision's ColorJitter does.
    RandAugment: timm's operations draw from Python's `random` and numpy's global RNG; both are seeded
    from the sample seed around the call and restored afterwards, so the caller's streams are
    untouched (the DataLoader runs one sample at a time per process: no thread shares them)."""

    def __init__(
        self, img_size: int, scale: tuple[float, float], color_jitter: float, randaugment: Any | None, finish: Any
    ) -> None:
        self.img_size = img_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.color_jitter = float(color_jitter)
        self.randaugment = randaugment
        self.finish = finish

    def __call__(self, img: Any, seed: int) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        generator = torch.Generator()
        generator.manual_seed(seed)
        i, j, h, w = random_resized_crop_params(generator, img.height, img.width, self.scale, RRC_RATIO)
        img = F.resized_crop(img, i, j, h, w, [self.img_size, self.img_size], InterpolationMode.BICUBIC)
        if torch.rand(1, generator=generator).item() < 0.5:
            img = F.hflip(img)
        if self.color_jitter > 0:
            s = self.color_jitter
            factors = torch.empty(3).uniform_(max(0.0, 1.0 - s), 1.0 + s, generator=generator).tolist()
            adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
            for k in torch.randperm(3, generator=generator).tolist():
                img = adjust[k](img, factors[k])
        if self.randaugment is not None:
            py_state, np_state = random.getstate(), np.random.get_state()
            draw = int(torch.randint(0, 2**62, (1,), generator=generator).item())
            random.seed(draw)
            np.random.seed(draw & 0xFFFFFFFF)
            try:
                img = self.randaugment(img)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return self.finish(img)


def build_transform(
    train: bool,
    img_size: int,
    scale: tuple[float, float],
    color_jitter: float,
    randaugment: str | None,
    normalize: bool = True,
) -> Any:
    """Validation: PIL image -> normalised float32 [3, S, S] (no randomness). Training: a
    SeededTrainTransform, called with (image, sample seed). `normalize=False`: uint8 [3, S, S]."""
    from torchvision import transforms as T

    finish = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]) if normalize else T.PILToTensor()
    if not train:
        bicubic = T.InterpolationMode.BICUBIC
        return T.Compose([T.Resize(int(img_size / CROP_PCT), interpolation=bicubic), T.CenterCrop(img_size), finish])
    augment = None
    if randaugment:
        if color_jitter > 0:
            raise DataError(
                "color_jitter and randaugment cannot be combined (timm skips colour jitter under "
                "RandAugment); set one of them"
            )
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        if not randaugment.startswith("rand"):
            raise DataError(f"not a timm RandAugment spec: {randaugment!r} (it starts with 'rand')")
        # The hyper-parameters timm's create_transform gives RandAugment for this image size.
        hparams = {
            "translate_const": int(img_size * 0.45),
            "img_mean": tuple(min(255, round(255 * x)) for x in IMAGENET_MEAN),
            "interpolation": str_to_pil_interp("bicubic"),
        }
        try:
            augment = rand_augment_transform(randaugment, hparams)
        except (AssertionError, ValueError, KeyError, IndexError) as exc:
            raise DataError(f"not a timm RandAugment spec: {randaugment!r} ({exc})") from None
        for op in augment.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return SeededTrainTransform(img_size, scale, color_jitter, augment, finish)


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, defined at 0 bits too. `PosterizeIncreasing` at magnitude ~10 asks for
    0 bits, which current Pillow refuses (ValueError), killing the worker a few thousand images
    into a `rand-m9-mstd0.5` run; keeping 0 bits makes the image black, as older Pillow did and as
    the dali pipeline's RandAugment does."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class StoredImages:
    """A converted dataset's stored JPEGs as (PIL image, label) by index, in ImageFolder's order of
    the source images (see the module docstring); decoded with PIL as ImageFolder's loader does."""

    def __init__(self, root: str, split: str) -> None:
        from pipelines.stored import StoredJpegs

        self.stored = StoredJpegs(root, split)
        self.positions = self.stored.source_order()  # [N] dataset index -> stored position
        self.targets = self.stored.labels[self.positions].tolist()
        self.classes = list(self.stored.dataset.classes)

    def __len__(self) -> int:
        return len(self.positions)

    def load(self, index: int) -> tuple[Any, int]:
        import io

        from PIL import Image

        data = self.stored.read(int(self.positions[index]))
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB"), self.targets[index]


class _FolderImages:
    """An ImageFolder as (PIL image, label) by index."""

    def __init__(self, folder: Any) -> None:
        self.folder = folder
        self.classes = folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def load(self, index: int) -> tuple[Any, int]:
        path, target = self.folder.samples[index]
        return self.folder.loader(path), target


class _SeededSamples(Dataset):
    """Images read by (index, epoch) keys: the epoch rides with each index from the sampler, so every
    worker process (persistent or not) knows it without any state of its own."""

    def __init__(self, images: StoredImages | _FolderImages, transform: Any, seed: int, train: bool) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed
        self.train = train

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        img, target = self.images.load(index)
        if self.train:
            return self.transform(img, sample_seed(self.seed, epoch, index)), target
        return self.transform(img), target


class _EpochTaggedSampler(Sampler):
    """This rank's indices of the epoch set on the DistributedSampler, each paired with that epoch; the first
    `skip` of them left out (a resume inside the epoch: those samples are never loaded).

    Training (drop_last, `block` = the batch size): DistributedSampler's permutation of (seed, epoch),
    dealt out in blocks of a batch (`pipelines.base.deal`), so that an optimiser step reads the same
    micro-batches on any rank count (see `rank_order`); evaluation: DistributedSampler's own order."""

    def __init__(self, sampler: DistributedSampler, block: int) -> None:
        self.sampler = sampler
        self.block = block
        self.skip = 0

    def epoch_order(self) -> np.ndarray:
        s = self.sampler
        if not (s.drop_last and self.block):
            return np.fromiter(iter(s), dtype=np.int64)
        if s.shuffle:  # exactly DistributedSampler's permutation
            g = torch.Generator()
            g.manual_seed(s.seed + s.epoch)
            perm = torch.randperm(len(s.dataset), generator=g).numpy()
        else:
            perm = np.arange(len(s.dataset), dtype=np.int64)
        return deal(perm[: s.total_size], s.rank, s.num_replicas, self.block)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.sampler.epoch)
        return ((int(i), epoch) for i in self.epoch_order()[self.skip :])

    def __len__(self) -> int:
        return len(self.sampler)


class TorchvisionPipeline(Pipeline):
    kind = "torchvision"

    def __init__(self, spec: ReadSpec) -> None:
        """`spec` resolved; its path a converted directory or an ImageFolder root."""
        reject_unknown(self.kind, spec.options, BACKEND_OPTIONS)
        if not spec.os_cache:
            raise DataError(
                "os_cache=False applies to the ffcv and dali pipelines; torchvision always reads the "
                "JPEG files through the OS page cache"
            )
        from torch.utils.data import DataLoader

        path, split = spec.path, spec.split
        source = spec.options.get("source", "auto")
        if source not in SOURCES:
            raise DataError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        converted = is_converted(path) if os.path.exists(path) else False
        if converted:
            reading = choose_source(ConvertedDataset(path), source)
        elif source == "converted":
            raise DataError(f"source='converted' needs a directory written by 'supmae convert': {path}")
        else:
            reading = "folder"
        if reading == "converted":
            images: StoredImages | _FolderImages = StoredImages(path, split)
            self.folder = images.stored.dataset.root
        else:
            images = _FolderImages(_image_folder(path, split, converted))
            self.folder = images.folder.root
        self.source = "converted" if reading == "converted" else "raw"
        transform = build_transform(
            spec.train, spec.img_size, spec.scale, spec.color_jitter, spec.randaugment,
            normalize=spec.dtype != torch.uint8,
        )
        super().__init__(spec, num_total=len(images), num_classes=len(images.classes))
        self.dataset = images
        self.train = spec.train
        self.sampler = DistributedSampler(
            images, num_replicas=self.world_size, rank=self.rank, shuffle=spec.train, seed=self.seed,
            drop_last=self.drop_last,
        )
        # Augmentation draws from per-sample generators (SeededTrainTransform); this generator only
        # gives the DataLoader its workers' base seed, so that it never draws from torch's global
        # RNG (which would shift the training's own random stream with the worker count).
        self._generator = torch.Generator()
        pin = bool(spec.options.get("pin_memory", self.device.type == "cuda"))
        extra: dict[str, Any] = {"prefetch_factor": spec.batches_ahead} if spec.num_workers > 0 else {}
        self.loader = DataLoader(
            _SeededSamples(images, transform, self.seed, spec.train),
            batch_size=self.batch_size,
            sampler=_EpochTaggedSampler(self.sampler, self.batch_size if self.drop_last else 0),
            num_workers=spec.num_workers,
            pin_memory=pin,
            drop_last=self.drop_last,
            generator=self._generator,
            **extra,
        )
        assert len(self.loader) == len(self), (len(self.loader), len(self))

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """Dataset indices of this rank's batch `batch` of `epoch` (DistributedSampler's order; nothing is read)."""
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != epoch:
            saved = self.sampler.epoch
            self.sampler.set_epoch(epoch)
            try:
                cached = self._order_cache = (epoch, self.loader.sampler.epoch_order())
            finally:
                self.sampler.set_epoch(saved)
        return cached[1][batch * self.batch_size : (batch + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._start_epoch()
        self.sampler.set_epoch(epoch)
        self.loader.sampler.skip = self._iter_start * self.batch_size
        self._generator.manual_seed(derive_seed(self.seed, epoch, self.rank))
        # With CUDA: each batch is a fresh pinned tensor (pin_memory) that torch's host allocator
        # keeps until the non_blocking copy has read it; the copy lands in torch-owned device memory
        # on the consumer's current stream. Nothing handed out is reused by the loader.
        non_blocking = self.device.type == "cuda"
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=non_blocking)  # [B, 3, S, S] float32 normalised, or uint8
            if images.dtype != self.dtype:
                images = images.to(self.dtype)
            yield images, labels.to(self.device, non_blocking=non_blocking)


def choose_source(converted: ConvertedDataset, source: str) -> str:
    """Which bytes to read of a converted directory, "raw" or "converted" (see the module docstring)."""
    layout = str(converted.manifest.get("layout", "imagefolder"))
    raw = converted.source_root
    raw_here = layout == "imagefolder" and bool(raw) and os.path.isdir(raw)
    if source == "raw":
        if layout != "imagefolder":
            raise DataError(
                f"{converted.root} was converted from the {layout} layout, which has no raw JPEG tree to read: "
                "use source='converted' (or 'auto') to read the bytes it stored"
            )
        if not raw:
            raise DataError(f"manifest of {converted.root} has no 'source_root': use source='converted' (or 'auto')")
        if not os.path.isdir(raw):
            raise DataError(f"raw JPEG tree named by {converted.root}'s manifest is missing: {raw}")
        return "raw"
    if source == "auto" and raw_here:
        return "raw"
    return "converted"


def _image_folder(path: str, split: str, converted: bool) -> Any:
    """The ImageFolder of a raw tree: `path` itself, or the tree a converted directory names (then
    minus the files the converter skipped, labelled by its class list, checked against its count)."""
    from torchvision.datasets import ImageFolder

    skipped: set[str] = set()
    expected_classes: list[str] | None = None
    expected_count: int | None = None
    if converted:
        dataset = ConvertedDataset(path)
        source = dataset.source_root
        assert source is not None  # _choose_source checked it
        skipped = _skipped_files(dataset.root, source)
        expected_classes = dataset.classes
        expected_count = dataset.count(split)
        folder = image_root(source, split)
    else:
        folder = image_root(os.path.abspath(path), split)

    # The converter decides a file's format by its content, whatever its extension; for a converted
    # dataset read exactly the files it converted (all but those in skipped.tsv).
    valid = None
    if expected_classes is not None:

        def valid(p: str) -> bool:
            return os.path.normpath(p) not in skipped

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
        found = dataset_cls(folder, is_valid_file=valid, **extra)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"no images in {folder}: {exc}") from None
    if expected_count is not None and len(found) != expected_count:
        raise DataError(
            f"{folder} now holds {len(found)} images but {path} converted {expected_count}; "
            "the raw tree changed since the conversion (source='converted' reads the bytes it stored)"
        )
    return found
