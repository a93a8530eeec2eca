"""The JPEG bytes a conversion stored, read in place: from the webdataset shards through their DALI
index files (`<key>.jpg` and `<key>.label` members by byte range), or from the `.beton` when the
conversion has no shards (FFCV's metadata and allocation table give each image's byte range).

Used by the torchvision pipeline to read a conversion whatever the layout it was made from
(ImageFolder, the official archives, Kaggle), and by `bench loaders` to measure the bare decode
rate of exactly the files the pipelines read.

Damage: when the conversion has a `.beton` with the crc32 field, every read is checked against
the CRC-32 stored for that position (the shards and the `.beton` hold the same bytes in the same
order), and a mismatch is a DataError naming the file, split and position: bytes damaged after
conversion are never handed to the decoder as if they were the image.

Order: position p is the p-th sample the converter wrote (its seeded permutation). `source_order()`
sorts the positions by source index (the manifest's `permutation`), which is the order ImageFolder
lists the same images in; so index i of a dataset built on it is the i-th converted image of the
raw tree, with the raw tree's label.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import numpy as np

from pipelines.base import ConvertedDataset, find_shards
from pipelines.constants import FFCV_CHECKSUM_FIELD, WDS_IMAGE_EXT, WDS_LABEL_EXT, beton_path, wds_dir
from pipelines.errors import DataError

_INDEX_VERSION = "v1.2"


def _parse_index(path: str) -> list[dict[str, tuple[int, int]]]:
    """DALI's webdataset index v1.2: per sample, extension -> (data offset, size)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != _INDEX_VERSION:
        raise DataError(f"not a DALI webdataset index ({_INDEX_VERSION}): {path}")
    samples = []
    for line in lines[1:]:
        parts = line.split()
        if not parts or len(parts) % 4:
            raise DataError(f"malformed line in the index {path}: {line[:80]!r}")
        samples.append({parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)})
    if len(samples) != int(head[1]):
        raise DataError(f"index {path} announces {head[1]} samples but lists {len(samples)}")
    return samples


class StoredJpegs:
    """Byte ranges of every stored JPEG of `split`, with its label; `read(p)` returns the bytes of
    position p. File descriptors are opened per process on first use, so an instance made before a
    DataLoader forks its workers reads safely in each of them (pread: no shared file position)."""

    def __init__(self, root: str, split: str) -> None:
        self.dataset = ConvertedDataset(root)
        self.split = split
        self.count = self.dataset.count(split)
        shards = os.path.isdir(wds_dir(self.dataset.root, split))
        if shards:
            self.source = "wds"
            self._load_wds(split)
        elif os.path.isfile(beton_path(self.dataset.root, split)):
            self.source = "ffcv"
            self._load_beton(split)
        else:
            raise DataError(f"{self.dataset.root} holds neither webdataset shards nor a .beton for split '{split}'")
        if len(self.offsets) != self.count:
            raise DataError(
                f"the stored {self.source} files of split '{split}' hold {len(self.offsets)} images but the manifest "
                f"of {self.dataset.root} says {self.count}; re-run the conversion"
            )
        self.checksums = self._load_checksums(split)
        self._fds: dict[str, int] = {}
        self._pid = -1

    def _load_checksums(self, split: str) -> np.ndarray | None:
        """The CRC-32 of each position's JPEG from the `.beton`'s crc32 field; None when there is no
        `.beton`, no ffcv to read it, or no such field (a conversion from before it existed)."""
        path = beton_path(self.dataset.root, split)
        if not os.path.isfile(path):
            return None
        from pipelines.ffcv_import import ffcv_importable

        if not ffcv_importable():
            return None
        from ffcv.reader import Reader
        reader = Reader(path)
        names = list(reader.handlers)
        if FFCV_CHECKSUM_FIELD not in names or int(reader.num_samples) != self.count:
            return None
        return np.asarray(reader.metadata[f"f{names.index(FFCV_CHECKSUM_FIELD)}"], dtype=np.int64)

    def _load_wds(self, split: str) -> None:
        tars, indexes = find_shards(self.dataset.root, split)
        self.paths = tars
        file_of, offsets, sizes, labels = [], [], [], []
        for k, (tar, idx) in enumerate(zip(tars, indexes)):
            with open(tar, "rb") as f:
                for sample in _parse_index(idx):
                    if WDS_IMAGE_EXT not in sample or WDS_LABEL_EXT not in sample:
                        raise DataError(f"a sample in {idx} lacks its .{WDS_IMAGE_EXT} or .{WDS_LABEL_EXT} member")
                    off, size = sample[WDS_IMAGE_EXT]
                    label_off, label_size = sample[WDS_LABEL_EXT]
                    f.seek(label_off)
                    raw = f.read(label_size)
                    if len(raw) != 8:
                        raise DataError(f"a .{WDS_LABEL_EXT} member of {tar} is not one int64")
                    file_of.append(k)
                    offsets.append(off)
                    sizes.append(size)
                    labels.append(int(np.frombuffer(raw, "<i8")[0]))
        self.file_of = np.asarray(file_of, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def _load_beton(self, split: str) -> None:
        from pipelines.ffcv_import import import_ffcv

        try:
            import_ffcv()
            from ffcv.reader import Reader
        except (ImportError, DataError) as exc:
            raise DataError(
                f"split '{split}' of {self.dataset.root} is stored only as a .beton, which needs the 'ffcv' package "
                f"to read ({exc}); convert with --formats wds as well"
            ) from None
        fname = beton_path(self.dataset.root, split)
        reader = Reader(fname)
        image, label = reader.metadata["f0"], reader.metadata["f1"]
        table = reader.alloc_table
        size_of = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
        self.paths = [fname]
        self.offsets = np.asarray(image["data_ptr"], dtype=np.int64)
        self.sizes = np.asarray([size_of[int(p)] for p in self.offsets], dtype=np.int64)
        self.file_of = np.zeros(len(self.offsets), dtype=np.int32)
        self.labels = np.asarray(label, dtype=np.int64).reshape(-1)

    def source_order(self) -> np.ndarray:
        """Positions sorted by source index: ImageFolder's order of the converted images (the stored
        order when the manifest has no permutation)."""
        perm = self.dataset.splits[self.split].get("permutation")
        if not isinstance(perm, list) or len(perm) != self.count:
            return np.arange(self.count, dtype=np.int64)
        return np.argsort(np.asarray(perm, dtype=np.int64), kind="stable")

    def read(self, position: int) -> bytes:
        pid = os.getpid()
        if pid != self._pid:  # a fresh process (a forked DataLoader worker): its own descriptors
            self._fds, self._pid = {}, pid
        k = int(self.file_of[position])
        fd = self._fds.get(self.paths[k])
        if fd is None:
            fd = self._fds[self.paths[k]] = os.open(self.paths[k], os.O_RDONLY)
        size = int(self.sizes[position])
        data = os.pread(fd, size, int(self.offsets[position]))
        if len(data) != size:
            raise DataError(f"{self.paths[k]} is shorter than its index says (re-run the conversion)")
        if self.checksums is not None and zlib.crc32(data) != int(self.checksums[position]):
            raise DataError(
                f"{self.paths[k]}: sample {position} of split '{self.split}' is damaged: its stored JPEG bytes do "
                "not match the crc32 written at conversion; the file changed after conversion (a bad disk, copy "
                "or transfer?): restore it or convert the dataset again"
            )
        return data

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"], state["_pid"] = {}, -1  # descriptors do not travel to another process
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", -1) == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
