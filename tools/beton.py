"""Write an FFCV `.beton` from JPEG bytes the converter has already encoded, so the `.beton` stores
exactly the bytes the webdataset shards store.

The file is a stock FFCV file: field `image` is an `RGBImageField` (JPEG mode), `label` an
`IntField`, and `crc32` an `IntField` holding the CRC-32 (zlib) of each stored JPEG, which the
ffcv pipeline checks when it reads a record (storage rots after conversion: a bad disk, a bad
copy, a cut rsync); the field table names the stock types, so any FFCV reader opens it.

Two writers give the same bytes (a test holds them to it):

- `write_beton`, the reference: FFCV's own `DatasetWriter` with one worker, the field instance
  storing the given JPEG bytes as they are instead of re-encoding a pixel array. One worker,
  because with several the order in which workers grab file pages depends on timing, and a
  resumed conversion must give the same bytes as an uninterrupted one. But that one worker copies
  every byte in series: at 64 cores it would take longer than all the encoding.
- `write_beton_in_place`, what the converter runs: the layout that one-worker `DatasetWriter`
  produces is a function of the sample sizes alone (pages filled in order; a sample that does
  not fit the current page's rest opens the next page), so it is computed up front (`plan_beton`,
  FFCV's own header, field and table types), the header, metadata and allocation table are
  written by the caller, and the JPEGs are copied into their places by parallel tasks
  (`copy_samples`, `os.copy_file_range` from the shards). Page gaps are left as holes, which
  read as the zeros FFCV writes there.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.constants import FFCV_CHECKSUM_FIELD
from tools.files import die_with_parent, pwrite_all

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
        checksums: np.ndarray,
    ) -> None:
        n = len(file_ids)
        assert all(len(a) == n for a in (offsets, sizes, heights, widths, labels, checksums)), "ragged sample arrays"
        self.files = list(files)
        self.file_ids, self.offsets, self.sizes = file_ids, offsets, sizes
        self.heights, self.widths, self.labels = heights, widths, labels
        self.checksums = checksums  # CRC-32 of each JPEG
        self._owner_pid = os.getpid()
        self._fds: dict[int, int] = {}
        self._checked_pid = -1

    def __len__(self) -> int:
        return len(self.file_ids)

    def __getitem__(self, i: int) -> tuple[EncodedJpeg, int, int]:
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
        return sample, int(self.labels[i]), int(self.checksums[i])


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
    from pipelines.ffcv_import import import_ffcv

    import_ffcv()  # first: through the numba cache (pipelines/ffcv_import.py)
    from ffcv.writer import DatasetWriter

    fields = _fields(max_resolution, jpeg_quality)
    # Instance attribute, not a subclass: FFCV records a field's type by exact class in the file
    # header, and readers must see the stock RGBImageField.
    fields["image"].encode = functools.partial(_store_encoded_jpeg, mode=JPEG_MODE)
    writer = DatasetWriter(
        path, fields, page_size=page_size_for(int(dataset.sizes.sum()), int(dataset.sizes.max())), num_workers=1
    )
    with _ffcv_progress_off():
        writer.from_indexed_dataset(dataset, chunksize=512)


def _fields(max_resolution: int, jpeg_quality: int) -> dict:
    from ffcv.fields import IntField, RGBImageField

    image = RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    return {"image": image, "label": IntField(), FFCV_CHECKSUM_FIELD: IntField()}


@dataclass(frozen=True)
class BetonPlan:
    """Where everything of a `.beton` lies, as FFCV's one-worker writer would place it."""

    head: bytes  # header, field descriptors and per-sample metadata, written at offset 0
    ptrs: np.ndarray  # int64 [n]: file offset of each sample's JPEG
    alloc_table: bytes  # written at `alloc_table_ptr`, the end of the file
    alloc_table_ptr: int
    page_size: int
    num_pages: int

    @property
    def file_size(self) -> int:
        return self.alloc_table_ptr + len(self.alloc_table)


