"""FFCV backend: reads the converter's `.beton` with the crop fused into the JPEG decode.

Per batch (B images, output side S; legend: H/W decoded height/width):
  JPEG bytes --our decoder: decode + RandomResizedCrop (or centre crop) + resize + flip
  (+ colour jitter), one compiled pass per image in FFCV's worker threads--> uint8 [B, S, S, 3]
    CPU:  --normalise + HWC->CHW, one JIT pass in FFCV's worker threads--> float32 [B, 3, S, S]
    CUDA: --copy on our own stream (host waits for it before FFCV may reuse the pinned slot)-->
          uint8 [B, S, S, 3] on the device --one fused addcmul--> dtype [B, 3, S, S]

Determinism: every random number of a training sample (crop window, flip, jitter factors and
order) is a counter draw of (seed, epoch, dataset index) (`pipelines.base.counter_uniform`),
computed inside the decoder; FFCV's stock random decoder and transforms draw from numba's global
RNG, per thread, so they are not used. The same seed gives the same batches with any worker
count, after a resume (`set_epoch(e)` on a fresh pipeline), and on any rank count (a sample keeps
its augmentation wherever the order puts it). The order itself is `rank_order`'s permutation per
(seed, epoch); FFCV's QUASI_RANDOM page order is not used.

Order and sharding: FFCV 1.0.2's `distributed=True` builds torch's `DistributedSampler` without
`num_replicas`/`rank`, so it needs an initialised process group, and it pads the ranks with
repeated samples; its `seed` is fixed for the loader's life. We pass FFCV a traversal order of
our own instead (`rank_order`): one permutation per (seed, epoch) shared by all ranks and cut
into equal disjoint pieces, so `rank`/`world_size` work without a process group and
`set_epoch(e)` selects epoch e's order exactly (FFCV's loader asks the order for its
`next_epoch`, which `set_epoch` sets).

Speed: a training JPEG is decoded only inside its crop window (`crop_decode`, on by default):
our small C++ library (pipelines/_cropdecode.cpp, built by `pip install -e .`, called through
ctypes from the compiled decoder as FFCV calls its own) skips the rows above the window, decodes
only the iMCU columns covering it and stops after its last row, then resizes and flips in the same
call. The decode runs at 1/2, 1/4 or 1/8 DCT scale when the crop still covers the output after
scaling (`dct_scale`, on by default; other k/8 factors were measured slower than a full decode:
no SIMD path), so the resize never shrinks by 2x or more and bilinear interpolation
(`interpolation="linear"`, OpenCV's INTER_LINEAR, the default) does not alias much; "area"
(INTER_AREA, FFCV's stock resize) costs 4-8x more per image on a downscale. `crop_decode=False`
decodes the whole image with FFCV's decoder and cuts the same window from it: the same pixels
(tested byte for byte), kept as the reference path. Normalisation on the CPU is one parallel
compiled pass (normalise + HWC->CHW) in FFCV's worker thread into pooled output arrays (see
BufferPool); uint8 batches on the CPU are decoded straight into pooled arrays (_pooled_uint8_op).

Damage: a stored JPEG whose bytes changed after conversion is never decoded into a batch. Each
record's bytes are checked against the CRC-32 the converter stored beside them (the `crc32`
field; 5 us per 17 KB image against 270 us for its decode, measured), and the decode itself
fails on libjpeg's errors and on its warnings (a truncated scan, a marker inside the entropy-coded
data), which libjpeg would otherwise paper over with grey pixels. A `.beton` written before the
`crc32` field existed still reads, with the decoder's checks alone. Policy: the job stops with one
line naming the file, the split and the sample (a DataError), rather than skip it: a damaged file
is a storage fault that will not stay at one sample, and a restore or a reconversion fixes it.

Failure: an exception in FFCV's epoch thread (a corrupt record the decoder rejects, a numba error)
is a DataError in the consumer carrying that exception, within a second (_guarded_loader_class);
FFCV alone would leave the consumer waiting on its queue forever.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import math
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipelines.base import Normalizer, Pipeline, rank_order, reject_unknown
from pipelines.constants import (
    CROP_PCT,
    FFCV_CHECKSUM_FIELD,
    FFCV_FIELDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RRC_RATIO,
    beton_path,
)
from pipelines.errors import DataError
from pipelines.spec import ReadSpec

BACKEND_OPTIONS = ("dct_scale", "crop_decode", "interpolation")
# OpenCV's interpolation codes (cv::INTER_LINEAR, cv::INTER_AREA), passed to the C++ resize.
INTERPOLATIONS = {"linear": 1, "area": 3}
CROP_DECODE_MODULE = "pipelines._cropdecode"
# What the decoder records for a damaged record (`_crop_decoder`'s `damage` cell), besides the C
# library's own negative codes (-1 libjpeg error, -6 libjpeg warned of corrupt data).
CHECKSUM_MISMATCH = -100
_DAMAGE = {
    CHECKSUM_MISMATCH: "its stored JPEG bytes do not match the crc32 written at conversion",
    -1: "libjpeg cannot decode its stored JPEG",
    -6: "libjpeg reports corrupt data in its stored JPEG (a truncated scan or a stray marker)",
}


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
    if FFCV_CHECKSUM_FIELD in names:  # the converter's since the crc32 field; older files lack it
        expected[FFCV_CHECKSUM_FIELD] = IntField
    if set(names) != set(expected) or any(kinds[n] is not t for n, t in expected.items()):
        found = ", ".join(f"{n}:{kinds[n].__name__}" for n in names)
        raise DataError(
            f"FFCV file {path} has fields ({found}); expected image:RGBImageField, label:IntField "
            f"[, {FFCV_CHECKSUM_FIELD}:IntField]"
        )
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


# Streams of the counter draw (pipelines.base.counter_uniform) of one training sample: two per
# RandomResizedCrop try (area, log aspect ratio), the window's top and left, the flip, the three
# colour-jitter factors and their order. Changing these changes every augmentation: keep them fixed.
_CROP_TRIES = 10
_STREAM_TOP = 2 * _CROP_TRIES
_STREAM_LEFT = _STREAM_TOP + 1
_STREAM_FLIP = _STREAM_TOP + 2
_STREAM_BRIGHTNESS = _STREAM_TOP + 3
_STREAM_CONTRAST = _STREAM_TOP + 4
_STREAM_SATURATION = _STREAM_TOP + 5
_STREAM_JITTER_ORDER = _STREAM_TOP + 6
# The six orders of (0 brightness, 1 contrast, 2 saturation); torchvision's ColorJitter permutes its
# operations per sample, so one of these is drawn per sample too.
_JITTER_ORDERS = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]], dtype=np.int64)


def make_random_crop(uniform: Any) -> Any:
    """torchvision's RandomResizedCrop window (10 tries of area and log-uniform aspect ratio, then
    the centre crop clamped to the ratio range) with every uniform taken from
    `uniform(seed, epoch, index, stream)`. Plain Python that numba compiles: with
    `pipelines.base.counter_uniform` it is the reference, with `counter_uniform_jit()` the decoder's.
    Rounding is floor(x + 0.5) (torchvision's round() differs only on exact halves)."""

    def random_crop(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, seed, epoch, index):
        full_h = int(height)
        full_w = int(width)
        area = float(full_h) * float(full_w)
        for attempt in range(_CROP_TRIES):
            u_area = uniform(seed, epoch, index, 2 * attempt)
            u_ratio = uniform(seed, epoch, index, 2 * attempt + 1)
            target = area * (scale_lo + (scale_hi - scale_lo) * u_area)
            aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * u_ratio)
            w = math.floor(math.sqrt(target * aspect) + 0.5)
            h = math.floor(math.sqrt(target / aspect) + 0.5)
            if 0 < w <= full_w and 0 < h <= full_h:
                i = int(uniform(seed, epoch, index, _STREAM_TOP) * (full_h - h + 1))
                j = int(uniform(seed, epoch, index, _STREAM_LEFT) * (full_w - w + 1))
                return i, j, h, w
        in_ratio = float(full_w) / float(full_h)
        ratio_lo = math.exp(log_ratio_lo)
        ratio_hi = math.exp(log_ratio_hi)
        if in_ratio < ratio_lo:
            w = full_w
            h = math.floor(w / ratio_lo + 0.5)
        elif in_ratio > ratio_hi:
            h = full_h
            w = math.floor(h * ratio_hi + 0.5)
        else:
            w = full_w
            h = full_h
        return (full_h - h) // 2, (full_w - w) // 2, h, w

    return random_crop


