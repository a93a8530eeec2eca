"""`supmae convert` from ImageNet as people download it: the official archives (read in place),
the Kaggle layout, and ImageFolder give the same dataset; bad archive members are reported;
kill -9 then resume is byte-identical; `--shard K/N` parts merge into the unsharded result.

The archives are built (`imagenet_layouts.py`) from small JPEGs, with a devkit whose ILSVRC2012_ID order is not the
sorted-wnid order and which holds a non-leaf synset, as the real one does."""

from __future__ import annotations

import filecmp
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from imagenet_layouts import (
    DEVKIT,
    TRAIN_TAR,
    VAL_TAR,
    WNIDS,
    files_under,
    jpeg_bytes,
    kill_after_chunks,
    make_layouts,
    read_json,
    same_outputs,
    tar_bytes,
    wds_samples,
    write_devkit,
    write_file,
)
from procs import REPO

from tools.convert import convert, main, verify


def _stable(path: str) -> dict:
    with open(path) as f:
        m = json.load(f)
    for key in ("elapsed_seconds", "encode_seconds", "resumed_chunks", "encoded_this_run", "source_root"):
        m.pop(key)
    m["options"].pop("workers")
    for key in ("source_root", "layout"):
        m["identity"].pop(key)
    for key in ("layout", "archives", "listing_fingerprint"):
        m.pop(key)
    return m


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, str]:
    return make_layouts(str(tmp_path_factory.mktemp("layouts")))


@pytest.mark.slow
def test_every_layout_gives_the_imagefolder_dataset(layouts, tmp_path):
    from torchvision.datasets import ImageFolder

    outs = {}
    for name, src in layouts.items():
        outs[name] = str(tmp_path / name)
        m = convert(src, outs[name], max_res=32, workers=0, shard_size=5, progress=False)
        assert m["layout"] == {"folder": "imagefolder"}.get(name, name)
        assert m["classes"] == WNIDS and m["skipped"]["count"] == 0
    for split in ("train", "val"):
        # Labels and order are torchvision's: its ImageFolder over the extracted tree.
        reference = ImageFolder(os.path.join(layouts["folder"], split))
        assert reference.classes == WNIDS
        for name, out in outs.items():
            with open(os.path.join(out, "sources", f"{split}.tsv")) as f:
                rows = [line.rstrip("\n").split("\t") for line in f][1:]
            assert [(os.path.basename(p), int(lab)) for _, lab, p in rows] == [
                (os.path.basename(p), lab) for p, lab in reference.samples
            ], name
        expected = wds_samples(outs["folder"], split)
        assert len(expected) == len(reference.samples)
        for name in ("archives", "kaggle"):
            assert wds_samples(outs[name], split) == expected, name
    for name in ("archives", "kaggle"):
        same_outputs(outs["folder"], outs[name])  # .beton and shards byte for byte
        assert (
            _stable(os.path.join(outs[name], "manifest.json"))["splits"]["val"]["permutation"]
            == _stable(os.path.join(outs["folder"], "manifest.json"))["splits"]["val"]["permutation"]
        )
    assert verify(outs["archives"]) == []


def _damage_header(tar: bytes, member: int) -> bytes:
    """The tar with the header of its `member`-th member (0-based) overwritten: bad checksum."""
    offsets, pos = [], 0
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t:
            offsets.append(m.offset)
            pos = m.offset
    del pos
    raw = bytearray(tar)
    raw[offsets[member] + 100 : offsets[member] + 108] = b"garbage!"
    return bytes(raw)


