"""The converter's listing of a source: what every layout reader hands to the converter.

`Source` (one image and where its bytes are), `SplitPlan` (a split's sources, skipped inputs and
seeded output order), `Listing` (the whole source), and the shared machinery of the layouts that
label each image by an index rather than a folder (`Row`, `hub_listing`: the HF parquet and
webdataset-tar readers). `tools/layouts.py` detects a layout and dispatches to its reader; the
readers import from here, never from `layouts`, so imports run one way.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipelines.errors import DataError
from tools import archives as A


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


def seeded_order(seed: int, split: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode())]))
    return rng.permutation(n)


def make_plan(split: str, sources: list[Source], extras, seed: int, shard_size: int, class_seen) -> SplitPlan:
    if not sources:
        raise DataError(f"split '{split}' holds no samples")
    return SplitPlan(split, sources, extras, seeded_order(seed, split, len(sources)), shard_size, class_seen)


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
        plans.append(make_plan(split, sources, extras_by_split.get(split, []) + extras, seed, shard_size, class_seen))
    return Listing(layout, f"{description}; classes: {how}", classes, plans, warnings)
