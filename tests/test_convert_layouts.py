"""`supmae convert` from ImageNet as people download it: the official archives (read in place),
the Kaggle layout, and ImageFolder give the same dataset; bad archive members are reported;
kill -9 then resume is byte-identical; `--shard K/N` parts merge into the unsharded result.

The archives are built here from small JPEGs, with a devkit whose ILSVRC2012_ID order is not the
sorted-wnid order and which holds a non-leaf synset, as the real one does."""

from __future__ import annotations

import filecmp
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from tools.convert import convert, main, verify
from tools.shards import read_tar_samples

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
# Devkit row order (= ILSVRC2012_ID 1, 2, 3) differs from the sorted wnids; ID 4 is a non-leaf synset.
DEVKIT_WNIDS = ["n03000003", "n01000001", "n02000002"]
WNIDS = sorted(DEVKIT_WNIDS)


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.kron(rng.integers(0, 255, (size[1] // 5, size[0] // 5, 3)), np.ones((5, 5, 1))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _devkit(path: str, val_wnids: list[str]) -> None:
    import scipy.io

    rows = [(i + 1, w, f"class {w}", "gloss", 0) for i, w in enumerate(DEVKIT_WNIDS)]
    rows.append((len(rows) + 1, "n00000009", "a parent synset", "gloss", 2))  # not a class
    synsets = np.array(
        rows,
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")],
    )
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    ids = [DEVKIT_WNIDS.index(w) + 1 for w in val_wnids]
    truth = "".join(f"{i}\n" for i in ids).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("data/meta.mat", mat.getvalue()), ("data/ILSVRC2012_validation_ground_truth.txt", truth)):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _write(path, buf.getvalue())


def make_layouts(root: str, per_class: int = 4, val_per_class: int = 2) -> dict[str, str]:
    """The same images as an ImageFolder tree, the official archives and the Kaggle layout."""
    train = {w: [(f"{w}_{i}.JPEG", _jpeg(100 * c + i)) for i in range(per_class)] for c, w in enumerate(WNIDS)}
    # Validation images interleave the classes, as the real flat folder does.
    val_wnids = [WNIDS[(i * 2) % len(WNIDS)] for i in range(val_per_class * len(WNIDS))]
    val = [(f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(9000 + i), w) for i, w in enumerate(val_wnids)]
    folder, archives, kaggle = (os.path.join(root, n) for n in ("folder", "archives", "kaggle"))
    for w, files in train.items():
        for name, data in files:
            _write(os.path.join(folder, "train", w, name), data)
            _write(os.path.join(kaggle, "ILSVRC", "Data", "CLS-LOC", "train", w, name), data)
    for name, data, w in val:
        _write(os.path.join(folder, "val", w, name), data)
        _write(os.path.join(kaggle, "ILSVRC", "Data", "CLS-LOC", "val", name), data)
    _write(
        os.path.join(archives, TRAIN_TAR),
        _tar_bytes([(f"{w}.tar", _tar_bytes(files)) for w, files in reversed(list(train.items()))]),
    )
    _write(os.path.join(archives, VAL_TAR), _tar_bytes([(n, d) for n, d, _ in val]))
    _devkit(os.path.join(archives, DEVKIT), val_wnids)
    rows = [f"{n[:-5]},{w} 1 2 30 40 {w} 3 4 20 20 \n" for n, _, w in val]
    _write(os.path.join(kaggle, "LOC_val_solution.csv"), ("ImageId,PredictionString\n" + "".join(rows[::-1])).encode())
    _write(os.path.join(kaggle, "LOC_synset_mapping.txt"), "".join(f"{w} class {w}\n" for w in DEVKIT_WNIDS).encode())
    return {"folder": folder, "archives": archives, "kaggle": kaggle}


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _files(root: str) -> dict[str, str]:
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = path
    return found


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


def _same_outputs(a: str, b: str, skip=("manifest.json", "sources/train.tsv", "sources/val.tsv")) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        if rel not in skip:
            assert filecmp.cmp(fa[rel], fb[rel], shallow=False), f"{rel} differs"


def _samples(out: str, split: str) -> list[tuple[str, int, bytes]]:
    m = _json(os.path.join(out, "manifest.json"))
    rows = []
    for f in m["formats"]["wds"][split]["files"]:
        for key, members in read_tar_samples(os.path.join(out, f["path"])):
            rows.append((key, int(members["cls"][1]), members["jpg"][1]))
    return rows


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
        expected = _samples(outs["folder"], split)
        assert len(expected) == len(reference.samples)
        for name in ("archives", "kaggle"):
            assert _samples(outs[name], split) == expected, name
    for name in ("archives", "kaggle"):
        _same_outputs(outs["folder"], outs[name])  # .beton and shards byte for byte
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
    good = {w: [(f"{w}_{i}.JPEG", _jpeg(i + 10 * c)) for i in range(3)] for c, w in enumerate(WNIDS)}
    real = _jpeg(77, (80, 60))
    good[WNIDS[0]] += [("broken.JPEG", real[: len(real) // 2]), ("README.txt", b"not an image\n")]
    damaged = _damage_header(_tar_bytes(good[WNIDS[2]]), 1)  # first member readable, then garbage
    members = [(f"{w}.tar", _tar_bytes(good[w])) for w in WNIDS[:2]] + [(f"{WNIDS[2]}.tar", damaged)]
    _write(os.path.join(src, TRAIN_TAR), _tar_bytes(members + [("stray.txt", b"x")]))
    val_wnids = [WNIDS[0], WNIDS[1], WNIDS[2], WNIDS[0]]
    # Images 1, 2, 4 and 5: image 3 has a ground-truth line but no image, image 5 no line.
    val = [(f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(500 + i)) for i in (1, 2, 4, 5)]
    _write(os.path.join(src, VAL_TAR), _tar_bytes(val))
    _devkit(os.path.join(src, DEVKIT), val_wnids)

    out = str(tmp_path / "out")
    assert main([src, out, "--max-res", "32", "--workers", "0", "--shard-size", "4", "--strict", "--no-progress"]) == 1
    m = _json(os.path.join(out, "manifest.json"))
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
    classes = {w: [(f"{w}_{i}.JPEG", _jpeg(i + 10 * c, (60, 60))) for i in range(4)] for c, w in enumerate(WNIDS)}
    whole = _tar_bytes([(f"{w}.tar", _tar_bytes(f)) for w, f in classes.items()])
    with tarfile.open(fileobj=io.BytesIO(whole)) as t:
        third = t.getmembers()[2]
    with tarfile.open(fileobj=io.BytesIO(whole[third.offset_data :])) as inner:
        second = inner.getmembers()[1]
    cut = third.offset_data + second.offset_data + second.size // 2  # inside the 2nd image of class 3
    _write(os.path.join(src, TRAIN_TAR), whole[:cut])
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
    _write(os.path.join(src, VAL_TAR), _tar_bytes([("ILSVRC2012_val_00000001.JPEG", _jpeg(1))]))
    with pytest.raises(DataError, match="devkit"):
        convert(src, str(tmp_path / "a"), workers=0, progress=False)
    _write(os.path.join(src, TRAIN_TAR), b"\x1f\x8b" + bytes(100))
    with pytest.raises(DataError, match="compressed"):
        convert(src, str(tmp_path / "b"), splits=["train"], workers=0, progress=False)


def test_sharded_parts_merge_into_the_unsharded_conversion(layouts, tmp_path):
    src = layouts["archives"]
    whole = str(tmp_path / "whole")
    convert(src, whole, max_res=32, workers=0, shard_size=3, progress=False)
    parts = [str(tmp_path / f"part{k}") for k in range(2)]
    for k, part in enumerate(parts):
        convert(src, part, max_res=32, workers=0, shard_size=3, progress=False, shard=(k, 2))
        assert _json(os.path.join(part, "manifest.json"))["part"] == {"index": k, "count": 2}
    merged = str(tmp_path / "merged")
    assert main(["--merge", *reversed(parts), merged, "--no-progress"]) == 0
    fa, fb = _files(whole), _files(merged)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        if rel == "manifest.json":
            a, b = (_json(p) for p in (fa[rel], fb[rel]))
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


def kill_after_chunks(cmd: list[str], out: str, chunks: int = 3) -> None:
    """Start the conversion `cmd` writing to `out` and SIGKILL it once `chunks` train chunks are
    recorded as done (mid-run, with work in flight)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = os.path.join(out, ".work", "train")
    killed = False
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < 60:
        if os.path.isdir(work) and sum(n.endswith(".json") and ".tmp-" not in n for n in os.listdir(work)) >= chunks:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed, "the run finished before it could be interrupted"


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
    fa, fb = _files(out), _files(reference)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        if rel != "manifest.json":
            assert filecmp.cmp(fa[rel], fb[rel], shallow=False), f"{rel} differs"


def test_beton_jpeg_mode_is_ffcvs():
    from ffcv.fields.rgb_image import IMAGE_MODES

    from tools.beton import JPEG_MODE

    assert IMAGE_MODES["jpg"] == JPEG_MODE
