"""Write an FFCV `.beton` from JPEG bytes the converter has already encoded, with FFCV's own
`DatasetWriter`, so the `.beton` stores exactly the bytes the webdataset shards store.

The file is a stock FFCV file: field `image` is an `RGBImageField` (JPEG mode) and `label` an
`IntField`, and the field table names the stock types, so any FFCV reader opens it. Only the
encoding step differs: `RGBImageField.encode` would resize and re-encode a pixel array with
OpenCV, while here the field instance stores the given JPEG bytes and their size as they are.

Determinism: the writer runs with one worker. With several, the order in which workers grab
file pages depends on timing, so two runs over the same samples would give different bytes (and
a resumed conversion must give the same bytes as an uninterrupted one). One worker only copies
bytes; it is not the bottleneck of a conversion.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tools.files import die_with_parent

# FFCV's default page; grown to fit the largest JPEG when needed (a sample never spans pages).
DEFAULT_PAGE_SIZE = 8 << 20
MIN_PAGE_SIZE = 2 << 20


# FFCV's record code for a JPEG image (`ffcv.fields.rgb_image.IMAGE_MODES["jpg"]`). It is part of
# the file format (stored in every .beton), so fixed; reading it from IMAGE_MODES, a numba typed
# dict, compiles numba code on first access: 0.35 s measured, serial time in every conversion.
# tests/test_convert_layouts.py checks the two agree.
JPEG_MODE = 0


@dataclass(frozen=True)
class EncodedJpeg:
    data: np.ndarray  # uint8 [nbytes]
    height: int
    width: int


def _store_encoded_jpeg(destination: np.ndarray, sample: EncodedJpeg, malloc, mode: int) -> None:
    """`RGBImageField.encode` for samples that are already JPEG bytes (same record layout).
    `mode` is FFCV's code for JPEG: looking it up in `IMAGE_MODES` (a numba typed dict) per sample
    cost more than the rest of the writer's work on the sample."""
    destination["mode"] = mode
    destination["height"], destination["width"] = sample.height, sample.width
    destination["data_ptr"], storage = malloc(sample.data.nbytes)
    storage[:] = sample.data


class JpegSlices:
    """Indexable dataset of `(EncodedJpeg, label)` read from byte ranges of the converter's tars.

    `files[file_ids[i]]` holds sample i's JPEG at `offsets[i]` with length `sizes[i]`."""

    def __init__(
        self,
        files: list[str],
        file_ids: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
        heights: np.ndarray,
        widths: np.ndarray,
        labels: np.ndarray,
    ) -> None:
        n = len(file_ids)
        assert all(len(a) == n for a in (offsets, sizes, heights, widths, labels)), "ragged sample arrays"
        self.files = list(files)
        self.file_ids, self.offsets, self.sizes = file_ids, offsets, sizes
        self.heights, self.widths, self.labels = heights, widths, labels
        self._owner_pid = os.getpid()
        self._fds: dict[int, int] = {}
        self._checked_pid = -1

    def __len__(self) -> int:
        return len(self.file_ids)

    def __getitem__(self, i: int) -> tuple[EncodedJpeg, int]:
        pid = os.getpid()
        if pid != self._checked_pid:
            # First call in FFCV's writer process: file descriptors are per process, and the
            # writer must not outlive a killed converter.
            if pid != self._owner_pid:
                die_with_parent(self._owner_pid)
            self._fds = {}
            self._checked_pid = pid
        fid = int(self.file_ids[i])
        fd = self._fds.get(fid)
        if fd is None:
            fd = self._fds[fid] = os.open(self.files[fid], os.O_RDONLY)
        size = int(self.sizes[i])
        data = os.pread(fd, size, int(self.offsets[i]))
        if len(data) != size:
            raise OSError(f"{self.files[fid]}: short read at {int(self.offsets[i])}")
        sample = EncodedJpeg(np.frombuffer(data, dtype=np.uint8), int(self.heights[i]), int(self.widths[i]))
        return sample, int(self.labels[i])


# How often FFCV's writer checks whether its workers are done (its own loop sleeps 0.1 s).
_POLL_SECONDS = 0.002


@contextlib.contextmanager
def _ffcv_progress_off() -> Iterator[None]:
    """FFCV's writer draws its own unlabelled tqdm bar (its module-level name `tqdm`, looked up at
    call time); the converter reports progress itself. The same loop polls its workers' progress
    every 0.1 s (module-level `sleep`), and measured, two of those polls were 0.2 s of the 0.25 s
    a small .beton took, all of it serial time after the encoding: it polls every 2 ms instead."""
    import ffcv.writer

    original, original_sleep = ffcv.writer.tqdm, ffcv.writer.sleep
    ffcv.writer.tqdm = functools.partial(original, disable=True)
    ffcv.writer.sleep = lambda _seconds: original_sleep(_POLL_SECONDS)
    try:
        yield
    finally:
        ffcv.writer.tqdm, ffcv.writer.sleep = original, original_sleep


def page_size_for(total_bytes: int, max_sample_bytes: int) -> int:
    """FFCV's default page (8 MiB), or its smallest (2 MiB) for small files: the data region
    starts one page into the file and the last page is written whole, so a small dataset would
    otherwise be mostly padding. Doubled until the largest sample fits (a sample never spans pages)."""
    size = DEFAULT_PAGE_SIZE if total_bytes >= 32 * DEFAULT_PAGE_SIZE else MIN_PAGE_SIZE
    while size < max_sample_bytes + 64:
        size *= 2
    return size


def write_beton(path: str, dataset: JpegSlices, max_resolution: int, jpeg_quality: int) -> None:
    """Write `dataset` to the FFCV file `path` (which the caller renames into place)."""
    if len(dataset) == 0:
        raise ValueError("an FFCV file needs at least one sample")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    image = RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    # Instance attribute, not a subclass: FFCV records a field's type by exact class in the file
    # header, and readers must see the stock RGBImageField.
    image.encode = functools.partial(_store_encoded_jpeg, mode=JPEG_MODE)
    fields = {"image": image, "label": IntField()}
    writer = DatasetWriter(
        path, fields, page_size=page_size_for(int(dataset.sizes.sum()), int(dataset.sizes.max())), num_workers=1
    )
    with _ffcv_progress_off():
        writer.from_indexed_dataset(dataset, chunksize=512)


def read_jpeg_table(path: str) -> dict[str, np.ndarray]:
    """Where each sample's stored JPEG lies in a `.beton` (data pointer and size from FFCV's own
    reader), with its height, width and label: enough to copy the samples into another file
    without decoding or re-encoding them."""
    from ffcv.reader import Reader

    reader = Reader(path)
    names = reader.field_names
    image = reader.metadata[f"f{names.index('image')}"]
    label = reader.metadata[f"f{names.index('label')}"]
    sizes_by_ptr = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    ptrs = image["data_ptr"].astype(np.int64)
    return {
        "offsets": ptrs,
        "sizes": np.asarray([sizes_by_ptr[p] for p in ptrs.tolist()], dtype=np.int64),
        "heights": image["height"].astype(np.int64),
        "widths": image["width"].astype(np.int64),
        "labels": np.asarray(label, dtype=np.int64),
    }
