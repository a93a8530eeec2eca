"""DALI backend: reads the converter's webdataset shards (with their DALI index files).

One pipeline definition, `define_graph(placement, ...)`, serves both placements:
  placement "gpu": JPEG decode + random crop on the GPU (nvJPEG, `device="mixed"`, hardware
                   decoder share `hw_decoder_load`), resize, RandAugment and crop_mirror_normalize
                   on the GPU; each batch is copied into torch-owned memory on torch's stream.
  placement "cpu": the same operators with `device_id=None` and the decoder on "cpu", so CI runs
                   the very graph the GPU runs; each batch is DALI's own output buffer, no copy.

Per batch (B images, output side S):
  <key>.jpg bytes --decode + random crop (area `scale`, ratio 3/4..4/3)--> uint8 [h, w, 3] each
  --resize to S x S--> [--flip, RandAugment (pipelines/dali_randaugment.py)-->]
  --crop_mirror_normalize (flip unless done before RandAugment, mean/std, HWC->CHW)--> float [B, 3, S, S]
  <key>.label (little-endian int64) --> int64 [B, 1] --> [B]

Epochs, order and augmentation seeds. DALI's reader shuffles inside its buffer (`random_shuffle`,
`initial_fill`) and with `shuffle_after_epoch` visits the tar shards in an order drawn from
`shuffle_after_epoch_seed`, cut between ranks by `shard_id`/`num_shards`. The buffer and that
order carry over from one epoch to the next, so a running reader cannot jump to "epoch e". We
therefore build a fresh DALI pipeline at the start of each epoch, seeded from (seed, epoch): the
shard order (same seed on every rank, so the ranks' pieces stay disjoint), the buffer shuffle and
the augmentation seeds (per rank). DALI's random operators (crop window, flip, colour jitter,
RandAugment's op / magnitude / sign draws) keep one generator per batch slot, seeded from the
pipeline seed, and the reader's order is a function of its seeds; so a sample's augmentation is a
function of (seed, epoch, rank, its place in the epoch), not of `num_threads` or of what ran
before: epoch e is the same reached directly or after a resume. (Unlike the ffcv and torchvision
pipelines it changes with the rank count: DALI cuts the shards between ranks itself.)

The rebuild costs no time between epochs: a build takes ~0.03 s, 0.4-1.4 s with RandAugment
(AutoGraph defines its ~770 operators) on 2 CPU cores, so a training pipeline builds epoch e + 1's
on a background thread while epoch e runs, and lets it start decoding once e has scheduled its
last batch; runs are scheduled by hand so that nothing is decoded past an epoch's end (DALI's
`run()` keeps `prefetch` batches in flight, which a per-epoch pipeline would throw away). Two
pipelines are alive around each epoch boundary. `bench loaders --dali-rebuild` measures the whole
gap between epochs and compares with stock DALI on the same shards. Each rank then reads exactly
`len(self)` batches (the plan in
pipelines/base.py), so `__len__` agrees between ranks even when the reader's shards differ by one
sample; with drop_last=False the last batch is cut to the plan's remainder.

Hand-off to torch, and why two threads did not gain (issue 29). On the CPU each batch used to be
copied out of DALI into a fresh torch tensor (`to_torch`). That copy is not one cheap memcpy: a
float32 batch of 64 at 224 px is 38.5 MB, above glibc's largest mmap threshold, so every batch
mapped fresh memory and page-faulted it in: 28-29 ms of the consumer thread per batch (the copy
into memory already mapped takes 4-5 ms), about 0.45 ms an image against ~1 ms for DALI's whole
decode + crop + resize + normalise on one thread. With one DALI thread it ran on the otherwise idle
second core and cost nothing; with two threads on two cores it took its core share from the
decoders, so 2 threads gained little (stock DALI fed through the same copy did no better). The CPU
placement now hands out DALI's own output buffers through DLPack (`share_host`): the pipeline runs on
DALI's dynamic executor (`exec_dynamic=True`, set explicitly because the hand-off depends on it),
which allocates each iteration's outputs afresh and never writes them again ("the buffers are not
invalidated", DALI's `release_outputs`), and the DLPack tensor holds a reference to its buffer, so a
batch stays the consumer's to keep and to write into (mixup, random erasing) after later runs and
after its epoch's pipeline is gone. The GPU placement still copies (`to_torch`): there the copy also
orders the batch after DALI's stream on torch's. Measured in the commit that made this change: the
rebuild, the hand scheduling, checkpointing and the reader's options each moved ours against stock
DALI by no more than the noise (0.96-1.04x) once both used the same hand-off.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from pipelines.base import Normalizer, Pipeline, derive_seed, find_shards, reject_unknown
from pipelines.constants import CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, WDS_IMAGE_EXT, WDS_LABEL_EXT, wds_dir
from pipelines.dali_randaugment import RandAugmentPolicy, parse_policy, rand_augment
from pipelines.errors import DataError
from pipelines.spec import ReadSpec

BACKEND_OPTIONS = ("hw_decoder_load", "initial_fill", "preallocate_hint")
READER_NAME = "reader"


def _import_dali() -> Any:
    try:
        import nvidia.dali
    except ImportError as exc:
        raise DataError(
            f"the dali pipeline needs NVIDIA DALI ('nvidia.dali'), which cannot be imported: {exc}"
        ) from None
    import nvidia.dali

    return nvidia.dali


def dali_cuda_flavours() -> list[int]:
    """CUDA major versions of the installed DALI wheels (`nvidia-dali-cuda130` -> 13)."""
    majors = set()
    for dist in importlib.metadata.distributions():
        match = re.fullmatch(r"nvidia[-_]dali[-_]cuda(\d+?)0", str(dist.metadata.get("Name", "")).lower())
        if match:
            majors.add(int(match.group(1)))
    return sorted(majors)


def cuda_flavour_mismatch(dali_majors: list[int], torch_cuda: str | None) -> str | None:
    """One line when the DALI wheel's CUDA flavour differs from torch's CUDA, else None. Nothing to
    compare when torch has no CUDA or no flavoured DALI wheel is found (a source build)."""
    if not torch_cuda or not dali_majors:
        return None
    torch_major = int(torch_cuda.split(".")[0])
    if torch_major in dali_majors:
        return None
    wheels = ", ".join(f"nvidia-dali-cuda{m}0" for m in dali_majors)
    return (
        f"DALI is installed for CUDA {'/'.join(map(str, dali_majors))} ({wheels}) but torch uses CUDA {torch_cuda}: "
        f"install nvidia-dali-cuda{torch_major}0 (scripts/setup.sh picks it)"
    )


_PAD_ROUND = 1 << 16  # padding rounded up to 64 KiB


def nvjpeg_padding(max_side: int) -> tuple[int, int]:
    """(device_memory_padding, host_memory_padding) in bytes for nvJPEG decoding images whose longer
    side is at most `max_side` (the converter's --max-res). DALI preallocates them per decoder
    thread (the host one twice, pinned, for double buffering), so they are sized from the largest
    image the dataset can hold, not ImageNet-at-full-size constants: device, its decoded RGB
    (max_side^2 x 3 bytes); host, the Huffman-decoded DCT coefficients of three full-resolution
    components as int16 (max_side^2 x 6 bytes, the 4:4:4 worst case; the converter writes 4:2:0,
    half that). Each rounded up to 64 KiB. At --max-res 256: 192 KiB and 384 KiB per thread, where
    the constants used before (211,025,920 and 140,544,512 bytes) were 1,073x and 357x that."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")

    def rounded(n: int) -> int:
        return -(-n // _PAD_ROUND) * _PAD_ROUND

    area = int(max_side) * int(max_side)
    return rounded(3 * area), rounded(6 * area)


def define_graph(
    placement: str,
    *,
    files: list[str],
    index_files: list[str],
    train: bool,
    img_size: int,
    scale: tuple[float, float],
    color_jitter: float,
    randaugment: RandAugmentPolicy | None,
    out_dtype: torch.dtype,
    shard_id: int,
    num_shards: int,
    reader_seed: int,
    shard_order_seed: int,
    initial_fill: int,
    os_cache: bool,
    prefetch: int,
    hw_decoder_load: float,
    preallocate_hint: int,
) -> tuple[Any, Any]:
    """The DALI graph, to be called inside a `Pipeline` context (one with `enable_conditionals`
    when `randaugment` is set: RandAugment splits the batch between its ops). Only `placement`
    ("cpu" or "gpu") decides where operators run; everything else is the same for both.

    Returns (images, labels): images [B, 3, S, S] normalised in `out_dtype` (float32/float16), or
    uint8 unnormalised when `out_dtype` is uint8 or bfloat16 (DALI has no bfloat16; torch normalises
    then); labels int64 [B, 1]."""
    from nvidia.dali import fn, types

    if placement not in ("cpu", "gpu"):
        raise ValueError(f"placement must be 'cpu' or 'gpu', got {placement!r}")
    gpu = placement == "gpu"
    # DALI warns about a shard-order seed without shard-order shuffling: pass it only when used.
    shard_order = {"shuffle_after_epoch_seed": shard_order_seed} if train else {}
    jpegs, labels = fn.readers.webdataset(
        paths=files,
        index_paths=index_files,
        ext=[WDS_IMAGE_EXT, WDS_LABEL_EXT],
        dtypes=[types.UINT8, types.INT64],
        missing_component_behavior="error",
        random_shuffle=train,
        initial_fill=initial_fill,
        seed=reader_seed,
        shuffle_after_epoch=train,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=False,
        dont_use_mmap=not os_cache,
        prefetch_queue_depth=prefetch,
        name=READER_NAME,
        **shard_order,
    )
    decode_device = "mixed" if gpu else "cpu"
    # Hardware-decoder share and preallocation exist on the mixed (GPU) decoder only.
    gpu_decoder_args: dict[str, Any] = {}
    if gpu:
        gpu_decoder_args = {
            "hw_decoder_load": hw_decoder_load,
            "preallocate_width_hint": preallocate_hint,
            "preallocate_height_hint": preallocate_hint,
        }
        if preallocate_hint > 0:  # the dataset's longest side is known: size nvJPEG's buffers from it
            device_pad, host_pad = nvjpeg_padding(preallocate_hint)
            gpu_decoder_args |= {"device_memory_padding": device_pad, "host_memory_padding": host_pad}
    if train:
        images = fn.decoders.image_random_crop(
            jpegs,
            device=decode_device,
            output_type=types.RGB,
            random_area=list(scale),
            random_aspect_ratio=list(RRC_RATIO),
            num_attempts=10,
            **gpu_decoder_args,
        )
        images = fn.resize(
            images, resize_x=img_size, resize_y=img_size, interp_type=types.INTERP_LINEAR, antialias=True
        )
        if color_jitter > 0:
            lo, hi = max(0.0, 1.0 - color_jitter), 1.0 + color_jitter
            images = fn.color_twist(
                images,
                brightness=fn.random.uniform(range=[lo, hi]),
                contrast=fn.random.uniform(range=[lo, hi]),
                saturation=fn.random.uniform(range=[lo, hi]),
            )
        mirror = fn.random.coin_flip(probability=0.5)
        if randaugment is not None:
            # timm flips before RandAugment (its shears and translations are not mirror-symmetric
            # for one draw), so the flip moves out of crop_mirror_normalize here.
            images = fn.flip(images, horizontal=mirror)
            images = rand_augment(images, randaugment, img_size)
            mirror = 0
    else:
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **gpu_decoder_args)
        images = fn.resize(
            images, resize_shorter=int(img_size / CROP_PCT), interp_type=types.INTERP_LINEAR, antialias=True
        )
        mirror = 0
    if out_dtype in (torch.bfloat16, torch.uint8):
        images = fn.crop_mirror_normalize(
            images, dtype=types.UINT8, output_layout="CHW", crop=(img_size, img_size), mirror=mirror
        )
    else:
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT16 if out_dtype == torch.float16 else types.FLOAT,
            output_layout="CHW",
            crop=(img_size, img_size),
            mean=[255.0 * m for m in IMAGENET_MEAN],
            std=[255.0 * s for s in IMAGENET_STD],
            mirror=mirror,
        )
    if gpu:
        labels = labels.gpu()
    return images, labels


