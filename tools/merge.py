"""`supmae convert --merge PART_DIR... OUT`: join the part folders of a sharded conversion (`--shard K/N`,
see `tools/convert.py`) into one dataset equal to the unsharded conversion, without decoding or
re-encoding an image."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence

import numpy as np

from pipelines.constants import MANIFEST_FILE, beton_path
from pipelines.errors import DataError
from tools.beton import JpegSlices
from tools.conversion import write_beton_file
from tools.files import atomic_path, atomic_write, fsync_dir
from tools.listing import Source, SplitPlan
from tools.parallel_write import OrderedPool, init_worker
from tools.reports import finish_strict, print_summary, write_reports
from tools.workdir import (
    LOCK_FILE,
    PART_FILE,
    SOURCES_DIR,
    WORK_DIR,
    identity_diff,
    lock_out,
    out_entries,
    read_json,
    say,
)


def _unescape_tsv(cell: str) -> str:
    out, i = [], 0
    while i < len(cell):
        c = cell[i]
        if c == "\\" and i + 1 < len(cell):
            out.append({"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}.get(cell[i + 1], cell[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _read_sources(path: str) -> list[Source]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        lines = f.read().split("\n")[1:]
    rows = []
    for line in lines:
        if not line:
            continue
        _, label, rel = line.split("\t")
        rows.append(Source(_unescape_tsv(rel), int(label)))
    return rows


def _comparable(identity: dict) -> dict:
    """A part's identity less what differs between the parts of one conversion."""
    return {k: v for k, v in identity.items() if k not in ("shard", "source_root")}


def merge(
    parts: Sequence[str],
    out: str,
    strict: bool = False,
    progress: bool = True,
    workers: int = 0,
    expect: dict | None = None,
) -> dict:
    """Join the part folders of a sharded conversion (`convert(..., shard=(K, N))` for every K)
    into one dataset in `out`, equal to the unsharded conversion: webdataset shards and their
    indexes are copied as they are; the `.beton` is rewritten from the JPEG bytes stored in the
    parts' `.beton` files (copied by `workers` processes, never decoded or re-encoded).

    `expect` holds output options the caller asked for (identity keys: `max_res`, `formats`, ...);
    a merge only copies, so each must equal what the parts were converted with."""
    t_start = time.perf_counter()
    out = os.path.abspath(out)
    infos = []
    for d in parts:
        d = os.path.abspath(d)
        if not os.path.isfile(os.path.join(d, MANIFEST_FILE)):
            raise DataError(f"{d} is not a finished conversion (no {MANIFEST_FILE}): run or rerun its --shard job")
        part = read_json(os.path.join(d, PART_FILE))
        if part is None:
            raise DataError(f"{d} is a whole conversion, not one part of a --shard K/N run")
        infos.append((d, part))
    if not infos:
        raise DataError("--merge needs the part folders of a sharded conversion and an output folder")
    counts = sorted({p["shard"][1] for _, p in infos})
    if len(counts) != 1:
        raise DataError(f"the parts come from runs with different shard counts ({counts})")
    n = counts[0]
    have = sorted(p["shard"][0] for _, p in infos)
    if have != list(range(n)):
        missing = sorted(set(range(n)) - set(have))
        twice = sorted({k for k in have if have.count(k) > 1})
        raise DataError(f"the parts must be shards 0..{n - 1} exactly once; missing {missing}, repeated {twice}")
    infos.sort(key=lambda dp: dp[1]["shard"][0])
    first_dir, first = infos[0]
    for d, p in infos[1:]:
        if _comparable(p["identity"]) != _comparable(first["identity"]):
            raise DataError(
                f"{d} was converted with other options than {first_dir}: {identity_diff(first['identity'], p['identity'])}"
            )
        if p["listing_fingerprint"] != first["listing_fingerprint"]:
            raise DataError(f"{d} was converted from another source listing than {first_dir}")
    identity = {k: v for k, v in first["identity"].items() if k != "shard"}
    fingerprint = first["listing_fingerprint"]
    formats = identity["formats"]
    for key, value in (expect or {}).items():
        if identity.get(key) != value:
            flag = "--" + key.replace("_", "-")
            shown = ",".join(value) if isinstance(value, list) else value
            theirs = ",".join(identity[key]) if isinstance(identity.get(key), list) else identity.get(key)
            raise DataError(
                f"{flag} {shown} differs from the parts' {theirs}: a merge copies the parts as they were "
                f"converted (leave {flag} out, or reconvert the parts with it)"
            )

    with lock_out(out):
        return _merge_locked(out, infos, identity, fingerprint, formats, first_dir, first, strict, progress, workers,
                             t_start)  # fmt: skip


