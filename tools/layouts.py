"""Which layout a source holds, and the list of samples it gives, in `ImageFolder` order.

Five layouts are recognised, in this order:

- `archives`: ImageNet's official downloads in one folder: `ILSVRC2012_img_train.tar` (one tar
  per class inside), `ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_NNNNNNNN.JPEG`) and
  `ILSVRC2012_devkit_t12.tar.gz` (needed for val). Read in place, see `tools/archives.py`.
- `kaggle`: the Kaggle ImageNet download: `ILSVRC/Data/CLS-LOC/train/<wnid>/...`, a flat
  `ILSVRC/Data/CLS-LOC/val/`, labelled by `LOC_val_solution.csv` (the first wnid of each
  PredictionString), and `LOC_synset_mapping.txt` (checked against the train folders).
- `hf-parquet`: the Hugging Face `imagenet-1k` download: `SRC/data/{train,validation,test}-NNNNN-of-
  NNNNN.parquet`, rows `image` {bytes, path} and `label`. See `tools/hf_parquet.py`.
- `wds`: webdataset tars such as `imagenet1k-train-0000.tar` / `imagenet1k-validation-00.tar` in
  SRC, samples `KEY.jpg` + `KEY.cls` (+ `KEY.json`). See `tools/wds_source.py`.
- `imagefolder`: `SRC/train/<class>/...`, `SRC/val/<class>/...`, or one split folder.

The two hub layouts label each image by an index (`label`, `.cls`) rather than a folder name; how
their class names (wnids) are known and checked is `index_rows`' business, below.

Whatever the layout, classes are the sorted class names (wnids) of the first split converted, as
torchvision's `ImageFolder` and `ImageNet` index them, and samples are listed in the order
`ImageFolder` would list the same images extracted into class folders (by class, then by path).
So every layout of the same images gives the same samples with the same labels.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines.constants import SPLITS
from pipelines.errors import DataError
from tools import archives as A

OUTSIDE_CLASS = "outside-class-folder"
KAGGLE_DATA = os.path.join("ILSVRC", "Data", "CLS-LOC")
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"


@dataclass(frozen=True, slots=True)
class Source:
    rel: str  # path relative to SRC, '/'-separated; inside an archive: "<archive>/<member path>"
    label: int
    archive: str | None = None  # archive file (relative to SRC) holding the bytes, None for a plain file
    offset: int = -1  # byte range of the bytes inside `archive`
    size: int = -1


@dataclass
class SplitPlan:
    name: str
    sources: list[Source]
    # Inputs seen that are not samples (stray files, damaged archives, ground truth without an
    # image...): (path, reason code, detail), each one row of skipped.tsv.
    extras: list[tuple[str, str, str]]
    permutation: np.ndarray  # [n] output position -> source index
    shard_size: int
    class_seen: list[int] = field(default_factory=list)  # inputs seen per class

    @property
    def num_shards(self) -> int:
        return -(-len(self.sources) // self.shard_size)

    def shard_positions(self, k: int) -> range:
        return range(k * self.shard_size, min(len(self.sources), (k + 1) * self.shard_size))

    @property
    def key_width(self) -> int:
        return max(8, len(str(max(len(self.sources) - 1, 0))))

    def key(self, position: int) -> str:
        return f"{position:0{self.key_width}d}"


@dataclass
class Listing:
    layout: str
    description: str
    classes: list[str]
    plans: list[SplitPlan]
    warnings: list[str]
    archives: dict[str, dict] = field(default_factory=dict)  # archive name -> facts (members read, truncated)
    # Layouts whose images have no byte range in SRC (parquet rows: compressed pages) unpack the
    # rows of the chunks about to be converted into the output's work folder first, and point
    # those sources there: stage(work_dir, pending [(plan, chunk)], progress). Called by the
    # converter once OUT is its own, after the fingerprint (which never depends on OUT) is taken.
    stage: Callable[[str, list, bool], None] | None = None

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.layout, self.classes]).encode())
        for plan in self.plans:
            h.update(plan.name.encode() + b"\0")
            for s in plan.sources:
                where = "" if s.archive is None else f"\t{s.archive}:{s.offset}:{s.size}"
                h.update(f"{s.label}\t{s.rel}{where}\n".encode("utf-8", "surrogateescape"))
            for path, code, _ in plan.extras:
                h.update(f"-\t{path}\t{code}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def _permutation(seed: int, split: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode())]))
    return rng.permutation(n)


def _rel(path: str, src: str) -> str:
    # Listed paths are joins onto src: cutting the prefix is what relpath returns, at a fraction of
    # its cost (once per source file, in the main process: serial time of every conversion).
    if path.startswith(src + os.sep):
        return path[len(src) + 1 :].replace(os.sep, "/")
    return os.path.relpath(path, src).replace(os.sep, "/")


def _folder_order(name: str) -> tuple[str, str]:
    """Sort key of a path as `ImageFolder` walks it (folder by folder, names sorted in each)."""
    return posixpath.dirname(name), posixpath.basename(name)


def detect(src: str) -> str:
    from tools import hf_parquet, wds_source

    if any(os.path.isfile(os.path.join(src, n)) for n in (A.TRAIN_TAR, A.VAL_TAR)):
        return "archives"
    if os.path.isdir(os.path.join(src, KAGGLE_DATA)):
        return "kaggle"
    if hf_parquet.detect(src):
        return "hf-parquet"
    if wds_source.detect(src):
        return "wds"
    return "imagefolder"


def list_source(src: str, splits: Sequence[str] | None, seed: int, shard_size: int) -> Listing:
    """Detect the layout of `src` and list its samples."""
    layout = detect(src)
    if layout == "archives":
        return _list_archives(src, splits, seed, shard_size)
    if layout == "kaggle":
        return _list_kaggle(src, splits, seed, shard_size)
    if layout == "hf-parquet":
        from tools.hf_parquet import list_hf_parquet

        return list_hf_parquet(src, splits, seed, shard_size)
    if layout == "wds":
        from tools.wds_source import list_wds

        return list_wds(src, splits, seed, shard_size)
    classes, plans, warnings = _list_imagefolder(src, splits, seed, shard_size)
    return Listing("imagefolder", "ImageFolder tree (class sub-folders)", classes, plans, warnings)


# ----------------------------------------------------------------------------------------------
# ImageFolder


def find_classes(directory: str) -> list[str]:
    """Class folder names of one split, sorted: torchvision's `find_classes` rule (any directory
    entry, symlinks to directories included)."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _walk_class(class_dir: str) -> list[str]:
    """Files under one class folder in `ImageFolder`'s order (recursive, links followed, sorted)."""
    paths = []
    for root, _, names in sorted(os.walk(class_dir, followlinks=True)):
        for name in sorted(names):
            paths.append(os.path.join(root, name))
    return paths