def make_flip_and_jitter(uniform: Any, flip: bool = True) -> Any:
    """In place on one uint8 image [S, S, 3]: the horizontal flip (probability 1/2; skipped when
    `flip` is False because the crop decoder has already flipped with the same draw,
    `draws_flip`) and, when `strength` > 0, colour jitter as torchvision's ColorJitter(s, s, s):
    brightness, contrast and saturation factors each uniform in [max(0, 1 - s), 1 + s], applied in
    an order drawn per sample from the six, each result rounded to uint8 as PIL does between
    operations. Contrast blends with the mean of the ITU-R 601 grey image, saturation with each
    pixel's grey (PIL's "L"). The jitter is pointwise, so it commutes with the flip."""
    do_flip = bool(flip)

    def flip_and_jitter(img, strength, seed, epoch, index):
        rows, cols, _c = img.shape
        if do_flip and uniform(seed, epoch, index, _STREAM_FLIP) < 0.5:
            for y in range(rows):
                for x in range(cols // 2):
                    for c in range(3):
                        tmp = img[y, x, c]
                        img[y, x, c] = img[y, cols - 1 - x, c]
                        img[y, cols - 1 - x, c] = tmp
        if strength <= 0.0:
            return
        lo = max(0.0, 1.0 - strength)
        span = 1.0 + strength - lo
        f_bright = lo + span * uniform(seed, epoch, index, _STREAM_BRIGHTNESS)
        f_contrast = lo + span * uniform(seed, epoch, index, _STREAM_CONTRAST)
        f_saturation = lo + span * uniform(seed, epoch, index, _STREAM_SATURATION)
        order = min(5, int(uniform(seed, epoch, index, _STREAM_JITTER_ORDER) * 6.0))
        for k in range(3):
            op = _JITTER_ORDERS[order, k]
            mean = 0.0
            if op == 1:  # contrast blends towards the rounded mean grey of the image as it is now
                for y in range(rows):
                    for x in range(cols):
                        r, g, b = float(img[y, x, 0]), float(img[y, x, 1]), float(img[y, x, 2])
                        mean += 0.299 * r + 0.587 * g + 0.114 * b
                mean = math.floor(mean / (rows * cols) + 0.5)
            for y in range(rows):
                for x in range(cols):
                    r, g, b = float(img[y, x, 0]), float(img[y, x, 1]), float(img[y, x, 2])
                    if op == 0:  # brightness: blend with black
                        base, factor = 0.0, f_bright
                    elif op == 1:
                        base, factor = mean, f_contrast
                    else:  # saturation: blend with the pixel's own grey
                        base, factor = math.floor(0.299 * r + 0.587 * g + 0.114 * b + 0.5), f_saturation
                    img[y, x, 0] = min(max(math.floor(base + factor * (r - base) + 0.5), 0), 255)
                    img[y, x, 1] = min(max(math.floor(base + factor * (g - base) + 0.5), 0), 255)
                    img[y, x, 2] = min(max(math.floor(base + factor * (b - base) + 0.5), 0), 255)

    return flip_and_jitter


def make_draws_flip(uniform: Any) -> Any:
    """Whether sample (seed, epoch, index) is flipped: the draw `make_flip_and_jitter` makes."""

    def draws_flip(seed, epoch, index):
        return uniform(seed, epoch, index, _STREAM_FLIP) < 0.5

    return draws_flip


@functools.cache
def _crop_decode_functions() -> tuple[Any, Any, Any, Any]:
    """The C++ library's entry points as ctypes functions (numba calls them from compiled code):
    (supmae_crop_decode, supmae_resize_flip, supmae_set_batch_output, supmae_batch_output).
    DataError when the library was not built."""
    spec = importlib.util.find_spec(CROP_DECODE_MODULE)
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise DataError(
            "the ffcv pipeline's crop decoder (pipelines/_cropdecode.cpp) is not built: run "
            "'pip install -e .' in the project (scripts/setup.sh does), which compiles it against libjpeg-turbo and OpenCV"
        )
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as exc:
        raise DataError(
            f"cannot load the crop decoder {spec.origin}: {exc} (rebuild it with 'pip install -e .')"
        ) from None
    i64, u64, ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
    decode = lib.supmae_crop_decode
    decode.argtypes = [ptr, u64, i64, i64, i64, i64, i64, i64, i64, ptr, u64, ptr, i64, i64, i64, i64]
    decode.restype = ctypes.c_int
    resize = lib.supmae_resize_flip
    resize.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, i64, i64, i64, i64]
    resize.restype = ctypes.c_int
    set_output = lib.supmae_set_batch_output
    set_output.argtypes = [i64]
    set_output.restype = None
    get_output = lib.supmae_batch_output
    get_output.argtypes = []
    get_output.restype = i64
    return decode, resize, set_output, get_output


