"""Evaluation sample accounting: each validation sample counted once across ranks, whatever the padding."""

from __future__ import annotations

from typing import Any


def real_samples(loader: Any) -> int:
    """How many of this rank's validation samples are not repeats: the backend's own padding rule
    (`pipelines.Pipeline.real_samples`), so that the ranks together count each sample once."""
    return loader.real_samples


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