def _wanted(present: list[str], splits: Sequence[str] | None, src: str) -> list[str]:
    if not present:
        raise DataError(f"{src} holds neither a train nor a val split")
    wanted = list(splits) if splits else present
    missing = [s for s in wanted if s not in present]
    if missing:
        raise DataError(f"split(s) {', '.join(missing)} not found under {src} (found: {', '.join(present)})")
    return wanted


def _split_dirs(src: str, splits: Sequence[str] | None) -> dict[str, str]:
    present = [s for s in SPLITS if os.path.isdir(os.path.join(src, s))]
    if not present:
        # A single split folder: its sub-folders are classes.
        if splits and list(splits) != ["train"]:
            raise DataError(
                f"{src} has no {'/'.join(SPLITS)} sub-folder, so it is one split ('train'); "
                f"--splits {','.join(splits)} does not apply"
            )
        return {"train": src}
    return {s: os.path.join(src, s) for s in _wanted(present, splits, src)}


def _class_folder_split(
    src: str, split: str, split_dir: str, classes: list[str], warnings: list[str]
) -> tuple[list[Source], list[int]]:
    present = find_classes(split_dir)
    extra = sorted(set(present) - set(classes))
    if extra:
        raise DataError(
            f"split '{split}' has class folders that the first split lacks: {', '.join(extra[:5])}"
            f"{' ...' if len(extra) > 5 else ''}"
        )
    sources: list[Source] = []
    class_seen = []
    for label, name in enumerate(classes):
        if name not in present:
            warnings.append(f"split '{split}': class folder '{name}' is missing; class keeps index {label}, 0 samples")
            class_seen.append(0)
            continue
        files = _walk_class(os.path.join(split_dir, name))
        if not files:
            warnings.append(f"split '{split}': class folder '{name}' is empty; class keeps index {label}, 0 samples")
        class_seen.append(len(files))
        sources.extend(Source(_rel(p, src), label) for p in files)
    return sources, class_seen


