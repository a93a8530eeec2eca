"""`supmae convert`: an ImageNet-style folder to FFCV `.beton` files and DALI-readable webdataset
shards, in one pass, resumable after any crash.

    supmae convert SRC OUT [--formats ffcv,wds] [--max-res 256] [--quality 90] [--workers N]
                   [--shard-size 1000] [--splits train,val] [--seed 0] [--max-pixels N] [--strict]
    supmae convert --verify OUT

Input. SRC is either an ImageNet-style tree (`SRC/train/<class>/...`, `SRC/val/<class>/...`: any
folder holding a `train` or `val` sub-folder) or one split folder (`SRC/<class>/...`, converted as
split "train"). Classes are the sub-folders of the first split (train before val), sorted, indexed
0..C-1 exactly as torchvision's `ImageFolder` assigns them; every other split must use a subset of
them. Files are listed the way `ImageFolder` lists them (recursively, symlinks followed, sorted),
but every file is tried, whatever its extension: format is decided by content.

Each file is read once, decoded, made RGB, its longer side capped at --max-res and encoded as a
JPEG at --quality (see `tools/imageio.py` for the exact rules: alpha is composited on white,
16-bit grayscale scaled to 8 bits, truncated JPEGs skipped). Those JPEG bytes go unchanged into
every requested format.

Output (layout in `pipelines/constants.py`): per split, samples in a seeded random order (the
permutation of the split's sources, seeded by --seed and the split name, is in the manifest),
cut into chunks of --shard-size source files. Chunk k of split s becomes the webdataset shard
`wds/s/s-kkkkkk.tar` (+ its DALI index `.idx`); the `.beton` is assembled from the finished
chunks at the end. Sample keys are the sample's position in the permutation (gaps where a file
was skipped). `sources/<split>.tsv` lists every file seen (index, label, path relative to SRC);
`manifest.json["splits"][s]["permutation"]` lists, in output order, the source index of each
sample. `skipped.tsv` lists every file not converted with a reason code and detail; the counts
reconcile: converted + skipped = files seen. Files directly inside a split folder (outside any
class folder) are not samples: they are listed as skipped ("outside-class-folder").

Resumability. Work state lives in `OUT/.work/`: the options of the run, a fingerprint of the
source listing, and one small JSON record per finished chunk, written only after the chunk's tar
and index are complete under their final names. Every file is written to `<name>.tmp-<pid>`,
fsynced and renamed, so after a `kill -9` at any moment, rerunning the same command redoes only
unfinished chunks and produces byte-identical outputs (JPEG encoding is deterministic and FFCV's
writer runs single-process). A finished conversion is marked by `manifest.json`; rerunning then
does nothing. Changing an output-affecting option or the source tree under an unfinished
conversion is refused.

Bad input never stops the run and is never dropped silently; each file not converted is a row of
`skipped.tsv` (split, path, reason, detail):

    zero-byte file                                  skipped  empty
    truncated image (JPEG, PNG, ...)                skipped  truncated
    unparsable header / undecodable data            skipped  corrupt
    content that is no image format                 skipped  not-an-image
    PNG / GIF / TIFF / WebP / BMP under any name    converted (format is read from the content)
    more pixels than --max-pixels (header check)    skipped  too-many-pixels
    FIFO, socket, device                            skipped  not-a-regular-file (never opened)
    broken symlink                                  skipped  broken-symlink
    stat/open/read fails (permissions, link loop)   skipped  unreadable
    file directly inside a split folder             skipped  outside-class-folder
    empty (or, in val, missing) class folder        warning; the class keeps its index, 0 samples

Tests run as root, for whom `chmod 000` does not make a file unreadable: there a symlink loop
(ELOOP on open) is the unreadable file. With --strict any skipped file makes the exit status 1
(the outputs and `skipped.tsv` are still written, for inspection).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines.constants import (
    CLASSES_FILE,
    MANIFEST_FILE,
    SKIPPED_FILE,
    SPLITS,
    beton_path,
    wds_dir,
)
from pipelines.errors import DataError
from tools.files import atomic_path, atomic_write, die_with_parent, fsync_dir, remove_stale_temporaries
from tools.imageio import (
    ALPHA_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    JPEG_SUBSAMPLING,
    RESAMPLE_NAME,
    SkipImage,
    encode_bytes,
    read_source,
)
from tools.shards import ShardSample, build_shard

# Bump when the same options would give different output bytes (keys, layout, encoding rules).
TOOL_VERSION = 1
FORMATS = ("ffcv", "wds")
DEFAULT_SHARD_SIZE = 1000
WORK_DIR = ".work"
SOURCES_DIR = "sources"
STATE_FILE = "state.json"
OUTSIDE_CLASS = "outside-class-folder"


# ----------------------------------------------------------------------------------------------
# Listing the source tree


@dataclass(frozen=True)
class Source:
    rel: str  # path relative to SRC, '/'-separated
    label: int


@dataclass
class SplitPlan:
    name: str
    sources: list[Source]
    strays: list[str]  # files directly in the split folder: seen, never samples
    permutation: np.ndarray  # [n] output position -> source index
    shard_size: int
    class_seen: list[int] = field(default_factory=list)  # files seen per class

    @property
    def num_shards(self) -> int:
        return -(-len(self.sources) // self.shard_size)

    def shard_positions(self, k: int) -> range:
        return range(k * self.shard_size, min(len(self.sources), (k + 1) * self.shard_size))

    @property
    def key_width(self) -> int:
        return max(8, len(str(max(len(self.sources) - 1, 0))))

    def key(self, position: int) -> str:
        return f"{position:0{self.key_width}d}"


def find_classes(directory: str) -> list[str]:
    """Class folder names of one split, sorted: torchvision's `find_classes` rule (any directory
    entry, symlinks to directories included)."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _walk_class(class_dir: str) -> list[str]:
    """Files under one class folder in `ImageFolder`'s order (recursive, links followed, sorted)."""
    paths = []
    for root, _, names in sorted(os.walk(class_dir, followlinks=True)):
        for name in sorted(names):
            paths.append(os.path.join(root, name))
    return paths