def to_torch(output: Any, device: torch.device) -> torch.Tensor:
    """Copy one DALI output (a TensorList of equal-shaped samples) into a fresh torch tensor.

    The GPU placement's hand-off (the CPU one is `share_host`). Why a copy there and not DLPack: on
    the GPU the outputs are written on DALI's stream while the training step runs asynchronously on
    torch's, and DALI's legacy executor recycles its outputs after `prefetch_queue_depth` runs. Mixup
    and random erasing write into the batch in place. So torch gets memory it owns from its caching
    allocator, and the copy is issued on torch's current stream (`feed_ndarray`, as DALI's own
    PyTorch iterator does): kernels that read the batch are ordered after it. Cost: one device-memory
    copy per batch. On the CPU the same copy costs ~29 ms per float32 batch of 64 at 224 px, most of
    it page faults of the fresh 38.5 MB tensor: why the CPU placement does not copy."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    from nvidia.dali.plugin.pytorch.torch_utils import to_torch_type

    dense = output.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out


def share_host(output: Any) -> torch.Tensor:
    """One CPU output of a pipeline on DALI's dynamic executor (a TensorList of equal-shaped samples)
    as a torch tensor over DALI's own buffer, no copy (DLPack).

    Safe because that executor allocates every iteration's outputs afresh and never reuses a buffer
    something still references (DALI: with the default execution model "the buffers are not
    invalidated"), and the DLPack tensor references its buffer: the batch outlives later runs and
    the pipeline itself, and nothing but its holder writes into it. Not for the legacy executor,
    which recycles its outputs (tests/test_dali.py shows it)."""
    return torch.from_dlpack(output.as_tensor())


class DaliPipeline(Pipeline):
    kind = "dali"

    def __init__(self, spec: ReadSpec, *, num_total: int, num_classes: int) -> None:
        """`spec` resolved, its path the converted directory; `num_total` samples in the split."""
        reject_unknown(self.kind, spec.options, BACKEND_OPTIONS)
        policy = parse_policy(spec.randaugment) if spec.randaugment else None
        if policy is not None and spec.color_jitter > 0:
            raise DataError(
                "color_jitter and randaugment cannot be combined (timm skips colour jitter under RandAugment); "
                "set one of them"
            )
        _import_dali()
        self.files, self.index_files = find_shards(spec.path, spec.split)
        super().__init__(spec, num_total=num_total, num_classes=num_classes)
        self.placement = "gpu" if self.device.type == "cuda" else "cpu"
        if self.placement == "gpu":
            mismatch = cuda_flavour_mismatch(dali_cuda_flavours(), torch.version.cuda)
            if mismatch:
                warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
        self.train = spec.train
        # RandAugment is a training augmentation: evaluation reads plain centre crops, as timm does.
        self.randaugment = policy if spec.train else None
        self.augmentation = self._describe(spec.train, spec.img_size, spec.scale, spec.color_jitter)
        self.num_threads = max(1, spec.num_workers)
        self.prefetch = spec.batches_ahead
        self.graph_args: dict[str, Any] = {
            "files": self.files,
            "index_files": self.index_files,
            "train": spec.train,
            "img_size": spec.img_size,
            "scale": tuple(spec.scale),
            "color_jitter": spec.color_jitter,
            "randaugment": self.randaugment,
            "out_dtype": spec.dtype,
            "shard_id": spec.rank,
            "num_shards": spec.world_size,
            "initial_fill": int(spec.options.get("initial_fill", 1024)),
            "os_cache": spec.os_cache,
            "prefetch": spec.batches_ahead,
            "hw_decoder_load": float(spec.options.get("hw_decoder_load", 0.65)),
            "preallocate_hint": int(spec.options.get("preallocate_hint", 0)),
        }
        self._normalize = Normalizer(self.device, self.dtype) if self.dtype == torch.bfloat16 else None
        self.build_seconds: list[float] = []  # wall time of each (per-epoch) pipeline build
        # Training prepares epoch e + 1's pipeline while epoch e runs (see __iter__).
        self.prepare_ahead = spec.train
        self._builder: Any = None  # a one-thread executor building the next epoch's pipeline
        self._current: _EpochRun | None = None  # the epoch being iterated
        self._restore: bytes | None = None  # the position state the next set_epoch(e, start_batch) iteration resumes
        # Build epoch 0 now so that unreadable shards fail here, not in the training loop.
        self._ready: _EpochRun | None = _EpochRun(self.epoch, self.build_graph(self.epoch))
        reader_size = int(self._ready.pipe.epoch_size(READER_NAME))
        if reader_size != num_total:
            raise DataError(
                f"the shards in {wds_dir(spec.path, spec.split)} hold {reader_size} samples but the manifest says "
                f"{num_total}; re-run the conversion"
            )

    def _unrepeated(self) -> int:
        # DALI's reader cuts the unpadded list into contiguous shards.
        n, s, r = self.num_total, self.world_size, self.rank
        return (r + 1) * n // s - r * n // s

    def _describe(self, train: bool, img_size: int, scale: tuple[float, float], color_jitter: float) -> str:
        if not train:
            return f"resize shorter side to {int(img_size / CROP_PCT)} + centre crop {img_size} (dali)"
        parts = [f"RandomResizedCrop({img_size}, scale {scale[0]:g}-{scale[1]:g}) + flip"]
        if color_jitter > 0:
            parts.append(f"colour jitter {color_jitter:g}")
        if self.randaugment is not None:
            parts.append(self.randaugment.describe())
        return " + ".join(parts) + " (dali)"

    def describe(self) -> str:
        """The augmentation this pipeline applies, for the run's log."""
        return self.augmentation

    def build_graph(self, epoch: int, checkpoint: bytes | None = None) -> Any:
        """A built DALI pipeline seeded for `epoch` (what iterating that epoch runs), or restored from a DALI
        `checkpoint` of that epoch's pipeline (its readers' positions and its generators' states: the
        batches before it are neither read nor decoded); its wall time is appended to `build_seconds`.
        Iterate the pipeline itself in training; this is for benchmarks."""
        from nvidia.dali import pipeline_def

        t0 = time.perf_counter()
        graph_args = self.graph_args

        def graph() -> tuple[Any, Any]:
            return define_graph(
                self.placement,
                reader_seed=derive_seed(self.seed, epoch, self.rank, 2),
                shard_order_seed=derive_seed(self.seed, epoch, 3),
                **graph_args,
            )

        # Checkpointing on in every pipeline (DALI: no cost; measured within the noise against it off), so
        # that a pipeline restored from a checkpoint continues the very order an uninterrupted one reads
        # (DALI shuffles differently with it on). The dynamic executor (DALI's default) named explicitly:
        # the CPU hand-off (`share_host`) relies on its outputs never being recycled.
        pipe = pipeline_def(graph, enable_conditionals=self.randaugment is not None, enable_checkpointing=True)(
            exec_dynamic=True,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if self.placement == "gpu" else None,
            seed=derive_seed(self.seed, epoch, self.rank, 1),
            prefetch_queue_depth=self.prefetch,
            **({"checkpoint": checkpoint} if checkpoint is not None else {}),
        )
        try:
            pipe.build()
        except RuntimeError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise DataError(f"DALI cannot read the shards in {os.path.dirname(self.files[0])}: {first}") from None
        self.build_seconds.append(time.perf_counter() - t0)
        return pipe

    def _take(self, epoch: int) -> _EpochRun:
        """Epoch `epoch`'s pipeline: the one prepared ahead (a built, possibly already filling,
        untouched pipeline seeded for that epoch), else one built now."""
        ready, self._ready = self._ready, None
        if ready is not None and ready.epoch == epoch:
            if ready.future is not None:
                ready.pipe = ready.future.result()  # re-raises a failed build here
                ready.future = None
            return ready
        if ready is not None and ready.future is not None:
            ready.future.result()  # let a stale build finish before its pipeline is dropped
        return _EpochRun(epoch, self.build_graph(epoch))

    def _prepare(self, epoch: int) -> None:
        """Start building epoch `epoch`'s pipeline on a background thread (graph definition is
        Python, ~1 s for the RandAugment graph; DALI's pipeline stack is thread-local)."""
        if self._ready is not None and self._ready.epoch == epoch:
            return
        if self._builder is None:
            from concurrent.futures import ThreadPoolExecutor

            self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-next-epoch")
        self._ready = _EpochRun(epoch, None, future=self._builder.submit(self.build_graph, epoch))

    def _start_filling(self) -> None:
        """Let the prepared pipeline decode its first batches while this epoch's last ones finish."""
        ready = self._ready
        if ready is None or ready.scheduled:
            return
        if ready.future is not None:
            if not ready.future.done():
                return  # still building: it fills once taken
            ready.pipe, ready.future = ready.future.result(), None
        ready.schedule(len(self), self.prefetch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch e's batches from a DALI pipeline seeded for e (see the module docstring).

        Nothing is decoded past the epoch's end: runs are scheduled by hand (DALI's `run()` keeps
        `prefetch` batches in flight, which a per-epoch pipeline would throw away at every epoch
        end). While epoch e runs, epoch e + 1's pipeline is built on a background thread; once e
        has scheduled its last batch it starts filling, so its first batches decode while e's last
        ones are consumed and the gap between epochs is about one batch."""
        epoch = self._start_epoch()
        start = self._iter_start
        if start:
            state, self._restore = self._restore, None
            if state is None:
                raise DataError(f"the dali pipeline resumes epoch {epoch} at batch {start} only from the position "
                                "state saved there (position_state), and none was given")
            if self._ready is not None and self._ready.future is not None:
                self._ready.future.result()  # a stale build finishes before its pipeline is dropped
            self._ready = None
            run = _EpochRun(epoch, self.build_graph(epoch, checkpoint=state))
        else:
            run = self._take(epoch)
        self._current = run
        n = len(self) - start
        if self.prepare_ahead:
            self._prepare(epoch + 1)
        remaining = self.num_samples - start * self.batch_size
        try:
            for _ in range(n):
                run.schedule(n, self.prefetch)
                images_tl, labels_tl = run.pipe.outputs()
                if self.prepare_ahead and run.scheduled >= n:
                    self._start_filling()
                take = min(self.batch_size, remaining)
                remaining -= take
                if self.placement == "gpu":
                    with torch.cuda.device(self.device):
                        images = to_torch(images_tl, self.device)  # [B, 3, S, S], torch-owned
                        labels = to_torch(labels_tl, self.device).view(-1)  # [B]
                else:  # DALI's own buffers, no copy (see the module docstring: the copy cost a core share)
                    images = share_host(images_tl)
                    labels = share_host(labels_tl).view(-1)
                del images_tl, labels_tl
                if take < self.batch_size:
                    images, labels = images[:take], labels[:take]
                if self._normalize is not None:
                    images = self._normalize(images)
                yield images, labels
        finally:
            self._current = None
            del run  # release this epoch's threads and buffers (also when the consumer stops early)

    def position_state(self) -> bytes | None:
        """DALI's checkpoint of the running epoch's pipeline, as of the batches handed out so far (its
        readers' positions and its generators' states; a few hundred bytes)."""
        run = getattr(self, "_current", None)
        if run is None or run.pipe is None:
            return None
        state = run.pipe.checkpoint()
        return state.encode() if isinstance(state, str) else bytes(state)

    def restore_position(self, state: bytes | None) -> None:
        self._restore = state


class _EpochRun:
    """One epoch's DALI pipeline and how many of its iterations have been scheduled."""

    def __init__(self, epoch: int, pipe: Any, future: Any = None) -> None:
        self.epoch = epoch
        self.pipe = pipe
        self.future = future
        self.scheduled = 0

    def schedule(self, total: int, prefetch: int) -> None:
        """Keep `prefetch` iterations in flight, as `run()` does, but never schedule more than the
        epoch's `total`: the first call queues `prefetch` at once (DALI's own first fill)."""
        if self.scheduled >= total:
            return
        self.pipe.schedule_run()
        self.scheduled += prefetch if self.scheduled == 0 else 1