def decode_window(
    jpeg: np.ndarray,
    image_size: tuple[int, int],
    window: tuple[int, int, int, int],
    out_size: tuple[int, int],
    *,
    scale_num: int = 8,
    interpolation: str = "linear",
    flip: bool = False,
) -> np.ndarray:
    """The crop decoder on one JPEG (uint8 bytes of an `image_size` (H, W) image): the `window`
    (top, left, height, width) decoded at DCT scale `scale_num`/8, resized to `out_size` and
    flipped when `flip`, as uint8 [H, W, 3]. With `out_size` equal to the scaled window's size the
    resize is a copy, so this returns the decoded window's own pixels. DataError on a bad JPEG."""
    crop_decode = _crop_decode_functions()[0]
    data = np.ascontiguousarray(jpeg, dtype=np.uint8)
    height, width = int(image_size[0]), int(image_size[1])
    scratch = np.empty(height * width * 3, dtype=np.uint8)
    out = np.empty((int(out_size[0]), int(out_size[1]), 3), dtype=np.uint8)
    top, left, h, w = (int(v) for v in window)
    status = crop_decode(
        data.ctypes.data,
        data.size,
        height,
        width,
        top,
        left,
        h,
        w,
        int(scale_num),
        scratch.ctypes.data,
        scratch.size,
        out.ctypes.data,
        out.shape[0],
        out.shape[1],
        INTERPOLATIONS[interpolation],
        int(bool(flip)),
    )
    if status != 0:
        raise DataError(f"crop decode failed (status {status}) for window {tuple(window)} of a {height}x{width} JPEG")
    return out


