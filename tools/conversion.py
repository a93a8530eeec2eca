"""The conversion itself (`supmae convert SRC OUT`, documented in `tools/convert.py`): list the source, plan
the chunks, have the workers encode and stitch them, write the `.beton` files, then the reports. Resumes
what a killed run left, isolates an input that crashes or hangs the decoder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from pipelines.constants import MANIFEST_FILE, SPLITS, beton_path
from pipelines.errors import DataError
from tools.beton import JpegSlices, write_beton_in_place
from tools.files import atomic_path, atomic_write, fsync_dir, is_resource_error, remove_stale_temporaries
from tools.imageio import DEFAULT_MAX_PIXELS
from tools.layouts import list_source
from tools.listing import SplitPlan
from tools.parallel_write import (
    DEFAULT_PIECE_SIZE,
    OrderedPool,
    PieceResult,
    PieceTask,
    RunStats,
    StitchTask,
    TaskLost,
    TaskTimedOut,
    WorkerDied,
    encode_piece,
    init_worker,
    stitch_chunk,
)
from tools.reports import finish_strict, print_summary, write_reports
from tools.workdir import (
    DEFAULT_SHARD_SIZE,
    FORMATS,
    PART_FILE,
    STATE_FILE,
    WORK_DIR,
    conversion_identity,
    identity_diff,
    load_finished,
    lock_out,
    out_entries,
    read_json,
    say,
    shard_record_path,
    shard_tar_path,
)

# Seconds a worker may spend on one image before it is killed and the image retried alone (then
# skipped as decode-timeout). A 500x375 JPEG takes about 5 ms here; the slowest images the pixel
# limit lets through (89 Mpx: a PNG 4 s, a progressive JPEG 2.3 s on one core of the 2-core test
# machine) stay 30x below it, which leaves room for a loaded node and slow storage; a hung decode
# costs twice this (the piece, then the image alone).
DEFAULT_DECODE_TIMEOUT = 120.0


# ----------------------------------------------------------------------------------------------
# Encoding and stitching the chunks


def _pieces(plan: SplitPlan, k: int, src: str, out: str, piece_size: int) -> Iterator[PieceTask]:
    """Chunk k of a split as encoding tasks: runs of at most `piece_size` consecutive samples."""
    positions = plan.shard_positions(k)
    base = os.path.join(out, WORK_DIR, plan.name, f"{plan.name}-{k:06d}")
    width = plan.key_width  # plan.key(pos), without recomputing the width per sample (main-process time)
    prefix = src + os.sep
    for j, lo in enumerate(range(positions.start, positions.stop, piece_size)):
        items = []
        for pos in range(lo, min(lo + piece_size, positions.stop)):
            s = plan.sources[plan.permutation[pos]]
            if s.archive is None:
                items.append((prefix + s.rel, -1, -1, f"{pos:0{width}d}", s.label))
            else:  # an archive in SRC, or (staged parquet rows) an absolute path in OUT/.work
                where = s.archive if os.path.isabs(s.archive) else prefix + s.archive
                items.append((where, s.offset, s.size, f"{pos:0{width}d}", s.label))
        yield PieceTask(f"{base}.piece-{j:05d}", items)


def _stitch_task(out: str, plan: SplitPlan, k: int, pieces: list[PieceResult], keep_wds: bool) -> StitchTask:
    """What a worker needs to turn chunk k's pieces into its shard, index and record."""
    positions = plan.shard_positions(k)
    results = [r for piece in pieces for r in piece.results]
    assert len(results) == len(positions), "results out of step with the plan"
    meta, skipped, keys, sizes, checksums = [], [], [], [], []
    source_bytes = 0
    key_width = plan.key_width
    for pos, src_index, res in zip(positions, plan.permutation[positions.start : positions.stop].tolist(), results):
        if res[0] == "ok":
            _, jpeg_size, width, height, nbytes, crc = res
            meta.append([pos, src_index, plan.sources[src_index].label, width, height])
            keys.append(f"{pos:0{key_width}d}")
            sizes.append(jpeg_size)
            checksums.append(crc)
        else:
            _, code, detail, nbytes = res
            skipped.append([pos, src_index, code, detail])
        source_bytes += nbytes
    record = {
        "split": plan.name,
        "shard": k,
        "tar": None,
        "tar_bytes": 0,
        "idx": None,
        "idx_bytes": 0,
        "samples": meta,
        "crc32": checksums,  # per converted sample, the CRC-32 of its JPEG (the .beton's crc32 field)
        "skipped": skipped,
        "source_bytes": source_bytes,
        "jpeg_bytes": sum(sizes),
    }
    tar_path = shard_tar_path(out, plan.name, k, keep_wds)
    return StitchTask(
        out=out,
        tar_path=tar_path,
        idx_path=tar_path[: -len(".tar")] + ".idx" if keep_wds else None,
        record_path=shard_record_path(out, plan.name, k),
        pieces=[piece.path for piece in pieces if piece.path is not None],
        keys=keys,
        jpeg_sizes=sizes,
        record=record,
    )


