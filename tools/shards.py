"""Webdataset tar shards and their DALI index files, built in memory so the converter can write
each one atomically (temporary name, fsync, rename).

A sample is three tar members sharing a key: `<key>.jpg` (the JPEG bytes), `<key>.cls` (the class
index as ASCII digits, the webdataset convention) and `<key>.label` (the same index as a
little-endian int64: DALI batches fixed-width fields, not the variable-length `.cls`).
Headers are fixed (ustar, mtime 0, uid/gid 0, mode 0644) so equal samples give equal bytes.

The index is DALI's webdataset index format v1.2, as its `wds2idx` tool writes it: a first line
`v1.2 <number of samples>`, then one line per sample listing, for each member,
`<extension> <data offset> <size> <member name>`, space-separated.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.constants import WDS_CLS_EXT, WDS_IMAGE_EXT, WDS_LABEL_EXT

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class ShardSample:
    key: str
    jpeg: bytes
    label: int


@dataclass(frozen=True)
class BuiltShard:
    tar: bytes
    index: bytes
    jpeg_offsets: list[int]  # data offset of each sample's .jpg inside `tar`, in sample order


def _members(sample: ShardSample) -> tuple[tuple[str, bytes], ...]:
    return (
        (WDS_IMAGE_EXT, sample.jpeg),
        (WDS_CLS_EXT, str(sample.label).encode("ascii")),
        (WDS_LABEL_EXT, np.array(sample.label, dtype="<i8").tobytes()),
    )


def build_shard(samples: Sequence[ShardSample]) -> BuiltShard:
    """The tar bytes and the DALI index bytes of one shard holding `samples` in order."""
    buf = io.BytesIO()
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    jpeg_offsets: list[int] = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if "." in sample.key or "/" in sample.key:
                raise ValueError(f"webdataset key {sample.key!r} must not contain '.' or '/'")
            fields = []
            for ext, payload in _members(sample):
                name = f"{sample.key}.{ext}"
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                header_at = tar.offset
                tar.addfile(info, io.BytesIO(payload))
                # The header is one 512-byte block for these short ustar names; the data follows it.
                data_at = header_at + tarfile.BLOCKSIZE
                padded = -(-len(payload) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                assert tar.offset == data_at + padded, "ustar header is not one block"
                fields.append(f"{ext} {data_at} {len(payload)} {name}")
                if ext == WDS_IMAGE_EXT:
                    jpeg_offsets.append(data_at)
            lines.append(" ".join(fields))
    index = ("\n".join(lines) + "\n").encode("utf-8")
    return BuiltShard(buf.getvalue(), index, jpeg_offsets)


@dataclass(frozen=True)
class IndexEntry:
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)


def parse_index(text: str) -> list[IndexEntry]:
    """Parse a DALI webdataset index (v1.2, as written by `build_shard` or `wds2idx`)."""
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ValueError(f"index header {lines[0]!r} is not '{INDEX_VERSION} <count>'")
    count = int(head[1])
    entries = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"index line {line!r} is not groups of '<ext> <offset> <size> <name>'")
        members: dict[str, tuple[int, int]] = {}
        key = None
        for i in range(0, len(parts), 4):
            ext, offset, size, name = parts[i : i + 4]
            member_key = name[: name.find(".", name.rfind("/") + 1)]
            if key is None:
                key = member_key
            elif member_key != key:
                raise ValueError(f"index line mixes keys {key!r} and {member_key!r}")
            members[ext] = (int(offset), int(size))
        entries.append(IndexEntry(key or "", members))
    if len(entries) != count:
        raise ValueError(f"index header says {count} samples, found {len(entries)} lines")
    return entries


def read_tar_samples(path: str) -> Iterable[tuple[str, dict[str, tuple[int, bytes]]]]:
    """Yield (key, {extension: (data offset, bytes)}) for each sample of a tar, in order, using tarfile."""
    with tarfile.open(path, mode="r:") as tar:
        key = None
        group: dict[str, tuple[int, bytes]] = {}
        for member in tar:
            if not member.isreg():
                continue
            base = member.name[member.name.rfind("/") + 1 :]
            dot = base.find(".")
            if dot <= 0:
                continue
            member_key = member.name[: member.name.rfind("/") + 1 + dot]
            ext = base[dot + 1 :]
            f = tar.extractfile(member)
            assert f is not None  # a regular member always has data
            if key is not None and member_key != key:
                yield key, group
                group = {}
            key = member_key
            group[ext] = (member.offset_data, f.read())
        if key is not None:
            yield key, group
