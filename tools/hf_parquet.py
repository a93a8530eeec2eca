"""The Hugging Face `imagenet-1k` layout: `SRC/data/{train,validation,test}-NNNNN-of-NNNNN.parquet`.

Each row is `image` (a struct of `bytes`, the image file, and `path`, its file name such as
`n01440764_190.JPEG`; validation names carry no wnid) and `label` (int64, the class's index
among the sorted wnids; -1 on the unlabelled test split, which is therefore not converted).

Listing reads only the `label` and `image.path` columns, one row group at a time (a 500 MB file
is never loaded whole; the image bytes are not read at all). Rows are checked as
`tools.listing.index_rows` says: a row without a label, or whose file name starts with a wnid
other than its label's class, is a skipped row with its reason; the class names come from the
repository's `classes.py` when it sits beside `data/`, else from the train file names (see
`tools.listing.hub_classes`). Samples are ordered as ImageFolder would order the same files
in class folders, so the output is byte-identical to converting the extracted tree.

A file whose footer cannot be read (a truncated download: parquet keeps its index at the end)
is one skipped entry (`truncated-archive`): its rows cannot be located, every other file is
converted. A row group whose label/path columns cannot be decoded is one skipped entry
(`corrupt`), the file's other row groups are converted.

Reading the bytes. Parquet pages are compressed, so an image has no byte range in the file and
the converter's workers cannot `pread` it as they do for tar members. And the output order is a
random permutation, so reading a row group per image would read each row group about a hundred
times. So, before encoding, `stage` streams each file once (several files at a time, on threads), a row
group at a time, and copies the
image bytes of the rows the pending chunks need into `OUT/.work/hf-parquet/<file>.bin` (plain
concatenation, fsynced, renamed into place; a small JSON beside it lists the rows it holds, and
is the commit point). Those rows then are byte ranges of that file, read like archive members.
A resumed run reuses a complete `.bin` that holds every row it still needs. A row group whose
image bytes cannot be read is read again (`READ_TRIES` in all, the file reopened each time); if
it still fails the conversion stops with the error (rerun to resume; a damaged file is downloaded
again): nothing is staged for it, so a transient I/O error or a MemoryError never becomes lost
rows. (Only a row whose bytes are null is an empty image, reported as `empty`.) The work folder is
deleted when the conversion finishes; while it runs it needs free space for the source bytes of
the rows being converted (for a `--shard K/N` part, about 1/N of them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from pipelines.constants import SPLITS
from pipelines.errors import DataError
from tools import archives as A
from tools.files import atomic_path, atomic_write
from tools.listing import Listing, Row, Source, SplitPlan, hub_listing

DATA_DIR = "data"
FILE_NAME = re.compile(r"(train|validation|test)-(\d+)-of-(\d+)\.parquet")
HUB_SPLITS = {"train": "train", "validation": "val"}  # their split name -> ours
STAGE_DIR = "hf-parquet"
CORRUPT = "corrupt"
STAGE_THREADS = 8
READ_TRIES = 3  # reads of one row group's image bytes before the conversion stops


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            "reading the Hugging Face parquet layout needs the 'pyarrow' package: pip install pyarrow"
        ) from None
    return pq


def _files(src: str) -> dict[str, list[str]]:
    """Parquet files (relative to `src`) per hub split name, sorted."""
    folder = os.path.join(src, DATA_DIR)
    found: dict[str, list[str]] = {}
    if not os.path.isdir(folder):
        return found
    for name in sorted(os.listdir(folder)):
        m = FILE_NAME.fullmatch(name)
        if m and os.path.isfile(os.path.join(folder, name)):
            found.setdefault(m.group(1), []).append(f"{DATA_DIR}/{name}")
    return found


def detect(src: str) -> bool:
    files = _files(src)
    return any(split in files for split in HUB_SPLITS)


def _file_rows(src: str, rel: str) -> tuple[list[Row], list[tuple[str, str, str]], dict]:
    """The rows of one parquet file (label and path only), problems, and facts for the manifest."""
    pq = _pyarrow()
    path = os.path.join(src, rel)
    size = os.path.getsize(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for a damaged footer
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        code = A.TRUNCATED_ARCHIVE if "magic" in detail.lower() or "footer" in detail.lower() else A.DAMAGED_ARCHIVE
        return (
            [],
            [(rel, code, f"parquet file unreadable ({detail}); its rows cannot be located, none converted")],
            {
                "bytes": size,
                "rows": None,
                "truncated": code == A.TRUNCATED_ARCHIVE,
            },
        )
    schema = pf.schema_arrow
    image = schema.field("image").type if "image" in schema.names else None
    fields = {image.field(i).name for i in range(image.num_fields)} if getattr(image, "num_fields", 0) else set()
    if "label" not in schema.names or not {"bytes", "path"} <= fields:
        raise DataError(
            f"{path} has columns {schema.names} (image: {image}); the imagenet-1k layout has 'label' and "
            "'image' {bytes, path}"
        )
    rows: list[Row] = []
    problems: list[tuple[str, str, str]] = []
    start = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            table = pf.read_row_group(g, columns=["label", "image.path"])
            labels = table.column("label").to_pylist()
            paths = table.column("image").combine_chunks().field("path").to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow's decoding errors vary by damage
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append((f"{rel}#rowgroup{g}", CORRUPT, f"rows {start}..{start + n - 1} unreadable: {detail}"))
            start += n
            continue
        for i, (label, name) in enumerate(zip(labels, paths)):
            row = start + i
            name = name or f"row{row}"
            rows.append(
                Row(
                    f"{rel}#{row}/{name}",
                    name,
                    None if label is None else int(label),
                    rel,
                    row,  # the row index: no byte range until staged
                    -1,
                    "" if label is not None else "the row's label is null",
                )
            )
        start += n
    return rows, problems, {"bytes": size, "rows": start, "row_groups": pf.metadata.num_row_groups}


def list_hf_parquet(src: str, splits: Sequence[str] | None, seed: int, shard_size: int) -> Listing:
    files = _files(src)
    present = [ours for hub, ours in HUB_SPLITS.items() if hub in files]
    wanted = list(splits) if splits else present
    missing = [s for s in wanted if s not in present]
    if missing:
        raise DataError(f"split(s) {', '.join(missing)} not found in {os.path.join(src, DATA_DIR)}")
    ours_to_hub = {v: k for k, v in HUB_SPLITS.items()}
    warnings: list[str] = []
    if "test" in files:
        warnings.append(f"{len(files['test'])} test parquet file(s) not converted: the test split is unlabelled")
    rows_by_split: dict[str, list[Row]] = {}
    extras_by_split: dict[str, list[tuple[str, str, str]]] = {}
    facts: dict[str, dict] = {}
    # The train rows name the classes even when only val is converted (unless a classes file does).
    need = [s for s in SPLITS if s in wanted or (s == "train" and "train" in present)]
    for split in need:
        rows, extras = [], []
        for rel in files[ours_to_hub[split]]:
            r, problems, fact = _file_rows(src, rel)
            rows.extend(r)
            extras.extend(problems)
            facts[rel] = fact
            if fact.get("truncated"):
                warnings.append(
                    f"{rel} is truncated (no parquet footer): its rows are lost; every other file converted"
                )
        rows_by_split[split], extras_by_split[split] = rows, extras
    listing = hub_listing(
        "hf-parquet",
        f"Hugging Face imagenet-1k parquet ({DATA_DIR}/*.parquet)",
        src,
        rows_by_split,
        extras_by_split,
        wanted,
        seed,
        shard_size,
        warnings,
        rows_by_split.get("train"),
    )
    listing.archives = {rel: facts[rel] for split in wanted for rel in files[ours_to_hub[split]]}
    listing.stage = lambda work, pending, progress: stage(src, work, pending, progress)
    return listing


def stage(src: str, work_dir: str, pending: list[tuple[SplitPlan, int]], progress: bool = False) -> None:
    """Copy the image bytes of the rows that `pending` chunks need into `work_dir/hf-parquet/` and
    point their sources at them (see the module docstring). Memory: one row group per thread."""
    needed: dict[str, set[int]] = {}
    for plan, k in pending:
        for pos in plan.shard_positions(k):
            s = plan.sources[int(plan.permutation[pos])]
            if s.archive is not None and s.size < 0:
                needed.setdefault(s.archive, set()).add(s.offset)
    if not needed:
        return
    folder = os.path.join(work_dir, STAGE_DIR)
    os.makedirs(folder, exist_ok=True)

    def one(rel: str) -> tuple[str, str, dict]:
        bin_path = os.path.join(folder, os.path.basename(rel)[: -len(".parquet")] + ".bin")
        table = _staged(bin_path, needed[rel])
        if table is None:
            # The old table must not outlive the file it describes (a kill between the two renames).
            with contextlib.suppress(FileNotFoundError):
                os.remove(bin_path + ".json")
            if progress:
                print(f"unpacking {len(needed[rel])} rows of {rel}", file=sys.stderr, flush=True)
            table = _stage_file(os.path.join(src, rel), bin_path, sorted(needed[rel]))
        return rel, bin_path, table

    # Files in parallel: pyarrow decodes and the writes proceed without the GIL, and this pass is
    # serial work ahead of the encoding. Memory: one row group per thread.
    threads = max(1, min(len(needed), os.cpu_count() or 1, STAGE_THREADS))
    where: dict[tuple[str, int], tuple[str, int, int]] = {}
    with ThreadPoolExecutor(threads) as pool:
        for rel, bin_path, table in pool.map(one, sorted(needed)):
            for row, offset, size in zip(table["rows"], table["offsets"], table["sizes"]):
                where[(rel, row)] = (bin_path, offset, size)
    for plan, k in pending:
        for pos in plan.shard_positions(k):
            i = int(plan.permutation[pos])
            s = plan.sources[i]
            if s.archive is not None and s.size < 0:
                path, offset, size = where[(s.archive, s.offset)]
                plan.sources[i] = Source(s.rel, s.label, path, offset, size)


def _staged(bin_path: str, rows: set[int]) -> dict | None:
    """The row table of a complete staged file holding every row of `rows`, else None."""
    try:
        with open(bin_path + ".json") as f:
            table = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not os.path.isfile(bin_path) or os.path.getsize(bin_path) != table.get("bytes"):
        return None
    return table if rows <= set(table["rows"]) else None


def _stage_file(path: str, bin_path: str, rows: list[int]) -> dict:
    """Stream `rows` (sorted) of one parquet file into `bin_path`, a row group at a time.

    A row whose bytes are null gets an empty range: the worker reports it as an empty image. A row
    group that cannot be read after `READ_TRIES` tries stops the conversion (DataError), with
    nothing committed for this file."""
    pq = _pyarrow()
    pf = pq.ParquetFile(path)
    offsets, sizes = [], []
    at = 0
    wanted = iter(rows)
    row = next(wanted, None)
    start = 0
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as out:
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row is None:
                break
            if row >= start + n:
                start += n
                continue
            column, pf = _image_bytes(pq, pf, path, g, start, n)
            while row is not None and row < start + n:
                data = column[row - start].as_py() or b""
                out.write(data)
                offsets.append(at)
                sizes.append(len(data))
                at += len(data)
                row = next(wanted, None)
            start += n
    if len(offsets) != len(rows):
        raise DataError(f"{path} holds fewer rows than its listing: it changed during the conversion")
    table = {"rows": rows, "offsets": offsets, "sizes": sizes, "bytes": at}
    atomic_write(bin_path + ".json", json.dumps(table).encode())
    return table


def _image_bytes(pq, pf, path: str, g: int, start: int, n: int):
    """(row group g's `image.bytes` column, the ParquetFile to go on with), read up to READ_TRIES
    times (the file reopened between tries); DataError naming the real error when every try fails."""
    for attempt in range(READ_TRIES):
        try:
            if attempt:
                time.sleep(0.5 * attempt)
                pf = pq.ParquetFile(path)
            table = pf.read_row_group(g, columns=["image.bytes"])
            return table.column("image").combine_chunks().field("bytes"), pf
        except Exception as exc:  # noqa: BLE001 - I/O, memory or decoding: all stop the run after the tries
            error = exc
    detail = " ".join(str(error).split()) or type(error).__name__
    raise DataError(
        f"{path}: the image bytes of row group {g} (rows {start}..{start + n - 1}) cannot be read after "
        f"{READ_TRIES} tries ({type(error).__name__}: {detail}); none of its rows were skipped: rerun the same "
        "command to resume (if the file is damaged, download it again first)"
    ) from error