def _split_dirs(src: str, splits: Sequence[str] | None) -> dict[str, str]:
    present = [s for s in SPLITS if os.path.isdir(os.path.join(src, s))]
    if not present:
        # A single split folder: its sub-folders are classes.
        if splits and list(splits) != ["train"]:
            raise DataError(
                f"{src} has no {'/'.join(SPLITS)} sub-folder, so it is one split ('train'); "
                f"--splits {','.join(splits)} does not apply"
            )
        return {"train": src}
    wanted = list(splits) if splits else present
    missing = [s for s in wanted if s not in present]
    if missing:
        raise DataError(f"split folder(s) {', '.join(missing)} not found under {src} (found: {', '.join(present)})")
    return {s: os.path.join(src, s) for s in wanted}


def discover(
    src: str, splits: Sequence[str] | None, seed: int, shard_size: int
) -> tuple[list[str], list[SplitPlan], list[str]]:
    """Classes, one plan per split, and warnings (empty or missing class folders)."""
    dirs = _split_dirs(src, splits)
    names = list(dirs)
    classes = find_classes(dirs[names[0]])
    if not classes:
        raise DataError(f"no class folders found in {dirs[names[0]]}")
    warnings: list[str] = []
    plans = []
    for split in names:
        split_dir = dirs[split]
        present = find_classes(split_dir)
        extra = sorted(set(present) - set(classes))
        if extra:
            raise DataError(
                f"split '{split}' has class folders that '{names[0]}' lacks: {', '.join(extra[:5])}"
                f"{' ...' if len(extra) > 5 else ''}"
            )
        sources: list[Source] = []
        class_seen = []
        for label, name in enumerate(classes):
            class_dir = os.path.join(split_dir, name)
            if name not in present:
                warnings.append(
                    f"split '{split}': class folder '{name}' is missing; class keeps index {label}, 0 samples"
                )
                class_seen.append(0)
                continue
            files = _walk_class(class_dir)
            if not files:
                warnings.append(
                    f"split '{split}': class folder '{name}' is empty; class keeps index {label}, 0 samples"
                )
            class_seen.append(len(files))
            sources.extend(Source(os.path.relpath(p, src).replace(os.sep, "/"), label) for p in files)
        with os.scandir(split_dir) as entries:
            strays = sorted(os.path.relpath(e.path, src).replace(os.sep, "/") for e in entries if not e.is_dir())
        if not sources:
            raise DataError(f"split '{split}' ({split_dir}) holds no files in its class folders")
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode())]))
        perm = rng.permutation(len(sources))
        plans.append(SplitPlan(split, sources, strays, perm, shard_size, class_seen))
    return classes, plans, warnings