def _strays(src: str, split_dir: str) -> list[tuple[str, str, str]]:
    with os.scandir(split_dir) as entries:
        names = sorted(_rel(e.path, src) for e in entries if not e.is_dir())
    return [(n, OUTSIDE_CLASS, "not inside a class folder; ImageFolder ignores it too") for n in names]


def _plan(split: str, sources: list[Source], extras, seed: int, shard_size: int, class_seen) -> SplitPlan:
    if not sources:
        raise DataError(f"split '{split}' holds no samples")
    return SplitPlan(split, sources, extras, _permutation(seed, split, len(sources)), shard_size, class_seen)


def _list_imagefolder(
    src: str, splits: Sequence[str] | None, seed: int, shard_size: int
) -> tuple[list[str], list[SplitPlan], list[str]]:
    dirs = _split_dirs(src, splits)
    names = list(dirs)
    classes = find_classes(dirs[names[0]])
    if not classes:
        raise DataError(f"no class folders found in {dirs[names[0]]}")
    warnings: list[str] = []
    plans = []
    for split in names:
        sources, class_seen = _class_folder_split(src, split, dirs[split], classes, warnings)
        plans.append(_plan(split, sources, _strays(src, dirs[split]), seed, shard_size, class_seen))
    return classes, plans, warnings


# ----------------------------------------------------------------------------------------------
# Flat validation sets labelled by a table (archives: devkit ground truth; Kaggle: the CSV)


def _labelled_flat_split(
    images: list[tuple[str, object]],
    labels_by_number: dict[int, str],
    label_source: str,
    expected_name,
    classes: list[str],
) -> tuple[list[Source], list[tuple[str, str, str]], list[int]]:
    """`images`: (display path, location) of each flat file; `labels_by_number`: image number ->
    wnid. Sources sorted as ImageFolder lists the images once sorted into class folders."""
    index = {c: i for i, c in enumerate(classes)}
    keyed, extras = [], []
    seen_numbers = set()
    for rel, loc in images:
        number = A.val_index(rel)
        if number is None:
            extras.append((rel, A.NO_LABEL, "not an ILSVRC2012_val_NNNNNNNN.JPEG name, so it has no label"))
            continue
        seen_numbers.add(number)
        wnid = labels_by_number.get(number)
        if wnid is None:
            extras.append((rel, A.NO_LABEL, f"no ground-truth entry for image {number} in {label_source}"))
            continue
        if wnid not in index:
            extras.append((rel, A.NO_LABEL, f"ground-truth class {wnid} is not one of the {len(classes)} classes"))
            continue
        keyed.append((index[wnid], posixpath.basename(rel), rel, loc))
    for number in sorted(set(labels_by_number) - seen_numbers):
        extras.append(
            (expected_name(number), A.MISSING_IMAGE, f"{label_source} labels image {number}, which the source lacks")
        )
    keyed.sort(key=lambda t: (t[0], t[1]))
    class_seen = [0] * len(classes)
    sources = []
    for label, _, rel, loc in keyed:
        class_seen[label] += 1
        sources.append(Source(rel, label) if loc is None else Source(rel, label, *loc))
    return sources, extras, class_seen


# ----------------------------------------------------------------------------------------------
# Official archives


