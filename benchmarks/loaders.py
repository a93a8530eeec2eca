"""`supmae bench loaders`: images/s per CPU core of every data pipeline against the decode ceilings.

    supmae bench loaders --data DIR [--batch-size 64] [--workers 1,2] [--img-size 224] [--dtype uint8]
                         [--batches 30] [--warmup 5] [--rounds 5] [--json OUT]
                         [--pipelines ffcv,dali,torchvision] [--device cpu]
                         [--randaugment rand-m9-mstd0.5-inc1] [--dali-rebuild EPOCHS]
                         [--ceiling-images 2000] [--dali-rounds 5]

DIR is a directory written by `supmae convert`. Every pipeline reads the same stored JPEGs: ffcv
its `.beton`, dali its webdataset shards, torchvision the shards' bytes too (`source="converted"`,
PIL decode + torchvision transforms). Each runs the same training augmentation
(RandomResizedCrop(img_size, scale 0.2-1) + flip) and delivers what a worker feeding a GPU hands
over: uint8 [B, 3, S, S] batches, normalisation left to the device (`--dtype float32` delivers
normalised float32 instead), one pipeline after the other in this process (torchvision first).

The ceilings, on the same stored files (the first `--ceiling-images`, read into memory first so
that only decoding is timed), on ONE core (this process's main thread):
  entropy floor  libjpeg-turbo's entropy decoding alone (jpeg_read_coefficients: Huffman codes to
                 DCT coefficients, no IDCT, upsampling or colour conversion), in C: what any
                 decoder of these files must do, the floor of the storage format;
  full C decode  a full libjpeg-turbo decode to RGB in C at the pipelines' settings (fast integer
                 IDCT, fancy upsampling): what a decoder without crop windows pays;
  bare decode    cv2.imdecode of every file (or PIL where OpenCV is missing): the same decode
                 through Python and OpenCV;
  plain loop     decode + crop (RandomResizedCrop's window) + resize + flip one image at a time
                 (cv2, bilinear), as a reference.
The first two come from a small compiled helper beside the ffcv pipeline's crop decoder
(pipelines/_cropdecode.cpp, `supmae_decode_ceiling`): one call decodes all the files.

Rounds: each pipeline is built once per worker count (`--workers`, the smallest first) and warmed
up for `--warmup` batches (FFCV compiles its JIT code then, DALI fills its queues, the
torchvision workers start); then `--rounds` times: each worker count's run is timed over
`--batches` batches, the pipeline is left to go idle (its prefetching ends), and one pass of every
ceiling is timed right after, so each round pairs a pipeline's runs with a ceiling measured
moments later, and the load of a shared machine moves both. Per core (the one-worker run): the
median over rounds of img/s, and of its ratio to each ceiling of the same round. Scaling: the
median over rounds of the largest worker count's img/s over the one-worker img/s (efficiency: that
divided by the worker ratio). Beside each, the cores the runs kept busy (CPU seconds of this
process and its worker processes over the wall time, from /proc): a worker count is not a core
count (the consumer thread, FFCV's and DALI's own threads, DALI's next-epoch pipeline filling while
an epoch ends), and on short epochs that makes a one-worker rate more than one core's. When an
epoch ends the next one starts, its set-up included in the time, as in training. With `--randaugment SPEC` every pipeline adds that RandAugment policy (a
pipeline that refuses it, ffcv, is listed with its reason). A pipeline whose library is missing is
reported as unavailable. The figures are the loader's throughput alone (nothing consumes the
batches).

`--dali-rebuild EPOCHS` also measures the dali pipeline across epoch boundaries at every worker
count: the whole gap between the last batch of epoch e and the first of e+1, and EPOCHS epochs as
training reads them against stock DALI on the same shards (fn.readers.webdataset +
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
    p.add_argument(
        "--rounds", type=int, default=5, help="paired rounds: every worker count's run, then one pass of each ceiling"
    )
    p.add_argument("--device", default="cpu", help="where batches are delivered: cpu or cuda[:N]")
    p.add_argument("--pipelines", default="ffcv,dali,torchvision", help="comma-separated subset to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here as JSON")
    p.add_argument(
        "--randaugment", default="", help="timm RandAugment spec every pipeline adds, e.g. rand-m9-mstd0.5-inc1"
    )
    p.add_argument("--ceiling-images", type=int, default=2000, help="stored images the one-core ceilings decode")
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


CEILINGS = ("entropy_floor", "full_c_decode", "bare_decode", "plain_loop")
CEILING_NAMES = {
    "entropy_floor": "entropy floor",
    "full_c_decode": "full C decode",
    "bare_decode": "bare decode",
    "plain_loop": "plain loop",
}


class Ceilings:
    """The one-core ceilings on the stored JPEGs of `split` (see the module docstring), measured a
    pass at a time (`measure_pass`) so that passes can be paired with pipeline runs."""

    def __init__(self, data: str, split: str, img_size: int, limit: int = 2000, seed: int = 0) -> None:
        import numpy as np

        from pipelines.constants import RRC_RATIO, RRC_SCALE
        from pipelines.stored import StoredJpegs

        stored = StoredJpegs(data, split)
        self.blobs = [np.frombuffer(stored.read(p), np.uint8) for p in range(min(limit, stored.count))]
        if not self.blobs:
            raise ValueError(f"split '{split}' of {data} holds no images")
        self.stored_in = stored.source
        self.img_size = img_size
        try:
            import cv2
        except ImportError:
            cv2 = None
        self.cv2 = cv2
        self.decoder = "cv2.imdecode (libjpeg-turbo)" if cv2 is not None else "PIL (libjpeg-turbo)"
        self.shapes = [self._decode(b).shape for b in self.blobs]  # also an untimed warm-up pass
        rng = np.random.default_rng(seed)
        self.windows = [
            (*_crop_window(rng, h, w, RRC_SCALE, RRC_RATIO), bool(rng.random() < 0.5)) for h, w, _ in self.shapes
        ]
        # The compiled helper (entropy floor, full C decode); missing when the crop decoder is unbuilt.
        self.c_reason = ""
        try:
            from pipelines.ffcv_cropdecode import decode_ceiling_function, time_decode_ceilings

            decode_ceiling_function()
            self.c_ceilings = time_decode_ceilings
        except Exception as exc:  # noqa: BLE001 - DataError (unbuilt) or ImportError: reported, not fatal
            self.c_ceilings, self.c_reason = None, str(exc)
        self.passes: dict[str, list[float]] = {k: [] for k in CEILINGS}

    def _decode(self, blob: Any) -> Any:
        if self.cv2 is not None:
            return self.cv2.imdecode(blob, self.cv2.IMREAD_COLOR)
        import io

        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(blob.tobytes())) as img:
            return np.asarray(img.convert("RGB"))

    def _crop_resize(self, img: Any, top: int, left: int, h: int, w: int, flip: bool) -> Any:
        size = self.img_size
        if self.cv2 is not None:
            cv2 = self.cv2
            out = cv2.resize(img[top : top + h, left : left + w], (size, size), interpolation=cv2.INTER_LINEAR)
            return cv2.flip(out, 1) if flip else out
        import numpy as np
        from PIL import Image

        out = Image.fromarray(img[top : top + h, left : left + w]).resize((size, size), Image.BILINEAR)
        return np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out)

    def measure_pass(self) -> dict[str, float]:
        """One timed pass of every ceiling (img/s); also appended to `passes`."""
        threads = self.cv2.getNumThreads() if self.cv2 is not None else 0
        if self.cv2 is not None:
            self.cv2.setNumThreads(1)  # one core: OpenCV's resize would otherwise use its own pool
        try:
            rates: dict[str, float] = {}
            if self.c_ceilings is not None:  # the warm-up was the shapes' pass
                rates.update(self.c_ceilings(self.blobs, passes=1, warmup=False))
            t0 = time.perf_counter()
            for blob in self.blobs:
                self._decode(blob)
            rates["bare_decode"] = len(self.blobs) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for blob, window in zip(self.blobs, self.windows):
                self._crop_resize(self._decode(blob), *window)
            rates["plain_loop"] = len(self.blobs) / (time.perf_counter() - t0)
        finally:
            if self.cv2 is not None:
                self.cv2.setNumThreads(threads)
        for key, rate in rates.items():
            self.passes[key].append(rate)
        return rates

    def summary(self) -> dict[str, Any]:
        import numpy as np

        out: dict[str, Any] = {
            "decoder": self.decoder,
            "stored_in": self.stored_in,
            "images": len(self.blobs),
            "mean_kpx": float(np.mean([h * w for h, w, _ in self.shapes]) / 1000),
            "mean_kb": float(np.mean([b.size for b in self.blobs]) / 1000),
            "passes": len(self.passes["bare_decode"]),
            "c_helper": None if self.c_ceilings is not None else self.c_reason,
        }
        for key in CEILINGS:
            passes = self.passes[key]
            out[f"{key}_passes"] = passes
            out[f"{key}_images_per_sec"] = statistics.median(passes) if passes else None
        return out


# ---------------------------------------------------------------------------------------------- the pipelines


def cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by this process and its child processes
    (torchvision's DataLoader workers, started afresh at every epoch): the children that ended and
    were reaped (os.times) plus the live ones (and unreaped ones) from /proc; None where there is no
    /proc."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        me = os.getpid()
        ended = os.times()
        total = 0
        if not os.path.isdir("/proc"):
            return None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # a process that ended meanwhile
            # after the command: state ppid ... utime (field 14) stime (15), 0-based 11 and 12 here
            if int(entry) == me or int(fields[1]) == me:
                total += int(fields[11]) + int(fields[12])
        return total / ticks + ended.children_user + ended.children_system
    except (OSError, ValueError, IndexError):
        return None


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
        self.last_seconds, self.last_batches = 0.0, 0
        self.last_cores: float | None = None

    def _batches(self) -> Any:
        while True:  # successive epochs, each with its own order, as in training
            yield from self.pipe

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def run(self, n: int, timed: bool) -> float:
        cpu0 = cpu_seconds()
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
        cpu1 = cpu_seconds()
        if timed:
            self.seconds += elapsed
        self.last_seconds, self.last_batches = elapsed, n
        # Cores busy during the run: a worker count is not a core count (FFCV's and DALI's own
        # threads, the consumer, DALI's next-epoch pipeline filling at an epoch's end).
        self.last_cores = (cpu1 - cpu0) / elapsed if cpu0 is not None and cpu1 is not None else None
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
            "images": self.images,
            "batches": self.batches,
            "seconds": self.seconds,
            "build_seconds": self.build_seconds,
            "warmup_seconds": warmup_seconds,
            "batch_shape": self.shape,
            "batch_dtype": self.dtype,
            "augmentation": getattr(self.pipe, "augmentation", None),
        }

    def idle(self) -> None:
        """Wait until the pipeline's prefetching is over (it keeps decoding a few batches ahead after
        the consumer stops), so that the ceiling pass that follows runs alone: about three batches'
        worth of one worker's time (FFCV's batches_ahead, DataLoader's prefetch_factor 2, DALI's
        prefetch queue), at most 2 s."""
        per_batch = self.last_seconds / max(1, self.last_batches)
        time.sleep(min(2.0, max(0.1, 3 * self.workers * per_batch)))


def _per_round(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def _cores_busy(runs: list[tuple[float, float]]) -> float | None:
    """CPU seconds over wall seconds of all the timed runs together; None under 1 s of runs, where
    the kernel's 10 ms accounting ticks (and a worker's start-up) would swamp the figure."""
    wall = sum(w for _, w in runs)
    return sum(c for c, _ in runs) / wall if wall >= 1.0 else None


def measure_all(
    kinds: list[str], args: argparse.Namespace, worker_counts: list[int], ceilings: Ceilings
) -> list[dict[str, Any]]:
    """Each available pipeline in turn (see the module docstring for the rounds). One row per
    pipeline: its figures at the smallest worker count (the per-core run), the ratios to each
    ceiling, and under "scaling" every worker count. The baseline goes first: its DataLoader forks
    worker processes at every epoch, which must not happen while another pipeline's compiled thread
    pool (numba's TBB layer, used by FFCV) is alive in this process: numba warns at each such fork,
    and in an interleaved trial on a shared machine FFCV ran at about half its speed measured
    alone."""
    from pipelines import DataError, available

    rows = []
    for kind in kinds:
        reason = available(kind)
        if reason:
            rows.append({"pipeline": kind, "available": False, "reason": reason})
            continue
        runners: dict[int, _Runner] = {}
        warmups: dict[int, float] = {}
        try:
            for workers in worker_counts:
                print(f"[bench loaders] {kind}, {workers} worker(s): build, warm up", file=sys.stderr, flush=True)
                runner = runners[workers] = _Runner(kind, args, workers)
                warmups[workers] = runner.run(args.warmup, timed=False)
        except DataError as exc:
            for runner in runners.values():
                runner.close()
            if not args.randaugment or "randaugment" not in str(exc).lower():
                raise
            # A backend without RandAugment refuses the spec: a row with its reason, not a failed run.
            rows.append({"pipeline": kind, "available": False, "reason": str(exc)})
            continue
        rates: dict[int, list[float]] = {w: [] for w in worker_counts}
        cores: dict[int, list[tuple[float, float]]] = {w: [] for w in worker_counts}  # (CPU s, wall s) a run
        fractions: dict[str, list[float]] = {k: [] for k in CEILINGS}
        for r in range(args.rounds):
            print(f"[bench loaders] {kind}: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for workers in worker_counts:
                runner = runners[workers]
                before_images, before_seconds = runner.images, runner.seconds
                runner.run(args.batches, timed=True)
                rates[workers].append((runner.images - before_images) / (runner.seconds - before_seconds))
                if runner.last_cores is not None:
                    cores[workers].append((runner.last_cores * runner.last_seconds, runner.last_seconds))
                runner.idle()
            ceiling = ceilings.measure_pass()
            for key, rate in ceiling.items():
                fractions[key].append(rates[worker_counts[0]][-1] / (worker_counts[0] * rate))
        base_workers = worker_counts[0]
        row = runners[base_workers].row(warmups[base_workers])
        row["rounds"] = args.rounds
        row["images_per_sec"] = statistics.median(rates[base_workers])
        row["images_per_sec_rounds"] = rates[base_workers]
        row["images_per_sec_per_core"] = row["images_per_sec"] / base_workers
        row["per_core_fraction_of"] = {k: _per_round(v) for k, v in fractions.items() if v}
        row["cores_busy"] = _cores_busy(cores[base_workers])
        row["scaling"] = []
        for workers in worker_counts:
            ratios = [a / b for a, b in zip(rates[workers], rates[base_workers])]
            ratio = statistics.median(ratios)
            row["scaling"].append(
                {
                    "workers": workers,
                    "images_per_sec": statistics.median(rates[workers]),
                    "images_per_sec_rounds": rates[workers],
                    "speedup": ratio,
                    "speedup_rounds": ratios,
                    "efficiency": ratio * base_workers / workers,
                    "cores_busy": _cores_busy(cores[workers]),
                    "build_seconds": runners[workers].build_seconds,
                }
            )
        for runner in runners.values():
            runner.close()
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
        exec_dynamic=True,  # as ours: its CPU outputs are handed over without a copy (share_host)
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
    as ours was). Both hand every batch to torch the same way: on the GPU a copy into torch memory
    on torch's stream (pipelines.dali_pipeline.to_torch, as DALI's own PyTorch iterator copies), on
    the CPU DALI's own output buffer through DLPack (share_host: stock runs on the same dynamic
    executor), so the ratio compares the pipelines, not their hand-offs. The gap between epochs is
    measured whole: from the
    last batch of epoch e in the consumer's hands to the first batch of e + 1 (teardown, build,
    the reader's initial fill, the first decodes), against the median interval between batches
    inside an epoch."""
    import torch

    from pipelines.dali_pipeline import share_host, to_torch

    pipe = _build("dali", args, workers)
    cuda = pipe.device.type == "cuda"

    def hand_off(output: Any) -> Any:  # as DaliPipeline hands its batches over
        return to_torch(output, pipe.device) if cuda else share_host(output)

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
            hand_off(images), hand_off(labels)
        sync()
        t0 = time.perf_counter()
        for _ in range(epochs * per_epoch):
            images, labels = stock.run()
            hand_off(images), hand_off(labels)
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
    def rate(key: str) -> str:
        value = c.get(f"{key}_images_per_sec")
        return f"{value:,.0f} img/s" if value else "n/a"

    line = (
        f"ceilings, one core, {c['images']} stored images ({c['stored_in']}, mean {c['mean_kpx']:.0f} kpx, "
        f"{c['mean_kb']:.1f} kB), median of {c['passes']} passes: entropy floor {rate('entropy_floor')}, "
        f"full C decode {rate('full_c_decode')}, bare decode ({c['decoder']}) {rate('bare_decode')}, "
        f"plain decode + crop + resize + flip loop {rate('plain_loop')}"
    )
    if c.get("c_helper"):
        line += f" [no entropy floor / full C decode: {c['c_helper']}]"
    return line


def format_table(rows: list[dict[str, Any]], ceiling: dict[str, Any] | None = None) -> str:
    """One line per pipeline: img/s per worker core (the one-worker run), its fraction of each
    ceiling (median of the per-round ratios), the largest worker count's img/s and speed-up over one
    worker, the ratio to the baseline. Ceilings first, as fractions of the full C decode."""
    base = next((r["images_per_sec"] for r in rows if r["pipeline"] == BASELINE and r["available"]), None)
    top = max((s["workers"] for r in rows if r["available"] for s in r["scaling"]), default=1)
    cols = [("entropy_floor", "x floor"), ("full_c_decode", "x full C"), ("bare_decode", "x bare")]
    lines = [
        f"{'pipeline':<14} {'img/s/core':>10} " + " ".join(f"{name:>8}" for _, name in cols)
        + f" {'cores':>6} {f'img/s @{top}':>10} {'speed-up':>9} {f'cores @{top}':>9} {'vs ' + BASELINE:>15}"
        + f" {'build s':>8} {'warm-up s':>10}",
        "-" * 124,
    ]
    if ceiling:
        for key in CEILINGS:
            value = ceiling.get(f"{key}_images_per_sec")
            if not value:
                continue
            fracs = []
            for k, _ in cols:
                ref = ceiling.get(f"{k}_images_per_sec")
                fracs.append(f"{value / ref:.2f}x" if ref else "n/a")
            lines.append(f"{CEILING_NAMES[key]:<14} {value:>10.1f} " + " ".join(f"{f:>8}" for f in fracs))
    for r in rows:
        if not r["available"]:
            lines.append(f"{r['pipeline']:<14} {'unavailable: ' + r['reason']}")
            continue
        fracs = []
        for key, _ in cols:
            f = r.get("per_core_fraction_of", {}).get(key)
            fracs.append(f"{f['median']:.2f}x" if f else "n/a")
        last = r["scaling"][-1]
        at_top = f"{last['images_per_sec']:.1f}" if last["workers"] == top else "n/a"
        speedup = f"{last['speedup']:.2f}x" if last["workers"] == top else "n/a"
        ratio = f"{r['images_per_sec'] / base:.2f}x" if base else "n/a"
        busy = f"{r['cores_busy']:.2f}" if r.get("cores_busy") is not None else "n/a"
        busy_top = f"{last['cores_busy']:.2f}" if last["workers"] == top and last.get("cores_busy") is not None else "n/a"
        lines.append(
            f"{r['pipeline']:<14} {r['images_per_sec_per_core']:>10.1f} " + " ".join(f"{f:>8}" for f in fracs)
            + f" {busy:>6} {at_top:>10} {speedup:>9} {busy_top:>9} {ratio:>15} {r['build_seconds']:>8.1f}"
            + f" {r['warmup_seconds']:>10.1f}"
        )
    lines.append(
        f"per core: one worker, median of {rows[0].get('rounds', '?') if rows else '?'} rounds, each ratio taken "
        "against the ceiling pass of the same round; speed-up: the largest worker count over one worker; cores: the "
        "CPU this process and its workers kept busy during the timed runs (a worker is not always one core)"
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
    if args.rounds < 1:
        raise DataError(f"--rounds must be >= 1, got {args.rounds}")
    worker_counts = _worker_counts(args.workers)
    print("[bench loaders] one-core ceilings: read the stored files, warm up", file=sys.stderr, flush=True)
    ceilings = Ceilings(args.data, args.split, args.img_size, args.ceiling_images, seed=args.seed)
    # The baseline first, then the others in the order given.
    kinds = sorted(dict.fromkeys(kinds), key=lambda k: k != BASELINE)
    rows = measure_all(kinds, args, worker_counts, ceilings)
    if not any(r["available"] for r in rows):
        ceilings.measure_pass()  # nothing ran: the ceilings alone
    ceiling = ceilings.summary()
    config = {
        "data": os.path.abspath(args.data),
        "split": args.split,
        "batch_size": args.batch_size,
        "workers": worker_counts,
        "dtype": args.dtype,
        "img_size": args.img_size,
        "batches": args.batches,
        "warmup": args.warmup,
        "rounds": args.rounds,
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
    for r in rows:
        if r["available"] and base:
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
            result["dali_epochs"] = []
            for workers in worker_counts:
                print(f"[bench loaders] dali, {workers} thread(s): across epochs, against stock DALI", file=sys.stderr,
                      flush=True)
                result["dali_epochs"].append(measure_dali_epochs(args, workers, args.dali_rounds))
                print(format_epochs(result["dali_epochs"][-1]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
