"""`supmae bench loaders`: images/s of every data pipeline against the torchvision baseline.

    supmae bench loaders --data DIR [--batch-size 64] [--workers 2] [--img-size 224]
                         [--batches 30] [--warmup 5] [--json OUT] [--pipelines ffcv,dali,torchvision]
                         [--device cpu] [--randaugment rand-m9-mstd0.5-inc1] [--dali-rebuild EPOCHS]

DIR is a directory written by `supmae convert`: ffcv reads its `.beton`, dali its webdataset
shards, torchvision the raw JPEG tree its manifest names (`source_root`). Every pipeline runs the
same training augmentation (RandomResizedCrop(img_size, scale 0.2-1) + flip, normalised output) on
the same device with the same number of workers, one after the other in this process (the
torchvision baseline first). With `--randaugment SPEC` every pipeline adds that RandAugment
policy: timm's RandAugment in the torchvision workers against DALI's graph operators
(pipelines/dali_randaugment.py); a pipeline that refuses it (ffcv) is listed with its reason.
Each is built, warmed up for `--warmup` batches (FFCV compiles its JIT code then, DALI fills its
queues, the torchvision workers start), timed over `--batches` batches, and closed before the next
starts. When an epoch ends the next one starts, its set-up included in the time, as in training. A
pipeline whose library is missing is reported as unavailable. The figures are the loader's
throughput alone (nothing consumes the batches); on a machine shared with other work they are
indicative.

`--dali-rebuild EPOCHS` also measures what the dali pipeline's per-epoch rebuild costs (it builds
a fresh DALI pipeline at each epoch so that epoch e is reproducible on its own): EPOCHS whole
epochs as training reads them (rebuild, refill, every batch) against the same number of batches
from one DALI pipeline that is never rebuilt, in the same run; the difference per epoch is the
rebuild's cost, printed beside the build time alone.
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
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (FFCV compiles then)")
    p.add_argument("--device", default="cpu", help="where batches are delivered: cpu or cuda[:N]")
    p.add_argument("--pipelines", default="ffcv,dali,torchvision", help="comma-separated subset to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here as JSON")
    p.add_argument("--randaugment", default="", help="timm RandAugment spec every pipeline adds, e.g. rand-m9-mstd0.5-inc1")
    p.add_argument("--dali-rebuild", type=int, default=0, metavar="EPOCHS",
                   help="also time EPOCHS dali epochs with and without the per-epoch pipeline rebuild")
    return p


class _Runner:
    """One pipeline under measurement: its endless batch stream (epoch after epoch) and its tallies."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        import torch

        from pipelines import build_pipeline

        self.kind = kind
        self.cuda = torch.device(args.device).type == "cuda"
        t0 = time.perf_counter()
        self.pipe = build_pipeline(
            kind,
            args.data,
            split=args.split,
            batch_size=args.batch_size,
            img_size=args.img_size,
            device=args.device,
            num_workers=args.workers,
            seed=args.seed,
            train=True,
            randaugment=args.randaugment or None,
        )
        self.build_seconds = time.perf_counter() - t0
        self.stream = self._batches()
        self.images = 0
        self.seconds = 0.0
        self.batches = 0
        self.shape: list[int] | None = None

    def _batches(self) -> Any:
        while True:  # successive epochs, each with its own order, as in training
            yield from self.pipe

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def run(self, n: int, timed: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            images, labels = next(self.stream)
            if timed:
                self.images += int(labels.shape[0])
                self.batches += 1
                self.shape = list(images.shape)
        self._sync()
        elapsed = time.perf_counter() - t0
        if timed:
            self.seconds += elapsed
        return elapsed

    def close(self) -> None:
        self.stream.close()
        del self.stream, self.pipe
        gc.collect()

    def row(self, warmup_seconds: float) -> dict[str, Any]:
        return {
            "pipeline": self.kind,
            "available": True,
            "images_per_sec": self.images / self.seconds,
            "images": self.images,
            "batches": self.batches,
            "seconds": self.seconds,
            "build_seconds": self.build_seconds,
            "warmup_seconds": warmup_seconds,
            "batch_shape": self.shape,
            "augmentation": getattr(self.pipe, "augmentation", None),
        }


def measure_all(kinds: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each available pipeline in turn: build, warm up, time, close, so that only one loader's
    workers run at a time. The baseline goes first: its DataLoader forks worker processes at
    every epoch, which must not happen while another pipeline's compiled thread pool (numba's TBB
    layer, used by FFCV) is alive in this process: numba warns at each such fork, and in an
    interleaved trial on a shared machine FFCV ran at about half its speed measured alone."""
    from pipelines import DataError, available

    rows = []
    for kind in kinds:
        reason = available(kind)
        if reason:
            rows.append({"pipeline": kind, "available": False, "reason": reason})
            continue
        print(f"[bench loaders] {kind}: build, warm up, time", file=sys.stderr, flush=True)
        try:
            runner = _Runner(kind, args)
        except DataError as exc:
            if not args.randaugment or "randaugment" not in str(exc).lower():
                raise
            # A backend without RandAugment refuses the spec: a row with its reason, not a failed run.
            rows.append({"pipeline": kind, "available": False, "reason": str(exc)})
            continue
        warmup = runner.run(args.warmup, timed=False)
        runner.run(args.batches, timed=True)
        rows.append(runner.row(warmup))
        runner.close()
    return rows


def measure_dali_rebuild(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per epoch that the dali pipeline's per-epoch rebuild adds: `args.dali_rebuild`
    epochs read as training reads them (a fresh DALI pipeline each, `set_epoch` then iterate)
    against as many batches from one DALI pipeline that is never rebuilt (the reader just runs on
    into its next epoch), both after one untimed epoch, in this run."""
    import torch

    from pipelines import build_pipeline
    from pipelines.dali_pipeline import to_torch

    pipe = build_pipeline(
        "dali",
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        img_size=args.img_size,
        device=args.device,
        num_workers=args.workers,
        seed=args.seed,
        train=True,
        randaugment=args.randaugment or None,
    )
    cuda = torch.device(args.device).type == "cuda"
    epochs, per_epoch = args.dali_rebuild, len(pipe)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in pipe:  # untimed: imports, first graph conversion, OS page cache
        pass
    rebuilt, first_batch = [], []
    for epoch in range(1, epochs + 1):
        pipe.set_epoch(epoch)
        t0 = time.perf_counter()
        for i, _batch in enumerate(pipe):
            if i == 0:
                sync()
                first_batch.append(time.perf_counter() - t0)
        sync()
        rebuilt.append(time.perf_counter() - t0)
    builds = pipe.build_seconds[-epochs:]
    graph = pipe.build_graph(epochs + 1)  # one pipeline for all the epochs below
    for _ in range(per_epoch):
        graph.run()
    kept = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for _ in range(per_epoch):
            images, labels = graph.run()
            to_torch(images, pipe.device), to_torch(labels, pipe.device)
        sync()
        kept.append(time.perf_counter() - t0)
    del graph, pipe
    gc.collect()
    rebuilt_s, kept_s = sum(rebuilt) / epochs, sum(kept) / epochs
    return {
        "epochs": epochs,
        "batches_per_epoch": per_epoch,
        "randaugment": args.randaugment or None,
        "build_seconds_per_epoch": sum(builds) / epochs,
        "first_batch_seconds": sum(first_batch) / epochs,
        "epoch_seconds_rebuilt": rebuilt_s,
        "epoch_seconds_kept": kept_s,
        "rebuild_cost_seconds_per_epoch": rebuilt_s - kept_s,
        "rebuild_cost_fraction": (rebuilt_s - kept_s) / kept_s,
    }


def format_rebuild(r: dict[str, Any]) -> str:
    return (
        f"dali per-epoch rebuild ({r['epochs']} epochs of {r['batches_per_epoch']} batches"
        f"{', ' + r['randaugment'] if r['randaugment'] else ''}): build {r['build_seconds_per_epoch']:.3f} s/epoch; "
        f"epoch {r['epoch_seconds_rebuilt']:.2f} s rebuilt vs {r['epoch_seconds_kept']:.2f} s on one kept pipeline "
        f"-> {r['rebuild_cost_seconds_per_epoch']:+.3f} s/epoch ({100 * r['rebuild_cost_fraction']:+.1f} %); "
        f"first batch of a rebuilt epoch {r['first_batch_seconds']:.2f} s"
    )


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
        raise DataError(f"need --batches >= 1 and --warmup >= 0, got {args.batches} and {args.warmup}")
    if args.dali_rebuild < 0:
        raise DataError(f"--dali-rebuild must be >= 0 epochs, got {args.dali_rebuild}")
    # The baseline first, then the others in the order given.
    kinds = sorted(dict.fromkeys(kinds), key=lambda k: k != BASELINE)
    rows = measure_all(kinds, args)
    config = {
        "data": os.path.abspath(args.data),
        "split": args.split,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "img_size": args.img_size,
        "batches": args.batches,
        "warmup": args.warmup,
        "device": args.device,
        "augmentation": "RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3) + flip"
        + (f" + RandAugment {args.randaugment}" if args.randaugment else "")
        + ", normalised",
        "randaugment": args.randaugment or None,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    base = next((r["images_per_sec"] for r in rows if r["pipeline"] == BASELINE and r["available"]), None)
    for r in rows:
        if r["available"] and base:
            r["ratio_to_baseline"] = r["images_per_sec"] / base
    if args.randaugment:
        print(f"augmentation: {config['augmentation']}")
    print(format_table(rows))
    result: dict[str, Any] = {"config": config, "results": rows}
    if args.dali_rebuild:
        from pipelines import available

        reason = available("dali")
        if reason:
            print(f"dali per-epoch rebuild: not measured ({reason})")
        else:
            print("[bench loaders] dali: per-epoch rebuild", file=sys.stderr, flush=True)
            result["dali_rebuild"] = measure_dali_rebuild(args)
            print(format_rebuild(result["dali_rebuild"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
