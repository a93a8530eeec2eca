"""What every data pipeline shares: the interface, the per-rank epoch plan, the reading of a
converted dataset's manifest and shard list, and the fused normalisation.

Shape legend: B batch, H/W image height/width, C = 3 channels.

Epoch plan (identical for every backend, so that `__len__` agrees between ranks and backends):
with N samples in the split, S ranks and batch B,
  drop_last=True:  every rank sees N // S samples, (N // S) // B full batches; the ranks' sets are
                   disjoint and the remainder (at most S - 1 + S * (B - 1) samples) is dropped.
  drop_last=False: every rank sees ceil(N / S) samples (a few repeated to even the ranks out, as
                   torch's DistributedSampler does) in ceil(ceil(N / S) / B) batches, the last
                   one partial.
"""

from __future__ import annotations

import abc
import functools
import glob
import json
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.constants import CLASSES_FILE, IMAGENET_MEAN, IMAGENET_STD, MANIFEST_FILE, wds_dir
from pipelines.errors import DataError

if TYPE_CHECKING:
    from pipelines.spec import ReadSpec


class Pipeline(abc.ABC):
    """A loader yielding `(images [B, 3, H, W] normalised, labels int64 [B])` on `device`.

    Iterating starts the epoch set by `set_epoch` (or the one after the previous iteration when
    `set_epoch` was not called, as FFCV's loader does); the order is a function of
    `(seed, epoch)` only, so the same seed replays the same order.
    """

    kind: str = ""

    def __init__(self, spec: ReadSpec, *, num_total: int, num_classes: int) -> None:
        """`spec` resolved (`ReadSpec.resolved()`); `num_total` samples in the split, `num_classes` classes."""
        self.num_total = num_total
        self.num_classes = num_classes
        self.batch_size = spec.batch_size
        self.rank = spec.rank
        self.world_size = spec.world_size
        self.drop_last = spec.drop_last
        self.seed = spec.seed
        self.device = spec.device
        self.dtype = spec.dtype
        self.num_samples, self._num_batches = epoch_plan(num_total, self.world_size, self.batch_size, self.drop_last)
        if self._num_batches == 0:
            raise DataError(
                f"{num_total} samples cannot fill one batch of {self.batch_size} per rank on {self.world_size} rank(s)"
                + (" with drop_last" if self.drop_last else "")
                + ": lower batch_size"
            )
        self.epoch = 0
        self.start_batch = 0  # set_epoch's skip for the next iteration
        self._iter_start = 0  # the skip of the iteration running now

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch the next iteration reads (its order and its augmentation seeds), from its batch
        `start_batch` on: the batches before it are skipped without being read or decoded (a run resumed
        from a checkpoint taken inside the epoch). The skip applies to that one iteration."""
        if epoch < 0:
            raise DataError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise DataError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _start_epoch(self) -> int:
        """The epoch this iteration reads; the next iteration defaults to the one after it, from its start."""
        epoch = self.epoch
        self.epoch = epoch + 1
        self._iter_start = self.start_batch
        self.start_batch = 0
        return epoch

    def position_state(self) -> bytes | None:
        """What, besides (epoch, batches read), the running epoch's position needs to resume exactly: None
        for pipelines whose order and augmentation are functions of (seed, epoch, sample index)."""
        return None

    def restore_position(self, state: bytes | None) -> None:
        """Give the next `set_epoch(e, start_batch)` iteration the `position_state()` saved at that point."""

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray | None:
        """The dataset indices of this rank's batch `batch` of `epoch` (without reading it), or None when the
        pipeline cannot tell them in advance."""
        return None

    @property
    def real_samples(self) -> int:
        """How many of this rank's samples per epoch are not repeats.

        Without drop_last every rank reads ceil(N / S) samples; to even the ranks out the backends
        repeat a few (fewer than S in all) at the *end* of some ranks' unshuffled order. Which ranks
        depends on how the backend splits the N samples (`_unrepeated`). Counting only these
        samples, the ranks together count each sample of the split exactly once."""
        if self.world_size == 1:
            return self.num_samples
        return max(0, min(self.num_samples, self._unrepeated()))

    def _unrepeated(self) -> int:
        """This rank's share of the N samples before clamping: the padded permutation is dealt out in
        turn (`rank_order`, DistributedSampler), so rank r's real samples are positions r, r + S, ...
        below N and its repeats (if any) come last."""
        return len(range(self.rank, self.num_total, self.world_size))

    @abc.abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of this epoch: (images [B, 3, H, W] normalised on the device, labels [B] int64)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, samples/rank={self.num_samples}, batches={len(self)}, "
            f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, device={self.device})"
        )


def epoch_plan(num_total: int, world_size: int, batch_size: int, drop_last: bool) -> tuple[int, int]:
    """(samples this rank yields per epoch, batches per epoch), the same on every rank."""
    if drop_last:
        per_rank = num_total // world_size
        batches = per_rank // batch_size
        return batches * batch_size, batches
    per_rank = math.ceil(num_total / world_size)
    return per_rank, math.ceil(per_rank / batch_size)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixing `parts` (seed, epoch, rank, ...), stable across runs and platforms."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


# Counter-based random draws: a uniform is a pure function of (seed, epoch, sample index, stream), so
# a sample's augmentation does not depend on which worker, thread or rank decodes it, nor on how many
# draws came before it (a resume replays it exactly). The hash chains splitmix64's finaliser over the
# four words; `stream` numbers the independent draws one sample needs (crop tries, flip, jitter, ...).
# Written twice: `counter_hash` / `counter_uniform` below are the pure-Python reference, and
# `counter_uniform_jit()` is the same arithmetic in numba for FFCV's compiled decoder (tested equal).
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_TWO_POW_MINUS_53 = 1.0 / 9007199254740992.0


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def counter_hash(seed: int, epoch: int, index: int, stream: int) -> int:
    """A 64-bit hash of the four words (each taken modulo 2**64)."""
    h = 0
    for word in (seed, epoch, index, stream):
        h = _mix64(((h ^ (int(word) & _MASK64)) + _GOLDEN) & _MASK64)
    return h


def counter_uniform(seed: int, epoch: int, index: int, stream: int) -> float:
    """A uniform draw in [0, 1) (53 bits) from `counter_hash`."""
    return (counter_hash(seed, epoch, index, stream) >> 11) * _TWO_POW_MINUS_53


@functools.cache
def counter_uniform_jit() -> Any:
    """`counter_uniform` compiled with numba (uint64 arithmetic wraps like the masked reference);
    callable from other numba functions. numba is imported here, only by the backends that compile."""
    from numba import njit

    golden, mix1, mix2 = np.uint64(_GOLDEN), np.uint64(_MIX1), np.uint64(_MIX2)
    s30, s27, s31, s11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)

    @njit(nogil=True, inline="always")
    def mix64(z):  # pragma: no cover - runs compiled
        z = (z ^ (z >> s30)) * mix1
        z = (z ^ (z >> s27)) * mix2
        return z ^ (z >> s31)

    @njit(nogil=True)
    def uniform(seed, epoch, index, stream):  # pragma: no cover - runs compiled
        h = mix64((np.uint64(0) ^ np.uint64(seed)) + golden)
        h = mix64((h ^ np.uint64(epoch)) + golden)
        h = mix64((h ^ np.uint64(index)) + golden)
        h = mix64((h ^ np.uint64(stream)) + golden)
        return np.float64(h >> s11) * _TWO_POW_MINUS_53

    return uniform


def rank_order(
    num_total: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool, drop_last: bool,
    batch_size: int = 0,
) -> np.ndarray:
    """Sample indices this rank reads in `epoch` (FFCV's traversal order).

    One permutation of all samples per (seed, epoch), shared by every rank. Training (`drop_last`, with
    its `batch_size` B) deals it out in blocks of B: rank r's batch k is block k S + r, so micro-batch
    k of all ranks together is positions [k B S, (k + 1) B S), and each rank's batch is the very block
    a single process with S times the accumulation reads as its micro-batch k S + r: an optimiser step
    of a given effective batch reads the same samples in the same micro-batches (BatchNorm statistics
    included) on 1, 2, 4 or 8 ranks. Otherwise (evaluation) positions are dealt out in turn (r, r + S,
    ...), as torch's DistributedSampler does. Either way the ranks' sets are disjoint and cover the
    epoch (its first N // S * S positions with drop_last; padded by wrapping around to ceil(N / S) per
    rank without)."""
    order = np.arange(num_total, dtype=np.int64)
    if shuffle:
        order = np.random.default_rng(derive_seed(seed, epoch)).permutation(num_total)
    per_rank = num_total // world_size if drop_last else math.ceil(num_total / world_size)
    order = np.resize(order, per_rank * world_size)
    return deal(order, rank, world_size, batch_size if drop_last else 0)


def deal(order: np.ndarray, rank: int, world_size: int, block: int) -> np.ndarray:
    """Rank `rank`'s share of `order` (length a multiple of `world_size`): blocks of `block` dealt out in
    turn (block k S + r is rank r's k-th; a last partial round is dealt out one by one), or single
    positions in turn when `block` is 0."""
    if block <= 0 or world_size == 1:
        return order[rank::world_size]
    full = len(order) // (block * world_size) * block * world_size
    blocks = order[:full].reshape(-1, world_size, block)[:, rank, :].reshape(-1)
    return np.concatenate([blocks, order[full:][rank::world_size]])


class ConvertedDataset:
    """The manifest and class list of a directory written by `supmae convert`."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        if not os.path.exists(self.root):
            raise DataError(f"dataset path does not exist: {self.root}")
        if not os.path.isdir(self.root):
            raise DataError(f"dataset path is not a directory: {self.root}")
        manifest_path = os.path.join(self.root, MANIFEST_FILE)
        if not os.path.isfile(manifest_path):
            raise DataError(f"not a converted dataset (no {MANIFEST_FILE}; run 'supmae convert' first): {self.root}")
        self.manifest = _read_json(manifest_path, dict)
        classes_path = os.path.join(self.root, CLASSES_FILE)
        if os.path.isfile(classes_path):
            self.classes = [str(c) for c in _read_json(classes_path, list)]
        elif isinstance(self.manifest.get("classes"), list):
            self.classes = [str(c) for c in self.manifest["classes"]]
        else:
            raise DataError(f"converted dataset has no class list ({CLASSES_FILE}): {self.root}")
        splits = self.manifest.get("splits")
        if not isinstance(splits, dict):
            raise DataError(f"manifest has no 'splits' table: {manifest_path}")
        self.splits: dict[str, Any] = splits

    def count(self, split: str) -> int:
        if split not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise DataError(f"split '{split}' is not in {os.path.join(self.root, MANIFEST_FILE)} (splits: {known})")
        try:
            return int(self.splits[split]["count"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"manifest split '{split}' has no sample count: {self.root}") from None

    @property
    def source_root(self) -> str | None:
        src = self.manifest.get("source_root")
        return str(src) if src else None


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST_FILE))


def find_shards(root: str, split: str) -> tuple[list[str], list[str]]:
    """(tar shards, their DALI index files) of `split`, sorted; DataError naming what is missing."""
    folder = wds_dir(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"webdataset shards not found: {folder} (convert the dataset with --formats wds)")
    tars = sorted(glob.glob(os.path.join(folder, "*.tar")))
    if not tars:
        raise DataError(f"no .tar shards in {folder}")
    indexes = []
    for tar in tars:
        idx = tar[: -len(".tar")] + ".idx"
        if not os.path.isfile(idx):
            raise DataError(f"shard has no DALI index file: {tar} (expected {idx}; make it with wds2idx)")
        if not os.access(tar, os.R_OK) or not os.access(idx, os.R_OK):
            raise DataError(f"shard or its index is not readable: {tar}")
        indexes.append(idx)
    return tars, indexes


def _read_json(path: str, kind: type) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataError(f"not valid JSON ({exc.msg}, line {exc.lineno}): {path}") from None
    if not isinstance(value, kind):
        raise DataError(f"expected a JSON {kind.__name__} in {path}")
    return value


class Normalizer:
    """uint8 images [B, 3, H, W] (any memory layout) -> (x / 255 - mean) / std in `dtype`, as ONE
    fused elementwise op (`addcmul`: bias + x * scale) writing a fresh contiguous tensor. With
    `dtype` uint8 it hands the images back as they are: the consumer normalises."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(device)
        self.bias = (-mean / std).view(1, 3, 1, 1).to(device)
        self.dtype = dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.uint8:
            return images
        out = torch.empty(images.shape, dtype=self.dtype, device=images.device)  # [B, 3, H, W] contiguous
        return torch.addcmul(self.bias, images, self.scale, out=out)


def reject_unknown(kind: str, backend_kw: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(backend_kw) - set(known))
    if unknown:
        accepted = ", ".join(known) or "none"
        raise DataError(f"the {kind} pipeline does not take option(s) {', '.join(unknown)} (it takes: {accepted})")