def _merge_locked(
    out: str,
    infos: list[tuple[str, dict]],
    identity: dict,
    fingerprint: str,
    formats: list[str],
    first_dir: str,
    first: dict,
    strict: bool,
    progress: bool,
    workers: int,
    t_start: float,
) -> dict:
    existing = read_json(os.path.join(out, MANIFEST_FILE))
    if existing is not None:
        if existing.get("identity") == identity and existing.get("listing_fingerprint") == fingerprint:
            say(progress, f"{out} already holds this merged conversion; nothing to do")
            return finish_strict(existing, strict, out)
        raise DataError(f"{out} already holds a different conversion; choose another OUT or delete it")
    marker = os.path.join(out, WORK_DIR, "merge.json")
    if out_entries(out):
        if read_json(marker) is None:
            raise DataError(f"{out} is not empty and holds no conversion; choose an empty or new folder")
        # An interrupted merge: it only copied, so it starts over (keeping the lock we hold).
        for folder, names in (
            (out, os.listdir(out)),
            (os.path.join(out, WORK_DIR), os.listdir(os.path.join(out, WORK_DIR))),
        ):
            for name in names:
                if (folder == out and name == WORK_DIR) or name == LOCK_FILE:
                    continue
                path = os.path.join(folder, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(os.path.join(out, WORK_DIR), exist_ok=True)
    atomic_write(marker, json.dumps({"parts": [d for d, _ in infos]}).encode())

    plans: list[SplitPlan] = []
    finished: dict[str, dict[int, dict]] = {}
    for name in identity["splits"]:
        info = first["splits"][name]
        sources = _read_sources(os.path.join(first_dir, SOURCES_DIR, f"{name}.tsv"))
        if len(sources) != info["num_sources"]:
            raise DataError(
                f"{first_dir}: {SOURCES_DIR}/{name}.tsv lists {len(sources)} sources, expected {info['num_sources']}"
            )
        plan = SplitPlan(
            name,
            sources,
            [tuple(e) for e in info["extras"]],
            np.empty(0, np.int64),
            info["shard_size"],
            info["class_seen"],
        )
        plans.append(plan)
        records: dict[int, dict] = {}
        for d, p in infos:
            for k, rec in p["splits"][name]["chunks"].items():
                records[int(k)] = rec
        assert sorted(records) == list(range(plan.num_shards)), "parts do not cover every chunk"
        finished[name] = records
        if "wds" in formats:
            say(progress, f"copying the {name} webdataset shards")
            for d, p in infos:
                for rec in p["splits"][name]["chunks"].values():
                    for key in ("tar", "idx"):
                        if rec[key] is None:
                            continue
                        target = os.path.join(out, rec[key])
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        with atomic_path(target) as tmp:
                            shutil.copyfile(os.path.join(d, rec[key]), tmp)
        if "ffcv" in formats:
            say(progress, f"writing {os.path.relpath(beton_path(out, name), out)} from the parts' samples")
            init_args = (identity["max_res"], identity["quality"], identity["max_pixels"], os.getpid())
            with OrderedPool(workers, initializer=init_worker, initargs=init_args) as pool:
                _merge_betons(out, name, infos, identity["max_res"], identity["quality"], pool)
    manifest = write_reports(
        out,
        first["classes"],
        plans,
        finished,
        formats,
        identity,
        fingerprint,
        first["warnings"],
        workers=0,
        strict=strict,
        resumed=0,
        elapsed=time.perf_counter() - t_start,
        encode_seconds=0.0,
        encoded_now=0,
        layout=first["layout"],
        archives=first["archives"],
    )
    shutil.rmtree(os.path.join(out, WORK_DIR), ignore_errors=True)
    fsync_dir(out)
    if progress:
        print_summary(manifest)
    return finish_strict(manifest, strict, out)


def _merge_betons(
    out: str, split: str, infos: list[tuple[str, dict]], max_res: int, quality: int, pool: OrderedPool
) -> None:
    from tools.beton import read_jpeg_table

    files, tables = [], []
    for d, p in infos:
        rows = [
            row
            for k in sorted(p["splits"][split]["chunks"], key=int)
            for row in p["splits"][split]["chunks"][k]["samples"]
        ]
        if not rows:
            continue
        path = beton_path(d, split)
        table = read_jpeg_table(path)
        labels = np.asarray([r[2] for r in rows], dtype=np.int64)
        sizes = np.asarray([(r[4], r[3]) for r in rows], dtype=np.int64)  # [n, (height, width)]
        if len(table["labels"]) != len(rows) or not (
            np.array_equal(table["labels"], labels)
            and np.array_equal(table["heights"], sizes[:, 0])
            and np.array_equal(table["widths"], sizes[:, 1])
        ):
            raise DataError(f"{path} does not hold the samples its part records list; reconvert that part")
        files.append(path)
        tables.append(table)
    if not files:
        return
    cat = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
    file_ids = np.concatenate([np.full(len(t["labels"]), i, dtype=np.int64) for i, t in enumerate(tables)])
    if "crc32" not in cat:
        raise DataError(f"{files[0]} has no crc32 field: its part was converted by an older version; reconvert it")
    dataset = JpegSlices(
        files, file_ids, cat["offsets"], cat["sizes"], cat["heights"], cat["widths"], cat["labels"], cat["crc32"]
    )
    write_beton_file(beton_path(out, split), dataset, max_res, quality, pool)