def _listing_fingerprint(classes: list[str], plans: list[SplitPlan]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(classes).encode())
    for plan in plans:
        h.update(plan.name.encode() + b"\0")
        for s in plan.sources:
            h.update(f"{s.label}\t{s.rel}\n".encode("utf-8", "surrogateescape"))
        for s in plan.strays:
            h.update(f"-\t{s}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Workers: one image in, JPEG bytes (or a skip reason) out

_WORKER_ARGS: tuple[int, int, int] = (256, 90, DEFAULT_MAX_PIXELS)


def _init_worker(max_res: int, quality: int, max_pixels: int, parent_pid: int) -> None:
    global _WORKER_ARGS
    _WORKER_ARGS = (max_res, quality, max_pixels)
    if os.getpid() != parent_pid:
        # Ctrl-C is the parent's to handle (it stops the pool); workers would only print tracebacks.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        die_with_parent(parent_pid)


def _encode_task(path: str) -> tuple:
    """("ok", jpeg, width, height, source bytes) or ("skip", code, detail, source bytes)."""
    max_res, quality, max_pixels = _WORKER_ARGS
    try:
        data = read_source(path)
    except SkipImage as exc:
        return ("skip", exc.code, exc.detail, 0)
    try:
        enc = encode_bytes(data, max_res, quality, max_pixels)
    except SkipImage as exc:
        return ("skip", exc.code, exc.detail, len(data))
    return ("ok", enc.jpeg, enc.width, enc.height, len(data))


# ----------------------------------------------------------------------------------------------
# Output directory state


def _identity(
    src: str,
    formats: Sequence[str],
    max_res: int,
    quality: int,
    shard_size: int,
    splits: list[str],
    seed: int,
    max_pixels: int,
) -> dict:
    """Everything that decides the output bytes; a resume must match it exactly."""
    import PIL

    return {
        "tool_version": TOOL_VERSION,
        "source_root": src,
        "formats": list(formats),
        "max_res": max_res,
        "quality": quality,
        "shard_size": shard_size,
        "splits": splits,
        "seed": seed,
        "max_pixels": max_pixels,
        "pillow": PIL.__version__,
    }


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys)


def _shard_record_path(out: str, split: str, k: int) -> str:
    return os.path.join(out, WORK_DIR, split, f"{split}-{k:06d}.json")


def _shard_tar_path(out: str, split: str, k: int, keep_wds: bool) -> str:
    base = wds_dir(out, split) if keep_wds else os.path.join(out, WORK_DIR, split)
    return os.path.join(base, f"{split}-{k:06d}.tar")


def _load_finished(out: str, plan: SplitPlan, keep_wds: bool) -> dict[int, dict]:
    """Chunk records whose files are all in place; anything else is redone."""
    done = {}
    for k in range(plan.num_shards):
        path = _shard_record_path(out, plan.name, k)
        try:
            with open(path) as f:
                rec = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        ok = True
        if rec["tar"] is not None:
            for key in ("tar", "idx"):
                if rec[key] is None:
                    continue
                full = os.path.join(out, rec[key])
                if not os.path.isfile(full) or os.path.getsize(full) != rec[f"{key}_bytes"]:
                    ok = False
        if ok and rec["tar"] is not None and (rec["idx"] is None) == keep_wds:
            ok = False
        if ok:
            done[k] = rec
    return done


