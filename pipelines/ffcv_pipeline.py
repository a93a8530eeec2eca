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

Speed (the decoder and its kernels: pipelines/ffcv_cropdecode.py): a training JPEG is decoded
only inside its crop window (`crop_decode`, on by default): our small C++ library
(pipelines/_cropdecode.cpp, built by `pip install -e .`, called through ctypes from the compiled
decoder as FFCV calls its own) starts at the window's first MCU row when the JPEG has a restart
marker after every row (the converter writes them: the rows above are then not even
entropy-decoded; without markers libjpeg skips them, entropy decoding only), decodes only the iMCU
columns covering the window and stops after its last row, then resizes and flips in the same call.
The decode runs at 1/2, 1/4 or 1/8 DCT scale when the crop still covers the output after scaling
(`dct_scale`, on by default; other k/8 factors were measured slower than a full decode: no SIMD
path), so the resize never shrinks by 2x or more and bilinear interpolation
(`interpolation="linear"`, the default: our own AVX2 resize with the flip folded in, within one
level of OpenCV's INTER_LINEAR at half its time) does not alias much; "area" (OpenCV's INTER_AREA,
FFCV's stock resize) costs 4-8x more per image on a downscale. `crop_decode=False` decodes the
whole image with FFCV's decoder and cuts the same window from it: the same pixels (tested byte for
byte), kept as the reference path. Memory is kept from epoch to epoch: the window decode's scratch
is its thread's own, and FFCV's batch buffers are allocated once (GuardedLoader._reuse_buffers);
FFCV allocates both afresh for every epoch, and faulting their pages in again cost about a tenth
of a worker's time at 512 px storage. Normalisation on the CPU is one parallel
compiled pass (normalise + HWC->CHW) in FFCV's worker thread into pooled output arrays (see
BufferPool); uint8 batches on the CPU are decoded straight into pooled arrays (_pooled_uint8_op).
Per core this decodes faster than a full libjpeg-turbo decode of the same files: `supmae bench
loaders` prints both, with the entropy-decoding floor (benchmarks/RESULTS.md).

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
import functools
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
from pipelines.ffcv_cropdecode import CHECKSUM_MISMATCH, INTERPOLATIONS, crop_decode_functions, crop_decoder
from pipelines.spec import ReadSpec

BACKEND_OPTIONS = ("dct_scale", "crop_decode", "interpolation")
# What the decoder records for a damaged record (its `damage` cell): ours, and the C library's own
# negative codes (-1 libjpeg error, -6 libjpeg warned of corrupt data).
_DAMAGE = {
    CHECKSUM_MISMATCH: "its stored JPEG bytes do not match the crc32 written at conversion",
    -1: "libjpeg cannot decode its stored JPEG",
    -6: "libjpeg reports corrupt data in its stored JPEG (a truncated scan or a stray marker)",
}


def _import_ffcv() -> Any:
    from pipelines.ffcv_import import import_ffcv

    return import_ffcv()


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


def _traversal_order_factory(rank: int, world_size: int, seed: int, shuffle: bool, drop_last: bool,
                             batch_size: int) -> Any:
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
            picks = rank_order(len(self.indices), rank, world_size, seed, epoch, shuffle, drop_last, batch_size)
            return np.asarray(self.indices)[picks]

    return RankedOrder()


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

    _decode, _resize, set_output, _get_output = crop_decode_functions()

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
                # The decode loop's images go to the workers one at a time as each finishes
                # (numba's chunk size, per launching thread), not in equal static shares: an
                # image's cost varies with its crop window, and with 2 workers the equal halves
                # of a batch left one idle while the other finished (measured 1 -> 2 workers:
                # 1.53-1.83x static, 1.88-1.95x one at a time, on a shared machine).
                import numba

                set_chunksize = getattr(numba, "set_parallel_chunksize", None)  # numba >= 0.57
                if set_chunksize is not None:
                    set_chunksize(1)
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
        previous: GuardedEpochIterator | None = None  # the last epoch's thread

        def __iter__(self) -> Any:
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            # The pipeline's set_epoch(e, start_batch): the batches before it are not read at all.
            skip = getattr(self, "skip_batches", 0) * self.batch_size
            selected_order = order[skip : len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            self._reuse_buffers()
            self.previous = GuardedEpochIterator(self, selected_order)
            return self.previous

        def _reuse_buffers(self) -> None:
            """One set of FFCV's batch buffers for all epochs. FFCV allocates them afresh for every
            epoch (Graph.allocate_memory in EpochIterator), and their pages are faulted in again
            each time: 9.6 MB a batch slot touched per epoch for 64 x 224 px. Safe because the
            previous epoch's thread is over first (it has put its last batch, or stops within a
            batch once closed), and no batch handed out keeps pointing into these buffers: labels
            are copied, uint8 and float images live in pooled arrays, and CUDA batches are copied
            and waited for before the next one is asked for (FfcvPipeline._batches)."""
            previous = self.previous
            if previous is not None:
                previous.terminate_event.set()  # FFCV's close(): the thread stops within a batch
                previous.join()
            graph = self.graph
            if getattr(graph, "reused_buffers", None) is None:
                graph.reused_buffers = {}
                allocate = graph.allocate_memory

                def allocate_once(batch_size: int, slots: int) -> Any:
                    key = (batch_size, slots)
                    if key not in graph.reused_buffers:
                        graph.reused_buffers[key] = allocate(batch_size, slots)
                    return graph.reused_buffers[key]

                graph.allocate_memory = allocate_once

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
        self._decoder = crop_decoder(
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

        order = self._order = _traversal_order_factory(
            self.rank, self.world_size, spec.seed, shuffle=spec.train, drop_last=self.drop_last,
            batch_size=self.batch_size,
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
        self.loader.skip_batches = self._iter_start
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

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """Dataset indices of this rank's batch `batch` of `epoch` (the traversal order; nothing is read)."""
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != epoch:
            cached = self._order_cache = (epoch, self._order.sample_order(epoch))
        return cached[1][batch * self.batch_size : (batch + 1) * self.batch_size]

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
