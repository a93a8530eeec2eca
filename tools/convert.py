"""`supmae convert`: ImageNet as downloaded (official archives, Kaggle layout) or any ImageFolder
tree to FFCV `.beton` files and DALI-readable webdataset shards, in one pass, resumable after any
crash, shardable over machines.

    supmae convert SRC OUT [--formats ffcv,wds] [--max-res 256] [--quality 90] [--workers N]
                   [--shard-size 1000] [--splits train,val] [--seed 0] [--max-pixels N] [--strict]
                   [--shard K/N]
    supmae convert --merge PART_DIR... OUT
    supmae convert --verify OUT

Input. The layout of SRC is detected and named on stderr (`tools/layouts.py`): the official
archives (`ILSVRC2012_img_train.tar`, `ILSVRC2012_img_val.tar`, `ILSVRC2012_devkit_t12.tar.gz`,
read in place by byte range, nothing extracted: `tools/archives.py`), the Kaggle layout
(`ILSVRC/Data/CLS-LOC/{train,val}` + `LOC_val_solution.csv`), the Hugging Face `imagenet-1k`
parquet files (`SRC/data/{train,validation}-*.parquet`: `tools/hf_parquet.py`), `imagenet-1k-wds`
tars (`SRC/imagenet1k-{train,validation}-NNNN.tar`: `tools/wds_source.py`), or an ImageNet-style tree
(`SRC/train/<class>/...`, `SRC/val/<class>/...`) or one split folder (`SRC/<class>/...`, converted
as split "train"). Classes are the class names (wnids) of the first split (train before val),
sorted, indexed 0..C-1 exactly as torchvision's `ImageFolder` and `ImageNet` assign them; every
other split must use a subset of them. Samples are listed in the order `ImageFolder` lists the
same images in class folders (recursively, symlinks followed, sorted), so every layout of the same
images gives byte-identical shards and `.beton` files; every file is tried, whatever its extension: format is
decided by content.

Each file is read once, decoded, made RGB, its longer side capped at --max-res and encoded as a
JPEG at --quality (see `tools/imageio.py` for the exact rules: alpha is composited on white,
16-bit grayscale scaled to 8 bits, truncated JPEGs skipped). Those JPEG bytes go unchanged into
every requested format.

Output (layout in `pipelines/constants.py`): per split, samples in a seeded random order (the
permutation of the split's sources, seeded by --seed and the split name, is in the manifest), cut
into chunks of --shard-size source files. Chunk k of split s becomes the webdataset shard
`wds/s/s-kkkkkk.tar` (+ its DALI index `.idx`); the `.beton` is assembled from the finished chunks
at the end, as FFCV's one-worker writer lays it out, with a third field `crc32` (each JPEG's
CRC-32, computed by the worker that encoded it) that the pipelines check when they read a record. Sample keys are the sample's position in the
permutation (gaps where a file was skipped). `sources/<split>.tsv` lists every file seen (index,
label, path relative to SRC); `manifest.json["splits"][s]["permutation"]` lists, in output order,
the source index of each sample. `skipped.tsv` lists every file not converted with a reason code
and detail; the counts reconcile: converted + skipped = files seen. Files directly inside a split
folder (outside any class folder) are not samples: they are listed as skipped
("outside-class-folder").

Resumability. Work state lives in `OUT/.work/`: the options of the run, a fingerprint of the
source listing, and one small JSON record per finished chunk, written only after the chunk's tar
and index are complete under their final names. Every file is written to `<name>.tmp-<pid>`,
fsynced and renamed, so after a `kill -9` at any moment, rerunning the same command redoes only
unfinished chunks and produces byte-identical outputs (JPEG encoding is deterministic, and where
each byte goes is a function of the samples' sizes, never of timing). A finished conversion is
marked by `manifest.json`; rerunning then does nothing. Changing an output-affecting option or the
source tree under an unfinished conversion is refused.

Sharding over machines. `--shard K/N` (0 <= K < N: a job array's task index and count) converts
chunks [K*C/N, (K+1)*C/N) of each split's C chunks into a part folder (its own manifest, shards,
`.beton` and `part.json`, the chunk records a merge needs); every part lists the whole source, so
the split into chunks is the same everywhere. `--merge PART_DIR... OUT` checks that the N parts
come from one listing and the same options, copies the webdataset shards (global chunk numbers, so
names never collide) and rewrites one `.beton` per split from the JPEG bytes stored in the parts'
`.beton` files (FFCV's reader locates them; nothing is decoded or re-encoded). The merged folder
is byte-identical to an unsharded conversion (manifest timings aside).

Parallel work and memory (`tools/parallel_write.py`). Workers read and encode runs of samples and
write them as tar members to piece files; a worker stitches a chunk's pieces into its shard,
index and record; after the last chunk, workers copy every JPEG into its place in the `.beton`,
whose layout, header and tables the main process computes from the sizes. The main process routes
small records only (sizes, skip reasons), at most `4 x --workers` tasks of 32 images are out at
once, and no process ever holds more than one piece of image bytes: memory stays bounded whatever
the worker count and however slow the disk.

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
    archive member that is no regular file          skipped  not-a-regular-file
    damaged per-class tar (unreadable header)       skipped  damaged-archive (members before it converted)
    train-archive member that is no per-class tar   skipped  outside-class-folder
    archive cut short (interrupted download)        skipped  truncated-archive (+ the cut member: truncated);
                                                    everything before the cut converted, members counted
    val image without ground truth / odd name       skipped  no-label
    ground-truth line (or CSV row) without image    skipped  missing-image
    hub row / sample without a usable label         skipped  no-label (parquet label null or -1, bad .cls)
    hub file name's wnid is not its label's class   skipped  label-mismatch
    parquet file without its footer (cut download)  skipped  truncated-archive (its rows cannot be located)
    webdataset KEY.png beside KEY.jpg               skipped  second-image (one image per sample; .jpg converted)
    webdataset member repeating a KEY.EXT           skipped  duplicate-member (the first one converted)
    unreadable .json sidecar (bad, deep, > 1 MB)    converted under its key's name; a warning counts them
    input that crashes the decoder (a signal)       skipped  decoder-crashed (the signal; see "Isolation")
    input that keeps the decoder > --decode-timeout skipped  decode-timeout (see "Isolation")
    a worker SIGKILLed on one input, alone          the run stops (DataError, exit 2): the OOM killer or a
                                                    person, not the input; rerun to resume
    out of descriptors / disk / memory              the run stops (DataError, exit 2); rerun to resume
    parquet row group unreadable after 3 tries      the run stops (DataError, exit 2); rerun to resume

Isolation. A worker that dies while encoding a piece (a segfault or abort in a decoder: any
signal or exit) or spends more than --decode-timeout seconds (default 120) on one image (it is
killed) loses only that piece: a fresh worker takes its place, and the piece's images are retried
one by one, each in a fresh process under the same limit; the image that crashes or hangs alone is
skipped with its reason, everything else converts, and the chunk commits as usual, so a resume
never meets the input again (a resume before the commit isolates it again, with the same result).
The limit counts per image, from the moment the worker starts it: a hung decode costs twice the
limit (in its piece, then alone). With --workers 0 everything runs in the main process (for
debugging): there is no worker to lose, so an input that crashes or hangs the decoder stops the run
there; any --workers >= 1 resumes the same OUT with isolation.

Tests run as root, for whom `chmod 000` does not make a file unreadable: there a symlink loop
(ELOOP on open) is the unreadable file. With --strict any skipped file makes the exit status 1
(the outputs and `skipped.tsv` are still written, for inspection).

Where the code lives: the command line here; the conversion in `tools/conversion.py`; the merge in
`tools/merge.py`; OUT's work state and lock in `tools/workdir.py`; the manifest and reports in
`tools/reports.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from pipelines.errors import DataError
from tools.conversion import DEFAULT_DECODE_TIMEOUT, convert, shard_chunks
from tools.imageio import DEFAULT_MAX_PIXELS
from tools.merge import merge
from tools.reports import StrictFailure, format_bytes, output_bytes, tsv_cell
from tools.workdir import DEFAULT_SHARD_SIZE, FORMATS, TOOL_VERSION

# What other modules and the tests use, wherever it now lives.
__all__ = [
    "DEFAULT_DECODE_TIMEOUT",
    "DEFAULT_SHARD_SIZE",
    "FORMATS",
    "TOOL_VERSION",
    "StrictFailure",
    "build_parser",
    "convert",
    "format_bytes",
    "main",
    "merge",
    "output_bytes",
    "parse_shard",
    "shard_chunks",
    "tsv_cell",
    "verify",
]

# ----------------------------------------------------------------------------------------------
# Command line


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` (0 <= K < N): this run converts part K of N, as a job array's task index and count give it."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise DataError(f"--shard must be K/N with 0 <= K < N (e.g. 0/4 ... 3/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise DataError(f"--shard must be K/N with 0 <= K < N (e.g. 0/4 ... 3/4), got {text!r}")
    return k, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supmae convert",
        description="Convert an ImageNet-style folder to FFCV .beton files and DALI webdataset shards "
        "(one pass, resumable), or check a converted folder with --verify.",
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="SRC OUT (SRC: an ImageFolder tree, the official ImageNet archives, the Kaggle layout, the Hugging "
        "Face imagenet-1k parquet files or imagenet-1k-wds tars; OUT: "
        "created, empty or a resumable run); with --verify: OUT; with --merge: PART_DIR... OUT",
    )
    p.add_argument(
        "--verify", action="store_true", help="re-read every output of OUT and check it against the manifest"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="join the part folders of a --shard K/N conversion (all N of them) into OUT, without re-encoding",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="convert only part K of N (0 <= K < N) into OUT, e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
    )
    p.add_argument("--formats", default=None, help="comma-separated subset of ffcv,wds (default: both)")
    p.add_argument(
        "--max-res", type=int, default=None, help="cap on the longer image side, never upscaled (default 256)"
    )
    p.add_argument("--quality", type=int, default=None, help="JPEG quality of the stored images (default 90)")
    p.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        help="worker processes: encoding, and with --merge copying into the .beton "
        "(default: usable CPUs; 0 = in the main process, for debugging: there an input that crashes or "
        "hangs the decoder stops the run, as no worker can be lost in its place)",
    )
    p.add_argument(
        "--decode-timeout",
        type=float,
        default=DEFAULT_DECODE_TIMEOUT,
        metavar="SECONDS",
        help="a worker that crashes or spends more than SECONDS on one image is replaced and the images of its "
        "task are retried one by one in fresh processes; an image that crashes or hangs alone too is skipped "
        f"as decoder-crashed or decode-timeout (default {DEFAULT_DECODE_TIMEOUT:g}; 0 = no limit)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help=f"source files per webdataset shard / resumable chunk (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument(
        "--splits", default=None, help="comma-separated splits to convert (default: train and val if present)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the sample order permutation (default 0)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help=f"skip images with more pixels than this (decompression-bomb guard, default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any input was skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary on stderr")
    return p


# Options that decide a conversion's output. Their parser defaults are None so that --merge and
# --verify can tell which were given: those modes read what the parts or OUT hold, and an option
# they would otherwise ignore is checked (merge) or refused (verify).
_OUTPUT_OPTIONS = {
    "formats": ("--formats", list(FORMATS)),
    "max_res": ("--max-res", 256),
    "quality": ("--quality", 90),
    "shard_size": ("--shard-size", DEFAULT_SHARD_SIZE),
    "splits": ("--splits", None),
    "seed": ("--seed", 0),
    "max_pixels": ("--max-pixels", DEFAULT_MAX_PIXELS),
}


def _given_options(args: argparse.Namespace) -> dict:
    """The output options given on the command line, as the identity records them."""
    given = {k: getattr(args, k) for k in _OUTPUT_OPTIONS if getattr(args, k) is not None}
    for k in ("formats", "splits"):
        if k in given:
            given[k] = _csv(given[k])
    return given


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.verify and args.merge:
        raise DataError("--verify and --merge do not go together: merge first, then verify OUT")
    given = _given_options(args)
    if args.merge:
        if len(args.paths) < 2:
            raise DataError("--merge takes the part folders and the output: supmae convert --merge PART_DIR... OUT")
        if args.shard is not None:
            raise DataError("--merge joins parts; --shard belongs to the conversions that wrote them")
        return _run_strict(
            lambda: merge(
                args.paths[:-1],
                args.paths[-1],
                strict=args.strict,
                progress=not args.no_progress,
                workers=args.workers,
                expect=given,
            )
        )
    if args.verify:
        if len(args.paths) != 1:
            raise DataError("--verify takes one folder: supmae convert --verify OUT")
        refused = [_OUTPUT_OPTIONS[k][0] for k in given] + [
            flag for flag, value in (("--shard", args.shard), ("--strict", args.strict)) if value
        ]
        if refused:
            raise DataError(f"--verify checks OUT as it was converted; {', '.join(refused)} does not apply to it")
        target = args.paths[0]
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
    if len(args.paths) != 2:
        raise DataError(
            "expected SRC and OUT: supmae convert SRC OUT [options] "
            "(or: supmae convert --verify OUT, supmae convert --merge PART_DIR... OUT)"
        )
    src, out = args.paths
    opts = {k: given.get(k, default) for k, (_, default) in _OUTPUT_OPTIONS.items()}
    return _run_strict(
        lambda: convert(
            src,
            out,
            formats=opts["formats"],
            max_res=opts["max_res"],
            quality=opts["quality"],
            workers=args.workers,
            shard_size=opts["shard_size"],
            splits=opts["splits"],
            seed=opts["seed"],
            strict=args.strict,
            progress=not args.no_progress,
            max_pixels=opts["max_pixels"],
            shard=parse_shard(args.shard) if args.shard is not None else None,
            decode_timeout=args.decode_timeout,
        )
    )


def _run_strict(job: Callable[[], dict]) -> int:
    """Run a conversion or merge; --strict's finding is exit status 1 (the outputs are written),
    not a usage error."""
    try:
        job()
    except StrictFailure as exc:
        print(f"supmae convert: --{exc}", file=sys.stderr)
        return 1
    return 0


def verify(out: str, workers: int = 2, progress: bool = False) -> list[str]:
    """Problems found re-reading every output of `out` against its manifest (empty: all good)."""
    from tools.verify import verify as _verify

    return _verify(out, workers=workers, progress=progress)