def _write_shard(out: str, plan: SplitPlan, k: int, results: list[tuple], keep_wds: bool) -> dict:
    """Write chunk k's tar (and index) under final names, then its record (the commit point)."""
    positions = plan.shard_positions(k)
    assert len(results) == len(positions), "results out of step with the plan"
    samples, skipped, meta = [], [], []
    source_bytes = 0
    for pos, res in zip(positions, results):
        src_index = int(plan.permutation[pos])
        label = plan.sources[src_index].label
        if res[0] == "ok":
            _, jpeg, width, height, nbytes = res
            samples.append(ShardSample(plan.key(pos), jpeg, label))
            meta.append([pos, src_index, label, width, height])
        else:
            _, code, detail, nbytes = res
            skipped.append([pos, src_index, code, detail])
        source_bytes += nbytes
    rec: dict = {
        "split": plan.name,
        "shard": k,
        "tar": None,
        "tar_bytes": 0,
        "idx": None,
        "idx_bytes": 0,
        "samples": meta,
        "skipped": skipped,
        "source_bytes": source_bytes,
        "jpeg_bytes": sum(len(s.jpeg) for s in samples),
    }
    if samples:
        built = build_shard(samples)
        tar_path = _shard_tar_path(out, plan.name, k, keep_wds)
        os.makedirs(os.path.dirname(tar_path), exist_ok=True)
        atomic_write(tar_path, built.tar, sync_dir=False)
        rec["tar"] = os.path.relpath(tar_path, out)
        rec["tar_bytes"] = len(built.tar)
        if keep_wds:
            idx_path = tar_path[: -len(".tar")] + ".idx"
            atomic_write(idx_path, built.index, sync_dir=False)
            rec["idx"] = os.path.relpath(idx_path, out)
            rec["idx_bytes"] = len(built.index)
        fsync_dir(os.path.dirname(tar_path))
        for m, offset, s in zip(meta, built.jpeg_offsets, samples):
            m.extend([offset, len(s.jpeg)])
    record_path = _shard_record_path(out, plan.name, k)
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    atomic_write(record_path, json.dumps(rec).encode())
    return rec


def _assemble_beton(out: str, plan: SplitPlan, records: list[dict], max_res: int, quality: int) -> None:
    from tools.beton import JpegSlices, write_beton

    files, file_ids, rows = [], [], []
    for rec in records:
        if rec["tar"] is None:
            continue
        files.append(os.path.join(out, rec["tar"]))
        for pos, src_index, label, width, height, offset, size in rec["samples"]:
            file_ids.append(len(files) - 1)
            rows.append((offset, size, height, width, label))
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 5)  # [n, (offset, size, height, width, label)]
    dataset = JpegSlices(
        files, np.asarray(file_ids, dtype=np.int64), arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], arr[:, 4]
    )
    final = beton_path(out, plan.name)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with atomic_path(final) as tmp:
        write_beton(tmp, dataset, max_resolution=max_res, jpeg_quality=quality)


# ----------------------------------------------------------------------------------------------
# Reports


