"""`supmae bench convert`: our converter (FFCV .beton + webdataset shards from one pass) against
FFCV's own `DatasetWriter` on the same images, at 1 and 2 worker processes, in one run; the
scaling of each; and the projected wall time of ImageNet-1k train at 16 and 64 cores.

    supmae bench convert --src /work/shared/data/imagenet-sample --max-res 256 --workers 1,2

FFCV's writer is run over an ImageFolder-like dataset (torchvision's `ImageFolder`, PIL loader)
with `RGBImageField(max_resolution=R, jpeg_quality=90)` twice: in its default `write_mode="raw"`
(stores decoded pixels, no JPEG encode: the usual stock invocation) and in `write_mode="jpg"`
(stores JPEGs, as we do: the like-for-like comparison). Our converter writes both formats; with
`--archives` it also converts the same images packed as the official train archive (a tar of
per-class tars, built before any timing), to show what reading from the archive costs.
Library imports and a first read of every source file (page cache) happen before any timing, so
each figure is the conversion itself. Timings on a shared machine are indicative; CPU ms/image
(this process and its children) moves less with other users than wall time does.

Each tool's time includes listing the source (our converter lists it; FFCV's writer is given
torchvision's `ImageFolder`, built inside the timed region, since a user has to list the files
either way).

Projection: per tool, the serial part is ALL of its main process's work, measured as that
process's CPU seconds (every thread of it; the same meter for both tools, and one that other users
of a shared machine barely move): for ours the listing, starting the workers, routing their small
records, the .beton layout and header, the reports; for FFCV's writer the listing, starting its
workers, gathering their allocations and writing its tables. It is counted per image, unscaled.
The rest of the 1-worker run's wall time is the per-core parallel part, and the efficiency measured
at the largest worker count is assumed to hold at 16 and 64 cores. The source is assumed to be on a
local disk that keeps up: the table states the read and write rates the projection needs, which a
local NVMe drive sustains and a network filesystem may not (nor are waits on the disk counted as
serial: they are what those rates size).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time

from pipelines.errors import DataError


def _warm_page_cache(root: str) -> tuple[int, int]:
    files = total = 0
    for dirpath, _, names in os.walk(root, followlinks=True):
        for name in names:
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    total += len(f.read())
                files += 1
            except OSError:
                continue
    return files, total


def _split_root(src: str) -> str:
    """The folder whose sub-folders are classes (FFCV's writer gets one split, like ours converts)."""
    train = os.path.join(src, "train")
    return train if os.path.isdir(train) else src


def _main_cpu_seconds() -> float:
    """CPU seconds of this process alone (all its threads): the converting tool's main process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children: unlike wall time, barely affected by
    other users of a shared machine."""
    # Reap every worker process (FFCV's writer returns before its workers have exited) so that
    # all their CPU time is counted, and counted in this run.
    deadline = time.monotonic() + 30
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.01)
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


IMAGENET_TRAIN = 1_281_167
PROJECT_CORES = (16, 64)
OURS, FFCV_JPG, FFCV_RAW, OURS_ARCHIVE = "ours", "ffcv-jpg", "ffcv-raw", "ours-archive"


def run_ours(src: str, out: str, max_res: int, workers: int, quality: int, tool: str = "supmae convert") -> dict:
    from tools.convert import convert, output_bytes
    from tools.parallel_write import RunStats

    stats = RunStats()
    m0, c0, t0 = _main_cpu_seconds(), _cpu_seconds(), time.perf_counter()
    manifest = convert(
        src,
        out,
        formats=("ffcv", "wds"),
        max_res=max_res,
        quality=quality,
        workers=workers,
        splits=["train"] if os.path.isdir(os.path.join(src, "train")) or tool != "supmae convert" else None,
        progress=False,
        stats=stats,
    )
    seconds, main_cpu = time.perf_counter() - t0, _main_cpu_seconds() - m0
    cpu = _cpu_seconds() - c0
    return {
        "tool": tool,
        "workers": workers,
        "cpu_seconds": cpu,
        "writes": "ffcv + wds",
        "max_res": max_res,
        "images": manifest["converted"],
        "seconds": seconds,
        "serial_seconds": main_cpu,
        # Wall time the main process did not spend waiting for a worker (its CPU time plus its
        # waits on the disk), and the most tasks it ever had out (bounded by max_in_flight).
        "main_busy_seconds": stats.main_busy_seconds,
        "peak_in_flight": stats.peak_in_flight,
        "max_in_flight": stats.max_in_flight,
        "bytes": {"ffcv": output_bytes(manifest, "ffcv"), "wds": output_bytes(manifest, "wds")},
    }


