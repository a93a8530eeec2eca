"""`supmae convert --verify OUT`: re-read every output of a conversion and check it against
its manifest.

Checked: the manifest, `classes.json`, `sources/<split>.tsv` and `skipped.tsv` agree with each
other (counts reconcile, class counts match the labels); each listed file exists with its
recorded size; every webdataset shard holds, per sample, exactly a `.jpg`, a `.cls` and a
`.label` with equal labels, keys increasing, and its DALI index matches the tar's real member
offsets and sizes; each `.beton` opens with FFCV's reader with fields `image` (RGBImageField,
JPEG mode) and `label` (IntField). In output order, each sample's label equals the label of the
source the permutation names, in every format; every JPEG decodes completely (Pillow, no reduced
scale), is RGB, has the size its FFCV record says and a longer side <= max_res; when both formats
exist, they store byte-identical JPEGs. No leftover temporaries or unfinished work state.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
import zlib
from collections.abc import Iterator

import numpy as np

from pipelines.constants import CLASSES_FILE, FFCV_CHECKSUM_FIELD, FFCV_FIELDS, MANIFEST_FILE, SKIPPED_FILE
from tools.files import TMP_MARK
from tools.shards import parse_index, read_tar_samples

_DECODE_CHUNK = 256


def _decode_check(jpeg: bytes) -> tuple[str | None, int, int, bytes]:
    """(error or None, width, height, digest) of one stored JPEG, fully decoded."""
    from PIL import Image

    digest = hashlib.blake2b(jpeg, digest_size=16).digest()
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            if img.format != "JPEG":
                return f"stored image is {img.format}, not JPEG", 0, 0, digest
            img.load()
            if img.mode != "RGB":
                return f"stored JPEG is {img.mode}, not RGB", img.size[0], img.size[1], digest
            return None, img.size[0], img.size[1], digest
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a finding, not a crash
        return f"does not decode: {type(exc).__name__}: {exc}", 0, 0, digest


def _check_shard(task: tuple[str, str | None]) -> dict:
    """Read one tar (and its index) completely; decode every JPEG."""
    tar_path, idx_path = task
    problems: list[str] = []
    samples = []
    try:
        groups = list(read_tar_samples(tar_path))
    except (OSError, tarfile.TarError, EOFError) as exc:
        return {"problems": [f"{tar_path}: unreadable tar: {exc}"], "samples": []}
    offsets: dict[str, dict[str, tuple[int, int]]] = {}
    for key, members in groups:
        offsets[key] = {ext: (off, len(data)) for ext, (off, data) in members.items()}
        if set(members) != {"jpg", "cls", "label"}:
            problems.append(f"{tar_path}: sample {key}: members {sorted(members)}, expected cls, jpg, label")
        cls_label = label = None
        if "cls" in members:
            try:
                cls_label = int(members["cls"][1].decode("ascii"))
            except ValueError:
                problems.append(f"{tar_path}: sample {key}: .cls is not an ASCII integer")
        if "label" in members:
            raw = members["label"][1]
            if len(raw) != 8:
                problems.append(f"{tar_path}: sample {key}: .label has {len(raw)} bytes, expected 8")
            else:
                label = int(np.frombuffer(raw, dtype="<i8")[0])
        if cls_label is not None and label is not None and cls_label != label:
            problems.append(f"{tar_path}: sample {key}: .cls {cls_label} != .label {label}")
        jpeg = members.get("jpg", (0, b""))[1]
        err, width, height, digest = _decode_check(jpeg)
        samples.append((key, label if label is not None else cls_label, err, width, height, digest))
    if idx_path is not None:
        try:
            with open(idx_path) as f:
                entries = parse_index(f.read())
        except (OSError, ValueError) as exc:
            problems.append(f"{idx_path}: {exc}")
            entries = None
        if entries is not None:
            if [e.key for e in entries] != [k for k, _ in groups]:
                problems.append(f"{idx_path}: keys differ from the tar's samples")
            else:
                for e in entries:
                    if e.members != offsets[e.key]:
                        problems.append(
                            f"{idx_path}: sample {e.key}: offsets/sizes {e.members} != tar {offsets[e.key]}"
                        )
                        break
    return {"problems": problems, "samples": samples}


def _check_beton_chunk(
    task: tuple[str, list[tuple[int, int, int]], bool],
) -> list[tuple[str | None, int, int, bytes]]:
    """Decode (or, when the same bytes were already decoded from the shards, only hash) a run of
    JPEGs stored in a .beton, each checked against its CRC-32 (-1: the file has none)."""
    path, ranges, decode = task
    out = []
    with open(path, "rb") as f:
        for ptr, size, crc in ranges:
            f.seek(ptr)
            data = f.read(size)
            if crc >= 0 and zlib.crc32(data) != crc:
                out.append(("stored JPEG bytes do not match the crc32 written at conversion", -1, -1, b""))
            elif decode:
                out.append(_decode_check(data))
            else:
                out.append((None, -1, -1, hashlib.blake2b(data, digest_size=16).digest()))
    return out


def _imap(func, tasks: list, workers: int, desc: str | None = None) -> Iterator:
    """func over tasks in order, in a process pool; a tqdm bar on stderr when `desc` is given."""
    from tqdm import tqdm

    with tqdm(total=len(tasks), desc=desc, unit="chunk", disable=desc is None, file=sys.stderr) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                result = func(task)
                bar.update(1)
                yield result
            return
        with multiprocessing.Pool(min(workers, len(tasks))) as pool:
            for result in pool.imap(func, tasks):
                bar.update(1)
                yield result


def _read_tsv(path: str) -> list[list[str]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    return [line.split("\t") for line in lines[1:]]


def verify(out: str, workers: int = 2, progress: bool = False) -> list[str]:
    """Every disagreement between the files under `out` and its manifest, as readable lines."""
    out = os.path.abspath(out)
    problems: list[str] = []
    try:
        with open(os.path.join(out, MANIFEST_FILE)) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{MANIFEST_FILE}: cannot read ({exc}); the conversion did not finish"]
    if os.path.exists(os.path.join(out, ".work")):
        problems.append(".work/ exists: a conversion is unfinished or was interrupted while cleaning up")
    for dirpath, _, names in os.walk(out):
        for name in names:
            if TMP_MARK in name:
                problems.append(f"{os.path.relpath(os.path.join(dirpath, name), out)}: leftover temporary file")

    classes = manifest.get("classes", [])
    try:
        with open(os.path.join(out, CLASSES_FILE)) as f:
            if json.load(f) != classes:
                problems.append(f"{CLASSES_FILE} differs from the manifest's classes")
    except (OSError, json.JSONDecodeError) as exc:
        problems.append(f"{CLASSES_FILE}: {exc}")
    max_res = manifest["options"]["max_res"]

    try:
        skipped_rows = _read_tsv(os.path.join(out, SKIPPED_FILE))
    except OSError as exc:
        problems.append(f"{SKIPPED_FILE}: {exc}")
        skipped_rows = []
    if len(skipped_rows) != manifest["skipped"]["count"]:
        problems.append(f"{SKIPPED_FILE} has {len(skipped_rows)} rows, manifest says {manifest['skipped']['count']}")

    for split, info in manifest["splits"].items():
        where = f"split {split}"
        try:
            source_rows = _read_tsv(os.path.join(out, info["sources"]))
            source_labels = np.asarray([int(r[1]) for r in source_rows], dtype=np.int64)
        except (OSError, ValueError, IndexError) as exc:
            problems.append(f"{info.get('sources')}: {exc}")
            continue
        perm = np.asarray(info["permutation"], dtype=np.int64)
        n = info["count"]
        if len(perm) != n:
            problems.append(f"{where}: permutation has {len(perm)} entries, count is {n}")
        if len(np.unique(perm)) != len(perm) or (len(perm) and (perm.min() < 0 or perm.max() >= len(source_rows))):
            problems.append(f"{where}: permutation is not a set of distinct source indices")
            continue
        split_skipped = sum(1 for r in skipped_rows if r and r[0] == split)
        if n + split_skipped != info["seen"]:
            problems.append(f"{where}: {n} converted + {split_skipped} skipped != {info['seen']} seen")
        expected = source_labels[perm]  # [n] label of each output sample, in output order
        counts = np.bincount(expected, minlength=len(classes)) if n else np.zeros(len(classes), dtype=np.int64)
        if {c: int(k) for c, k in zip(classes, counts)} != info["class_counts"]:
            problems.append(f"{where}: class_counts disagree with the labels of the permuted sources")

        wds_decoded = None
        wds_info = manifest["formats"].get("wds", {}).get(split)
        if wds_info is not None:
            wds_decoded = _verify_wds(out, split, wds_info, expected, max_res, workers, progress, problems)
        ffcv_info = manifest["formats"].get("ffcv", {}).get(split)
        if ffcv_info is not None:
            _verify_ffcv(out, split, ffcv_info, expected, max_res, workers, progress, wds_decoded, problems)
    return problems


def _file_ok(out: str, entry: dict, problems: list[str], key: str = "path", size_key: str = "bytes") -> str | None:
    path = os.path.join(out, entry[key])
    if not os.path.isfile(path):
        problems.append(f"{entry[key]}: missing")
        return None
    if os.path.getsize(path) != entry[size_key]:
        problems.append(f"{entry[key]}: {os.path.getsize(path)} bytes, manifest says {entry[size_key]}")
    return path


def _verify_wds(
    out: str,
    split: str,
    info: dict,
    expected: np.ndarray,
    max_res: int,
    workers: int,
    progress: bool,
    problems: list[str],
) -> list[tuple[bytes, int, int]] | None:
    """Check the shards of one split; return (digest, width, height) of each sample in output order."""
    tasks = []
    for entry in info["files"]:
        tar = _file_ok(out, entry, problems)
        idx = _file_ok(out, entry, problems, "index", "index_bytes") if entry.get("index") else None
        if entry.get("index") is None:
            problems.append(f"{entry['path']}: no DALI index listed")
        if tar is not None:
            tasks.append((tar, idx))
    if len(tasks) != len(info["files"]):
        return None
    labels, decoded, keys = [], [], []
    for entry, result in zip(
        info["files"], _imap(_check_shard, tasks, workers, f"verify wds/{split}" if progress else None)
    ):
        problems.extend(os.path.relpath(p, out) if p.startswith(out) else p for p in result["problems"])
        if len(result["samples"]) != entry.get("count", len(result["samples"])):
            problems.append(f"{entry['path']}: {len(result['samples'])} samples, manifest says {entry['count']}")
        for key, label, err, width, height, digest in result["samples"]:
            where = f"{entry['path']}: sample {key}"
            if err:
                problems.append(f"{where}: {err}")
            elif max(width, height) > max_res:
                problems.append(f"{where}: {width}x{height} exceeds max_res {max_res}")
            keys.append(key)
            labels.append(-1 if label is None else label)
            decoded.append((digest, width, height))
    if len(labels) != len(expected):
        problems.append(f"wds split {split}: {len(labels)} samples, manifest count {len(expected)}")
        return None
    if keys != sorted(keys) or len(set(keys)) != len(keys):
        problems.append(f"wds split {split}: sample keys are not unique and increasing")
    bad = np.flatnonzero(np.asarray(labels) != expected)
    for i in bad[:20]:
        problems.append(
            f"wds split {split}: sample {keys[i]} (output #{i}) has label {labels[i]}, expected {expected[i]}"
        )
    return decoded


def _verify_ffcv(
    out: str,
    split: str,
    info: dict,
    expected: np.ndarray,
    max_res: int,
    workers: int,
    progress: bool,
    wds_decoded: list[tuple[bytes, int, int]] | None,
    problems: list[str],
) -> None:
    from pipelines.ffcv_import import import_ffcv

    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    entry = info["files"][0]
    path = _file_ok(out, entry, problems)
    if path is None:
        return
    try:
        reader = Reader(path)
    except Exception as exc:  # noqa: BLE001 - FFCV raises assorted errors on a damaged header: report, go on
        problems.append(f"{entry['path']}: FFCV cannot open it: {exc}")
        return
    expected_fields = (*FFCV_FIELDS, FFCV_CHECKSUM_FIELD)
    if tuple(reader.field_names) != expected_fields:
        problems.append(f"{entry['path']}: fields {reader.field_names}, expected {list(expected_fields)}")
        return
    if not isinstance(reader.handlers["image"], RGBImageField) or not isinstance(reader.handlers["label"], IntField):
        problems.append(f"{entry['path']}: field types {reader.handlers}, expected RGBImageField and IntField")
        return
    if int(reader.num_samples) != len(expected):
        problems.append(f"{entry['path']}: {reader.num_samples} samples, manifest count {len(expected)}")
        return
    image, label = reader.metadata["f0"], reader.metadata["f1"]  # fields in declaration order
    checksums = np.asarray(reader.metadata["f2"], dtype=np.int64).tolist()
    bad = np.flatnonzero(label != expected)
    for i in bad[:20]:
        problems.append(f"{entry['path']}: sample {i} has label {label[i]}, expected {expected[i]}")
    if np.any(image["mode"] != 0):
        problems.append(f"{entry['path']}: some images are not stored as JPEG")
    sizes_by_ptr = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    ranges = []
    for i, ptr in enumerate(image["data_ptr"].tolist()):
        size = sizes_by_ptr.get(ptr)
        if size is None:
            problems.append(f"{entry['path']}: sample {i} points outside the allocation table")
            return
        ranges.append((ptr, size, checksums[i]))
    decode = wds_decoded is None
    chunks = [(path, ranges[i : i + _DECODE_CHUNK], decode) for i in range(0, len(ranges), _DECODE_CHUNK)]
    results = [
        r
        for chunk in _imap(_check_beton_chunk, chunks, workers, f"verify ffcv/{split}" if progress else None)
        for r in chunk
    ]
    for i, (err, width, height, digest) in enumerate(results):
        where = f"{entry['path']}: sample {i}"
        if err and not digest:  # the stored bytes fail their checksum
            problems.append(f"{where}: {err}")
            continue
        if wds_decoded is not None:
            if digest != wds_decoded[i][0]:
                problems.append(f"{where}: JPEG bytes differ from the webdataset shard's")
                continue
            # Same bytes as the shard's sample, already fully decoded there.
            width, height = wds_decoded[i][1], wds_decoded[i][2]
        if err:
            problems.append(f"{where}: {err}")
            continue
        if (width, height) != (int(image["width"][i]), int(image["height"][i])):
            problems.append(f"{where}: JPEG is {width}x{height}, record says {image['width'][i]}x{image['height'][i]}")
        if max(width, height) > max_res:
            problems.append(f"{where}: {width}x{height} exceeds max_res {max_res}")