def tsv_cell(text: str) -> str:
    """One TSV cell: backslash, tab, CR and newline escaped so every record stays one line."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _write_text(path: str, lines: list[str]) -> None:
    atomic_write(path, "".join(lines).encode("utf-8", "surrogateescape"))


def _file_entry(out: str, rel: str) -> dict:
    return {"path": rel, "bytes": os.path.getsize(os.path.join(out, rel))}


# ----------------------------------------------------------------------------------------------
# The conversion


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _check_args(
    formats: Sequence[str],
    max_res: int,
    quality: int,
    workers: int,
    shard_size: int,
    max_pixels: int,
    splits: Sequence[str] | None,
) -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise DataError(f"--formats must be a non-empty subset of {','.join(FORMATS)}, got {','.join(formats)}")
    if len(set(formats)) != len(formats):
        raise DataError(f"--formats lists a format twice: {','.join(formats)}")
    if not 1 <= max_res <= 65535:
        raise DataError(f"--max-res must be in 1..65535 (FFCV stores 16-bit sizes), got {max_res}")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality must be in 1..100, got {quality}")
    if workers < 0:
        raise DataError(f"--workers must be >= 0 (0 = encode in the main process), got {workers}")
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    if max_pixels < 1:
        raise DataError(f"--max-pixels must be >= 1, got {max_pixels}")
    if splits is not None:
        bad = [s for s in splits if s not in SPLITS]
        if bad or not splits or len(set(splits)) != len(splits):
            raise DataError(f"--splits must be distinct names from {','.join(SPLITS)}, got {','.join(splits)}")


def _results(tasks: Iterator[str], workers: int, init_args: tuple) -> Iterator[tuple]:
    """Encode results in task order, from a process pool (or in-process when workers == 0)."""
    if workers == 0:
        _init_worker(*init_args)
        for path in tasks:
            yield _encode_task(path)
        return
    pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=init_args)
    try:
        yield from pool.imap(_encode_task, tasks, chunksize=8)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def convert(
    src: str,
    out: str,
    formats: Sequence[str] = ("ffcv", "wds"),
    max_res: int = 256,
    quality: int = 90,
    workers: int = 2,
    shard_size: int = DEFAULT_SHARD_SIZE,
    splits: Sequence[str] | None = None,
    seed: int = 0,
    strict: bool = False,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """Convert `src` into `out` (see the module docstring) and return the manifest.

    `workers` encoding processes (0: encode in this process). `progress` draws a tqdm bar and
    prints warnings and a summary on stderr. With `strict`, any skipped input raises DataError
    after the outputs and `skipped.tsv` are written. Rerunning after an interruption resumes."""
    t_start = time.perf_counter()
    formats = list(formats)
    _check_args(formats, max_res, quality, workers, shard_size, max_pixels, splits)
    src = os.path.abspath(src)
    out = os.path.abspath(out)
    if not os.path.isdir(src):
        raise DataError(f"source folder {src} does not exist")
    if out == src or out.startswith(src + os.sep):
        raise DataError(f"the output folder {out} must not be inside the source folder {src}")
    classes, plans, warnings = discover(src, splits, seed, shard_size)
    split_names = [p.name for p in plans]
    identity = _identity(src, formats, max_res, quality, shard_size, split_names, seed, max_pixels)
    fingerprint = _listing_fingerprint(classes, plans)

    manifest = _read_json(os.path.join(out, MANIFEST_FILE))
    if manifest is not None:
        if manifest.get("identity") != identity or manifest.get("listing_fingerprint") != fingerprint:
            changed = _diff(manifest.get("identity", {}), identity) or "the source file listing changed"
            raise DataError(f"{out} already holds a different conversion ({changed}); choose another OUT or delete it")
        shutil.rmtree(os.path.join(out, WORK_DIR), ignore_errors=True)
        _say(progress, f"{out} is already converted with these options; nothing to do")
        return _finish_strict(manifest, strict, out)

    state_path = os.path.join(out, WORK_DIR, STATE_FILE)
    state = _read_json(state_path)
    if state is None:
        if os.path.isdir(out) and os.listdir(out):
            raise DataError(f"{out} is not empty and holds no conversion; choose an empty or new folder")
        os.makedirs(os.path.join(out, WORK_DIR), exist_ok=True)
        atomic_write(state_path, json.dumps({"identity": identity, "listing_fingerprint": fingerprint}).encode())
    elif state.get("identity") != identity or state.get("listing_fingerprint") != fingerprint:
        changed = _diff(state.get("identity", {}), identity) or "the source file listing changed"
        raise DataError(
            f"{out} holds an unfinished conversion with other inputs ({changed}); rerun it with the "
            f"same options and source, or delete {out} to start over"
        )
    remove_stale_temporaries(out)
    for w in warnings:
        _say(progress, f"warning: {w}")

    keep_wds = "wds" in formats
    finished = {p.name: _load_finished(out, p, keep_wds) for p in plans}
    resumed = sum(len(v) for v in finished.values())
    pending = [(p, k) for p in plans for k in range(p.num_shards) if k not in finished[p.name]]
    total_pending = sum(len(p.shard_positions(k)) for p, k in pending)
    if resumed:
        _say(progress, f"resuming: {resumed} chunk(s) already done, {len(pending)} to go")

    def tasks() -> Iterator[str]:
        for p, k in pending:
            for pos in p.shard_positions(k):
                yield os.path.join(src, p.sources[int(p.permutation[pos])].rel)

    from tqdm import tqdm

    bar = tqdm(total=total_pending, unit="img", desc="convert", disable=not progress, smoothing=0.1, file=sys.stderr)
    t_encode = time.perf_counter()
    skipped_now = 0
    results = _results(tasks(), workers, (max_res, quality, max_pixels, os.getpid()))
    try:
        for p, k in pending:
            batch = []
            for _ in p.shard_positions(k):
                res = next(results)
                batch.append(res)
                if res[0] == "skip":
                    skipped_now += 1
                    bar.set_postfix_str(f"skipped {skipped_now}", refresh=False)
                bar.update(1)
            finished[p.name][k] = _write_shard(out, p, k, batch, keep_wds)
    finally:
        results.close()
        bar.close()
    encode_seconds = time.perf_counter() - t_encode

    # Assemble the .beton files from the finished chunks (skipped when one is already in place:
    # it was renamed there only after being written completely, by a run with these inputs).
    if "ffcv" in formats:
        for p in plans:
            if os.path.isfile(beton_path(out, p.name)):
                continue
            records = [finished[p.name][k] for k in range(p.num_shards)]
            if not any(r["samples"] for r in records):
                continue
            _say(progress, f"writing {os.path.relpath(beton_path(out, p.name), out)}")
            _assemble_beton(out, p, records, max_res, quality)

    manifest = _write_reports(
        out,
        classes,
        plans,
        finished,
        formats,
        identity,
        fingerprint,
        warnings,
        workers=workers,
        strict=strict,
        resumed=resumed,
        elapsed=time.perf_counter() - t_start,
        encode_seconds=encode_seconds,
        encoded_now=total_pending,
    )
    shutil.rmtree(os.path.join(out, WORK_DIR), ignore_errors=True)
    fsync_dir(out)
    if progress:
        _print_summary(manifest)
    return _finish_strict(manifest, strict, out)


def _finish_strict(manifest: dict, strict: bool, out: str) -> dict:
    skipped = manifest["skipped"]["count"]
    if strict and skipped:
        raise DataError(
            f"strict: {skipped} of {manifest['seen']} input files were not converted "
            f"(reasons in {os.path.join(out, SKIPPED_FILE)})"
        )
    return manifest


def _write_reports(
    out: str,
    classes: list[str],
    plans: list[SplitPlan],
    finished: dict[str, dict[int, dict]],
    formats: list[str],
    identity: dict,
    fingerprint: str,
    warnings: list[str],
    *,
    workers: int,
    strict: bool,
    resumed: int,
    elapsed: float,
    encode_seconds: float,
    encoded_now: int,
) -> dict:
    import PIL

    atomic_write(os.path.join(out, CLASSES_FILE), (json.dumps(classes, indent=1) + "\n").encode())
    os.makedirs(os.path.join(out, SOURCES_DIR), exist_ok=True)
    skipped_lines = ["split\tpath\treason\tdetail\n"]
    by_reason: dict[str, int] = {}
    splits_out: dict[str, dict] = {}
    formats_out: dict[str, dict] = {f: {} for f in formats}
    for p in plans:
        records = [finished[p.name][k] for k in range(p.num_shards)]
        sources_rel = f"{SOURCES_DIR}/{p.name}.tsv"
        _write_text(
            os.path.join(out, sources_rel),
            ["index\tlabel\tpath\n"] + [f"{i}\t{s.label}\t{tsv_cell(s.rel)}\n" for i, s in enumerate(p.sources)],
        )
        permutation, labels, skipped = [], [], []
        for rec in records:
            for row in rec["samples"]:
                permutation.append(row[1])
                labels.append(row[2])
            skipped.extend(rec["skipped"])
        skipped.sort(key=lambda row: row[1])  # source order: the report reads like the folder listing
        for _, src_index, code, detail in skipped:
            skipped_lines.append(f"{p.name}\t{tsv_cell(p.sources[src_index].rel)}\t{code}\t{tsv_cell(detail)}\n")
            by_reason[code] = by_reason.get(code, 0) + 1
        for rel in p.strays:
            skipped_lines.append(
                f"{p.name}\t{tsv_cell(rel)}\t{OUTSIDE_CLASS}\tnot inside a class folder; ImageFolder ignores it too\n"
            )
            by_reason[OUTSIDE_CLASS] = by_reason.get(OUTSIDE_CLASS, 0) + 1
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
        seen = len(p.sources) + len(p.strays)
        assert len(permutation) + len(skipped) + len(p.strays) == seen, "converted + skipped != seen"
        splits_out[p.name] = {
            "count": len(permutation),
            "seen": seen,
            "skipped": len(skipped) + len(p.strays),
            "class_counts": {c: int(n) for c, n in zip(classes, counts)},
            "class_files_seen": dict(zip(classes, p.class_seen)),
            "permutation": permutation,
            "sources": sources_rel,
            "source_bytes": sum(r["source_bytes"] for r in records),
            "jpeg_bytes": sum(r["jpeg_bytes"] for r in records),
        }
        if not permutation:
            raise DataError(
                f"split '{p.name}': none of its {len(p.sources)} files could be converted "
                f"(reasons in {os.path.join(out, SKIPPED_FILE)})"
            )
        if "ffcv" in formats:
            rel = os.path.relpath(beton_path(out, p.name), out)
            formats_out["ffcv"][p.name] = {"files": [_file_entry(out, rel) | {"count": len(permutation)}]}
        if "wds" in formats:
            files = []
            for rec in records:
                if rec["tar"] is None:
                    continue
                files.append(
                    {
                        "path": rec["tar"],
                        "bytes": rec["tar_bytes"],
                        "count": len(rec["samples"]),
                        "index": rec["idx"],
                        "index_bytes": rec["idx_bytes"],
                    }
                )
            formats_out["wds"][p.name] = {"files": files}
    _write_text(os.path.join(out, SKIPPED_FILE), skipped_lines)
    total_seen = sum(s["seen"] for s in splits_out.values())
    total_skipped = sum(s["skipped"] for s in splits_out.values())
    manifest = {
        "tool": "supmae convert",
        "tool_version": TOOL_VERSION,
        "source_root": identity["source_root"],
        "options": {
            "formats": formats,
            "max_res": identity["max_res"],
            "quality": identity["quality"],
            "shard_size": identity["shard_size"],
            "splits": identity["splits"],
            "seed": identity["seed"],
            "max_pixels": identity["max_pixels"],
            "workers": workers,
            "strict": strict,
        },
        "encoding": {
            "pillow": PIL.__version__,
            "jpeg_quality": identity["quality"],
            "subsampling": JPEG_SUBSAMPLING,
            "resample": RESAMPLE_NAME,
            "alpha": f"composited on RGB{ALPHA_BACKGROUND}",
            "reduced_dct_decode": True,
        },
        "classes": classes,
        "splits": splits_out,
        "formats": formats_out,
        "seen": total_seen,
        "converted": total_seen - total_skipped,
        "skipped": {"count": total_skipped, "by_reason": dict(sorted(by_reason.items())), "file": SKIPPED_FILE},
        "warnings": warnings,
        "identity": identity,
        "listing_fingerprint": fingerprint,
        "resumed_chunks": resumed,
        "encoded_this_run": encoded_now,
        "encode_seconds": round(encode_seconds, 3),
        "elapsed_seconds": round(elapsed, 3),
    }
    # Written last: its presence marks a finished conversion.
    atomic_write(os.path.join(out, MANIFEST_FILE), (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def output_bytes(manifest: dict, fmt: str) -> int:
    """Total bytes of one format's files (tars and their indexes for wds)."""
    total = 0
    for per_split in manifest["formats"].get(fmt, {}).values():
        for f in per_split["files"]:
            total += f["bytes"] + f.get("index_bytes", 0)
    return total