def _list_archives(src: str, splits: Sequence[str] | None, seed: int, shard_size: int) -> Listing:
    present = [s for s, n in (("train", A.TRAIN_TAR), ("val", A.VAL_TAR)) if os.path.isfile(os.path.join(src, n))]
    wanted = _wanted(present, splits, src)
    warnings: list[str] = []
    facts: dict[str, dict] = {}
    plans: list[SplitPlan] = []
    devkit_path = os.path.join(src, A.DEVKIT_TAR)
    devkit = A.read_devkit(devkit_path) if "val" in wanted or os.path.isfile(devkit_path) else None
    if "val" in wanted and devkit is None:
        raise DataError(f"{A.VAL_TAR} needs {A.DEVKIT_TAR} beside it for its labels")
    classes: list[str] = []
    if "train" in wanted:
        listing = A.list_train_archive(os.path.join(src, A.TRAIN_TAR))
        facts[A.TRAIN_TAR] = listing.facts()
        by_class: dict[str, list[A.Member]] = {}
        for tar_name, members in listing.nested.items():
            by_class.setdefault(posixpath.basename(tar_name)[: -len(".tar")], []).extend(members)
        classes = sorted(by_class)
        if not classes:
            raise DataError(f"{A.TRAIN_TAR} holds no per-class tars")
        if devkit is not None:
            unknown = sorted(set(classes) - set(devkit.leaf_wnids))
            if unknown:
                warnings.append(f"{len(unknown)} train class(es) are no leaf synset of the devkit: {unknown[:5]}")
        sources, class_seen = [], []
        for label, wnid in enumerate(classes):
            members = sorted(by_class[wnid], key=lambda m: _folder_order(m.name))
            class_seen.append(len(members))
            sources.extend(Source(f"{A.TRAIN_TAR}/{m.name}", label, A.TRAIN_TAR, m.offset, m.size) for m in members)
        plans.append(_plan("train", sources, listing.problems, seed, shard_size, class_seen))
        if listing.truncated:
            warnings.append(
                f"{A.TRAIN_TAR} is truncated (interrupted download?): {listing.members_read} per-class tars read "
                f"before the cut at byte {listing.file_bytes}; everything before it is converted"
            )
    if "val" in wanted:
        assert devkit is not None
        listing = A.list_val_archive(os.path.join(src, A.VAL_TAR))
        facts[A.VAL_TAR] = listing.facts()
        labels: dict[int, str] = {}
        bad_ids = []
        for i, class_id in enumerate(devkit.val_ids):
            wnid = devkit.id_to_wnid.get(class_id)
            if wnid is None:
                bad_ids.append(class_id)
            else:
                labels[i + 1] = wnid
        if bad_ids:
            warnings.append(f"{len(bad_ids)} ground-truth line(s) name no leaf synset (IDs {sorted(set(bad_ids))[:5]})")
        if not classes:
            classes = sorted(set(labels.values()))
        images = [(f"{A.VAL_TAR}/{m.name}", (A.VAL_TAR, m.offset, m.size)) for m in listing.members]
        sources, extras, class_seen = _labelled_flat_split(
            images,
            labels,
            f"{A.DEVKIT_TAR}:{A.VAL_GROUND_TRUTH}",
            lambda n: f"{A.VAL_TAR}/ILSVRC2012_val_{n:08d}.JPEG",
            classes,
        )
        plans.append(_plan("val", sources, listing.problems + extras, seed, shard_size, class_seen))
        if listing.truncated:
            warnings.append(
                f"{A.VAL_TAR} is truncated (interrupted download?): {listing.members_read} members read before the "
                f"cut at byte {listing.file_bytes}; everything before it is converted"
            )
    order = {s: i for i, s in enumerate(wanted)}
    plans.sort(key=lambda p: order[p.name])
    parts = [n for n, s in ((A.TRAIN_TAR, "train"), (A.VAL_TAR, "val")) if s in wanted]
    if devkit is not None:
        parts.append(A.DEVKIT_TAR)
    return Listing(
        "archives", f"official ImageNet archives ({', '.join(parts)}), read in place", classes, plans, warnings, facts
    )


# ----------------------------------------------------------------------------------------------
# Kaggle


