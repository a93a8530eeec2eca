"""What a conversion or merge reports once its outputs are written: `classes.json`, `sources/<split>.tsv`,
`skipped.tsv` and, last (its presence marks a finished conversion), `manifest.json`; the summary on
stderr; and `--strict`'s verdict on the skipped inputs."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from pipelines.constants import CLASSES_FILE, MANIFEST_FILE, SKIPPED_FILE, beton_path
from pipelines.errors import DataError
from tools.files import atomic_write
from tools.imageio import ALPHA_BACKGROUND, JPEG_RESTART_ROWS, JPEG_SUBSAMPLING, RESAMPLE_NAME, restart_markers_written
from tools.listing import SplitPlan
from tools.wids import write_wids_index
from tools.workdir import SOURCES_DIR, TOOL_VERSION


def tsv_cell(text: str) -> str:
    """One TSV cell: backslash, tab, CR and newline escaped so every record stays one line."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_text(path: str, lines: list[str]) -> None:
    atomic_write(path, "".join(lines).encode("utf-8", "surrogateescape"))


def _file_entry(out: str, rel: str) -> dict:
    return {"path": rel, "bytes": os.path.getsize(os.path.join(out, rel))}


class StrictFailure(DataError):
    """Some input was skipped under `strict` (the outputs and skipped.tsv are written)."""


def finish_strict(manifest: dict, strict: bool, out: str) -> dict:
    skipped = manifest["skipped"]["count"]
    if strict and skipped:
        raise StrictFailure(
            f"strict: {skipped} of {manifest['seen']} input files were not converted "
            f"(reasons in {os.path.join(out, SKIPPED_FILE)})"
        )
    return manifest


def write_reports(
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
    chunks: dict[str, range] | None = None,
    with_extras: bool = True,
    layout: str = "imagefolder",
    archives: dict | None = None,
) -> dict:
    """Write classes, sources, skipped.tsv and (last) the manifest. `chunks` (per split) are the
    chunks this output holds (all unless it is one part of a sharded run); `with_extras` reports
    the inputs seen outside any chunk (one part of a sharded run does that for all)."""
    import PIL

    part = identity.get("shard")

    atomic_write(os.path.join(out, CLASSES_FILE), (json.dumps(classes, indent=1) + "\n").encode())
    os.makedirs(os.path.join(out, SOURCES_DIR), exist_ok=True)
    skipped_lines = ["split\tpath\treason\tdetail\n"]
    by_reason: dict[str, int] = {}
    splits_out: dict[str, dict] = {}
    formats_out: dict[str, dict] = {f: {} for f in formats}
    for p in plans:
        mine = chunks[p.name] if chunks is not None else range(p.num_shards)
        records = [finished[p.name][k] for k in mine]
        extras = p.extras if with_extras else []
        sources_rel = f"{SOURCES_DIR}/{p.name}.tsv"
        write_text(
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
        for path, code, detail in extras:
            skipped_lines.append(f"{p.name}\t{tsv_cell(path)}\t{code}\t{tsv_cell(detail)}\n")
            by_reason[code] = by_reason.get(code, 0) + 1
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
        seen = sum(len(p.shard_positions(k)) for k in mine) + len(extras)
        assert len(permutation) + len(skipped) + len(extras) == seen, "converted + skipped != seen"
        splits_out[p.name] = {
            "count": len(permutation),
            "seen": seen,
            "skipped": len(skipped) + len(extras),
            "class_counts": {c: int(n) for c, n in zip(classes, counts)},
            "class_files_seen": dict(zip(classes, p.class_seen)),
            "permutation": permutation,
            "sources": sources_rel,
            "source_bytes": sum(r["source_bytes"] for r in records),
            "jpeg_bytes": sum(r["jpeg_bytes"] for r in records),
        }
        if not permutation and part is None:
            raise DataError(
                f"split '{p.name}': none of its {len(p.sources)} files could be converted "
                f"(reasons in {os.path.join(out, SKIPPED_FILE)})"
            )
        if "ffcv" in formats and permutation:
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
            wds_records = [rec for rec in records if rec["tar"] is not None]
            with_md5 = [f | {"md5": r["md5"]} if "md5" in r else f for f, r in zip(files, wds_records)]
            formats_out["wds"][p.name] = {"files": files, "wids_index": write_wids_index(out, p.name, with_md5)}
    write_text(os.path.join(out, SKIPPED_FILE), skipped_lines)
    total_seen = sum(s["seen"] for s in splits_out.values())
    total_skipped = sum(s["skipped"] for s in splits_out.values())
    manifest = {
        "tool": "supmae convert",
        "tool_version": TOOL_VERSION,
        "source_root": identity["source_root"],
        "layout": layout,
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
            "restart_marker_mcu_rows": JPEG_RESTART_ROWS if restart_markers_written() else 0,
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
        "archives": archives or {},
        "identity": identity,
        "listing_fingerprint": fingerprint,
        "resumed_chunks": resumed,
        "encoded_this_run": encoded_now,
        "encode_seconds": round(encode_seconds, 3),
        "elapsed_seconds": round(elapsed, 3),
    }
    if part is not None:
        manifest["part"] = {"index": part[0], "count": part[1]}
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


def print_summary(manifest: dict) -> None:
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