def _print_summary(manifest: dict) -> None:
    for name, s in manifest["splits"].items():
        print(
            f"{name}: {s['count']} converted, {s['skipped']} skipped of {s['seen']} files seen "
            f"(source {format_bytes(s['source_bytes'])}, JPEGs {format_bytes(s['jpeg_bytes'])})",
            file=sys.stderr,
        )
    for fmt in manifest["formats"]:
        print(f"{fmt}: {format_bytes(output_bytes(manifest, fmt))}", file=sys.stderr)
    if manifest["skipped"]["count"]:
        reasons = ", ".join(f"{k} {v}" for k, v in manifest["skipped"]["by_reason"].items())
        print(f"skipped: {reasons} (see {manifest['skipped']['file']})", file=sys.stderr)
    rate = manifest["encoded_this_run"] / max(manifest["encode_seconds"], 1e-9)
    print(f"{manifest['elapsed_seconds']:.1f} s ({rate:.0f} images/s while encoding)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Command line


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supmae convert",
        description="Convert an ImageNet-style folder to FFCV .beton files and DALI webdataset shards "
        "(one pass, resumable), or check a converted folder with --verify.",
    )
    p.add_argument("src", nargs="?", metavar="SRC", help="source folder (with --verify: the converted folder)")
    p.add_argument("out", nargs="?", metavar="OUT", help="output folder (created; must be empty or a resumable run)")
    p.add_argument(
        "--verify", action="store_true", help="re-read every output of OUT and check it against the manifest"
    )
    p.add_argument("--formats", default="ffcv,wds", help="comma-separated subset of ffcv,wds (default: both)")
    p.add_argument(
        "--max-res", type=int, default=256, help="cap on the longer image side, never upscaled (default 256)"
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images (default 90)")
    p.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        help="encoding processes (default: usable CPUs; 0 = in the main process)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"source files per webdataset shard / resumable chunk (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument(
        "--splits", default=None, help="comma-separated splits to convert (default: train and val if present)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order permutation (default 0)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels than this (decompression-bomb guard, default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any input was skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary on stderr")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.verify:
        if args.src is None or args.out is not None:
            raise DataError("--verify takes one folder: supmae convert --verify OUT")
        target = args.src
        if not os.path.isdir(target):
            raise DataError(f"{target} is not a folder")
        problems = verify(target, workers=max(args.workers, 1), progress=not args.no_progress)
        if problems:
            shown = problems[:50]
            print(f"verify {target}: {len(problems)} problem(s)", file=sys.stderr)
            for line in shown:
                print(f"  {line}", file=sys.stderr)
            if len(problems) > len(shown):
                print(f"  ... and {len(problems) - len(shown)} more", file=sys.stderr)
            return 1
        print(f"verify {target}: OK")
        return 0
    if args.src is None or args.out is None:
        raise DataError("expected SRC and OUT: supmae convert SRC OUT [options] (or: supmae convert --verify OUT)")
    manifest = convert(
        args.src,
        args.out,
        formats=_csv(args.formats),
        max_res=args.max_res,
        quality=args.quality,
        workers=args.workers,
        shard_size=args.shard_size,
        splits=_csv(args.splits) if args.splits else None,
        seed=args.seed,
        strict=False,
        progress=not args.no_progress,
        max_pixels=args.max_pixels,
    )
    if args.strict and manifest["skipped"]["count"]:
        print(
            f"supmae convert: --strict: {manifest['skipped']['count']} input file(s) were not converted "
            f"(see {os.path.join(args.out, SKIPPED_FILE)})",
            file=sys.stderr,
        )
        return 1
    return 0


def verify(out: str, workers: int = 2, progress: bool = False) -> list[str]:
    """Problems found re-reading every output of `out` against its manifest (empty: all good)."""
    from tools.verify import verify as _verify

    return _verify(out, workers=workers, progress=progress)
