"""List ImageNet's official archives without extracting them: which member holds which image,
where its bytes lie in the archive file, and what is wrong with the members that are damaged.

The archives as distributed are uncompressed tars, so every image's bytes are one contiguous
range of the archive file, also inside the per-class tars nested in `ILSVRC2012_img_train.tar`
(the inner tar is read by `tarfile` on the outer file object, and its member data sits at
`outer member data offset + inner member data offset`). Listing reads only the 512-byte
headers (tarfile seeks over the data); the converter's workers later read each image with one
`pread` of its range. Memory is bounded by the listing (a few numbers per image), never by the
archive's size, and nothing is ever written to disk.

`tarfile` treats an unreadable header after the first as the end of the archive, silently. So
after each archive ends, the block where it ended is read: two zero blocks are a clean end;
anything else is a damaged archive, and the end of the file there is a truncated one (an
interrupted download): every member before the cut is listed and converted, and the cut is
reported with the number of members read.

The devkit (`ILSVRC2012_devkit_t12.tar.gz`) gives the validation labels: `data/meta.mat` is read
by scipy, and torchvision's rules apply (only leaf synsets, `num_children == 0`, map an
`ILSVRC2012_ID` to a wnid; line i of `data/ILSVRC2012_validation_ground_truth.txt` is the
`ILSVRC2012_ID` of `ILSVRC2012_val_{i:08d}.JPEG`). Those IDs are not the class indices: classes
are always the sorted wnids, as torchvision's `ImageNet` and `ImageFolder` index them.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass, field

from pipelines.errors import DataError

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
META_MAT = "data/meta.mat"
VAL_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")

# Reason codes of skipped.tsv for archive members (beside those of tools/imageio.py).
DAMAGED_ARCHIVE = "damaged-archive"
TRUNCATED_ARCHIVE = "truncated-archive"
NO_LABEL = "no-label"
MISSING_IMAGE = "missing-image"
NOT_REGULAR = "not-a-regular-file"
NOT_CLASS_TAR = "outside-class-folder"


@dataclass(frozen=True, slots=True)
class Member:
    name: str  # path inside the archive ('/'-separated; nested: "n01440764.tar/n01440764_10026.JPEG")
    offset: int  # absolute byte offset of the member's data in the archive file
    size: int


@dataclass
class ArchiveListing:
    path: str
    file_bytes: int
    members: list[Member] = field(default_factory=list)  # complete regular members (images or not)
    nested: dict[str, list[Member]] = field(default_factory=dict)  # per-class tar name -> its members
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (member path, code, detail)
    members_read: int = 0
    truncated: bool = False

    def facts(self) -> dict:
        return {
            "bytes": self.file_bytes,
            "members_read": self.members_read,
            "truncated": self.truncated,
            "problems": len(self.problems),
        }


def _end_state(f, at: int, limit: int) -> str:
    """'end' (a zero block: tar's end marker), 'eof' (the file or container stops first) or
    'damaged' (a block tarfile could not parse) at byte `at`; `limit` is where the container ends."""
    if at >= limit:
        return "eof"
    f.seek(at)
    block = f.read(min(tarfile.BLOCKSIZE, limit - at))
    if len(block) < tarfile.BLOCKSIZE:
        return "eof"
    return "end" if block == bytes(tarfile.BLOCKSIZE) else "damaged"


def _iter_members(tar: tarfile.TarFile):
    """tarfile's members one by one, stopping (not raising) where the data ends unexpectedly; the
    caller inspects the end state."""
    while True:
        try:
            m = tar.next()
        except (tarfile.TarError, EOFError, OSError):
            return
        if m is None:
            return
        yield m


def _open_tar(fileobj, what: str) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.ReadError as exc:
        raise _NotATar(f"{what} is not a readable uncompressed tar: {exc}") from None


class _NotATar(Exception):
    pass


def _check_outer(path: str) -> tuple[object, int]:
    f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    head = f.read(4)
    f.seek(0)
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:4] == b"\xfd7zX":
        f.close()
        raise DataError(
            f"{path} is compressed; the official archives are plain tars, read in place by byte range: "
            "use the uncompressed .tar as distributed"
        )
    return f, os.fstat(f.fileno()).st_size


def list_train_archive(path: str) -> ArchiveListing:
    """The per-class tars of the train archive and their members (sorted later by the caller)."""
    f, size = _check_outer(path)
    out = ArchiveListing(path, size)
    base = os.path.basename(path)
    try:
        try:
            outer = _open_tar(f, base)
        except _NotATar as exc:
            raise DataError(str(exc)) from None
        for m in _iter_members(outer):
            out.members_read += 1
            if m.isdir():
                continue
            if not m.isreg():
                out.problems.append((f"{base}/{m.name}", NOT_REGULAR, "tar member is not a regular file"))
                continue
            if not m.name.endswith(".tar"):
                out.problems.append(
                    (f"{base}/{m.name}", NOT_CLASS_TAR, "member of the train archive that is not a per-class .tar")
                )
                continue
            out.nested[m.name] = _list_class_tar(outer, m, f, size, base, out)
        state = _end_state(f, outer.offset, size)
    finally:
        f.close()
    _close_outer(out, base, state, "per-class tars")
    return out


def _close_outer(out: ArchiveListing, base: str, state: str, unit: str) -> None:
    if state == "eof":
        out.truncated = True
        out.problems.append(
            (
                base,
                TRUNCATED_ARCHIVE,
                (
                    f"archive ends at byte {out.file_bytes} without tar's end marker (interrupted download?); "
                    f"{out.members_read} {unit} read before the cut, all of them converted"
                ),
            )
        )
    elif state == "damaged":
        out.problems.append(
            (base, DAMAGED_ARCHIVE, f"unreadable tar header after {out.members_read} {unit}; the rest is not read")
        )


class _Window:
    """Bytes [start, start + length) of an open file, as a file: the nested tar seen in place on the
    outer archive's file object. Unlike tarfile's `extractfile`, a read past the end of a cut file
    returns what is there (so the members before the cut are listed) instead of raising."""

    def __init__(self, f, start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def read(self, n: int = -1) -> bytes:
        left = self.length - self.pos
        n = left if n < 0 else min(n, left)
        if n <= 0:
            return b""
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def tell(self) -> int:
        return self.pos


def _list_class_tar(outer: tarfile.TarFile, m: tarfile.TarInfo, f, size: int, base: str, out: ArchiveListing):
    """Members of one nested per-class tar, read by tarfile on the outer archive's file object."""
    where = f"{base}/{m.name}"
    start = m.offset_data
    members: list[Member] = []
    cut = start + m.size > size
    try:
        inner = _open_tar(_Window(f, start, min(m.size, max(size - start, 0))), where)
    except _NotATar as exc:
        if cut:
            out.problems.append((where, "truncated", f"archive ends inside this per-class tar: {exc}"))
        else:
            out.problems.append((where, DAMAGED_ARCHIVE, str(exc)))
        return members
    read = 0
    for im in _iter_members(inner):
        read += 1
        if im.isdir():
            continue
        name = f"{m.name}/{im.name}"
        if not im.isreg():
            out.problems.append((f"{base}/{name}", NOT_REGULAR, "tar member is not a regular file"))
            continue
        offset = start + im.offset_data
        if offset + im.size > size:
            out.problems.append(
                (f"{base}/{name}", "truncated", "the archive file ends inside this member (interrupted download?)")
            )
            continue
        if im.offset_data + im.size > m.size:
            out.problems.append((f"{base}/{name}", DAMAGED_ARCHIVE, "member runs past the end of its per-class tar"))
            continue
        members.append(Member(name, offset, im.size))
    state = _end_state(f, start + inner.offset, min(size, start + m.size))
    if state == "damaged" or (state == "eof" and not cut):
        out.problems.append(
            (
                where,
                DAMAGED_ARCHIVE,
                f"unreadable tar header after {read} member(s); the members before it are converted",
            )
        )
    return members


def list_val_archive(path: str) -> ArchiveListing:
    """The flat members of the validation archive."""
    f, size = _check_outer(path)
    out = ArchiveListing(path, size)
    base = os.path.basename(path)
    try:
        try:
            tar = _open_tar(f, base)
        except _NotATar as exc:
            raise DataError(str(exc)) from None
        for m in _iter_members(tar):
            out.members_read += 1
            if m.isdir():
                continue
            if not m.isreg():
                out.problems.append((f"{base}/{m.name}", NOT_REGULAR, "tar member is not a regular file"))
                continue
            if m.offset_data + m.size > size:
                out.problems.append(
                    (
                        f"{base}/{m.name}",
                        "truncated",
                        "the archive file ends inside this member (interrupted download?)",
                    )
                )
                continue
            out.members.append(Member(m.name, m.offset_data, m.size))
        state = _end_state(f, tar.offset, size)
    finally:
        f.close()
    _close_outer(out, base, state, "members")
    return out


@dataclass(frozen=True)
class Devkit:
    leaf_wnids: list[str]  # in meta.mat row order
    id_to_wnid: dict[int, str]
    val_ids: list[int]  # line i-1: ILSVRC2012_ID of ILSVRC2012_val_{i:08d}.JPEG


def read_devkit(path: str) -> Devkit:
    """meta.mat (via scipy) and the validation ground truth, read from the devkit tar in memory."""
    import scipy.io

    wanted = {META_MAT: None, VAL_GROUND_TRUTH: None}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for m in tar:
                for suffix in wanted:
                    if m.isreg() and (m.name == suffix or m.name.endswith("/" + suffix)):
                        data = tar.extractfile(m)
                        assert data is not None  # a regular member has data
                        wanted[suffix] = data.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"devkit {path} cannot be read: {exc}") from None
    missing = [k for k, v in wanted.items() if v is None]
    if missing:
        raise DataError(f"devkit {path} lacks {', '.join(missing)}")
    try:
        synsets = scipy.io.loadmat(io.BytesIO(wanted[META_MAT]), squeeze_me=True)["synsets"]
        # torchvision's rule: only leaf synsets (no children) are classes.
        leaves = [row for row in synsets if int(row["num_children"]) == 0]
        id_to_wnid = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in leaves}
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise DataError(f"devkit {path}: {META_MAT} has no readable 'synsets' table ({exc})") from None
    try:
        val_ids = [int(line) for line in wanted[VAL_GROUND_TRUTH].decode("ascii").split()]
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"devkit {path}: {VAL_GROUND_TRUTH} is not one integer per line ({exc})") from None
    return Devkit([str(row["WNID"]) for row in leaves], id_to_wnid, val_ids)


def val_index(name: str) -> int | None:
    """1-based image number of an `ILSVRC2012_val_NNNNNNNN.JPEG` member name (any folder), else None."""
    match = VAL_NAME.fullmatch(posixpath.basename(name))
    return int(match.group(1)) if match else None
