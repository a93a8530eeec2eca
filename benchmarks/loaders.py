"""`supmae bench loaders`: images/s per CPU core of every data pipeline against the decode ceiling.

    supmae bench loaders --data DIR [--batch-size 64] [--workers 1,2] [--img-size 224] [--dtype uint8]
                         [--batches 30] [--warmup 5] [--json OUT] [--pipelines ffcv,dali,torchvision]
                         [--device cpu] [--randaugment rand-m9-mstd0.5-inc1] [--dali-rebuild EPOCHS]
                         [--ceiling-images 2000] [--dali-rounds 5]

DIR is a directory written by `supmae convert`. Every pipeline reads the same stored JPEGs: ffcv
its `.beton`, dali its webdataset shards, torchvision the shards' bytes too (`source="converted"`,
PIL decode + torchvision transforms). Each runs the same training augmentation
(RandomResizedCrop(img_size, scale 0.2-1) + flip) and delivers what a worker feeding a GPU hands
over: uint8 [B, 3, S, S] batches, normalisation left to the device (`--dtype float32` delivers
normalised float32 instead), one pipeline after the other in this process (torchvision first).

The ceiling, measured first on the same stored files on ONE core (this process, nothing else
running): the bare decode rate (a full decode of every stored JPEG with libjpeg-turbo through
cv2.imdecode, or PIL where OpenCV is missing; nothing else), and a plain loop that decodes, crops
(RandomResizedCrop's window) and resizes one image at a time (cv2, bilinear) + flip, as a
reference. Each is the median of 3 passes over the first `--ceiling-images` images.

Per-core figures come from runs with ONE worker (threads or processes: `--workers` lists the
counts, the smallest first); each pipeline's img/s per worker core is printed beside the bare
decode rate as a fraction of it, and the scaling to the largest worker count is a separate
column (img/s there, and its efficiency: rate / (workers x per-core rate)).

Each run is built, warmed up for `--warmup` batches (FFCV compiles its JIT code then, DALI fills its
queues, the torchvision workers start), timed over `--batches` batches, and closed before the next
starts. When an epoch ends the next one starts, its set-up included in the time, as in training.
With `--randaugment SPEC` every pipeline adds that RandAugment policy (a pipeline that refuses it,
ffcv, is listed with its reason). A pipeline whose library is missing is reported as unavailable.
The figures are the loader's throughput alone (nothing consumes the batches); on a machine shared
with other work they are indicative.

`--dali-rebuild EPOCHS` also measures the dali pipeline across epoch boundaries (at the largest
worker count): the whole gap between the last batch of epoch e and the first of e+1, and EPOCHS
epochs as training reads them against stock DALI on the same shards (fn.readers.webdataset +
decoders.image_random_crop + resize + flip, same batch, threads and output), in this run:
`--dali-rounds` paired rounds, the ratio being the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

BASELINE = "torchvision"
DTYPES = ("uint8", "float32")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supmae bench loaders", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a directory written by 'supmae convert'")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts; per-core figures use the smallest")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument(
        "--dtype",
        default="uint8",
        choices=DTYPES,
        help="uint8: raw pixels, as a worker feeding a GPU delivers; float32: normalised",
    )
    p.add_argument("--batches", type=int, default=30, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (FFCV compiles then)")
    p.add_argument("--device", default="cpu", help="where batches are delivered: cpu or cuda[:N]")
    p.add_argument("--pipelines", default="ffcv,dali,torchvision", help="comma-separated subset to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here as JSON")
    p.add_argument(
        "--randaugment", default="", help="timm RandAugment spec every pipeline adds, e.g. rand-m9-mstd0.5-inc1"
    )
    p.add_argument("--ceiling-images", type=int, default=2000, help="stored images the one-core ceiling decodes")
    p.add_argument(
        "--dali-rebuild",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also time EPOCHS dali epochs: the gap between epochs and the ratio to stock DALI",
    )
    p.add_argument("--dali-rounds", type=int, default=5, help="paired rounds (ours, then stock) of --dali-rebuild")
    return p


def _torch_dtype(name: str) -> Any:
    import torch

    return {"uint8": torch.uint8, "float32": torch.float32}[name]


def _build(kind: str, args: argparse.Namespace, workers: int) -> Any:
    from pipelines import build_pipeline

    # The baseline reads the very bytes the others read, not the raw tree the conversion came from.
    extra = {"source": "converted"} if kind == "torchvision" else {}
    return build_pipeline(
        kind,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        img_size=args.img_size,
        device=args.device,
        num_workers=workers,
        seed=args.seed,
        train=True,
        randaugment=args.randaugment or None,
        dtype=_torch_dtype(args.dtype),
        **extra,
    )


# ---------------------------------------------------------------------------------------------- the ceiling


def _crop_window(rng: Any, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple:
    """RandomResizedCrop's window (torchvision's algorithm, numpy's generator): (top, left, h, w)."""
    import math

    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def decode_ceiling(data: str, split: str, img_size: int, limit: int = 2000, passes: int = 3, seed: int = 0) -> dict:
    """One core's ceiling on the stored JPEGs of `split` (see the module docstring): the bare decode
    rate and the plain decode + crop + resize + flip loop, each the median of `passes` passes over
    the first `limit` images, read into memory first so that only decoding is timed."""
    import numpy as np

    from pipelines.constants import RRC_RATIO, RRC_SCALE
    from pipelines.stored import StoredJpegs

    stored = StoredJpegs(data, split)
    blobs = [stored.read(p) for p in range(min(limit, stored.count))]
    if not blobs:
        raise ValueError(f"split '{split}' of {data} holds no images")
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        decoder = "cv2.imdecode (libjpeg-turbo)"
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # one core: OpenCV's resize would otherwise use its own thread pool

        def decode(blob: bytes) -> Any:
            return cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)

        def crop_resize(img: Any, top: int, left: int, h: int, w: int, flip: bool) -> Any:
            out = cv2.resize(img[top : top + h, left : left + w], (img_size, img_size), interpolation=cv2.INTER_LINEAR)
            return cv2.flip(out, 1) if flip else out
    else:
        import io

        from PIL import Image

        decoder = "PIL (libjpeg-turbo)"

        def decode(blob: bytes) -> Any:
            with Image.open(io.BytesIO(blob)) as img:
                return np.asarray(img.convert("RGB"))

        def crop_resize(img: Any, top: int, left: int, h: int, w: int, flip: bool) -> Any:
            out = Image.fromarray(img[top : top + h, left : left + w]).resize((img_size, img_size), Image.BILINEAR)
            return np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out)

    shapes = [decode(b).shape for b in blobs]  # also the untimed warm-up pass
    rng = np.random.default_rng(seed)
    windows = [(*_crop_window(rng, h, w, RRC_SCALE, RRC_RATIO), bool(rng.random() < 0.5)) for h, w, _ in shapes]
    try:
        bare, plain = [], []
        for _ in range(passes):
            t0 = time.perf_counter()
            for blob in blobs:
                decode(blob)
            bare.append(len(blobs) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for blob, window in zip(blobs, windows):
                crop_resize(decode(blob), *window)
            plain.append(len(blobs) / (time.perf_counter() - t0))
    finally:
        if cv2 is not None:
            cv2.setNumThreads(threads)
    return {
        "decoder": decoder,
        "stored_in": stored.source,
        "images": len(blobs),
        "mean_kpx": float(np.mean([h * w for h, w, _ in shapes]) / 1000),
        "mean_kb": float(np.mean([len(b) for b in blobs]) / 1000),
        "passes": passes,
        "bare_decode_images_per_sec": statistics.median(bare),
        "plain_loop_images_per_sec": statistics.median(plain),
        "bare_decode_passes": bare,
        "plain_loop_passes": plain,
    }


def merge_ceilings(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One ceiling from the passes measured before and after the pipelines (medians of all passes)."""
    merged = dict(before)
    for key in ("bare_decode", "plain_loop"):
        passes = before[f"{key}_passes"] + after[f"{key}_passes"]
        merged[f"{key}_passes"] = passes
        merged[f"{key}_images_per_sec"] = statistics.median(passes)
        merged[f"{key}_before_after"] = [before[f"{key}_images_per_sec"], after[f"{key}_images_per_sec"]]
    merged["passes"] = before["passes"] + after["passes"]
    return merged


# ---------------------------------------------------------------------------------------------- the pipelines


class _Runner:
    """One pipeline under measurement: its endless batch stream (epoch after epoch) and its tallies."""

    def __init__(self, kind: str, args: argparse.Namespace, workers: int) -> None:
        import torch

        self.kind = kind
        self.workers = workers
        self.cuda = torch.device(args.device).type == "cuda"
        t0 = time.perf_counter()
        self.pipe = _build(kind, args, workers)
        self.build_seconds = time.perf_counter() - t0
        self.stream = self._batches()
        self.images = 0
        self.seconds = 0.0
        self.batches = 0
        self.shape: list[int] | None = None
        self.dtype: str | None = None

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
                self.dtype = str(images.dtype).replace("torch.", "")
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
            "workers": self.workers,
            "images_per_sec": self.images / self.seconds,
            "images": self.images,
            "batches": self.batches,
            "seconds": self.seconds,
            "build_seconds": self.build_seconds,
            "warmup_seconds": warmup_seconds,
            "batch_shape": self.shape,
            "batch_dtype": self.dtype,
            "augmentation": getattr(self.pipe, "augmentation", None),
        }


def measure_all(kinds: list[str], args: argparse.Namespace, worker_counts: list[int]) -> list[dict[str, Any]]:
    """Each available pipeline in turn, at each worker count: build, warm up, time, close, so that
    only one loader's workers run at a time. One row per pipeline: its figures at the smallest
    worker count (the per-core run) and, under "scaling", at every count. The baseline goes first:
    its DataLoader forks worker processes at every epoch, which must not happen while another
    pipeline's compiled thread pool (numba's TBB layer, used by FFCV) is alive in this process:
    numba warns at each such fork, and in an interleaved trial on a shared machine FFCV ran at
    about half its speed measured alone."""
    from pipelines import DataError, available

    rows = []
    for kind in kinds:
        reason = available(kind)
        if reason:
            rows.append({"pipeline": kind, "available": False, "reason": reason})
            continue
        runs = []
        for workers in worker_counts:
            print(f"[bench loaders] {kind}, {workers} worker(s): build, warm up, time", file=sys.stderr, flush=True)
            try:
                runner = _Runner(kind, args, workers)
            except DataError as exc:
                if not args.randaugment or "randaugment" not in str(exc).lower():
                    raise
                # A backend without RandAugment refuses the spec: a row with its reason, not a failed run.
                runs = [{"pipeline": kind, "available": False, "reason": str(exc)}]
                break
            warmup = runner.run(args.warmup, timed=False)
            runner.run(args.batches, timed=True)
            runs.append(runner.row(warmup))
            runner.close()
        row = dict(runs[0])
        if row["available"]:
            row["images_per_sec_per_core"] = row["images_per_sec"] / row["workers"]
            row["scaling"] = [
                {
                    "workers": r["workers"],
                    "images_per_sec": r["images_per_sec"],
                    "efficiency": r["images_per_sec"] / (r["workers"] * row["images_per_sec_per_core"]),
                }
                for r in runs
            ]
        rows.append(row)
    return rows


def _stock_dali(pipe: Any, args: argparse.Namespace, seed: int) -> Any:
    """Stock DALI on our dali pipeline's shards, built: fn.readers.webdataset + decoders.image_random_crop
    + resize + crop_mirror_normalize (flip, CHW, the same output dtype), the same batch, threads,
    prefetch and reader buffer, one pipeline that runs on from epoch to epoch."""
    from nvidia.dali import fn, pipeline_def, types

    from pipelines.constants import IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, RRC_SCALE, WDS_IMAGE_EXT, WDS_LABEL_EXT

    gpu = pipe.placement == "gpu"
    size = args.img_size

    def graph() -> tuple[Any, Any]:
        jpegs, labels = fn.readers.webdataset(
            paths=pipe.files,
            index_paths=pipe.index_files,
            ext=[WDS_IMAGE_EXT, WDS_LABEL_EXT],
            dtypes=[types.UINT8, types.INT64],
            random_shuffle=True,
            initial_fill=pipe.graph_args["initial_fill"],
            name="reader",
        )
        images = fn.decoders.image_random_crop(
            jpegs,
            device="mixed" if gpu else "cpu",
            output_type=types.RGB,
            random_area=list(RRC_SCALE),
            random_aspect_ratio=list(RRC_RATIO),
            num_attempts=10,
        )
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
        norm: dict[str, Any] = {"dtype": types.UINT8}
        if args.dtype == "float32":
            norm = {
                "dtype": types.FLOAT,
                "mean": [255.0 * m for m in IMAGENET_MEAN],
                "std": [255.0 * s for s in IMAGENET_STD],
            }
        mirror = fn.random.coin_flip(probability=0.5)
        images = fn.crop_mirror_normalize(images, output_layout="CHW", crop=(size, size), mirror=mirror, **norm)
        return images, labels.gpu() if gpu else labels

    stock = pipeline_def(graph)(
        batch_size=pipe.batch_size,
        num_threads=pipe.num_threads,
        device_id=pipe.device.index if gpu else None,
        seed=seed,
        prefetch_queue_depth=pipe.prefetch,
    )
    stock.build()
    return stock


def measure_dali_epochs(args: argparse.Namespace, workers: int, rounds: int = 5) -> dict[str, Any]:
    """Our dali pipeline across epoch boundaries against stock DALI, in this run, at `workers`
    threads: `rounds` alternating trials, each `args.dali_rebuild` whole epochs of ours (as
    training reads them: each epoch its own pipeline, prepared while the previous one runs)
    against as many batches of stock DALI (built and warmed up for one epoch outside the timing,
    as ours was). Every batch is copied into torch memory in both (pipelines.dali_pipeline.to_torch,
    as DALI's own PyTorch iterator copies). The gap between epochs is measured whole: from the
    last batch of epoch e in the consumer's hands to the first batch of e + 1 (teardown, build,
    the reader's initial fill, the first decodes), against the median interval between batches
    inside an epoch."""
    import torch

    from pipelines.dali_pipeline import to_torch

    pipe = _build("dali", args, workers)
    cuda = pipe.device.type == "cuda"
    epochs, per_epoch = args.dali_rebuild, len(pipe)
    images_per_round = epochs * per_epoch * pipe.batch_size

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in pipe:  # untimed: imports, first graph conversion, OS page cache
        pass
    builds_before = len(pipe.build_seconds)
    ours, stock_rates, gaps, steady = [], [], [], []
    stock_comparable = not args.randaugment
    for r in range(rounds):
        stamps: list[list[float]] = []
        t0 = time.perf_counter()
        for _ in range(epochs):
            stamps.append([])
            for _batch in pipe:
                sync()
                stamps[-1].append(time.perf_counter())
        ours.append(images_per_round / (stamps[-1][-1] - t0))
        gaps += [nxt[0] - prev[-1] for prev, nxt in itertools.pairwise(stamps)]
        steady += [b - a for ts in stamps for a, b in itertools.pairwise(ts)]
        if not stock_comparable:
            continue
        stock = _stock_dali(pipe, args, seed=args.seed + r)
        for _ in range(per_epoch):
            images, labels = stock.run()
            to_torch(images, pipe.device), to_torch(labels, pipe.device)
        sync()
        t0 = time.perf_counter()
        for _ in range(epochs * per_epoch):
            images, labels = stock.run()
            to_torch(images, pipe.device), to_torch(labels, pipe.device)
        sync()
        stock_rates.append(images_per_round / (time.perf_counter() - t0))
        del stock, images, labels
        gc.collect()
    builds = pipe.build_seconds[builds_before:]
    del pipe
    gc.collect()
    result: dict[str, Any] = {
        "epochs": epochs,
        "batches_per_epoch": per_epoch,
        "workers": workers,
        "rounds": rounds,
        "randaugment": args.randaugment or None,
        "build_seconds_per_epoch": sum(builds) / max(1, len(builds)),
        "gap_seconds": statistics.median(gaps) if gaps else None,
        "gaps_seconds": gaps,
        "steady_batch_seconds": statistics.median(steady),
        "ours_images_per_sec": statistics.median(ours),
        "ours_rounds": ours,
        "stock_images_per_sec": statistics.median(stock_rates) if stock_rates else None,
        "stock_rounds": stock_rates,
    }
    result["gap_excess_seconds"] = (
        result["gap_seconds"] - result["steady_batch_seconds"] if result["gap_seconds"] is not None else None
    )
    # Paired per round (ours and stock back to back), so that the load of a shared machine cancels out.
    result["ratio_rounds"] = [a / b for a, b in zip(ours, stock_rates)]
    result["ratio_to_stock"] = statistics.median(result["ratio_rounds"]) if stock_rates else None
    return result


def format_epochs(r: dict[str, Any]) -> str:
    lines = [
        (
            f"dali across epochs ({r['rounds']} rounds of {r['epochs']} epochs x {r['batches_per_epoch']} batches, "
            f"{r['workers']} threads{', ' + r['randaugment'] if r['randaugment'] else ''}): "
            f"ours {r['ours_images_per_sec']:,.0f} img/s (median); build {r['build_seconds_per_epoch']:.3f} s/epoch "
            "on a background thread"
        )
    ]
    if r["gap_seconds"] is not None:
        lines.append(
            f"  gap between epochs (last batch of e to first of e+1): {1000 * r['gap_seconds']:.1f} ms median, "
            f"against {1000 * r['steady_batch_seconds']:.1f} ms between batches inside an epoch "
            f"({1000 * r['gap_excess_seconds']:+.1f} ms)"
        )
    if r["stock_images_per_sec"]:
        lines.append(
            f"  stock DALI on the same shards: {r['stock_images_per_sec']:,.0f} img/s (median) "
            f"-> ours / stock = {r['ratio_to_stock']:.2f}x (median of the {len(r['ratio_rounds'])} paired rounds)"
        )
    else:
        lines.append("  stock DALI: not compared (it has no RandAugment)")
    return "\n".join(lines)


def format_ceiling(c: dict[str, Any]) -> str:
    return (
        f"ceiling, one core, {c['images']} stored images ({c['stored_in']}, mean {c['mean_kpx']:.0f} kpx, "
        f"{c['mean_kb']:.0f} kB), {c['decoder']}: bare decode {c['bare_decode_images_per_sec']:,.0f} img/s; "
        f"decode + crop + resize + flip, plain loop {c['plain_loop_images_per_sec']:,.0f} img/s "
        f"({c['plain_loop_images_per_sec'] / c['bare_decode_images_per_sec']:.2f}x bare)"
        + (
            " [bare before/after the pipelines: "
            + " / ".join(f"{v:,.0f}" for v in c["bare_decode_before_after"])
            + " img/s]"
            if "bare_decode_before_after" in c
            else ""
        )
    )


def format_table(rows: list[dict[str, Any]], ceiling: dict[str, Any] | None = None) -> str:
    """One line per pipeline: img/s per worker core (the one-worker run), its fraction of the bare
    decode rate, the largest worker count's img/s and scaling efficiency, the ratio to the baseline."""
    base = next((r["images_per_sec"] for r in rows if r["pipeline"] == BASELINE and r["available"]), None)
    bare = ceiling["bare_decode_images_per_sec"] if ceiling else None
    top = max((s["workers"] for r in rows if r["available"] for s in r["scaling"]), default=1)
    lines = [
        (
            f"{'pipeline':<12} {'img/s/core':>10} {'x bare':>7} {f'img/s @{top}':>10} {'scaling':>8} "
            f"{'vs ' + BASELINE:>15} {'build s':>8} {'warm-up s':>10}"
        ),
        "-" * 87,
    ]
    if ceiling:
        plain = ceiling["plain_loop_images_per_sec"]
        lines.append(f"{'bare decode':<12} {bare:>10.1f} {'1.00x':>7}")
        lines.append(f"{'plain loop':<12} {plain:>10.1f} {f'{plain / bare:.2f}x':>7}")
    for r in rows:
        if not r["available"]:
            lines.append(f"{r['pipeline']:<12} {'unavailable: ' + r['reason']}")
            continue
        per_core = r["images_per_sec_per_core"]
        frac = f"{per_core / bare:.2f}x" if bare else "n/a"
        last = r["scaling"][-1]
        at_top = f"{last['images_per_sec']:.1f}" if last["workers"] == top else "n/a"
        eff = f"{100 * last['efficiency']:.0f} %" if last["workers"] == top else "n/a"
        ratio = f"{r['images_per_sec'] / base:.2f}x" if base else "n/a"
        lines.append(
            f"{r['pipeline']:<12} {per_core:>10.1f} {frac:>7} {at_top:>10} {eff:>8} {ratio:>15} "
            f"{r['build_seconds']:>8.1f} {r['warmup_seconds']:>10.1f}"
        )
    return "\n".join(lines)


def _worker_counts(text: str) -> list[int]:
    from pipelines import DataError

    try:
        counts = sorted({int(w) for w in str(text).split(",") if w.strip()})
    except ValueError:
        raise DataError(f"--workers must be comma-separated integers, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise DataError(f"--workers needs worker counts >= 1, got {text!r}")
    return counts


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
    if args.dali_rounds < 1:
        raise DataError(f"--dali-rounds must be >= 1, got {args.dali_rounds}")
    if args.ceiling_images < 1:
        raise DataError(f"--ceiling-images must be >= 1, got {args.ceiling_images}")
    worker_counts = _worker_counts(args.workers)
    # The ceiling first, alone on its core, then the baseline, then the others in the order given.
    print("[bench loaders] one-core ceiling: bare decode, plain loop", file=sys.stderr, flush=True)
    ceiling = decode_ceiling(args.data, args.split, args.img_size, args.ceiling_images, seed=args.seed)
    kinds = sorted(dict.fromkeys(kinds), key=lambda k: k != BASELINE)
    rows = measure_all(kinds, args, worker_counts)
    # Again after the pipelines: on a machine shared with other work the load drifts during the run,
    # and a fraction of a ceiling measured only before the pipelines would carry that drift.
    print("[bench loaders] one-core ceiling again", file=sys.stderr, flush=True)
    ceiling = merge_ceilings(
        ceiling, decode_ceiling(args.data, args.split, args.img_size, args.ceiling_images, seed=args.seed)
    )
    config = {
        "data": os.path.abspath(args.data),
        "split": args.split,
        "batch_size": args.batch_size,
        "workers": worker_counts,
        "dtype": args.dtype,
        "img_size": args.img_size,
        "batches": args.batches,
        "warmup": args.warmup,
        "device": args.device,
        "augmentation": "RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3) + flip"
        + (f" + RandAugment {args.randaugment}" if args.randaugment else "")
        + (", normalised float32" if args.dtype == "float32" else ", uint8 (not normalised)"),
        "randaugment": args.randaugment or None,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    base = next((r["images_per_sec"] for r in rows if r["pipeline"] == BASELINE and r["available"]), None)
    bare = ceiling["bare_decode_images_per_sec"]
    for r in rows:
        if r["available"]:
            r["fraction_of_bare_decode"] = r["images_per_sec_per_core"] / bare
            if base:
                r["ratio_to_baseline"] = r["images_per_sec"] / base
    if args.randaugment:
        print(f"augmentation: {config['augmentation']}")
    print(format_ceiling(ceiling))
    print(format_table(rows, ceiling))
    result: dict[str, Any] = {"config": config, "ceiling": ceiling, "results": rows}
    if args.dali_rebuild:
        from pipelines import available

        reason = available("dali")
        if reason:
            print(f"dali across epochs: not measured ({reason})")
        else:
            print("[bench loaders] dali: across epochs, against stock DALI", file=sys.stderr, flush=True)
            result["dali_epochs"] = measure_dali_epochs(args, max(worker_counts), args.dali_rounds)
            print(format_epochs(result["dali_epochs"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
