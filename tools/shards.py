"""Webdataset tar shards and their DALI index files.

`build_shard` builds a whole shard in memory with `tarfile` (the reference); the converter writes
the same bytes in pieces (`member_bytes` per sample, `tar_end` once, `shard_index` from the sizes
alone), so no process ever holds a whole shard.

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


def _header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def member_bytes(key: str, jpeg: bytes, label: int) -> bytes:
    """The tar members of one sample, as `build_shard` writes them (a member's header does not
    depend on where it lies, so runs of members concatenate into a shard)."""
    if "." in key or "/" in key:
        raise ValueError(f"webdataset key {key!r} must not contain '.' or '/'")
    parts = []
    for ext, payload in _members(ShardSample(key, jpeg, label)):
        # The header bytes exactly as TarFile.addfile makes them for an archive opened with
        # format=USTAR_FORMAT and the default encoding.
        parts.append(
            _header(f"{key}.{ext}", len(payload)).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
        )
        parts.append(payload)
        parts.append(bytes(_padded(len(payload)) - len(payload)))
    return b"".join(parts)


def tar_end(length: int) -> bytes:
    """What `TarFile.close` appends to `length` bytes of members: two zero blocks, then zeros up to
    a whole record."""
    end = 2 * tarfile.BLOCKSIZE
    return bytes(end + (-(length + end)) % tarfile.RECORDSIZE)


def shard_index(keys: Sequence[str], jpeg_sizes: Sequence[int], labels: Sequence[int]) -> tuple[bytes, list[int]]:
    """The DALI index of the shard holding these samples (as `member_bytes` lays them out), and the
    data offset of each sample's JPEG, computed from the sizes alone."""
    lines = [f"{INDEX_VERSION} {len(keys)}"]
    jpeg_offsets = []
    at = 0
    for key, jpeg_size, label in zip(keys, jpeg_sizes, labels):
        fields = []
        for ext, size in ((WDS_IMAGE_EXT, jpeg_size), (WDS_CLS_EXT, len(str(label))), (WDS_LABEL_EXT, 8)):
            data_at = at + tarfile.BLOCKSIZE  # one header block for these short ustar names
            fields.append(f"{ext} {data_at} {size} {key}.{ext}")
            if ext == WDS_IMAGE_EXT:
                jpeg_offsets.append(data_at)
            at = data_at + _padded(size)
        lines.append(" ".join(fields))
    return ("\n".join(lines) + "\n").encode("utf-8"), jpeg_offsets


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
                info = _header(name, len(payload))
                header_at = tar.offset
                tar.addfile(info, io.BytesIO(payload))
                # The header is one 512-byte block for these short ustar names; the data follows it.
                data_at = header_at + tarfile.BLOCKSIZE
                assert tar.offset == data_at + _padded(len(payload)), "ustar header is not one block"
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