def _list_kaggle(src: str, splits: Sequence[str] | None, seed: int, shard_size: int) -> Listing:
    data = os.path.join(src, KAGGLE_DATA)
    present = [s for s in SPLITS if os.path.isdir(os.path.join(data, s))]
    wanted = _wanted(present, splits, data)
    warnings: list[str] = []
    plans: list[SplitPlan] = []
    classes: list[str] = []
    if "train" in wanted:
        train_dir = os.path.join(data, "train")
        classes = find_classes(train_dir)
        if not classes:
            raise DataError(f"no class folders found in {train_dir}")
        sources, class_seen = _class_folder_split(src, "train", train_dir, classes, warnings)
        plans.append(_plan("train", sources, _strays(src, train_dir), seed, shard_size, class_seen))
    mapping = os.path.join(src, KAGGLE_SYNSETS)
    if os.path.isfile(mapping):
        with open(mapping, encoding="utf-8") as f:
            listed = sorted(line.split()[0] for line in f if line.strip())
        if classes and listed != classes:
            warnings.append(
                f"{KAGGLE_SYNSETS} lists {len(listed)} wnids, the train folders {len(classes)}: classes follow the "
                "folders (ImageFolder's rule)"
            )
        classes = classes or listed
    if "val" in wanted:
        table = os.path.join(src, KAGGLE_VAL_CSV)
        if not os.path.isfile(table):
            raise DataError(f"the Kaggle val folder needs {KAGGLE_VAL_CSV} in {src} for its labels")
        labels: dict[int, str] = {}
        with open(table, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                number = A.val_index(f"{row.get('ImageId', '')}.JPEG")
                words = (row.get("PredictionString") or "").split()
                if number is not None and words:
                    labels[number] = words[0]
        if not classes:
            classes = sorted(set(labels.values()))
        val_dir = os.path.join(data, "val")
        with os.scandir(val_dir) as entries:
            names = sorted(e.name for e in entries)
        images = [
            (_rel(os.path.join(val_dir, n), src), None) for n in names if not os.path.isdir(os.path.join(val_dir, n))
        ]
        val_rel = _rel(val_dir, src)
        sources, extras, class_seen = _labelled_flat_split(
            images, labels, KAGGLE_VAL_CSV, lambda n: f"{val_rel}/ILSVRC2012_val_{n:08d}.JPEG", classes
        )
        plans.append(_plan("val", sources, extras, seed, shard_size, class_seen))
    order = {s: i for i, s in enumerate(wanted)}
    plans.sort(key=lambda p: order[p.name])
    return Listing("kaggle", f"Kaggle ImageNet layout ({KAGGLE_DATA}, {KAGGLE_VAL_CSV})", classes, plans, warnings)


# ----------------------------------------------------------------------------------------------
# Labelled rows (hub layouts: HF parquet, webdataset tars): an index per image, not a folder

WNID = re.compile(r"(n\d{8})_")
LABEL_MISMATCH = "label-mismatch"
CLASSES_PY = "classes.py"  # the HF imagenet-1k repository's label -> (wnid, names) table
CLASSES_TXT = "classes.txt"  # one wnid per line, line i naming label i


@dataclass(frozen=True, slots=True)
class Row:
    """One image of a hub layout as its source states it."""

    rel: str  # where it is, for sources.tsv and skipped.tsv
    name: str  # its file name (ImageFolder's sort key within a class; may start with its wnid)
    label: int | None  # the stated label (None: none stated or unreadable)
    archive: str | None
    offset: int
    size: int
    label_problem: str = ""  # why `label` is None, when it is


def path_wnid(name: str) -> str | None:
    """The wnid a training file name starts with (`n01440764_190.JPEG`), else None (val names)."""
    match = WNID.match(posixpath.basename(name))
    return match.group(1) if match else None


def read_label_table(src: str) -> tuple[list[str], str] | None:
    """(wnid of each label, the file it came from) from a classes file in `src`, if there is one:
    `classes.py` (the HF repository's `IMAGENET2012_CLASSES`, wnids in label order) or
    `classes.txt` (one wnid per line). None when neither exists."""
    for name in (CLASSES_PY, CLASSES_TXT):
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if name == CLASSES_PY:
            wnids = re.findall(r"[\"'](n\d{8})[\"']\s*:", text)
        else:
            wnids = [line.split()[0] for line in text.splitlines() if line.strip()]
        if not wnids:
            raise DataError(f"{path} names no class (expected wnids such as n01440764, in label order)")
        if len(set(wnids)) != len(wnids):
            raise DataError(f"{path} names a wnid twice")
        return wnids, name
    return None


def hub_classes(src: str, train_rows: list[Row] | None, what: str) -> tuple[list[str], list[int] | None, str]:
    """(classes, remap, how) of a hub layout whose rows carry a label index.

    The index is the position of the class's wnid in the dataset's label table. That table comes
    from a classes file beside the data when there is one (`read_label_table`); otherwise it is
    the sorted wnids that the training file names start with (all 1,000 ImageNet classes occur in
    the train split, and the hubs number them in sorted-wnid order). Our classes are always the
    sorted wnids, so `remap[label]` is our index of a stated label (None: the identity).
    With neither a table nor wnids in the names, the classes are the label indices themselves,
    zero-padded so that their sorted order is the numeric one.
    """
    table = read_label_table(src)
    if table is not None:
        wnids, name = table
        classes = sorted(wnids)
        index = {w: i for i, w in enumerate(classes)}
        remap = [index[w] for w in wnids]
        return classes, (None if remap == list(range(len(remap))) else remap), f"labels from {name}"
    if not train_rows:
        raise DataError(
            f"{what}: the class names (wnids) come from the train split's file names or from a "
            f"{CLASSES_PY} / {CLASSES_TXT} beside the data; there is neither"
        )
    wnids = sorted({w for r in train_rows if (w := path_wnid(r.name)) is not None})
    if wnids:
        index = {w: i for i, w in enumerate(wnids)}
        with_wnid = [(r.label, index[w]) for r in train_rows if r.label is not None and (w := path_wnid(r.name))]
        wrong = sum(1 for stated, expected in with_wnid if stated != expected)
        if with_wnid and wrong * 2 > len(with_wnid):
            raise DataError(
                f"{what}: {wrong} of {len(with_wnid)} train labels are not the index of their file name's wnid "
                f"among the {len(wnids)} sorted wnids (a subset of the classes?); put the dataset's "
                f"{CLASSES_TXT} (one wnid per line, in label order) beside the data"
            )
        return wnids, None, f"{len(wnids)} wnids from the train file names, sorted"
    top = max((r.label for r in train_rows if r.label is not None), default=-1)
    width = len(str(max(top, 0)))
    return [f"{i:0{width}d}" for i in range(top + 1)], None, "no wnids anywhere: classes named by label index"


def index_rows(
    rows: list[Row], classes: list[str], remap: list[int] | None
) -> tuple[list[Source], list[tuple[str, str, str]], list[int]]:
    """Sources of labelled rows in ImageFolder's order (by class, then file name) and the rows
    that cannot be samples. A row is skipped (`no-label`) without a usable label, and
    (`label-mismatch`) when its file name starts with a wnid that is not its label's class."""
    index = {c: i for i, c in enumerate(classes)}
    keyed, extras = [], []
    for r in rows:
        if r.label is None:
            extras.append((r.rel, A.NO_LABEL, r.label_problem or "no label"))
            continue
        if remap is not None:
            ours = remap[r.label] if 0 <= r.label < len(remap) else None
        else:
            ours = r.label if 0 <= r.label < len(classes) else None
        if ours is None:
            detail = "unlabelled (-1: the test split)" if r.label == -1 else f"label {r.label} is no class"
            extras.append((r.rel, A.NO_LABEL, f"{detail}; {len(classes)} classes"))
            continue
        wnid = path_wnid(r.name)
        if wnid is not None and wnid != classes[ours]:
            where = f"class {index[wnid]}" if wnid in index else "no class"
            extras.append(
                (
                    r.rel,
                    LABEL_MISMATCH,
                    f"file name says {wnid} ({where}), label {r.label} says {classes[ours]}",
                )
            )
            continue
        keyed.append((ours, posixpath.basename(r.name), r))
    keyed.sort(key=lambda t: (t[0], t[1]))
    class_seen = [0] * len(classes)
    sources = []
    for label, _, r in keyed:
        class_seen[label] += 1
        sources.append(Source(r.rel, label, r.archive, r.offset, r.size))
    return sources, extras, class_seen


def hub_listing(
    layout: str,
    description: str,
    src: str,
    rows_by_split: dict[str, list[Row]],
    extras_by_split: dict[str, list[tuple[str, str, str]]],
    wanted: list[str],
    seed: int,
    shard_size: int,
    warnings: list[str],
    train_rows_for_classes: list[Row] | None,
) -> Listing:
    """The listing of a hub layout: classes (see `hub_classes`), then each wanted split's sources."""
    classes, remap, how = hub_classes(src, train_rows_for_classes, description)
    plans = []
    for split in wanted:
        sources, extras, class_seen = index_rows(rows_by_split[split], classes, remap)
        plans.append(_plan(split, sources, extras_by_split.get(split, []) + extras, seed, shard_size, class_seen))
    return Listing(layout, f"{description}; classes: {how}", classes, plans, warnings)