@functools.cache
def _compiled_kernels() -> tuple[Any, Any, Any]:
    """(random crop, flip + jitter, read_int64) compiled once per process: the per-loader decode
    closure calls them, so a second loader compiles only its own small body."""
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from pipelines.base import counter_uniform_jit

    uniform = counter_uniform_jit()

    @intrinsic
    def read_int64(typingctx, address):  # pragma: no cover - runs compiled
        """The int64 stored at `address` (an integer), read at run time. numba freezes a global or
        closure numpy array into the compiled code as a constant, so a value the host changes
        between epochs (the epoch) has to be read through its address instead."""
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
            return builder.load_atomic(ptr, "monotonic", 8)

        return types.int64(address), codegen

    crop = njit(nogil=True)(make_random_crop(uniform))
    augment = njit(nogil=True)(make_flip_and_jitter(uniform))
    return crop, augment, read_int64


@functools.cache
def _store_int64_kernel() -> Any:
    """Compiled `store_int64(address, value)`: writes an int64 at `address` (an integer), as
    `read_int64` reads one: how the decoder reports which record was damaged to the host."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def store_int64(typingctx, address, value):  # pragma: no cover - runs compiled
        if not isinstance(address, types.Integer) or not isinstance(value, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
            val = context.cast(builder, args[1], signature.args[1], types.int64)
            builder.store_atomic(val, ptr, "monotonic", 8)
            return context.get_dummy_value()

        return types.void(address, value), codegen

    return store_int64


@functools.cache
def _crc32_function() -> Any:
    """zlib's `crc32(crc, buf, len)` as a ctypes function the compiled decoder calls (the CRC-32
    `zlib.crc32` computes, which the converter stores in the .beton's crc32 field)."""
    name = ctypes.util.find_library("z") or "libz.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise DataError(
            f"the ffcv pipeline checks each record's crc32 with zlib, which cannot be loaded: {exc}"
        ) from None
    crc32 = lib.crc32
    crc32.argtypes = [ctypes.c_ulong, ctypes.c_void_p, ctypes.c_uint]
    crc32.restype = ctypes.c_ulong
    return crc32


@functools.cache
def _image_at_kernel() -> Any:
    """Compiled `image_at(address, height, width)`: the uint8 [height, width, 3] array at `address`
    (an integer), for the colour jitter on an image decoded into memory the decoder was handed by
    address (the batch output set with supmae_set_batch_output)."""
    from llvmlite import ir
    from numba import carray, njit, types
    from numba.extending import intrinsic

    @intrinsic
    def as_uint8_pointer(typingctx, address):  # pragma: no cover - runs compiled
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

        return types.CPointer(types.uint8)(address), codegen

    @njit(nogil=True)
    def image_at(address, height, width):  # pragma: no cover - runs compiled
        return carray(as_uint8_pointer(address), (height, width, 3))

    return image_at


@functools.cache
def _jitter_kernels() -> tuple[Any, Any]:
    """(colour jitter without the flip, the flip draw) compiled once per process, for the decoder
    paths that flip inside the C++ resize."""
    from numba import njit

    from pipelines.base import counter_uniform_jit

    uniform = counter_uniform_jit()
    return njit(nogil=True)(make_flip_and_jitter(uniform, flip=False)), njit(nogil=True)(make_draws_flip(uniform))


