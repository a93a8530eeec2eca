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
their class names (wnids) are known and checked is `tools.listing.index_rows`' business.

Whatever the layout, classes are the sorted class names (wnids) of the first split converted, as
torchvision's `ImageFolder` and `ImageNet` index them, and samples are listed in the order
`ImageFolder` would list the same images extracted into class folders (by class, then by path).
So every layout of the same images gives the same samples with the same labels.
"""

from __future__ import annotations

import csv
import os
import posixpath
from collections.abc import Sequence

from pipelines.constants import SPLITS
from pipelines.errors import DataError
from tools import archives as A
from tools.listing import Listing, Source, SplitPlan, make_plan

OUTSIDE_CLASS = "outside-class-folder"
KAGGLE_DATA = os.path.join("ILSVRC", "Data", "CLS-LOC")
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"


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
        plans.append(make_plan(split, sources, _strays(src, dirs[split]), seed, shard_size, class_seen))
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
        plans.append(make_plan("train", sources, listing.problems, seed, shard_size, class_seen))
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
        plans.append(make_plan("val", sources, listing.problems + extras, seed, shard_size, class_seen))
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
        plans.append(make_plan("train", sources, _strays(src, train_dir), seed, shard_size, class_seen))
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
        plans.append(make_plan("val", sources, extras, seed, shard_size, class_seen))
    order = {s: i for i, s in enumerate(wanted)}
    plans.sort(key=lambda p: order[p.name])
    return Listing("kaggle", f"Kaggle ImageNet layout ({KAGGLE_DATA}, {KAGGLE_VAL_CSV})", classes, plans, warnings)