def _lost_result(lost: TaskLost, item: tuple) -> tuple:
    """The skip an input gets when it alone, in a fresh process, crashed or hung the decoder."""
    if isinstance(lost, TaskTimedOut):
        return ("skip", "decode-timeout", f"decode timed out (no result after {lost.limit:g} s; --decode-timeout)", 0)
    if isinstance(lost, WorkerDied) and lost.signal == signal.SIGKILL:
        # No decoder kills itself with SIGKILL: the kernel's OOM killer or a person did, and the
        # input may be fine. A shortage of this machine stops the run; it never skips an input.
        raise DataError(
            f"a worker process converting {item[0]}{'' if item[1] < 0 else f' (member at byte {item[1]})'} "
            "was killed by SIGKILL, alone in its process (the kernel's out-of-memory killer, or by hand); "
            "no input was skipped for it: free memory (or lower --workers) and rerun the same command to resume"
        ) from lost
    return ("skip", "decoder-crashed", f"crashed the decoder ({lost.how})", 0)


def _convert_chunks(
    pool: OrderedPool,
    pending: list[tuple[SplitPlan, int]],
    src: str,
    out: str,
    keep_wds: bool,
    piece_size: int,
    on_piece: Callable[[PieceResult], None],
    decode_timeout: float | None = None,
) -> Iterator[tuple[SplitPlan, int, dict]]:
    """Encode and write the pending chunks with `pool`; yields (plan, k, record) as each chunk is
    committed, in order. The main process only routes small records: pieces are written by the
    workers that encode them, shards and records by the worker that stitches them.

    Isolation: a piece whose worker dies (a decoder crash: a signal) or spends more than
    `decode_timeout` seconds on one image (killed) is retried image by image, each image alone in a
    fresh process under the same limit; an image that crashes or hangs there too is skipped as
    `decoder-crashed` (with the signal) or `decode-timeout`, and the rest of the piece converts.
    The other pieces of the chunk ran in other tasks and keep their results."""
    pieces = ((p, k, j, task) for p, k in pending for j, task in enumerate(_pieces(p, k, src, out, piece_size)))
    expected = {(p.name, k): -(-len(p.shard_positions(k)) // piece_size) for p, k in pending}
    stitches: list[tuple[tuple, StitchTask]] = []
    alone: deque[tuple[tuple, PieceTask]] = deque()  # single-image retries of a lost piece
    collected: dict[tuple[str, int], dict[int, list[PieceResult]]] = {}
    retried: dict[tuple[str, int, int], list[PieceResult | None]] = {}
    exhausted = False

    def piece_done(p: SplitPlan, k: int, j: int, results: list[PieceResult]) -> None:
        got = collected.setdefault((p.name, k), {})
        got[j] = results
        if len(got) == expected[(p.name, k)]:
            ordered = [r for jj in sorted(got) for r in got[jj]]
            del collected[(p.name, k)]
            stitches.append((("stitch", p, k), _stitch_task(out, p, k, ordered, keep_wds)))

    while True:
        # Stitches first: they free disk (pieces) and commit chunks; then the retries of a lost
        # piece (its chunk waits for them); new pieces only within the bound.
        while pool.has_room() and (stitches or alone or not exhausted):
            if stitches:
                tag, task = stitches.pop(0)
                pool.submit(stitch_chunk, task, tag)
                continue
            if alone:
                tag, task = alone.popleft()
                pool.submit(encode_piece, task, tag, limit=decode_timeout, fresh=True)
                continue
            nxt = next(pieces, None)
            if nxt is None:
                exhausted = True
                break
            p, k, j, task = nxt
            pool.submit(encode_piece, task, ("piece", p, k, j, task), limit=decode_timeout)
        if pool.in_flight == 0:
            return
        try:
            tag, result = pool.next()
        except TaskLost as lost:
            tag = lost.tag
            if tag[0] == "piece":
                _, p, k, j, task = tag
                retried[(p.name, k, j)] = [None] * len(task.items)
                for i, item in enumerate(task.items):
                    alone.append((("alone", p, k, j, i, item), PieceTask(f"{task.path}-{i:03d}", [item])))
                continue
            if tag[0] == "alone":
                result = PieceResult(None, 0, [_lost_result(lost, tag[5])])
            else:
                raise  # a stitch: no input's doing (convert() reports it as a failure of the run)
        if tag[0] == "piece":
            _, p, k, j, _task = tag
            on_piece(result)
            piece_done(p, k, j, [result])
        elif tag[0] == "alone":
            _, p, k, j, i, _item = tag
            on_piece(result)
            parts = retried[(p.name, k, j)]
            parts[i] = result
            if all(r is not None for r in parts):
                del retried[(p.name, k, j)]
                piece_done(p, k, j, parts)
        else:
            _, p, k = tag
            yield p, k, result


def _beton_sources(out: str, records: list[dict]) -> JpegSlices:
    """Where each converted sample's JPEG lies in the chunks' shards, in output order."""
    files, file_ids, rows, checksums = [], [], [], []
    for rec in records:
        if rec["tar"] is None:
            continue
        files.append(os.path.join(out, rec["tar"]))
        for pos, src_index, label, width, height, offset, size in rec["samples"]:
            file_ids.append(len(files) - 1)
            rows.append((offset, size, height, width, label))
        checksums.extend(rec["crc32"])
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 5)  # [n, (offset, size, height, width, label)]
    return JpegSlices(
        files,
        np.asarray(file_ids, dtype=np.int64),
        arr[:, 0],
        arr[:, 1],
        arr[:, 2],
        arr[:, 3],
        arr[:, 4],
        np.asarray(checksums, dtype=np.int64),
    )


def write_beton_file(final: str, dataset: JpegSlices, max_res: int, quality: int, pool: OrderedPool) -> None:
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with atomic_path(final) as tmp:
        write_beton_in_place(tmp, dataset, max_res, quality, pool.run_all)


# ----------------------------------------------------------------------------------------------
# The conversion


def _resource_failure(exc: BaseException, out: str) -> DataError:
    what = "out of memory" if isinstance(exc, MemoryError) else (exc.strerror or str(exc))
    return DataError(
        f"the conversion into {out} stopped: {what} ({type(exc).__name__}); no input was skipped for it and "
        "the finished chunks are kept: free the resource (ulimit -n, disk space, memory) and rerun the same command"
    )


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


def shard_chunks(num_chunks: int, shard: tuple[int, int] | None) -> range:
    """The chunks of one split that part K of N converts: a contiguous, balanced range, so the
    parts joined in K order are the unsharded output in order."""
    if shard is None:
        return range(num_chunks)
    k, n = shard
    return range(k * num_chunks // n, (k + 1) * num_chunks // n)


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
    shard: tuple[int, int] | None = None,
    *,
    max_in_flight: int | None = None,
    piece_size: int = DEFAULT_PIECE_SIZE,
    stats: RunStats | None = None,
    decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT,
) -> dict:
    """Convert `src` into `out` (see the module docstring) and return the manifest.

    `workers` encoding processes (0: encode in this process). `progress` draws a tqdm bar and
    prints warnings and a summary on stderr. With `strict`, any skipped input raises StrictFailure
    (a DataError) after the outputs and `skipped.tsv` are written. Rerunning after an interruption
    resumes. `shard=(K, N)` converts only part K of N into `out` (a part folder; see `merge`).

    Memory and disk stay bounded: at most `max_in_flight` tasks (default 4 per worker) of at most
    `piece_size` images each are out at once, and workers hand back sizes, never image bytes.
    Neither changes the output. `stats`, when given, receives what the pool saw (`RunStats`).

    An input that crashes a worker's decoder or keeps it more than `decode_timeout` seconds (None
    or 0: no limit) is isolated and skipped (`decoder-crashed`, `decode-timeout`); the rest of its
    chunk converts. With `workers=0` there is no worker to lose: no isolation and no limit.

    One conversion writes OUT at a time (`OUT/.work/convert.lock`); a second one raises DataError at
    once naming the holder. Running out of descriptors, disk or memory raises DataError (rerun to
    resume); no input is ever skipped for it."""
    t_start = time.perf_counter()
    formats = list(formats)
    _check_args(formats, max_res, quality, workers, shard_size, max_pixels, splits)
    if decode_timeout is not None and not decode_timeout >= 0:
        raise DataError(f"--decode-timeout must be >= 0 seconds (0 = no limit), got {decode_timeout}")
    if piece_size < 1 or (max_in_flight is not None and max_in_flight < 1):
        raise DataError(f"piece_size and max_in_flight must be >= 1, got {piece_size} and {max_in_flight}")
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise DataError(f"--shard must be K/N with 0 <= K < N, got {shard[0]}/{shard[1]}")
    src = os.path.abspath(src)
    out = os.path.abspath(out)
    if not os.path.isdir(src):
        raise DataError(f"source folder {src} does not exist")
    if out == src or out.startswith(src + os.sep):
        raise DataError(f"the output folder {out} must not be inside the source folder {src}")
    with lock_out(out):
        try:
            return _convert_locked(
                src, out, formats, max_res, quality, workers, shard_size, splits, seed, strict, progress,
                max_pixels, shard, max_in_flight, piece_size, stats, t_start, decode_timeout or None,
            )  # fmt: skip
        except (OSError, MemoryError) as exc:
            if is_resource_error(exc):
                raise _resource_failure(exc, out) from exc
            raise
        except TaskLost as exc:
            # A worker lost while stitching a shard or writing the .beton: no decoder ran there.
            raise DataError(
                f"the conversion into {out} stopped: {exc} while writing the outputs; no input was skipped "
                "for it: rerun the same command to resume"
            ) from exc


def _convert_locked(
    src: str,
    out: str,
    formats: list[str],
    max_res: int,
    quality: int,
    workers: int,
    shard_size: int,
    splits: Sequence[str] | None,
    seed: int,
    strict: bool,
    progress: bool,
    max_pixels: int,
    shard: tuple[int, int] | None,
    max_in_flight: int | None,
    piece_size: int,
    stats: RunStats | None,
    t_start: float,
    decode_timeout: float | None,
) -> dict:
    listing = list_source(src, splits, seed, shard_size)
    say(progress, f"layout: {listing.description}")
    classes, plans, warnings = listing.classes, listing.plans, listing.warnings
    split_names = [p.name for p in plans]
    identity = conversion_identity(
        src, formats, max_res, quality, shard_size, split_names, seed, max_pixels, listing.layout, shard
    )
    fingerprint = listing.fingerprint()

    manifest = read_json(os.path.join(out, MANIFEST_FILE))
    if manifest is not None:
        if manifest.get("identity") != identity or manifest.get("listing_fingerprint") != fingerprint:
            changed = identity_diff(manifest.get("identity", {}), identity) or "the source file listing changed"
            raise DataError(f"{out} already holds a different conversion ({changed}); choose another OUT or delete it")
        shutil.rmtree(os.path.join(out, WORK_DIR), ignore_errors=True)
        say(progress, f"{out} is already converted with these options; nothing to do")
        return finish_strict(manifest, strict, out)

    state_path = os.path.join(out, WORK_DIR, STATE_FILE)
    state = read_json(state_path)
    if state is None:
        if out_entries(out):
            raise DataError(f"{out} is not empty and holds no conversion; choose an empty or new folder")
        os.makedirs(os.path.join(out, WORK_DIR), exist_ok=True)
        atomic_write(state_path, json.dumps({"identity": identity, "listing_fingerprint": fingerprint}).encode())
    elif state.get("identity") != identity or state.get("listing_fingerprint") != fingerprint:
        changed = identity_diff(state.get("identity", {}), identity) or "the source file listing changed"
        raise DataError(
            f"{out} holds an unfinished conversion with other inputs ({changed}); rerun it with the "
            f"same options and source, or delete {out} to start over"
        )
    remove_stale_temporaries(out)
    for w in warnings:
        say(progress, f"warning: {w}")

    keep_wds = "wds" in formats
    for p in plans:
        # Pieces and chunk records go here (and, without wds, the shards the .beton is made from).
        os.makedirs(os.path.join(out, WORK_DIR, p.name), exist_ok=True)
    mine = {p.name: shard_chunks(p.num_shards, shard) for p in plans}
    finished = {p.name: load_finished(out, p, keep_wds, mine[p.name]) for p in plans}
    resumed = sum(len(v) for v in finished.values())
    pending = [(p, k) for p in plans for k in mine[p.name] if k not in finished[p.name]]
    total_pending = sum(len(p.shard_positions(k)) for p, k in pending)
    if resumed:
        say(progress, f"resuming: {resumed} chunk(s) already done, {len(pending)} to go")
    if listing.stage is not None:  # rows with no byte range in SRC (HF parquet) are unpacked into .work first
        listing.stage(os.path.join(out, WORK_DIR), pending, progress)

    from tqdm import tqdm

    bar = tqdm(total=total_pending, unit="img", desc="convert", disable=not progress, smoothing=0.1, file=sys.stderr)
    skipped_now = 0

    def on_piece(piece: PieceResult) -> None:
        nonlocal skipped_now
        skips = sum(1 for r in piece.results if r[0] == "skip")
        if skips:
            skipped_now += skips
            bar.set_postfix_str(f"skipped {skipped_now}", refresh=False)
        bar.update(len(piece.results))

    t_encode = time.perf_counter()
    init_args = (max_res, quality, max_pixels, os.getpid())
    with OrderedPool(workers, max_in_flight, initializer=init_worker, initargs=init_args) as pool:
        try:
            for p, k, rec in _convert_chunks(pool, pending, src, out, keep_wds, piece_size, on_piece, decode_timeout):
                finished[p.name][k] = rec
        finally:
            bar.close()
        encode_seconds = time.perf_counter() - t_encode

        # The .beton files from the finished chunks (skipped when one is already in place: it was
        # renamed there only after being written completely, by a run with these inputs).
        if "ffcv" in formats:
            for p in plans:
                if os.path.isfile(beton_path(out, p.name)):
                    continue
                records = [finished[p.name][k] for k in mine[p.name]]
                if not any(r["samples"] for r in records):
                    continue
                say(progress, f"writing {os.path.relpath(beton_path(out, p.name), out)}")
                write_beton_file(beton_path(out, p.name), _beton_sources(out, records), max_res, quality, pool)
        if stats is not None:
            stats.max_in_flight = pool.max_in_flight
            stats.peak_in_flight = pool.peak_in_flight
            stats.wait_seconds = pool.wait_seconds

    part = None
    if shard is not None:
        # What a merge needs besides the files: every chunk record of this part, and the inputs
        # seen outside the chunks (reported once, by part 0).
        part = {
            "shard": list(shard),
            "identity": identity,
            "listing_fingerprint": fingerprint,
            "classes": classes,
            "warnings": warnings,
            "layout": listing.layout,
            "archives": listing.archives,
            "splits": {
                p.name: {
                    "chunks": {str(k): finished[p.name][k] for k in mine[p.name]},
                    "num_chunks": p.num_shards,
                    "num_sources": len(p.sources),
                    "shard_size": p.shard_size,
                    "extras": p.extras,
                    "class_seen": p.class_seen,
                }
                for p in plans
            },
        }
        atomic_write(os.path.join(out, PART_FILE), json.dumps(part).encode())
    manifest = write_reports(
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
        chunks=mine,
        with_extras=shard is None or shard[0] == 0,
        layout=listing.layout,
        archives=listing.archives,
    )
    shutil.rmtree(os.path.join(out, WORK_DIR), ignore_errors=True)
    fsync_dir(out)
    if stats is not None:
        stats.elapsed_seconds = time.perf_counter() - t_start
    if progress:
        print_summary(manifest)
    return finish_strict(manifest, strict, out)
