"""Evaluation sample accounting: each validation sample counted once across ranks, whatever the padding."""

from __future__ import annotations

from typing import Any


def real_samples(loader: Any) -> int:
    """How many of this rank's validation samples are not repeats.

    Without drop_last every rank reads ceil(N / S) samples; to even the ranks out the backends repeat
    a few (fewer than S in all) at the *end* of some ranks' unshuffled order. Which ranks depends on
    how each backend splits the N samples: torchvision's DistributedSampler deals them out in turn
    (rank r gets r, r + S, ...), FFCV's order (pipelines.base.rank_order) cuts the padded list into
    contiguous pieces, DALI's reader cuts the unpadded list into contiguous shards. Counting only
    these samples, the ranks together count each validation sample exactly once.
    """
    n, s, r, per = loader.num_total, loader.world_size, loader.rank, loader.num_samples
    if s == 1:
        return per
    if loader.kind == "torchvision":
        real = len(range(r, n, s))
    elif loader.kind == "dali":
        real = (r + 1) * n // s - r * n // s
    else:
        real = n - r * per
    return max(0, min(per, real))


class RealBatches:
    """Iterate a validation loader and yield (images, labels) cut to this rank's real samples (the
    padding repeats of `real_samples` dropped), so that summing over ranks counts each sample once."""

    def __init__(self, loader: Any, max_batches: int = 0):
        self.loader = loader
        self.max_batches = max_batches

    def __iter__(self) -> Any:
        real = real_samples(self.loader)
        done = 0
        for i, (images, labels) in enumerate(self.loader):
            if self.max_batches and i >= self.max_batches:
                break
            keep = max(0, min(labels.shape[0], real - done))
            done += labels.shape[0]
            if keep == 0:
                continue
            if keep < labels.shape[0]:
                images, labels = images[:keep], labels[:keep]
            yield images, labels