def test_bad_archive_members_are_reported_and_counted(tmp_path, capsys):
    src = str(tmp_path / "src")
    good = {w: [(f"{w}_{i}.JPEG", jpeg_bytes(i + 10 * c)) for i in range(3)] for c, w in enumerate(WNIDS)}
    real = jpeg_bytes(77, (80, 60))
    good[WNIDS[0]] += [("broken.JPEG", real[: len(real) // 2]), ("README.txt", b"not an image\n")]
    damaged = _damage_header(tar_bytes(good[WNIDS[2]]), 1)  # first member readable, then garbage
    members = [(f"{w}.tar", tar_bytes(good[w])) for w in WNIDS[:2]] + [(f"{WNIDS[2]}.tar", damaged)]
    write_file(os.path.join(src, TRAIN_TAR), tar_bytes(members + [("stray.txt", b"x")]))
    val_wnids = [WNIDS[0], WNIDS[1], WNIDS[2], WNIDS[0]]
    # Images 1, 2, 4 and 5: image 3 has a ground-truth line but no image, image 5 no line.
    val = [(f"ILSVRC2012_val_{i:08d}.JPEG", jpeg_bytes(500 + i)) for i in (1, 2, 4, 5)]
    write_file(os.path.join(src, VAL_TAR), tar_bytes(val))
    write_devkit(os.path.join(src, DEVKIT), val_wnids)

    out = str(tmp_path / "out")
    assert main([src, out, "--max-res", "32", "--workers", "0", "--shard-size", "4", "--strict", "--no-progress"]) == 1
    m = read_json(os.path.join(out, "manifest.json"))
    with open(os.path.join(out, "skipped.tsv")) as f:
        rows = {(r[0], r[1]): r[2] for r in (line.rstrip("\n").split("\t") for line in f) if r[0] != "split"}
    assert rows == {
        ("train", f"{TRAIN_TAR}/{WNIDS[0]}.tar/broken.JPEG"): "truncated",
        ("train", f"{TRAIN_TAR}/{WNIDS[0]}.tar/README.txt"): "not-an-image",
        ("train", f"{TRAIN_TAR}/{WNIDS[2]}.tar"): "damaged-archive",
        ("train", f"{TRAIN_TAR}/stray.txt"): "outside-class-folder",
        ("val", f"{VAL_TAR}/ILSVRC2012_val_00000005.JPEG"): "no-label",
        ("val", f"{VAL_TAR}/ILSVRC2012_val_00000003.JPEG"): "missing-image",
    }
    assert m["splits"]["train"]["count"] == 3 + 3 + 1  # the damaged tar's first member is kept
    assert m["splits"]["val"]["count"] == 3
    assert m["converted"] + m["skipped"]["count"] == m["seen"] == 7 + 4 + 3 + 2
    assert m["splits"]["val"]["class_counts"] == {WNIDS[0]: 2, WNIDS[1]: 1, WNIDS[2]: 0}  # image 3 missing
    assert verify(out) == []


def test_truncated_outer_archive_converts_everything_before_the_cut(tmp_path):
    src = str(tmp_path / "src")
    classes = {w: [(f"{w}_{i}.JPEG", jpeg_bytes(i + 10 * c, (60, 60))) for i in range(4)] for c, w in enumerate(WNIDS)}
    whole = tar_bytes([(f"{w}.tar", tar_bytes(f)) for w, f in classes.items()])
    with tarfile.open(fileobj=io.BytesIO(whole)) as t:
        third = t.getmembers()[2]
    with tarfile.open(fileobj=io.BytesIO(whole[third.offset_data :])) as inner:
        second = inner.getmembers()[1]
    cut = third.offset_data + second.offset_data + second.size // 2  # inside the 2nd image of class 3
    write_file(os.path.join(src, TRAIN_TAR), whole[:cut])
    out = str(tmp_path / "out")
    m = convert(src, out, max_res=32, workers=0, progress=False)
    assert m["splits"]["train"]["count"] == 4 + 4 + 1
    assert m["archives"][TRAIN_TAR]["truncated"] and m["archives"][TRAIN_TAR]["members_read"] == 3
    assert any("truncated" in w and "3 per-class tars read" in w for w in m["warnings"])
    assert m["skipped"]["by_reason"] == {"truncated": 1, "truncated-archive": 1}
    assert m["converted"] + m["skipped"]["count"] == m["seen"]
    assert main([src, str(tmp_path / "strict"), "--workers", "0", "--strict", "--no-progress"]) == 1


def test_compressed_or_missing_devkit_is_a_user_error(tmp_path):
    from pipelines.errors import DataError

    src = str(tmp_path / "src")
    write_file(os.path.join(src, VAL_TAR), tar_bytes([("ILSVRC2012_val_00000001.JPEG", jpeg_bytes(1))]))
    with pytest.raises(DataError, match="devkit"):
        convert(src, str(tmp_path / "a"), workers=0, progress=False)
    write_file(os.path.join(src, TRAIN_TAR), b"\x1f\x8b" + bytes(100))
    with pytest.raises(DataError, match="compressed"):
        convert(src, str(tmp_path / "b"), splits=["train"], workers=0, progress=False)


def test_sharded_parts_merge_into_the_unsharded_conversion(layouts, tmp_path):
    src = layouts["archives"]
    whole = str(tmp_path / "whole")
    convert(src, whole, max_res=32, workers=0, shard_size=3, progress=False)
    parts = [str(tmp_path / f"part{k}") for k in range(2)]
    for k, part in enumerate(parts):
        convert(src, part, max_res=32, workers=0, shard_size=3, progress=False, shard=(k, 2))
        assert read_json(os.path.join(part, "manifest.json"))["part"] == {"index": k, "count": 2}
    merged = str(tmp_path / "merged")
    assert main(["--merge", *reversed(parts), merged, "--no-progress"]) == 0
    fa, fb = files_under(whole), files_under(merged)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        if rel == "manifest.json":
            a, b = (read_json(p) for p in (fa[rel], fb[rel]))
            for d in (a, b):
                for key in ("elapsed_seconds", "encode_seconds", "resumed_chunks", "encoded_this_run"):
                    d.pop(key)
                d["options"].pop("workers")
            assert a == b
        else:
            assert filecmp.cmp(fa[rel], fb[rel], shallow=False), f"{rel} differs"
    assert verify(merged) == []
    with pytest.raises(Exception, match="missing"):
        main(["--merge", parts[0], str(tmp_path / "incomplete"), "--no-progress"])


@pytest.mark.slow
def test_kill_9_during_an_archive_conversion_then_resume_is_byte_identical(tmp_path):
    src = make_layouts(str(tmp_path / "src"), per_class=16, val_per_class=2)["archives"]
    reference = str(tmp_path / "reference")
    convert(src, reference, max_res=32, shard_size=4, workers=0, progress=False)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "supmae.cli", "convert", src, out, "--max-res", "32", "--shard-size", "4"]
    cmd += ["--workers", "2", "--no-progress"]
    kill_after_chunks(cmd, out)
    final = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    fa, fb = files_under(out), files_under(reference)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        if rel != "manifest.json":
            assert filecmp.cmp(fa[rel], fb[rel], shallow=False), f"{rel} differs"


def test_beton_jpeg_mode_is_ffcvs():
    from ffcv.fields.rgb_image import IMAGE_MODES

    from tools.beton import JPEG_MODE

    assert IMAGE_MODES["jpg"] == JPEG_MODE
