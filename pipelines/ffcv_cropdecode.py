"""The ffcv pipeline's image decoder and its compiled kernels: JPEG decode of the crop window only
(our C++ library, pipelines/_cropdecode.cpp, called through ctypes), fused with the resize, the
flip and the colour jitter, every random number a counter draw of (seed, epoch, dataset index)
(numba). `crop_decoder` is the FFCV decoder that runs them in FFCV's worker threads; the module
docstring of pipelines/ffcv_pipeline.py says why it is built this way (determinism, speed, damage).

The augmentation kernels are plain Python that numba compiles (`make_random_crop`,
`make_flip_and_jitter`, `make_draws_flip`): with `pipelines.base.counter_uniform` they are the
reference, with `counter_uniform_jit()` the decoder's (`compiled_kernels`, tested equal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import math
import os
from typing import Any

import numpy as np

from pipelines.errors import DataError

# OpenCV's interpolation codes (cv::INTER_LINEAR, cv::INTER_AREA), passed to the C++ resize.
INTERPOLATIONS = {"linear": 1, "area": 3}
CROP_DECODE_MODULE = "pipelines._cropdecode"
# What the decoder records for a record whose bytes fail their crc32 (`crop_decoder`'s `damage`
# cell), besides the C library's own negative codes (-1 libjpeg error, -6 libjpeg warned of
# corrupt data).
CHECKSUM_MISMATCH = -100


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


def _library() -> Any:
    """The built C++ library (ctypes.CDLL; the dynamic loader maps it once per process, whoever asks);
    DataError when it was not built. Its callers cache what they bind."""
    spec = importlib.util.find_spec(CROP_DECODE_MODULE)
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise DataError(
            "the ffcv pipeline's crop decoder (pipelines/_cropdecode.cpp) is not built: run "
            "'pip install -e .' in the project (scripts/setup.sh does), which compiles it against libjpeg-turbo and OpenCV"
        )
    try:
        return ctypes.CDLL(spec.origin)
    except OSError as exc:
        raise DataError(
            f"cannot load the crop decoder {spec.origin}: {exc} (rebuild it with 'pip install -e .')"
        ) from None


@functools.cache
def crop_decode_functions() -> tuple[Any, Any, Any, Any]:
    """The C++ library's entry points as ctypes functions (numba calls them from compiled code):
    (supmae_crop_decode, supmae_resize_flip, supmae_set_batch_output, supmae_batch_output).
    DataError when the library was not built."""
    lib = _library()
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


@functools.cache
def decode_ceiling_function() -> Any:
    """The C library's `supmae_decode_ceiling(jpegs, sizes, n, mode, scratch, scratch_size)` as a
    ctypes function: n JPEGs (arrays of addresses and sizes) decoded in one call, mode 0 entropy
    decoding only (the floor of any decoder of these files), mode 1 a full decode to RGB at the
    pipeline's settings; returns how many failed. What `supmae bench loaders` measures the pipelines
    against. DataError when the library was not built."""
    fn = _library().supmae_decode_ceiling
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint64]
    fn.restype = ctypes.c_int64
    return fn


def time_decode_ceilings(blobs: list[Any], passes: int = 3, warmup: bool = True) -> dict[str, float]:
    """Images/s of one core (the calling thread) on the JPEGs `blobs` (uint8 arrays, in memory):
    {"entropy_floor": ..., "full_c_decode": ...}, each the median of `passes` timed passes of
    decode_ceiling_function (after an untimed pass when `warmup`), the two modes alternating.
    ValueError when a JPEG does not decode."""
    import statistics
    import time

    decode = decode_ceiling_function()
    arrays = [np.ascontiguousarray(b, dtype=np.uint8) for b in blobs]
    addresses = np.array([a.ctypes.data for a in arrays], dtype=np.uint64)
    sizes = np.array([a.size for a in arrays], dtype=np.uint64)
    modes = ((0, "entropy_floor"), (1, "full_c_decode"))
    rates: dict[str, list[float]] = {key: [] for _, key in modes}
    # The two modes alternate within each pass, so a busy spell of the machine falls on both.
    for k in range(passes + 1) if warmup else range(1, passes + 1):
        for mode, key in modes:
            t0 = time.perf_counter()
            failed = decode(addresses.ctypes.data, sizes.ctypes.data, len(arrays), mode, None, 0)  # the thread's scratch
            elapsed = time.perf_counter() - t0
            if failed:
                raise ValueError(f"{failed} of {len(arrays)} JPEGs do not decode")
            if k:
                rates[key].append(len(arrays) / elapsed)
    return {key: statistics.median(r) for key, r in rates.items()}


@functools.cache
def test_switches() -> tuple[Any, Any, Any]:
    """The C library's switches for tests, as ctypes functions: (no_row_cut(on), force_scalar(on),
    row_cut_count()): decode every window with libjpeg's row skipping even where restart markers
    allow a cut; run the resize's scalar path even on an AVX2 CPU; how many windows this thread
    decoded from a cut. Process-wide switches: tests only."""
    lib = _library()
    no_row_cut, force_scalar, count = lib.supmae_crop_decode_no_row_cut, lib.supmae_resize_force_scalar, lib.supmae_row_cut_count
    no_row_cut.argtypes = force_scalar.argtypes = [ctypes.c_int64]
    no_row_cut.restype = force_scalar.restype = None
    count.argtypes = []
    count.restype = ctypes.c_int64
    return no_row_cut, force_scalar, count


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
    crop_decode = crop_decode_functions()[0]
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
def compiled_kernels() -> tuple[Any, Any, Any]:
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
def store_int64_kernel() -> Any:
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
def crc32_function() -> Any:
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
def image_at_kernel() -> Any:
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
def jitter_kernels() -> tuple[Any, Any]:
    """(colour jitter without the flip, the flip draw) compiled once per process, for the decoder
    paths that flip inside the C++ resize."""
    from numba import njit

    from pipelines.base import counter_uniform_jit

    uniform = counter_uniform_jit()
    return njit(nogil=True)(make_flip_and_jitter(uniform, flip=False)), njit(nogil=True)(make_draws_flip(uniform))


def crop_decoder(
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
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    # ctypes functions, called straight from the compiled decode (no numba dispatcher of their own
    # that several loaders' threads would share); DataError here, not in a worker, when unbuilt.
    crop_decode_c, resize_flip_c, _set_output, batch_output_c = crop_decode_functions()
    crc32_c = crc32_function()
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

        def declare_state_and_memory(self, previous_state: Any) -> Any:
            state, (output, scratch) = super().declare_state_and_memory(previous_state)
            if crop_decode:
                # The window decode uses a scratch of its thread's own (the C library's): FFCV
                # allocates this one per batch slot at every epoch, and its pages faulted in again
                # each time (31 per image at 512 px storage, measured). Only the whole-image
                # reference path (crop_decode=False) decodes into it.
                scratch = AllocationQuery((1,), scratch.dtype)
            return state, (output, scratch)

        def generate_code(self) -> Any:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            center_crop_c = Compiler.compile(get_center_crop)
            random_crop_c, _augment, read_int64 = compiled_kernels()
            store_int64 = store_int64_kernel()
            check_crc = crc_table is not None
            crc_address = np.int64(crc_table.ctypes.data if crc_table is not None else 0)
            damage_address = np.int64(self.damage.ctypes.data)
            checksum_mismatch = np.int64(CHECKSUM_MISMATCH)
            corrupt = np.int64(-6)
            jitter_c, draws_flip_c = jitter_kernels()
            image_at_c = image_at_kernel()
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
                                0,  # the thread's own scratch (declare_state_and_memory)
                                0,
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
