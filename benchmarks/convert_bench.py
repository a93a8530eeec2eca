"""`supmae bench convert`: our converter (FFCV .beton + webdataset shards from one pass) against
FFCV's own `DatasetWriter` on the same images, the same number of worker processes, in one run.

    supmae bench convert --src /work/shared/data/imagenet-sample --max-res 256,512 --workers 2

FFCV's writer is run over an ImageFolder-like dataset (torchvision's `ImageFolder`, PIL loader)
with `RGBImageField(max_resolution=R, jpeg_quality=90)` twice: in its default `write_mode="raw"`
(stores decoded pixels, no JPEG encode: the usual stock invocation) and in `write_mode="jpg"`
(stores JPEGs, as we do: the like-for-like comparison). Our converter writes both formats.
Library imports and a first read of every source file (page cache) happen before any timing, so
each figure is the conversion itself. Timings on a shared machine are indicative.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
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


def run_ours(src: str, out: str, max_res: int, workers: int, quality: int) -> dict:
    from tools.convert import convert, output_bytes

    c0, t0 = _cpu_seconds(), time.perf_counter()
    manifest = convert(
        src,
        out,
        formats=("ffcv", "wds"),
        max_res=max_res,
        quality=quality,
        workers=workers,
        splits=["train"] if os.path.isdir(os.path.join(src, "train")) else None,
        progress=False,
    )
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return {
        "tool": "supmae convert",
        "cpu_seconds": cpu,
        "writes": "ffcv + wds",
        "max_res": max_res,
        "images": manifest["converted"],
        "seconds": seconds,
        "bytes": {"ffcv": output_bytes(manifest, "ffcv"), "wds": output_bytes(manifest, "wds")},
    }


def run_ffcv(split_root: str, out: str, max_res: int, workers: int, quality: int, write_mode: str) -> dict:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(split_root)
    path = os.path.join(out, "train.beton")
    os.makedirs(out, exist_ok=True)
    writer = DatasetWriter(
        path,
        {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_res, jpeg_quality=quality),
            "label": IntField(),
        },
        num_workers=workers,
    )
    c0, t0 = _cpu_seconds(), time.perf_counter()
    writer.from_indexed_dataset(dataset)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return {
        "cpu_seconds": cpu,
        "tool": f"ffcv DatasetWriter ({write_mode})",
        "writes": "ffcv",
        "max_res": max_res,
        "images": len(dataset),
        "seconds": seconds,
        "bytes": {"ffcv": os.path.getsize(path)},
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| tool | writes | max side | images | seconds | images/s | CPU ms/image | .beton MB | shards MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        wds = r["bytes"].get("wds")
        lines.append(
            f"| {r['tool']} | {r['writes']} | {r['max_res']} | {r['images']} | {r['seconds']:.2f} | "
            f"{r['images'] / r['seconds']:.0f} | {1e3 * r['cpu_seconds'] / r['images']:.1f} | "
            f"{r['bytes']['ffcv'] / 1e6:.1f} | "
            f"{'-' if wds is None else f'{wds / 1e6:.1f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="supmae bench convert", description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="ImageNet-style folder (its train split is converted)")
    p.add_argument("--max-res", default="256,512", help="comma-separated longer-side caps (default 256,512)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for every tool (default 2)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration; the fastest is reported")
    p.add_argument("--work-dir", default=None, help="scratch folder for the outputs (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    if not os.path.isdir(args.src):
        raise DataError(f"--src {args.src} is not a folder")
    resolutions = [int(r) for r in args.max_res.split(",") if r.strip()]
    if args.workers < 1 or args.repeats < 1 or not resolutions:
        raise DataError("--workers and --repeats must be >= 1 and --max-res non-empty")

    # Imports and page cache first: neither tool is charged for them.
    import ffcv.fields
    import ffcv.writer  # noqa: F401
    import torchvision.datasets  # noqa: F401

    import tools.convert  # noqa: F401

    files, nbytes = _warm_page_cache(_split_root(args.src))
    print(
        f"source: {args.src} ({files} files, {nbytes / 1e6:.1f} MB), workers={args.workers}, "
        f"cpus={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
    )

    scratch = args.work_dir or tempfile.mkdtemp(prefix="supmae-bench-convert-")
    rows = []
    try:
        for res in resolutions:
            candidates: dict[str, list[dict]] = {}
            for rep in range(args.repeats):
                runs = [
                    ("ours", lambda d, r=res: run_ours(args.src, d, r, args.workers, args.quality)),
                    (
                        "ffcv-jpg",
                        lambda d, r=res: run_ffcv(_split_root(args.src), d, r, args.workers, args.quality, "jpg"),
                    ),
                    (
                        "ffcv-raw",
                        lambda d, r=res: run_ffcv(_split_root(args.src), d, r, args.workers, args.quality, "raw"),
                    ),
                ]
                for name, fn in runs:
                    out = os.path.join(scratch, f"{name}-{res}-{rep}")
                    shutil.rmtree(out, ignore_errors=True)
                    row = fn(out)
                    print(
                        f"  {row['tool']} at {res}: {row['seconds']:.2f} s, {row['cpu_seconds']:.2f} CPU s",
                        file=sys.stderr,
                    )
                    candidates.setdefault(name, []).append(row)
                    shutil.rmtree(out, ignore_errors=True)
            rows.extend(min(v, key=lambda r: r["seconds"]) for v in candidates.values())
    finally:
        if args.work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workers": args.workers, "src": os.path.abspath(args.src), "rows": rows}, f, indent=1)
    return 0
