"""`supmae bench loaders`: images/s of every data pipeline against the torchvision baseline.

    supmae bench loaders --data DIR [--batch-size 64] [--workers 2] [--img-size 224]
                         [--batches 30] [--warmup 5] [--json OUT] [--pipelines ffcv,dali,torchvision]

DIR is a directory written by `supmae convert`: ffcv reads its `.beton`, dali its webdataset
shards, torchvision the raw JPEG tree its manifest names (`source_root`). Every pipeline runs the
same training augmentation (RandomResizedCrop(img_size, scale 0.2-1) + flip, normalised output) on
the same device with the same number of workers, one after the other in this process. Each is
warmed up for `--warmup` batches (FFCV compiles its JIT code then, DALI fills its queues, the
torchvision workers start), then `--batches` batches are timed; when an epoch ends the next one
starts, its set-up included in the time, as in training. A pipeline whose library is missing is
reported as unavailable. The figures are throughput of the loader alone (nothing consumes the
batches), so on a shared machine they are indicative.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from typing import Any

BASELINE = "torchvision"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supmae bench loaders", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a directory written by 'supmae convert'")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="loader workers (threads or processes) per pipeline")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=30, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--device", default="cpu", help="where batches are delivered: cpu or cuda[:N]")
    p.add_argument("--pipelines", default="ffcv,dali,torchvision", help="comma-separated subset to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here as JSON")
    return p


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build pipeline `kind`, warm it up, time `args.batches` batches; a result row."""
    import torch

    from pipelines import available, build_pipeline

    reason = available(kind)
    if reason:
        return {"pipeline": kind, "available": False, "reason": reason}
    cuda = torch.device(args.device).type == "cuda"
    t0 = time.perf_counter()
    pipe = build_pipeline(
        kind,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        img_size=args.img_size,
        device=args.device,
        num_workers=args.workers,
        seed=args.seed,
        train=True,
    )
    build_s = time.perf_counter() - t0

    def batches(loader: Any) -> Any:
        while True:  # successive epochs, each with its own order
            yield from loader

    stream = batches(pipe)
    t1 = time.perf_counter()
    for _ in range(args.warmup):
        next(stream)
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t1
    images = 0
    shape = None
    t2 = time.perf_counter()
    for _ in range(args.batches):
        x, y = next(stream)
        images += int(y.shape[0])
        shape = list(x.shape)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t2
    stream.close()
    del stream, pipe
    gc.collect()
    return {
        "pipeline": kind,
        "available": True,
        "images_per_sec": images / seconds,
        "images": images,
        "seconds": seconds,
        "build_seconds": build_s,
        "warmup_seconds": warmup_s,
        "batch_shape": shape,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    base = next((r["images_per_sec"] for r in rows if r["pipeline"] == BASELINE and r["available"]), None)
    lines = [
        f"{'pipeline':<12} {'img/s':>9} {'vs ' + BASELINE:>15} {'build s':>8} {'warm-up s':>10}",
        "-" * 58,
    ]
    for r in rows:
        if not r["available"]:
            lines.append(f"{r['pipeline']:<12} {'unavailable: ' + r['reason']}")
            continue
        ratio = f"{r['images_per_sec'] / base:.2f}x" if base else "n/a"
        lines.append(
            f"{r['pipeline']:<12} {r['images_per_sec']:>9.1f} {ratio:>15} {r['build_seconds']:>8.1f} "
            f"{r['warmup_seconds']:>10.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from pipelines import KINDS, DataError

    kinds = [k.strip() for k in args.pipelines.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise DataError(
            f"--pipelines: unknown pipeline(s) {', '.join(unknown) or '(none given)'} (known: {', '.join(KINDS)})"
        )
    if args.batches < 1 or args.warmup < 0:
        raise DataError(f"--batches must be >= 1 and --warmup >= 0, got {args.batches} and {args.warmup}")
    # The baseline first, then the others in the order given.
    kinds = sorted(dict.fromkeys(kinds), key=lambda k: k != BASELINE)
    rows = []
    for kind in kinds:
        print(f"[bench loaders] {kind} ...", file=sys.stderr, flush=True)
        rows.append(measure(kind, args))
    config = {
        "data": os.path.abspath(args.data),
        "split": args.split,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "img_size": args.img_size,
        "batches": args.batches,
        "warmup": args.warmup,
        "device": args.device,
        "augmentation": "RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3) + flip, normalised",
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    base = next((r["images_per_sec"] for r in rows if r["pipeline"] == BASELINE and r["available"]), None)
    for r in rows:
        if r["available"] and base:
            r["ratio_to_baseline"] = r["images_per_sec"] / base
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": config, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
