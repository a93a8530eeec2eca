"""FFCV backend: reads the converter's `.beton` with the crop fused into the JPEG decode.

Per batch (B images, output side S; legend: H/W decoded height/width):
  JPEG bytes --decode + RandomResizedCrop (or centre crop) + resize--> uint8 [B, S, S, 3]
  --flip (+ colour jitter)-->
    CPU:  --normalise + HWC->CHW, one JIT pass in FFCV's worker threads--> float32 [B, 3, S, S]
    CUDA: --ToTensor, ToDevice(non_blocking), ToTorchImage--> uint8 [B, 3, S, S] (channels-last view)
          --one fused addcmul on the device--> dtype [B, 3, S, S]

Order and sharding: FFCV 1.0.2's `distributed=True` builds torch's `DistributedSampler` without
`num_replicas`/`rank`, so it needs an initialised process group, and it pads the ranks with
repeated samples; its `seed` is fixed for the loader's life. We pass FFCV a traversal order of
our own instead (`rank_order`): one permutation per (seed, epoch) shared by all ranks and cut
into equal disjoint pieces, so `rank`/`world_size` work without a process group and
`set_epoch(e)` selects epoch e's order exactly (FFCV's loader asks the order for its
`next_epoch`, which `set_epoch` sets).

Speed: normalisation on the CPU is one parallel compiled pass (normalise + HWC->CHW) in FFCV's
worker thread into pooled output arrays (see BufferPool), about 8% on top of FFCV's uint8 output.
JPEG decode runs at 1/2, 1/4 or 1/8 DCT scale when the crop still covers the output after
scaling (`dct_scale`, on by default): measured 5-15% less decode time when the crop is at least
twice the output (small outputs, large stored images); at 224 px from a 256 or 512 px dataset it
almost never applies. Other k/8 factors were measured slower than a full decode (no SIMD path).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipelines.base import Normalizer, Pipeline, rank_order, reject_unknown
from pipelines.constants import CROP_PCT, FFCV_FIELDS, IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, beton_path
from pipelines.errors import DataError

BACKEND_OPTIONS = ("dct_scale",)


def _import_ffcv() -> Any:
    try:
        import ffcv
        import ffcv.loader
    except ImportError as exc:
        raise DataError(f"the ffcv pipeline needs the 'ffcv' package, which cannot be imported: {exc}") from None
    return ffcv


def check_beton(path: str) -> Any:
    """Open `path` with FFCV's reader and check it has the converter's fields; DataError otherwise."""
    _import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    if not os.path.isfile(path):
        raise DataError(f"FFCV file not found: {path} (convert the dataset with --formats ffcv)")
    try:
        reader = Reader(path)
    except (AssertionError, ValueError, IndexError, KeyError, TypeError, OSError) as exc:
        # What FFCV's reader raises on a foreign, empty or truncated file.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read FFCV file {path}: {detail}") from None
    names = tuple(reader.handlers)
    kinds = {name: type(h) for name, h in reader.handlers.items()}
    expected = {FFCV_FIELDS[0]: RGBImageField, FFCV_FIELDS[1]: IntField}
    if set(names) != set(expected) or any(kinds[n] is not t for n, t in expected.items()):
        found = ", ".join(f"{n}:{kinds[n].__name__}" for n in names)
        raise DataError(f"FFCV file {path} has fields ({found}); expected image:RGBImageField, label:IntField")
    if int(reader.num_samples) == 0:
        raise DataError(f"FFCV file {path} holds no samples")
    return reader


def _traversal_order_factory(rank: int, world_size: int, seed: int, shuffle: bool, drop_last: bool) -> Any:
    """An object FFCV's Loader accepts as `order`.

    FFCV 1.0.2 takes a custom order as a `TraversalOrder` *instance* and then calls it with the
    loader (`order(self)`); this instance answers that call by binding to the loader."""
    from ffcv.traversal_order.base import TraversalOrder

    class RankedOrder(TraversalOrder):
        def __init__(self) -> None:  # bound to a loader in __call__
            self.loader = None
            self.sampler = None
            self.distributed = world_size > 1

        def __call__(self, loader: Any) -> RankedOrder:
            self.loader = loader
            self.indices = loader.indices
            self.seed = seed
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            picks = rank_order(len(self.indices), rank, world_size, seed, epoch, shuffle, drop_last)
            return np.asarray(self.indices)[picks]

    return RankedOrder()


def _scaled_crop_decoder(base: Any, dct_scale: bool) -> Any:
    """`base` (FFCV's random or centre resized-crop decoder class) with the JPEG decoded at the
    smallest k/8 DCT scale that keeps the crop at least as large as the output."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    if not dct_scale:
        return base

    class Scaled(base):
        def generate_code(self) -> Any:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(self.get_crop_generator)
            scale = np.array(self.scale) if isinstance(self.scale, tuple) else self.scale
            ratio = np.array(self.ratio) if isinstance(self.ratio, tuple) else self.ratio
            out_h, out_w = int(self.output_size[0]), int(self.output_size[1])

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    i, j, h, w = get_crop_c(height, width, scale, ratio)
                    if field["mode"] == jpg:
                        # Smallest k in (8, 4, 2, 1) with the scaled crop still covering the output:
                        # libjpeg-turbo has fast reduced IDCTs for these; 7/8..5/8 measured slower
                        # than a full decode.
                        k = 8
                        while k > 1 and (h * (k // 2)) // 8 >= out_h and (w * (k // 2)) // 8 >= out_w:
                            k //= 2
                        sh = (height * k + 7) // 8  # libjpeg-turbo's TJSCALED
                        sw = (width * k + 7) // 8
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, k, 8, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * sh * sw].reshape(sh, sw, 3)
                        i0 = (i * k) // 8
                        j0 = (j * k) // 8
                        i1 = min(sh, max(i0 + 1, ((i + h) * k) // 8))
                        j1 = min(sw, max(j0 + 1, ((j + w) * k) // 8))
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                        i0, i1, j0, j1 = i, i + h, j, j + w
                    resize_crop_c(temp_buffer, i0, i1, j0, j1, destination[dst_ix])
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    Scaled.__name__ = f"Scaled{base.__name__}"
    return Scaled


@functools.cache
def _normalize_kernel() -> Any:
    """Numba kernel: uint8 [B, H, W, 3] -> float32 [B, 3, H, W] normalised, in parallel over images.
    A plain module-level function, so it is compiled once per process, not once per loader."""
    from numba import njit, prange

    @njit(parallel=True, nogil=True, fastmath=True)
    def kernel(images, out, mul, add):  # pragma: no cover - runs compiled
        n, h, w, _c = images.shape
        for b in prange(n):
            for y in range(h):
                for x in range(w):
                    out[b, 0, y, x] = images[b, y, x, 0] * mul[0] + add[0]
                    out[b, 1, y, x] = images[b, y, x, 1] * mul[1] + add[1]
                    out[b, 2, y, x] = images[b, y, x, 2] * mul[2] + add[2]

    return kernel


class BufferPool:
    """Output arrays handed out as torch tensors and reused once nobody holds them any more.

    A fresh 38 MB array per batch (64 x 3 x 224 x 224 float32) costs more in page faults than the
    normalisation itself (measured: 100 ms against 17 ms per batch), and FFCV's own buffers are
    recycled while the consumer may still hold a batch. `torch.from_numpy` keeps the array alive
    (through every view of the tensor), so an array whose only holder is this pool is free."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        for arr in self.arrays:
            # References: the pool's list, the loop variable and getrefcount's argument.
            if arr.shape[1:] == shape[1:] and arr.shape[0] >= shape[0] and sys.getrefcount(arr) <= 3:
                return arr[: shape[0]]
        arr = np.empty(shape, dtype=np.float32)
        self.arrays.append(arr)
        return arr


def _normalize_chw_op() -> Any:
    """FFCV operation: uint8 [B, H, W, 3] -> float32 [B, 3, H, W] normalised, one parallel pass
    (normalise + HWC->CHW) in FFCV's worker thread, into a pooled output array."""
    from ffcv.pipeline.operation import Operation

    mean = np.array(IMAGENET_MEAN, dtype=np.float32)
    std = np.array(IMAGENET_STD, dtype=np.float32)
    mul = (1.0 / (255.0 * std)).astype(np.float32)
    add = (-mean / std).astype(np.float32)

    class NormalizeCHW(Operation):
        def __init__(self) -> None:
            super().__init__()
            self.pool = BufferPool()

        def generate_code(self) -> Any:
            kernel = _normalize_kernel()
            pool = self.pool

            def normalize(images, _unused):
                n, h, w, c = images.shape
                out = pool.take((n, c, h, w))
                kernel(images, out, mul, add)
                return out

            return normalize

        def declare_state_and_memory(self, previous_state: Any) -> Any:
            h, w, c = previous_state.shape
            # Not JIT-fused: the pool is Python; the kernel it calls is compiled and releases the GIL.
            return replace(previous_state, jit_mode=False, shape=(c, h, w), dtype=np.dtype("float32")), None

    return NormalizeCHW()


class FfcvPipeline(Pipeline):
    kind = "ffcv"

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
        os_cache: bool,
        batches_ahead: int,
        num_classes: int,
        **backend_kw: Any,
    ) -> None:
        reject_unknown(self.kind, backend_kw, BACKEND_OPTIONS)
        if randaugment:
            raise DataError("randaugment is supported by the torchvision pipeline only (FFCV has no RandAugment)")
        fname = beton_path(path, split)
        reader = check_beton(fname)
        super().__init__(
            num_total=int(reader.num_samples),
            num_classes=num_classes,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            seed=seed,
            device=device,
            dtype=dtype,
        )
        self.path = fname
        self.train = train

        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import (
            RandomBrightness,
            RandomContrast,
            RandomHorizontalFlip,
            RandomSaturation,
            ToDevice,
            ToTensor,
            ToTorchImage,
        )

        dct_scale = bool(backend_kw.get("dct_scale", True))
        size = (img_size, img_size)
        if train:
            decoder = _scaled_crop_decoder(RandomResizedCropRGBImageDecoder, dct_scale)(
                size, scale=tuple(scale), ratio=RRC_RATIO
            )
            image_ops: list[Any] = [decoder, RandomHorizontalFlip()]
            if color_jitter > 0:
                # torchvision's ColorJitter(b, c, s) applies all three every time; so do we (p=1).
                image_ops += [
                    RandomBrightness(color_jitter, p=1.0),
                    RandomContrast(color_jitter, p=1.0),
                    RandomSaturation(color_jitter, p=1.0),
                ]
        else:
            # A centre square of side CROP_PCT * shorter side, resized to img_size: the same pixels as
            # "resize the shorter side to img_size / CROP_PCT, centre-crop img_size".
            image_ops = [_scaled_crop_decoder(CenterCropRGBImageDecoder, dct_scale)(size, ratio=CROP_PCT)]
        label_ops: list[Any] = [IntDecoder(), ToTensor()]
        self._normalize: Normalizer | None = None
        if device.type == "cuda":
            image_ops += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
            label_ops += [ToDevice(device, non_blocking=True)]
            self._normalize = Normalizer(device, dtype)
        else:
            image_ops += [_normalize_chw_op(), ToTensor()]

        order = _traversal_order_factory(rank, world_size, seed, shuffle=train, drop_last=drop_last)
        try:
            self.loader = Loader(
                fname,
                batch_size=batch_size,
                num_workers=max(1, num_workers),
                os_cache=os_cache,
                order=order,
                distributed=False,
                seed=seed,
                drop_last=drop_last,
                pipelines={"image": image_ops, "label": label_ops},
                batches_ahead=batches_ahead,
            )
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot open FFCV file {fname}: {exc}") from None
        assert len(self.loader) == len(self), (len(self.loader), len(self))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.next_epoch = self._start_epoch()
        # FFCV sets torch's intra-op thread count to its worker count at every epoch start; the
        # training process keeps its own setting.
        torch_threads = torch.get_num_threads()
        batches = iter(self.loader)
        try:
            for n, (images, labels) in enumerate(batches):
                if n == 0:
                    torch.set_num_threads(torch_threads)
                if self._normalize is not None:
                    images = self._normalize(images)  # [B, 3, S, S] fresh tensor on the device
                elif images.dtype != self.dtype:
                    images = images.to(self.dtype)
                # FFCV recycles its label buffers batches later: hand out a copy.
                yield images, labels.view(-1).clone()
        finally:
            batches.close()  # stop FFCV's prefetch thread when the consumer stops early
            torch.set_num_threads(torch_threads)