def _crop_decoder(
    output_size: tuple[int, int],
    *,
    train: bool,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    crop_pct: float,
    color_jitter: float,
    seed: int,
    dct_scale: bool,
    crop_decode: bool,
    interpolation: str,
    checksums: np.ndarray | None = None,
) -> Any:
    """Our decoder for the image field: JPEG decode of the crop window only (`crop_decode`; else the
    whole image with FFCV's decoder, then cut), at a reduced DCT scale when the crop still covers
    the output (`dct_scale`), fused with the resize (`interpolation`) and, in training, the flip and
    colour jitter. Training draws every random number from the counter of (seed, epoch, dataset
    index): FFCV's own RandomResizedCrop decoder, RandomHorizontalFlip and RandomBrightness/...
    draw from numba's global RNG, whose state depends on the thread that runs a sample and on every
    draw before it, so neither the worker count nor a resume would replay the same batches.

    The epoch reaches the compiled code through `epoch_cell` (int64[1]), which FfcvPipeline writes
    before starting each epoch; the sample index is the dataset index FFCV passes in
    `batch_indices`, whatever the batch position, worker or rank.

    Damage (see the module docstring): `checksums` (int64 [num samples], the .beton's crc32 field,
    or None for a file without it) are compared with each record's bytes before its decode, and
    the decode fails on libjpeg's errors and warnings. A damaged record fails the batch, after
    writing its dataset index and cause into `damage` (int64 [2]: index, code; -1 while none)."""
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_center_crop
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.compiler import Compiler

    # ctypes functions, called straight from the compiled decode (no numba dispatcher of their own
    # that several loaders' threads would share); DataError here, not in a worker, when unbuilt.
    crop_decode_c, resize_flip_c, _set_output, batch_output_c = _crop_decode_functions()
    crc32_c = _crc32_function()
    # Kept alive by the decoder (its address is a constant of the compiled code).
    crc_table = None if checksums is None else np.ascontiguousarray(checksums, dtype=np.int64)

    class SeededCropDecoder(ResizedCropRGBImageDecoder):
        def __init__(self) -> None:
            super().__init__(output_size)
            self.epoch_cell = np.zeros(1, dtype=np.int64)
            self.damage = np.array([-1, 0], dtype=np.int64)
            self.checksums = crc_table

        @property
        def get_crop_generator(self) -> Any:  # FFCV's abstract hook; our decode draws its own windows
            return get_center_crop

        def generate_code(self) -> Any:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            center_crop_c = Compiler.compile(get_center_crop)
            random_crop_c, _augment, read_int64 = _compiled_kernels()
            store_int64 = _store_int64_kernel()
            check_crc = crc_table is not None
            crc_address = np.int64(crc_table.ctypes.data if crc_table is not None else 0)
            damage_address = np.int64(self.damage.ctypes.data)
            checksum_mismatch = np.int64(CHECKSUM_MISMATCH)
            corrupt = np.int64(-6)
            jitter_c, draws_flip_c = _jitter_kernels()
            image_at_c = _image_at_kernel()
            # The array lives as long as this decoder (the loader's pipeline holds it); its address
            # is a constant of the compiled code.
            epoch_address = self.epoch_cell.ctypes.data
            out_h, out_w = int(output_size[0]), int(output_size[1])
            image_bytes = np.uint64(out_h * out_w * 3)
            scale_lo, scale_hi = float(scale[0]), float(scale[1])
            log_ratio_lo, log_ratio_hi = math.log(ratio[0]), math.log(ratio[1])
            strength = float(color_jitter)
            sample_seed = np.int64(seed)
            is_train = bool(train)
            use_dct = bool(dct_scale)
            window_only = bool(crop_decode)
            interp = np.int64(INTERPOLATIONS[interpolation])

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                epoch = read_int64(epoch_address)
                # A batch array handed over by address (the uint8 hand-off, _pooled_uint8_op), read
                # here in FFCV's epoch thread, or 0: FFCV's own buffer.
                batch_output = batch_output_c()
                failures = 0
                for dst_ix in my_range(len(batch_indices)):
                    if batch_output != 0:
                        target = np.uint64(batch_output) + np.uint64(dst_ix) * image_bytes
                    else:
                        target = np.uint64(destination[dst_ix].ctypes.data)
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.int64(field["height"])
                    width = np.int64(field["width"])
                    if is_train:
                        i, j, h, w = random_crop_c(
                            height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, sample_seed, epoch, source_ix
                        )
                        flip = draws_flip_c(sample_seed, epoch, source_ix)
                    else:
                        i, j, h, w = center_crop_c(height, width, 0.0, crop_pct)
                        flip = False
                    status = 0
                    if check_crc:
                        stored = read_int64(crc_address + np.int64(8) * np.int64(source_ix))
                        crc = crc32_c(np.uint64(0), image_data.ctypes.data, np.uint32(image_data.size))
                        if np.int64(crc) != stored:
                            status = checksum_mismatch
                    if status != 0:
                        pass  # damaged bytes are not decoded
                    elif field["mode"] == jpg:
                        # Smallest k in (8, 4, 2, 1) with the scaled crop still covering the output:
                        # libjpeg-turbo has fast reduced IDCTs for these; 7/8..5/8 measured slower
                        # than a full decode.
                        k = 8
                        while use_dct and k > 1 and (h * (k // 2)) // 8 >= out_h and (w * (k // 2)) // 8 >= out_w:
                            k //= 2
                        if window_only:
                            scratch = temp_storage[dst_ix]
                            status = crop_decode_c(
                                image_data.ctypes.data,
                                image_data.size,
                                height,
                                width,
                                i,
                                j,
                                h,
                                w,
                                k,
                                scratch.ctypes.data,
                                scratch.size,
                                target,
                                out_h,
                                out_w,
                                interp,
                                np.int64(flip),
                            )
                        else:
                            sh = (height * k + 7) // 8  # libjpeg-turbo's TJSCALED
                            sw = (width * k + 7) // 8
                            temp_buffer = temp_storage[dst_ix]
                            h32, w32 = np.uint32(height), np.uint32(width)
                            # TurboJPEG's status: -1 on an error and on a warning of corrupt data.
                            decoded = imdecode_c(image_data, temp_buffer, h32, w32, h32, w32, 0, 0, k, 8, False, False)
                            # The window at scale k/8, as the crop decoder computes it.
                            i0 = (i * k) // 8
                            j0 = (j * k) // 8
                            i1 = min(sh, max(i0 + 1, ((i + h) * k) // 8))
                            j1 = min(sw, max(j0 + 1, ((j + w) * k) // 8))
                            status = (
                                corrupt
                                if decoded != 0
                                else resize_flip_c(
                                    temp_buffer.ctypes.data,
                                    sh,
                                    sw,
                                    sw * 3,
                                    i0,
                                    i1,
                                    j0,
                                    j1,
                                    target,
                                    out_h,
                                    out_w,
                                    interp,
                                    np.int64(flip),
                                )
                            )
                    else:  # raw pixels [height, width, 3]
                        status = resize_flip_c(
                            image_data.ctypes.data,
                            height,
                            width,
                            width * 3,
                            i,
                            i + h,
                            j,
                            j + w,
                            target,
                            out_h,
                            out_w,
                            interp,
                            np.int64(flip),
                        )
                    if status != 0:
                        failures += 1
                        store_int64(damage_address + np.int64(8), np.int64(status))
                        store_int64(damage_address, np.int64(source_ix))
                    elif is_train and strength > 0.0:
                        jitter_c(image_at_c(target, out_h, out_w), strength, sample_seed, epoch, source_ix)
                # Raised after the loop: a `raise` inside it is a second exit, and numba then runs the
                # prange serially (one core per loader whatever its workers).
                if failures > 0:
                    raise ValueError("ffcv pipeline: a stored image could not be decoded (corrupt .beton?)")
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededCropDecoder()


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

    def __init__(self, dtype: Any = np.float32) -> None:
        self.arrays: list[np.ndarray] = []
        self.dtype = np.dtype(dtype)
        # An epoch thread finishing its batch after the consumer started the next epoch's thread
        # takes from the same pool: one array must not go to both.
        self.lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        with self.lock:
            for arr in self.arrays:
                # References: the pool's list, the loop variable and getrefcount's argument.
                if arr.shape[1:] == shape[1:] and arr.shape[0] >= shape[0] and sys.getrefcount(arr) <= 3:
                    return arr[: shape[0]]
            arr = np.empty(shape, dtype=self.dtype)
            self.arrays.append(arr)
            return arr


def _pooled_uint8_op() -> Any:
    """FFCV operation, in FFCV's epoch thread after the decoder: hands out the uint8 [B, H, W, 3]
    batch in a pooled array (BufferPool) that FFCV never rewrites, and hands the decoder the array
    for the thread's next batch (supmae_set_batch_output), so the decoder writes there directly.
    Only the thread's first batch is decoded into FFCV's buffer and copied out (9.6 MB per batch of
    64 x 224 px: 3% of a worker's time at 256 px storage). A fresh tensor per batch (a clone in the
    consumer's thread) would page-fault its 9.6 MB in again every batch."""
    from ffcv.pipeline.operation import Operation

    _decode, _resize, set_output, _get_output = _crop_decode_functions()

    class PooledHandOff(Operation):
        def __init__(self) -> None:
            super().__init__()
            self.pool = BufferPool(np.uint8)
            # The array the decoder of this thread writes its next batch into. Per thread: an epoch
            # thread still finishing a batch after the consumer started the next epoch (a new
            # thread) keeps its own, as the C side's address is thread-local too.
            self.next = threading.local()

        def generate_code(self) -> Any:
            pool = self.pool
            per_thread = self.next

            def hand_off(images, _unused):
                n = images.shape[0]
                prepared = getattr(per_thread, "array", None)
                if prepared is not None:
                    out = prepared[:n]  # the decoder wrote this batch there
                else:
                    out = pool.take(images.shape)
                    ctypes.memmove(out.ctypes.data, images.ctypes.data, images.nbytes)  # GIL released
                # The next batch's array: full batch size (the first batch of an epoch is full).
                size = prepared.shape[0] if prepared is not None else n
                per_thread.array = None  # out alone holds `prepared` now, so the pool skips it
                nxt = pool.take((size, *images.shape[1:]))
                per_thread.array = nxt
                set_output(nxt.ctypes.data)
                return out

            return hand_off

        def declare_state_and_memory(self, previous_state: Any) -> Any:
            # Not JIT-fused: the pool is Python.
            return replace(previous_state, jit_mode=False), None

    return PooledHandOff()


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


# How often the consumer, waiting for a batch, checks that FFCV's epoch thread is still alive (s).
_WORKER_CHECK_S = 0.5


@functools.cache
def _guarded_loader_class() -> Any:
    """FFCV's Loader whose epoch thread, when it dies, is an error in the consumer instead of a hang.

    FFCV 1.0.2's EpochIterator (a Thread) runs the whole pipeline; an exception there (a corrupt
    record the compiled decode rejects, a numba or memory error) ends the thread, Python prints it
    to stderr, and the consumer's `output_queue.get()` (no timeout) waits forever. Here the thread
    keeps its exception, and the consumer waits with a timeout and checks the thread is alive
    between waits: a wait that finds the queue empty and the thread gone raises DataError with
    the thread's exception. A timed get costs nothing per batch worth measuring (one Condition
    wait with a deadline instead of without). The Loader's `__iter__` is FFCV's own, repeated
    because it names EpochIterator directly; the thread is started by its constructor, so it
    cannot be wrapped afterwards."""
    import queue

    from ffcv.loader import Loader, epoch_iterator
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    class GuardedEpochIterator(EpochIterator):
        error: BaseException | None = None  # the exception that ended run(), set before the thread ends

        def run(self) -> None:
            try:
                super().run()
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                self.error = exc

        def __next__(self) -> Any:
            while True:
                try:
                    result = self.output_queue.get(timeout=_WORKER_CHECK_S)
                    break
                except queue.Empty:
                    if self.is_alive():
                        continue
                    try:  # the thread may have put its last item just before ending
                        result = self.output_queue.get_nowait()
                        break
                    except queue.Empty:
                        self.close()
                        exc = self.error
                        what = f"{type(exc).__name__}: {exc}" if exc is not None else "no exception recorded"
                        raise DataError(f"the ffcv worker thread died ({what})") from exc
            if result is None:
                self.close()
                raise StopIteration()
            slot, batch = result
            if epoch_iterator.IS_CUDA:  # as FFCV's own __next__: wait for the slot's copy stream
                self.current_stream.wait_stream(self.cuda_streams[slot])
            return batch

    class GuardedLoader(Loader):
        def __iter__(self) -> Any:
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            selected_order = order[: len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return GuardedEpochIterator(self, selected_order)

    return GuardedLoader


class FfcvPipeline(Pipeline):
    kind = "ffcv"

    def __init__(self, spec: ReadSpec, *, num_classes: int) -> None:
        """`spec` resolved, its path the converted directory."""
        reject_unknown(self.kind, spec.options, BACKEND_OPTIONS)
        if spec.randaugment:
            raise DataError(
                f"randaugment ({spec.randaugment}) runs in the dali and torchvision pipelines, not ffcv: use "
                f"--data.pipeline dali, or --data.randaugment '' to read with ffcv without it"
            )
        interpolation = str(spec.options.get("interpolation", "linear"))
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"ffcv interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        fname = beton_path(spec.path, spec.split)
        reader = check_beton(fname)
        super().__init__(spec, num_total=int(reader.num_samples), num_classes=num_classes)
        self.path = fname
        self.split = spec.split
        self.train = spec.train
        names = list(reader.handlers)
        has_crc = FFCV_CHECKSUM_FIELD in names
        checksums = reader.metadata[f"f{names.index(FFCV_CHECKSUM_FIELD)}"] if has_crc else None

        from ffcv.fields.decoders import IntDecoder
        from ffcv.transforms import ToTensor

        # Validation: a centre square of side CROP_PCT * shorter side, resized to img_size: the same
        # pixels as "resize the shorter side to img_size / CROP_PCT, centre-crop img_size".
        self._decoder = _crop_decoder(
            (spec.img_size, spec.img_size),
            train=spec.train,
            scale=tuple(spec.scale),
            ratio=RRC_RATIO,
            crop_pct=CROP_PCT,
            color_jitter=spec.color_jitter if spec.train else 0.0,
            seed=spec.seed,
            dct_scale=bool(spec.options.get("dct_scale", True)),
            crop_decode=bool(spec.options.get("crop_decode", True)),
            interpolation=interpolation,
            checksums=checksums,
        )
        image_ops: list[Any] = [self._decoder]
        label_ops: list[Any] = [IntDecoder(), ToTensor()]
        self._normalize: Normalizer | None = None
        self._copy_stream: Any = None
        if self.device.type == "cuda":
            # The batch leaves FFCV as uint8 in its pinned host slot; __iter__ copies it to the device
            # itself (see there why not FFCV's ToDevice).
            image_ops += [ToTensor()]
            self._normalize = Normalizer(self.device, self.dtype)
            self._copy_stream = torch.cuda.Stream(self.device)
        elif self.dtype == torch.uint8:
            image_ops += [_pooled_uint8_op(), ToTensor()]  # raw uint8 [B, S, S, 3], out of FFCV's buffer
        else:
            image_ops += [_normalize_chw_op(), ToTensor()]

        order = _traversal_order_factory(
            self.rank, self.world_size, spec.seed, shuffle=spec.train, drop_last=self.drop_last
        )
        # FFCV's Loader sets torch's intra-op thread count to its worker count (Compiler.set_num_threads,
        # at construction and at every epoch start); the training process keeps its own setting
        # (--train.cpu_threads).
        torch_threads = torch.get_num_threads()
        try:
            self.loader = _guarded_loader_class()(
                fname,
                batch_size=self.batch_size,
                num_workers=max(1, spec.num_workers),
                os_cache=spec.os_cache,
                order=order,
                distributed=False,
                seed=spec.seed,
                drop_last=self.drop_last,
                # The crc32 field is read by the image decoder from its own table, not as a batch column.
                pipelines={"image": image_ops, "label": label_ops} | ({FFCV_CHECKSUM_FIELD: None} if has_crc else {}),
                batches_ahead=spec.batches_ahead,
            )
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot open FFCV file {fname}: {exc}") from None
        finally:
            torch.set_num_threads(torch_threads)
        assert len(self.loader) == len(self), (len(self.loader), len(self))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._start_epoch()
        self.loader.next_epoch = epoch
        # Read by the compiled decoder (through its address) for every batch of this epoch. Written
        # before iter() starts FFCV's epoch thread, so that thread's first batch already sees it.
        self._decoder.epoch_cell[0] = epoch
        self._decoder.damage[:] = (-1, 0)  # nothing met yet in this epoch
        torch_threads = torch.get_num_threads()
        batches = iter(self.loader)
        try:
            yield from self._batches(batches, torch_threads)
        except DataError as exc:
            damaged = self._damage_error()
            if damaged is None:
                raise
            raise damaged from exc
        finally:
            batches.close()  # stop FFCV's prefetch thread when the consumer stops early
            torch.set_num_threads(torch_threads)

    def _damage_error(self) -> DataError | None:
        """The one-line error naming the damaged record the decoder met, or None."""
        index, code = (int(v) for v in self._decoder.damage)
        if index < 0:
            return None
        why = _DAMAGE.get(code, f"its decode failed (status {code})")
        return DataError(
            f"{self.path}: sample {index} of split '{self.split}' is damaged: {why}; the file changed after "
            "conversion (a bad disk, copy or transfer?): restore it or convert the dataset again"
        )

    def _batches(self, batches: Any, torch_threads: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._copy_stream is not None:
            yield from self._cuda_batches(batches, torch_threads)
            return
        for n, (images, labels) in enumerate(batches):
            if n == 0:
                # FFCV's epoch thread set torch's thread count before producing this batch.
                torch.set_num_threads(torch_threads)
            # Images: a pooled array only this batch's tensors reference (BufferPool), or a
            # fresh tensor after the dtype cast. Labels: FFCV recycles its buffers batches
            # later, so hand out a copy.
            if self.dtype == torch.uint8:
                # A pooled array (see _pooled_uint8_op): [B, 3, S, S] in channels-last memory.
                images = images.permute(0, 3, 1, 2)
            elif images.dtype != self.dtype:
                images = images.to(self.dtype)
            yield images, labels.view(-1).clone()

    def _cuda_batches(self, batches: Any, torch_threads: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Host -> device hand-off. FFCV's ToDevice(non_blocking=True) copies from a pinned host slot
        that its epoch thread rewrites batches_ahead + 2 batches later without waiting for that copy
        (its CUDA events only order device work), so with a training loop that never syncs the host
        can run ahead of the GPU and overwrite pixels the copy has not read yet. Here the copy runs on
        a stream of our own (it waits for nothing but itself), and the host waits for it to finish
        before asking FFCV for the next batch, which is the earliest FFCV may rewrite that slot. The
        device tensors come from torch's allocator, are ordered on the consumer's stream
        (wait_stream) and marked used there (record_stream), and the normaliser writes a fresh
        tensor on that stream: torch owns everything the consumer receives."""
        copy_stream = self._copy_stream
        normalize = self._normalize
        assert normalize is not None
        pending = None
        first = True
        while True:
            if pending is not None:
                pending.synchronize()  # the previous batch's host slot has been read
            try:
                images, labels = next(batches)
            except StopIteration:
                return
            if first:
                torch.set_num_threads(torch_threads)
                first = False
            with torch.cuda.stream(copy_stream):
                images_dev = images.to(self.device, non_blocking=True)  # [B, S, S, 3] uint8
                labels_dev = labels.view(-1).to(self.device, non_blocking=True)
                pending = torch.cuda.Event()
                pending.record(copy_stream)
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_stream(copy_stream)
            images_dev.record_stream(consumer)
            labels_dev.record_stream(consumer)
            yield normalize(images_dev.permute(0, 3, 1, 2)), labels_dev  # [B, 3, S, S] fresh, on `consumer`