def run_ffcv(split_root: str, out: str, max_res: int, workers: int, quality: int, write_mode: str) -> dict:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    path = os.path.join(out, "train.beton")
    os.makedirs(out, exist_ok=True)
    m0, c0, t0 = _main_cpu_seconds(), _cpu_seconds(), time.perf_counter()
    dataset = ImageFolder(split_root)
    writer = DatasetWriter(
        path,
        {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_res, jpeg_quality=quality),
            "label": IntField(),
        },
        num_workers=workers,
    )
    writer.from_indexed_dataset(dataset)
    seconds, main_cpu = time.perf_counter() - t0, _main_cpu_seconds() - m0
    cpu = _cpu_seconds() - c0
    return {
        "cpu_seconds": cpu,
        "workers": workers,
        "tool": f"ffcv DatasetWriter ({write_mode})",
        "writes": "ffcv",
        "max_res": max_res,
        "images": len(dataset),
        "seconds": seconds,
        "serial_seconds": main_cpu,
        "bytes": {"ffcv": os.path.getsize(path)},
    }


def build_train_archive(split_root: str, folder: str) -> str:
    """The ImageFolder split packed as ImageNet's official train archive (one tar per class inside),
    so our converter reads the same images from it."""
    import io
    import tarfile

    from tools.archives import TRAIN_TAR

    os.makedirs(folder, exist_ok=True)
    with tarfile.open(os.path.join(folder, TRAIN_TAR), "w", format=tarfile.USTAR_FORMAT) as outer:
        for cls in sorted(os.listdir(split_root)):
            class_dir = os.path.join(split_root, cls)
            if not os.path.isdir(class_dir):
                continue
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for name in sorted(os.listdir(class_dir)):
                    inner.add(os.path.join(class_dir, name), arcname=name, recursive=False)
            info = tarfile.TarInfo(f"{cls}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    return folder


def _rate(r: dict) -> float:
    return r["images"] / r["seconds"]


def _table(rows: list[dict]) -> str:
    lines = [
        (
            "| tool | writes | max side | workers | images | seconds | images/s | CPU ms/image "
            "| main-process CPU ms/image | .beton MB | shards MB |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        wds = r["bytes"].get("wds")
        lines.append(
            f"| {r['tool']} | {r['writes']} | {r['max_res']} | {r['workers']} | {r['images']} | {r['seconds']:.2f} | "
            f"{_rate(r):.0f} | {1e3 * r['cpu_seconds'] / r['images']:.1f} | "
            f"{1e3 * r['serial_seconds'] / r['images']:.3f} | "
            f"{r['bytes']['ffcv'] / 1e6:.1f} | "
            f"{'-' if wds is None else f'{wds / 1e6:.1f}'} |"
        )
    return "\n".join(lines)


def summarise(rows: list[dict], mean_source_bytes: float) -> dict:
    """Scaling per tool, ours against FFCV's jpg writer, and the ImageNet-1k projections."""
    by: dict[tuple, dict] = {(r["tool"], r["max_res"], r["workers"]): r for r in rows}
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    resolutions = sorted({r["max_res"] for r in rows})
    workers = sorted({r["workers"] for r in rows})
    lo, hi = workers[0], workers[-1]
    scaling, ratios, projections = [], [], []
    for res in resolutions:
        for w in workers:
            ours, theirs = by.get(("supmae convert", res, w)), by.get(("ffcv DatasetWriter (jpg)", res, w))
            if ours and theirs:
                ratios.append({"max_res": res, "workers": w, "ours_over_ffcv_jpg": _rate(ours) / _rate(theirs)})
        for tool in tools:
            one, many = by.get((tool, res, lo)), by.get((tool, res, hi))
            if not one or not many:
                continue
            speedup = _rate(many) / _rate(one)
            efficiency = speedup / (hi / lo) if hi > lo else 1.0
            scaling.append({"tool": tool, "max_res": res, "speedup": speedup, "efficiency": efficiency})
            # Per-core rate of the parallel part: the 1-worker run less its serial seconds.
            parallel_per_image = (one["seconds"] - one["serial_seconds"]) / one["images"] * lo
            serial_per_image = many["serial_seconds"] / many["images"]
            out_bytes = sum(many["bytes"].values()) / many["images"]
            for cores in PROJECT_CORES:
                seconds = IMAGENET_TRAIN * (parallel_per_image / (cores * efficiency) + serial_per_image)
                projections.append(
                    {
                        "tool": tool,
                        "max_res": res,
                        "cores": cores,
                        "minutes": seconds / 60,
                        "read_mb_s": IMAGENET_TRAIN * mean_source_bytes / seconds / 1e6,
                        "write_mb_s": IMAGENET_TRAIN * out_bytes / seconds / 1e6,
                    }
                )
    return {"scaling": scaling, "ours_over_ffcv_jpg": ratios, "projections": projections, "workers": [lo, hi]}


def _summary_text(summary: dict) -> str:
    lo, hi = summary["workers"]
    lines = ["", f"| tool | max side | speed-up {lo} -> {hi} workers | parallel efficiency |", "|---|---:|---:|---:|"]
    for s in summary["scaling"]:
        lines.append(f"| {s['tool']} | {s['max_res']} | {s['speedup']:.2f}x | {100 * s['efficiency']:.0f}% |")
    lines += ["", "| max side | workers | ours (ffcv + wds) / FFCV writer (jpg, ffcv only) |", "|---:|---:|---:|"]
    for r in summary["ours_over_ffcv_jpg"]:
        lines.append(f"| {r['max_res']} | {r['workers']} | {r['ours_over_ffcv_jpg']:.2f}x |")
    lines += [
        "",
        (
            f"Projected wall time, ImageNet-1k train ({IMAGENET_TRAIN:,} images): per-core rate from the {lo}-worker "
            f"run, the {hi}-worker efficiency held, serial part (all main-process CPU, per image) unscaled; disk "
            "assumed to sustain the rates shown"
        ),
        "",
        "| tool | max side | cores | minutes | source read MB/s | output write MB/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in summary["projections"]:
        lines.append(
            f"| {p['tool']} | {p['max_res']} | {p['cores']} | {p['minutes']:.1f} | {p['read_mb_s']:.0f} | "
            f"{p['write_mb_s']:.0f} |"
        )
    return "\n".join(lines)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DataError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise DataError(f"{what} must be a non-empty list of integers >= 1, got {text!r}")
    return values


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="supmae bench convert", description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="ImageNet-style folder (its train split is converted)")
    p.add_argument("--max-res", default="256", help="comma-separated longer-side caps (default 256)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts for every tool (default 1,2)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration; the fastest is reported")
    p.add_argument(
        "--archives",
        action="store_true",
        help="also convert the same images packed as the official train archive (tar of per-class tars)",
    )
    p.add_argument("--work-dir", default=None, help="scratch folder for the outputs (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    if not os.path.isdir(args.src):
        raise DataError(f"--src {args.src} is not a folder")
    resolutions = _int_list(args.max_res, "--max-res")
    worker_counts = sorted(set(_int_list(args.workers, "--workers")))
    if args.repeats < 1:
        raise DataError("--repeats must be >= 1")

    # Imports and page cache first: neither tool is charged for them.
    import ffcv.fields
    import ffcv.writer  # noqa: F401
    import torchvision.datasets  # noqa: F401

    import tools.convert  # noqa: F401

    split_root = _split_root(args.src)
    files, nbytes = _warm_page_cache(split_root)
    print(
        f"source: {args.src} ({files} files, {nbytes / 1e6:.1f} MB), workers={','.join(map(str, worker_counts))}, "
        f"cpus={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
    )

    scratch = args.work_dir or tempfile.mkdtemp(prefix="supmae-bench-convert-")
    rows = []
    try:
        archive_src = None
        if args.archives:
            archive_src = build_train_archive(split_root, os.path.join(scratch, "archives"))
            _warm_page_cache(archive_src)
        for res in resolutions:
            for workers in worker_counts:
                candidates: dict[str, list[dict]] = {}
                for rep in range(args.repeats):
                    runs = [
                        (OURS, lambda d, r=res, w=workers: run_ours(args.src, d, r, w, args.quality)),
                        (FFCV_JPG, lambda d, r=res, w=workers: run_ffcv(split_root, d, r, w, args.quality, "jpg")),
                        (FFCV_RAW, lambda d, r=res, w=workers: run_ffcv(split_root, d, r, w, args.quality, "raw")),
                    ]
                    if archive_src is not None:
                        runs.append(
                            (
                                OURS_ARCHIVE,
                                lambda d, r=res, w=workers: run_ours(
                                    archive_src, d, r, w, args.quality, tool="supmae convert (train archive)"
                                ),
                            )
                        )
                    for name, fn in runs:
                        out = os.path.join(scratch, f"{name}-{res}-{workers}-{rep}")
                        shutil.rmtree(out, ignore_errors=True)
                        row = fn(out)
                        print(
                            f"  {row['tool']} at {res}, {workers} worker(s): {row['seconds']:.2f} s, "
                            f"{row['cpu_seconds']:.2f} CPU s",
                            file=sys.stderr,
                        )
                        candidates.setdefault(name, []).append(row)
                        shutil.rmtree(out, ignore_errors=True)
                rows.extend(min(v, key=lambda r: r["seconds"]) for v in candidates.values())
    finally:
        if args.work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = summarise(rows, nbytes / max(files, 1))
    print(_table(rows))
    print(_summary_text(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"workers": worker_counts, "src": os.path.abspath(args.src), "rows": rows, **summary}, f, indent=1
            )
    return 0