def pack_pages(sizes: np.ndarray, page_size: int) -> tuple[np.ndarray, int]:
    """(offset of each sample from the start of the data region, pages used): FFCV's
    `MemoryAllocator` with one worker fills a page in sample order and opens the next page when a
    sample does not fit the current page's rest. Vectorised per page: the samples of one page are
    those whose running total stays within it."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and int(sizes.max()) > page_size:
        raise ValueError(f"a sample of {int(sizes.max())} bytes does not fit a {page_size}-byte page")
    ends = np.cumsum(sizes)  # [n] running total up to and including each sample
    offsets = np.empty(len(sizes), dtype=np.int64)
    i = page = 0
    while i < len(sizes):
        base = int(ends[i - 1]) if i else 0
        j = int(np.searchsorted(ends, base + page_size, side="right"))  # first sample past this page
        offsets[i:j] = page * page_size + (ends[i:j] - sizes[i:j] - base)
        page += 1
        i = j
    return offsets, page


def plan_beton(dataset: JpegSlices, max_resolution: int, jpeg_quality: int) -> BetonPlan:
    """The bytes and places `write_beton` would give `dataset`, without touching a sample."""
    from ffcv.types import (
        ALLOC_TABLE_TYPE,
        CURRENT_VERSION,
        TYPE_ID_HANDLER,
        FieldDescType,
        HeaderType,
        get_metadata_type,
    )
    from ffcv.utils import align_to_page

    n = len(dataset)
    if n == 0:
        raise ValueError("an FFCV file needs at least one sample")
    sizes = np.asarray(dataset.sizes, dtype=np.int64)
    page_size = page_size_for(int(sizes.sum()), int(sizes.max()))
    fields = _fields(max_resolution, jpeg_quality)

    # As DatasetWriter.prepare: header, field descriptors, metadata, data region on a page boundary.
    header = np.zeros(1, dtype=HeaderType)
    header["version"] = CURRENT_VERSION
    header["num_samples"] = n
    header["num_fields"] = len(fields)
    header["page_size"] = page_size
    descriptors = np.zeros(len(fields), dtype=FieldDescType)
    type_ids = {v: k for k, v in TYPE_ID_HANDLER.items()}
    for i, (name, field) in enumerate(fields.items()):
        encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")[: descriptors[0]["name"].shape[0]]
        descriptors[i]["type_id"] = type_ids.get(type(field), 255)
        descriptors[i]["name"][: len(encoded)] = encoded
        descriptors[i]["arguments"][:] = field.to_binary()[0]
    metadata_type = get_metadata_type(list(fields.values()))
    data_start = align_to_page(HeaderType.itemsize + descriptors.nbytes + n * metadata_type.itemsize, page_size)

    offsets, num_pages = pack_pages(sizes, page_size)
    ptrs = data_start + offsets
    alloc_table_ptr = data_start + num_pages * page_size
    header["alloc_table_ptr"] = alloc_table_ptr

    # As the fields' encode() fill the shared metadata table (image: mode, size, pointer; label).
    image_name, label_name, checksum_name = metadata_type.names
    metadata = np.zeros(n, dtype=metadata_type)
    metadata[image_name]["mode"] = JPEG_MODE
    metadata[image_name]["width"] = dataset.widths
    metadata[image_name]["height"] = dataset.heights
    metadata[image_name]["data_ptr"] = ptrs
    metadata[label_name] = dataset.labels
    metadata[checksum_name] = dataset.checksums

    # One allocation per sample, in sample order (one worker).
    alloc = np.zeros(n, dtype=ALLOC_TABLE_TYPE)
    alloc["sample_id"] = np.arange(n)
    alloc["ptr"] = ptrs
    alloc["size"] = sizes
    head = header.tobytes() + descriptors.tobytes() + metadata.tobytes()
    return BetonPlan(head, ptrs, alloc.tobytes(), alloc_table_ptr, page_size, num_pages)


@dataclass(frozen=True)
class CopyTask:
    dst: str
    src: str
    src_offsets: np.ndarray  # int64 [m]
    sizes: np.ndarray  # int64 [m]
    dst_offsets: np.ndarray  # int64 [m]


def _copy_range(src_fd: int, dst_fd: int, size: int, src_at: int, dst_at: int) -> None:
    done = 0
    while done < size:
        n = 0
        if hasattr(os, "copy_file_range"):
            try:
                n = os.copy_file_range(src_fd, dst_fd, size - done, src_at + done, dst_at + done)
            except OSError:
                n = 0  # not supported between these files: the plain copy below
        if n == 0:
            data = os.pread(src_fd, size - done, src_at + done)
            if not data:
                raise OSError(f"short read at {src_at + done}")
            n = os.pwrite(dst_fd, data, dst_at + done)
        done += n


def copy_samples(task: CopyTask) -> int:
    """Copy a run of JPEGs from one source file into their places in the `.beton` (in the kernel)."""
    src = os.open(task.src, os.O_RDONLY)
    try:
        dst = os.open(task.dst, os.O_WRONLY)
        try:
            for src_at, size, dst_at in zip(task.src_offsets.tolist(), task.sizes.tolist(), task.dst_offsets.tolist()):
                _copy_range(src, dst, size, src_at, dst_at)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return len(task.sizes)


def write_beton_in_place(
    path: str,
    dataset: JpegSlices,
    max_resolution: int,
    jpeg_quality: int,
    run_all: Callable[[Callable, Iterable], list],
    samples_per_task: int = 1024,
) -> None:
    """Write `dataset` to the FFCV file `path` (which the caller renames into place), bytes equal
    to `write_beton`'s; `run_all(copy_samples, tasks)` runs the copies (a pool's, or a loop)."""
    plan = plan_beton(dataset, max_resolution, jpeg_quality)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, plan.head, 0)
        os.ftruncate(fd, plan.file_size)
        pwrite_all(fd, plan.alloc_table, plan.alloc_table_ptr)
    finally:
        os.close(fd)
    tasks = []
    ids = np.asarray(dataset.file_ids, dtype=np.int64)
    # Runs of consecutive samples from one source file, cut into tasks of bounded length.
    cuts = np.flatnonzero(np.diff(ids)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(ids)]):
        for a in range(int(lo), int(hi), samples_per_task):
            b = min(a + samples_per_task, int(hi))
            tasks.append(
                CopyTask(
                    path,
                    dataset.files[int(ids[a])],
                    np.asarray(dataset.offsets[a:b], dtype=np.int64),
                    np.asarray(dataset.sizes[a:b], dtype=np.int64),
                    plan.ptrs[a:b],
                )
            )
    run_all(copy_samples, tasks)


def read_jpeg_table(path: str) -> dict[str, np.ndarray]:
    """Where each sample's stored JPEG lies in a `.beton` (data pointer and size from FFCV's own
    reader), with its height, width, label and (when the file has the field) CRC-32: enough to copy
    the samples into another file without decoding or re-encoding them."""
    from ffcv.reader import Reader

    reader = Reader(path)
    names = reader.field_names
    image = reader.metadata[f"f{names.index('image')}"]
    label = reader.metadata[f"f{names.index('label')}"]
    sizes_by_ptr = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    ptrs = image["data_ptr"].astype(np.int64)
    table = {
        "offsets": ptrs,
        "sizes": np.asarray([sizes_by_ptr[p] for p in ptrs.tolist()], dtype=np.int64),
        "heights": image["height"].astype(np.int64),
        "widths": image["width"].astype(np.int64),
        "labels": np.asarray(label, dtype=np.int64),
    }
    if FFCV_CHECKSUM_FIELD in names:
        table["crc32"] = np.asarray(reader.metadata[f"f{names.index(FFCV_CHECKSUM_FIELD)}"], dtype=np.int64)
    return table
