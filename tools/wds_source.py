"""The `imagenet-1k-wds` layout: webdataset tars in SRC, such as `imagenet1k-train-0000.tar` and
`imagenet1k-validation-00.tar`, each sample a group of members sharing a key: `KEY.jpg` (the
image; `.jpeg`, `.png`, `.webp` are taken too), `KEY.cls` (the label index as ASCII digits)
and sometimes `KEY.json` (its `filename`, when present, is the image's original file name).

The tars are uncompressed, so they are read like the official archives (`tools/archives.py`):
headers only, member by member, each image's bytes one byte range that the workers `pread`;
only the small `.cls` and `.json` members are read while listing. A tar cut short converts
everything before the cut (the cut is a skipped `truncated-archive` entry), a damaged or
compressed one is one skipped entry and the other tars are converted. A key without an image
is `missing-image`, an image without a readable `.cls` is `no-label`, an image whose file name
starts with another class's wnid is `label-mismatch`. Class names and order as for the
parquet layout: `tools.listing.hub_classes`.

Every image member is converted or reported. A sample has one image: of `KEY.jpg` and `KEY.png`
(or any two image extensions) the first in `IMAGE_EXTS` order is converted, each other one is
`second-image`; a member repeating an earlier member's key and extension is `duplicate-member`
(the first one is used, as `webdataset` keeps one value per extension). A `.json` sidecar that
cannot be parsed (not JSON, over 1 MB, nested too deep) only names the image: the image is
converted under its key's name and a warning counts such sidecars.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Sequence

from pipelines.constants import SPLITS
from pipelines.errors import DataError
from tools import archives as A
from tools.listing import Listing, Row, hub_listing

TAR_NAME = re.compile(r".+-(train|validation|val)-\d+\.tar")
HUB_SPLITS = {"train": "train", "validation": "val", "val": "val"}  # their split name -> ours
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DUPLICATE_MEMBER = "duplicate-member"
SECOND_IMAGE = "second-image"


def _tars(src: str) -> dict[str, list[str]]:
    """Tar names per split (ours), sorted."""
    found: dict[str, list[str]] = {}
    if not os.path.isdir(src):
        return found
    for name in sorted(os.listdir(src)):
        m = TAR_NAME.fullmatch(name)
        if m and os.path.isfile(os.path.join(src, name)):
            found.setdefault(HUB_SPLITS[m.group(1)], []).append(name)
    return found


def detect(src: str) -> bool:
    return bool(_tars(src))


def _read(f, member: A.Member, limit: int = 1 << 20) -> bytes:
    if member.size > limit:
        raise ValueError(f"{member.size} bytes")
    f.seek(member.offset)
    return f.read(member.size)


def _key(member: str) -> str:
    """webdataset's sample key of a member: its path up to the first dot of the file name."""
    base = posixpath.basename(member)
    dot = base.find(".")
    return member if dot < 0 else member[: len(member) - len(base) + dot]


def _tar_rows(src: str, name: str) -> tuple[list[Row], list[tuple[str, str, str]], dict]:
    """The samples of one tar, in member order, and the problems met."""
    path = os.path.join(src, name)
    try:
        listing = A.list_val_archive(path)  # a flat tar, listed header by header
    except DataError as exc:
        return [], [(name, A.DAMAGED_ARCHIVE, f"{exc}; none of its samples converted")], {"truncated": False}
    problems = list(listing.problems)
    # Samples a problem entry already accounts for (a member cut or unreadable): not reported twice.
    damaged = {_key(p[len(name) + 1 :]) for p, _, _ in problems if p.startswith(name + "/")}
    groups: dict[str, dict[str, A.Member]] = {}
    for m in listing.members:
        base = posixpath.basename(m.name)
        dot = base.find(".")
        if dot <= 0:
            problems.append((f"{name}/{m.name}", A.NO_LABEL, "member name has no KEY.EXTENSION form"))
            continue
        key = _key(m.name)
        ext = base[dot + 1 :].lower()
        members = groups.setdefault(key, {})
        if ext in members:
            if ext in IMAGE_EXTS:
                problems.append(
                    (f"{name}/{m.name}", DUPLICATE_MEMBER, f"sample {key} already has a .{ext}; the first is converted")
                )
            continue  # a repeated .cls / .json: the first one is the sample's, as for the image
        members[ext] = m
    rows: list[Row] = []
    bad_sidecars = 0
    with open(path, "rb") as f:
        for key, members in groups.items():
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                if key in damaged:
                    continue
                problems.append((f"{name}/{key}", A.MISSING_IMAGE, f"sample has {sorted(members)} but no image"))
                continue
            image = members[ext]
            for other in IMAGE_EXTS:
                if other != ext and other in members:
                    problems.append(
                        (
                            f"{name}/{members[other].name}",
                            SECOND_IMAGE,
                            f"sample {key} has a .{ext} too; one image per sample, the .{ext} is converted",
                        )
                    )
            file_name = f"{posixpath.basename(key)}.{ext}"
            if "json" in members:
                try:
                    meta = json.loads(_read(f, members["json"]))
                    if isinstance(meta, dict) and isinstance(meta.get("filename"), str) and meta["filename"]:
                        file_name = posixpath.basename(meta["filename"])
                except (ValueError, UnicodeDecodeError, RecursionError):
                    # The name only orders samples within a class; the key's serves as well.
                    bad_sidecars += 1
            label, problem = None, ""
            if "cls" not in members:
                problem = "sample has no .cls member"
            else:
                try:
                    label = int(_read(f, members["cls"]).decode("ascii").strip())
                except (ValueError, UnicodeDecodeError) as exc:
                    problem = f".cls is not an integer ({exc})"
            rows.append(Row(f"{name}/{image.name}", file_name, label, name, image.offset, image.size, problem))
    facts = listing.facts()
    if bad_sidecars:
        facts["unreadable_sidecars"] = bad_sidecars
    return rows, problems, facts


def list_wds(src: str, splits: Sequence[str] | None, seed: int, shard_size: int) -> Listing:
    tars = _tars(src)
    present = [s for s in SPLITS if s in tars]
    wanted = list(splits) if splits else present
    missing = [s for s in wanted if s not in present]
    if missing:
        raise DataError(f"split(s) {', '.join(missing)} not found among the webdataset tars of {src}")
    warnings: list[str] = []
    rows_by_split: dict[str, list[Row]] = {}
    extras_by_split: dict[str, list[tuple[str, str, str]]] = {}
    facts: dict[str, dict] = {}
    need = [s for s in SPLITS if s in wanted or (s == "train" and "train" in present)]
    for split in need:
        rows, extras = [], []
        for name in tars[split]:
            r, problems, fact = _tar_rows(src, name)
            rows.extend(r)
            extras.extend(problems)
            facts[name] = fact
            if fact.get("truncated"):
                warnings.append(f"{name} is truncated (interrupted download?): everything before the cut is converted")
            if fact.get("unreadable_sidecars"):
                warnings.append(
                    f"{name}: {fact['unreadable_sidecars']} .json sidecar(s) unreadable (not JSON, over 1 MB or "
                    "nested too deep); their images are converted, named by their keys"
                )
        rows_by_split[split], extras_by_split[split] = rows, extras
    listing = hub_listing(
        "wds",
        "webdataset tars (KEY.jpg + KEY.cls)",
        src,
        rows_by_split,
        extras_by_split,
        wanted,
        seed,
        shard_size,
        warnings,
        rows_by_split.get("train"),
    )
    listing.archives = {name: facts[name] for split in wanted for name in tars[split]}
    return listing
