"""The dataset converter: bad inputs, read-back through FFCV and DALI, crash/resume byte-identity,
--verify, and the image rules (colour modes, alpha, sizes)."""

from __future__ import annotations

import collections
import filecmp
import io
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pytest
from imagenet_layouts import files_under, stable_manifest
from PIL import Image

from pipelines.constants import beton_path
from pipelines.errors import DataError
from tools.convert import convert, main, verify
from tools.imageio import DEFAULT_MAX_PIXELS, SkipImage, encode_bytes, target_size
from tools.shards import parse_index, read_tar_samples
from tools.synthetic import make_dataset

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MAX_RES = 48
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ----------------------------------------------------------------------------------------------
# A source tree with every kind of bad input next to good images


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """Random colour blocks, a quarter of the shorter side wide: content that survives resizing."""
    rng = np.random.default_rng(seed)
    w, h = size
    b = max(2, min(w, h) // 4)
    base = np.kron(rng.integers(0, 255, size=(h // b + 1, w // b + 1, 3)), np.ones((b, b, 1)))[:h, :w]
    return Image.fromarray(base.astype(np.uint8), "RGB").convert(mode)


def build_bad_tree(root: str) -> dict[str, str]:
    """Synthetic good images plus one file per bad-input case; returns {path relative to root:
    expected outcome} for every file ("ok" or the skip reason code)."""
    make_dataset(root, train_per_class=5, val_per_class=2, size=64, num_classes=3, seed=1)
    expected = {}
    for split in ("train", "val"):
        for cls in sorted(os.listdir(os.path.join(root, split))):
            for name in os.listdir(os.path.join(root, split, cls)):
                expected[f"{split}/{cls}/{name}"] = "ok"
    c0 = "train/00_h_stripes"
    c1 = "train/01_v_stripes"
    real = _jpeg(_noise((200, 120), 7))

    def put(rel: str, data: bytes, outcome: str) -> None:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        expected[rel] = outcome

    put(f"{c0}/zero.JPEG", b"", "empty")
    put(f"{c0}/truncated.JPEG", real[: len(real) // 2], "truncated")
    put(f"{c0}/corrupt.JPEG", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt")
    put(f"{c0}/notes.JPEG", b"this is a text file, not an image\n", "not-an-image")
    # Other formats behind a .JPEG name are converted by content.
    rgba = _noise((40, 30), 3, "RGBA")
    alpha = np.zeros((30, 40), dtype=np.uint8)
    alpha[:, 20:] = 255  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    put(f"{c0}/png_alpha.JPEG", _saved(rgba, "PNG"), "ok")
    put(f"{c0}/gif_palette.JPEG", _saved(_noise((50, 40), 4).convert("P"), "GIF"), "ok")
    put(f"{c0}/tiff_cmyk.JPEG", _saved(_noise((30, 50), 5, "CMYK"), "TIFF"), "ok")
    put(f"{c1}/webp.JPEG", _saved(_noise((60, 60), 6), "WEBP", quality=90), "ok")
    put(f"{c1}/gray.JPEG", _jpeg(_noise((70, 50), 8, "L")), "ok")
    put(f"{c1}/cmyk.jpg", _jpeg(_noise((64, 48), 9, "CMYK")), "ok")
    put(f"{c1}/gray16.png", _saved(Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)), "PNG"), "ok")
    put(f"{c1}/large.JPEG", real, "ok")
    put(f"{c1}/tiny.JPEG", _jpeg(_noise((20, 12), 10)), "ok")
    put(f"{c1}/nested/deeper.JPEG", _jpeg(_noise((33, 33), 11)), "ok")  # ImageFolder recurses
    # Decompression bomb: 9600 x 9600 = 92 M pixels > Pillow's 89.5 M default, a few KB on disk.
    put(f"{c1}/bomb.png", _saved(Image.new("1", (9600, 9600)), "PNG", optimize=True), "too-many-pixels")
    put("train/README.txt", b"stray file outside the class folders\n", "outside-class-folder")
    os.mkfifo(os.path.join(root, c0, "fifo.JPEG"))
    expected[f"{c0}/fifo.JPEG"] = "not-a-regular-file"
    os.symlink("missing-target.JPEG", os.path.join(root, c0, "broken_link.JPEG"))
    expected[f"{c0}/broken_link.JPEG"] = "broken-symlink"
    # A symlink loop fails to open with ELOOP even for root: our "unreadable" case under root.
    os.symlink("loop.JPEG", os.path.join(root, c0, "loop.JPEG"))
    expected[f"{c0}/loop.JPEG"] = "unreadable"
    locked = f"{c1}/locked.JPEG"
    put(locked, _jpeg(_noise((30, 30), 12)), "ok" if IS_ROOT else "unreadable")
    os.chmod(os.path.join(root, locked), 0)
    # An empty class folder keeps its index; val has no folder for it.
    os.makedirs(os.path.join(root, "train", "03_empty"))
    return expected


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory) -> tuple[str, dict[str, str]]:
    root = str(tmp_path_factory.mktemp("bad_src"))
    return root, build_bad_tree(root)


@pytest.fixture(scope="module")
def bad_out(bad_tree, tmp_path_factory) -> tuple[str, dict]:
    src, _ = bad_tree
    out = str(tmp_path_factory.mktemp("bad_out") / "out")
    manifest = convert(src, out, max_res=MAX_RES, workers=2, shard_size=7, progress=False)
    return out, manifest


def _sources(out: str, split: str) -> list[tuple[int, str]]:
    with open(os.path.join(out, "sources", f"{split}.tsv")) as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    return [(int(r[1]), r[2]) for r in rows]


def _expected_order(out: str, manifest: dict, split: str) -> list[tuple[int, str]]:
    """(label, source path) of each output sample, in output order."""
    sources = _sources(out, split)
    return [sources[i] for i in manifest["splits"][split]["permutation"]]


def _tar_samples(out: str, manifest: dict, split: str) -> list[tuple[str, dict]]:
    samples = []
    for entry in manifest["formats"]["wds"][split]["files"]:
        samples.extend(read_tar_samples(os.path.join(out, entry["path"])))
    return samples


def _beton_jpegs(path: str) -> tuple[list[bytes], np.ndarray]:
    from ffcv.reader import Reader

    reader = Reader(path)
    image, labels = reader.metadata["f0"], reader.metadata["f1"]
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    with open(path, "rb") as f:
        data = []
        for ptr in image["data_ptr"].tolist():
            f.seek(ptr)
            data.append(f.read(sizes[ptr]))
    return data, np.asarray(labels)


def _reference(src_path: str) -> np.ndarray:
    """What the converter should store for a good source, decoded: RGB (alpha on white), capped size."""
    img = Image.open(src_path)
    img.load()
    if img.mode in ("RGBA", "LA", "P") and (img.mode != "P" or "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        img = bg
    elif img.mode.startswith("I"):
        img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).astype(np.uint8)).convert("RGB")
    else:
        img = img.convert("RGB")
    size = target_size(*img.size, MAX_RES)
    return np.asarray(img.resize(size, Image.Resampling.BOX), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_each_input_has_its_documented_outcome(bad_tree, bad_out):
    _, expected = bad_tree
    out, manifest = bad_out
    with open(os.path.join(out, "skipped.tsv")) as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    skipped = {path: reason for _, path, reason, _ in rows}
    assert skipped == {p: r for p, r in expected.items() if r != "ok"}
    assert all(detail for *_, detail in rows), "every skip carries a detail"
    converted = {path for split in manifest["splits"] for _, path in _expected_order(out, manifest, split)}
    assert converted == {p for p, r in expected.items() if r == "ok"}
    # Reconciliation: converted + skipped = files seen, per split and in total.
    for split, info in manifest["splits"].items():
        seen = sum(1 for p in expected if p.startswith(split + "/"))
        assert info["seen"] == seen
        assert info["count"] + info["skipped"] == seen
    assert manifest["converted"] + manifest["skipped"]["count"] == manifest["seen"] == len(expected)
    # The empty class keeps its index and is reported.
    assert manifest["classes"][3] == "03_empty"
    assert manifest["splits"]["train"]["class_counts"]["03_empty"] == 0
    assert any("03_empty" in w and "empty" in w for w in manifest["warnings"])
    assert any("03_empty" in w and "missing" in w for w in manifest["warnings"])  # val has no such folder


def test_class_indices_and_file_order_match_torchvision(bad_tree, bad_out):
    from torchvision.datasets import ImageFolder

    src, _ = bad_tree
    out, manifest = bad_out
    # Every file counts, whatever its name: ImageFolder with an accept-all filter lists the same.
    ref = ImageFolder(os.path.join(src, "train"), is_valid_file=lambda p: True, allow_empty=True)
    assert manifest["classes"] == ref.classes
    ours = [(os.path.join(src, path), label) for label, path in _sources(out, "train")]
    assert ours == [(p, y) for p, y in ref.samples]


def test_every_good_image_once_per_format_with_its_label(bad_tree, bad_out):
    src, _ = bad_tree
    out, manifest = bad_out
    for split in ("train", "val"):
        order = _expected_order(out, manifest, split)
        assert len(order) == manifest["splits"][split]["count"]
        labels = [label for label, _ in order]
        assert labels != sorted(labels), "samples are shuffled, not sorted by class"
        tar_samples = _tar_samples(out, manifest, split)
        assert len(tar_samples) == len(order)
        beton, beton_labels = _beton_jpegs(beton_path(out, split))
        assert beton_labels.tolist() == labels
        for (key, members), (label, path), beton_jpeg in zip(tar_samples, order, beton):
            assert set(members) == {"jpg", "cls", "label"}
            assert int(members["cls"][1]) == label
            assert np.frombuffer(members["label"][1], dtype="<i8").tolist() == [label]
            jpeg = members["jpg"][1]
            assert jpeg == beton_jpeg, "both formats store the same bytes"
            stored = Image.open(io.BytesIO(jpeg))
            assert stored.format == "JPEG" and stored.mode == "RGB"
            ref = _reference(os.path.join(src, path))
            got = np.asarray(stored, dtype=np.float32)
            assert got.shape == ref.shape
            assert np.abs(got - ref).mean() < 20, f"{path}: stored image does not match its source"


def test_image_rules_alpha_size_and_modes(bad_tree, bad_out):
    out, manifest = bad_out
    by_path = {path: i for i, (_, path) in enumerate(_expected_order(out, manifest, "train"))}
    samples = _tar_samples(out, manifest, "train")

    def stored(name: str) -> np.ndarray:
        _, members = samples[by_path[name]]
        return np.asarray(Image.open(io.BytesIO(members["jpg"][1])))

    png = stored("train/00_h_stripes/png_alpha.JPEG")
    assert png.shape == (30, 40, 3)
    assert png[:, :16].min() > 240, "transparent pixels are composited on white"
    assert stored("train/01_v_stripes/large.JPEG").shape == (29, 48, 3)  # 200x120 -> longer side 48
    assert stored("train/01_v_stripes/tiny.JPEG").shape == (12, 20, 3)  # never upscaled
    gray16 = stored("train/01_v_stripes/gray16.png")
    assert abs(float(gray16.mean()) - 40000 / 256) < 3


def test_strict_exit_code_and_rerun_is_a_no_op(bad_tree, bad_out):
    src, _ = bad_tree
    out, _ = bad_out
    before = os.stat(os.path.join(out, "manifest.json")).st_mtime_ns
    argv = [src, out, "--max-res", str(MAX_RES), "--shard-size", "7", "--workers", "2", "--no-progress"]
    assert main(argv + ["--strict"]) == 1
    assert main(argv) == 0
    assert os.stat(os.path.join(out, "manifest.json")).st_mtime_ns == before, "finished output is left alone"
    with pytest.raises(DataError, match="different conversion"):
        convert(src, out, max_res=MAX_RES, quality=80, shard_size=7, progress=False)
    with pytest.raises(DataError, match="strict"):
        convert(src, out, max_res=MAX_RES, workers=2, shard_size=7, progress=False, strict=True)


# ----------------------------------------------------------------------------------------------
# Read-back by the libraries the pipelines use


def test_ffcv_loader_reads_the_beton(bad_out):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    out, manifest = bad_out
    labels = [label for label, _ in _expected_order(out, manifest, "train")]
    loader = Loader(
        beton_path(out, "train"),
        batch_size=8,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={
            "image": [CenterCropRGBImageDecoder((24, 24), ratio=1.0)],
            "label": [IntDecoder()],
            "crc32": [IntDecoder()],
        },
    )
    got, pixels, checksums = [], [], []
    for images, batch_labels, batch_checksums in loader:
        assert images.shape[1:] == (24, 24, 3)
        got.extend(np.asarray(batch_labels).reshape(-1).tolist())
        checksums.extend(np.asarray(batch_checksums).reshape(-1).tolist())
        pixels.append(float(np.asarray(images).std()))
    assert got == labels
    assert min(pixels) > 5, "decoded images carry content"
    # The third field: each stored JPEG's CRC-32, as zlib computes it.
    assert checksums == [zlib.crc32(j) for j in _beton_jpegs(beton_path(out, "train"))[0]]


def test_dali_webdataset_reader_reads_the_shards(bad_out):
    from nvidia.dali import fn, pipeline_def, types

    out, manifest = bad_out
    files = manifest["formats"]["wds"]["train"]["files"]
    labels = [label for label, _ in _expected_order(out, manifest, "train")]

    @pipeline_def(batch_size=len(labels), num_threads=1, device_id=None)
    def wds_pipe():
        jpegs, lab = fn.readers.webdataset(
            paths=[os.path.join(out, f["path"]) for f in files],
            index_paths=[os.path.join(out, f["index"]) for f in files],
            ext=["jpg", "label"],
            dtypes=[types.UINT8, types.INT64],
            random_shuffle=False,
        )
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), lab

    pipe = wds_pipe()
    pipe.build()
    images, lab = pipe.run()
    assert [int(np.asarray(lab[i]).reshape(-1)[0]) for i in range(len(labels))] == labels
    assert all(max(np.asarray(images[i]).shape[:2]) <= MAX_RES for i in range(len(labels)))


@pytest.mark.parametrize("kind", ["ffcv", "dali", "torchvision"])
def test_project_pipelines_read_the_conversion(bad_out, kind):
    """The readers the trainer uses read a conversion with bad inputs: every converted sample, per
    class, in both splits (val lacks one class folder: the labels after it must not shift)."""
    import pipelines

    out, manifest = bad_out
    for split in ("train", "val"):
        info = manifest["splits"][split]
        pipe = pipelines.build_pipeline(
            kind, out, split=split, batch_size=5, img_size=32, device="cpu", train=False, num_workers=1
        )
        assert pipe.num_samples >= info["count"]  # val pads each rank to whole batches' worth of samples
        labels = []
        for images, batch_labels in pipe:
            assert images.shape[1:] == (3, 32, 32) and bool(images.isfinite().all())
            labels.extend(batch_labels.tolist())
        counts = collections.Counter(labels[: info["count"]])
        assert {c: counts.get(i, 0) for i, c in enumerate(manifest["classes"])} == info["class_counts"], split


def test_torchvision_pipeline_reads_exactly_the_converted_files(tmp_path):
    """The baseline reads the raw tree named by the manifest, minus the files in skipped.tsv."""
    import pipelines

    src = str(tmp_path / "src")
    make_dataset(src, train_per_class=3, val_per_class=0, size=32, num_classes=2, seed=4)
    bad_dir = os.path.join(src, "train", "00_h_stripes")
    open(os.path.join(bad_dir, "zero.JPEG"), "wb").close()
    with open(os.path.join(bad_dir, "notes.JPEG"), "wb") as f:
        f.write(b"not an image")
    os.mkfifo(os.path.join(bad_dir, "fifo.JPEG"))  # opening it would hang a reader
    out = str(tmp_path / "out")
    manifest = convert(src, out, formats=("wds",), workers=0, shard_size=4, progress=False)
    assert manifest["skipped"]["count"] == 3
    pipe = pipelines.build_pipeline(
        "torchvision", out, split="train", batch_size=2, img_size=32, device="cpu", train=False, num_workers=0
    )
    assert pipe.num_samples == 6
    labels = [y for _, batch in pipe for y in batch.tolist()]
    assert collections.Counter(labels) == {0: 3, 1: 3}


def test_index_files_equal_dalis_wds2idx(bad_out, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    out, manifest = bad_out
    for entry in manifest["formats"]["wds"]["train"]["files"]:
        theirs = str(tmp_path / "ref.idx")
        with wds2idx.IndexCreator(os.path.join(out, entry["path"]), theirs, verbose=False) as creator:
            creator.create_index()
        with open(theirs, "rb") as a, open(os.path.join(out, entry["index"]), "rb") as b:
            assert a.read() == b.read()
        with open(theirs) as f:
            assert len(parse_index(f.read())) == entry["count"]


# ----------------------------------------------------------------------------------------------
# --verify


def test_verify_passes_then_catches_tampering(bad_out, tmp_path):
    out, manifest = bad_out
    assert verify(out) == []
    assert main(["--verify", out, "--no-progress"]) == 0

    # A flipped byte inside one stored JPEG of a shard.
    bad = str(tmp_path / "tampered_jpeg")
    shutil.copytree(out, bad)
    first = manifest["formats"]["wds"]["train"]["files"][0]
    with open(os.path.join(bad, first["index"])) as f:
        idx = parse_index(f.read())
    offset, size = idx[0].members["jpg"]
    with open(os.path.join(bad, first["path"]), "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = verify(bad)
    assert any("differ" in p for p in problems), problems
    assert main(["--verify", bad, "--no-progress"]) == 1

    # A relabelled sample: .cls and .label rewritten consistently, so only the manifest can tell.
    relabel = str(tmp_path / "tampered_label")
    shutil.copytree(out, relabel)
    offset, _ = idx[0].members["label"]
    cls_offset, _ = idx[0].members["cls"]
    with open(os.path.join(relabel, first["path"]), "r+b") as f:
        f.seek(cls_offset)
        old = int(f.read(1))
        new = (old + 1) % 3
        f.seek(cls_offset)
        f.write(str(new).encode())
        f.seek(offset)
        f.write(np.array(new, dtype="<i8").tobytes())
    problems = verify(relabel)
    assert any("expected" in p and "label" in p for p in problems), problems

    # A truncated .beton and a missing shard.
    broken = str(tmp_path / "tampered_files")
    shutil.copytree(out, broken)
    with open(beton_path(broken, "val"), "r+b") as f:
        f.truncate(4096)
    os.remove(os.path.join(broken, manifest["formats"]["wds"]["train"]["files"][-1]["path"]))
    problems = verify(broken)
    assert any("val.beton" in p for p in problems), problems
    assert any("missing" in p for p in problems), problems


# ----------------------------------------------------------------------------------------------
# Crash safety: kill -9 at random points, rerun, compare with an uninterrupted run


def _group_exits(pgid: int, timeout: float) -> bool:
    """Wait for every process of group `pgid` to end; SIGKILL the rest (and say so) after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_byte_identical(tmp_path):
    src = str(tmp_path / "src")
    make_dataset(src, train_per_class=24, val_per_class=6, size=96, num_classes=5, seed=3)
    reference = str(tmp_path / "reference")
    convert(src, reference, max_res=64, shard_size=8, workers=0, progress=False)

    out = str(tmp_path / "out")
    cmd = [
        sys.executable,
        "-m",
        "supmae.cli",
        "convert",
        src,
        out,
        "--max-res",
        "64",
        "--shard-size",
        "8",
        "--workers",
        "2",
        "--no-progress",
    ]
    # The killed runs cut each chunk into pieces of 3 images (so chunks are stitched from several
    # pieces, by workers) with at most 3 tasks out; the last run resumes with the default pieces.
    killed_cmd = [
        sys.executable,
        "-c",
        (
            f"from tools.convert import convert; convert({src!r}, {out!r}, max_res=64, shard_size=8, workers=2, "
            "progress=False, piece_size=3, max_in_flight=3)"
        ),
    ]
    rng = random.Random(0)
    work = os.path.join(out, ".work")
    n_shards = -(-120 // 8) + -(-30 // 8)
    # Kill points: after a random number of finished chunks, twice (mid-encoding), once while
    # pieces of an unstitched chunk lie in .work, then while the .beton is being written (its
    # temporary exists). Each run pays the interpreter start-up, so four kills keep the test near
    # a minute.
    first = rng.randint(1, n_shards // 2)
    plans = [("chunks", first), ("pieces", None), ("chunks", rng.randint(first + 2, n_shards - 1)), ("beton", None)]
    kills = 0
    for kind, arg in plans:
        proc = subprocess.Popen(
            killed_cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 60:
            if kind == "chunks":
                done = (
                    sum(
                        len([n for n in names if n.endswith(".json") and ".tmp-" not in n])
                        for _, _, names in os.walk(work)
                    )
                    if os.path.isdir(work)
                    else 0
                )
                hit = done >= arg
            elif kind == "pieces":
                hit = os.path.isdir(work) and any(".piece-" in n for _, _, names in os.walk(work) for n in names)
            else:
                ffcv_dir = os.path.join(out, "ffcv")
                hit = os.path.isdir(ffcv_dir) and any(".tmp-" in n for n in os.listdir(ffcv_dir))
            if hit:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait()
        # Workers die with the converter (PDEATHSIG); multiprocessing's resource tracker removes
        # the FFCV writer's shared memory, then exits. Nothing of the run may linger.
        assert _group_exits(proc.pid, timeout=15), "processes of the killed run outlived it"
    assert kills == len(plans), "a run finished before it could be interrupted"
    final = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr

    ours, theirs = files_under(out), files_under(reference)
    assert sorted(ours) == sorted(theirs), "same files, no temporaries, no work state left"
    for rel in ours:
        if rel == "manifest.json":
            assert stable_manifest(ours[rel]) == stable_manifest(theirs[rel])
        else:
            assert filecmp.cmp(ours[rel], theirs[rel], shallow=False), f"{rel} differs"
    assert verify(out) == []


def test_real_imagenet_jpegs_convert_and_verify(imagenet_sample, tmp_path):
    """Real ImageNet files: every grayscale one, the largest and the smallest, plus a spread of
    others (linked into a small tree), convert without a skip and pass --verify."""
    train = os.path.join(imagenet_sample, "train")
    picked = {}
    for cls in sorted(os.listdir(train)):
        for name in sorted(os.listdir(os.path.join(train, cls))):
            path = os.path.join(train, cls, name)
            with Image.open(path) as img:
                picked[path] = (img.mode, img.size[0] * img.size[1])
    gray = [p for p, (mode, _) in picked.items() if mode == "L"]
    by_size = sorted(picked, key=lambda p: picked[p][1])
    chosen = sorted(set(gray) | {by_size[0], by_size[-1]} | set(sorted(picked)[::97]))
    src = tmp_path / "src" / "train"
    for path in chosen:
        cls = os.path.basename(os.path.dirname(path))
        (src / cls).mkdir(parents=True, exist_ok=True)
        os.symlink(path, src / cls / os.path.basename(path))
    out = str(tmp_path / "out")
    manifest = convert(str(tmp_path / "src"), out, max_res=96, workers=2, shard_size=16, progress=False)
    assert manifest["converted"] == len(chosen) and manifest["skipped"]["count"] == 0
    assert verify(out) == []
    for _, members in _tar_samples(out, manifest, "train"):
        img = Image.open(io.BytesIO(members["jpg"][1]))
        assert img.mode == "RGB" and max(img.size) <= 96


# ----------------------------------------------------------------------------------------------
# Unit rules of the image step


def test_encode_rules_on_bytes():
    big = _jpeg(_noise((1000, 600), 1))
    enc = encode_bytes(big, max_res=100, quality=90)
    assert (enc.width, enc.height) == (100, 60)
    again = encode_bytes(big, max_res=100, quality=90)
    assert enc.jpeg == again.jpeg, "deterministic bytes"
    # A restart marker after every MCU row (16 px at 4:2:0): DRI gives the interval of one row
    # (ceil(100 / 16) = 7 MCUs) and the 60 px image's 4 MCU rows are 3 markers apart, RST0..RST2:
    # what the ffcv pipeline's crop decoder cuts at.
    dri = enc.jpeg.index(b"\xff\xdd")
    assert enc.jpeg[dri + 4 : dri + 6] == (7).to_bytes(2, "big")
    assert [enc.jpeg.count(bytes([0xFF, 0xD0 + k])) for k in range(4)] == [1, 1, 1, 0]
    from tools.imageio import restart_markers_written

    assert restart_markers_written()  # what the manifest's encoding records
    # The reduced-scale decode keeps the image close to a full decode + resize.
    full = np.asarray(
        Image.open(io.BytesIO(big)).convert("RGB").resize((100, 60), Image.Resampling.BICUBIC), np.float32
    )
    assert np.abs(np.asarray(Image.open(io.BytesIO(enc.jpeg)), np.float32) - full).mean() < 8
    with pytest.raises(SkipImage) as info:
        encode_bytes(_saved(Image.new("L", (300, 300)), "PNG"), max_res=64, quality=90, max_pixels=300 * 300 - 1)
    assert info.value.code == "too-many-pixels"
    assert target_size(300, 300, 512) == (300, 300)
    assert target_size(301, 100, 300) == (300, 100)
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS, "the guard follows Pillow's default"


def test_bad_arguments_are_user_errors(tmp_path, synthetic_root):
    with pytest.raises(DataError, match="formats"):
        convert(synthetic_root, str(tmp_path / "o1"), formats=("ffcv", "tfrecord"), progress=False)
    with pytest.raises(DataError, match="max-res"):
        convert(synthetic_root, str(tmp_path / "o2"), max_res=0, progress=False)
    with pytest.raises(DataError, match="splits"):
        convert(synthetic_root, str(tmp_path / "o3"), splits=["test"], progress=False)
    with pytest.raises(DataError, match="does not exist"):
        convert(str(tmp_path / "nowhere"), str(tmp_path / "o4"), progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        convert(synthetic_root, str(tmp_path / "full"), progress=False)
    with pytest.raises(DataError, match="inside the source"):
        convert(synthetic_root, os.path.join(synthetic_root, "out"), progress=False)


def test_single_split_folder_becomes_train_and_wds_only(tmp_path):
    src = str(tmp_path / "flat")
    make_dataset(src, train_per_class=3, val_per_class=0, size=32, num_classes=2, seed=5)
    flat = os.path.join(src, "train")
    out = str(tmp_path / "out")
    manifest = convert(flat, out, formats=("wds",), workers=0, shard_size=4, progress=False)
    assert list(manifest["splits"]) == ["train"]
    assert manifest["splits"]["train"]["count"] == 6
    assert set(manifest["formats"]) == {"wds"}
    assert not os.path.exists(os.path.join(out, "ffcv")) and not os.path.exists(os.path.join(out, ".work"))
    keys = [
        k
        for e in manifest["formats"]["wds"]["train"]["files"]
        for k, _ in read_tar_samples(os.path.join(out, e["path"]))
    ]
    assert keys == sorted(keys) and len(set(keys)) == 6
    assert verify(out) == []
    counts = collections.Counter(label for label, _ in _expected_order(out, manifest, "train"))
    assert counts == {0: 3, 1: 3}
    with tarfile.open(os.path.join(out, manifest["formats"]["wds"]["train"]["files"][0]["path"])) as tar:
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())

    # FFCV alone: the chunks live in .work/ until the .beton is assembled, then go.
    only_ffcv = str(tmp_path / "only_ffcv")
    manifest = convert(flat, only_ffcv, formats=("ffcv",), workers=0, shard_size=4, progress=False)
    assert set(manifest["formats"]) == {"ffcv"}
    assert sorted(os.listdir(only_ffcv)) == ["classes.json", "ffcv", "manifest.json", "skipped.tsv", "sources"]
    assert verify(only_ffcv) == []


def test_bench_convert_runs_every_tool_on_the_same_images(tmp_path, capsys):
    from benchmarks.convert_bench import main as bench_main

    src = str(tmp_path / "src")
    make_dataset(src, train_per_class=4, val_per_class=0, size=48, num_classes=5, seed=2)
    report = str(tmp_path / "bench.json")
    assert bench_main(["--src", src, "--max-res", "32", "--workers", "1", "--archives", "--json", report]) == 0
    with open(report) as f:
        result = json.load(f)
    rows = result["rows"]
    assert [r["tool"] for r in rows] == [
        "supmae convert",
        "ffcv DatasetWriter (jpg)",
        "ffcv DatasetWriter (raw)",
        "supmae convert (train archive)",
    ]
    assert all(r["images"] == 20 and r["seconds"] > 0 and r["bytes"]["ffcv"] > 0 for r in rows)
    assert rows[0]["bytes"]["wds"] > 0 and rows[0]["bytes"] == rows[3]["bytes"]
    assert len(result["projections"]) == 2 * 4 and all(p["minutes"] > 0 for p in result["projections"])
    assert result["ours_over_ffcv_jpg"][0]["workers"] == 1
    out = capsys.readouterr().out
    assert "| supmae convert | ffcv + wds | 32 | 1 | 20 |" in out and "Projected wall time" in out


# ----------------------------------------------------------------------------------------------
# Parallel writing: bounded in-flight work, pieces and in-place .beton equal to the references


def _touch(path: str) -> str:
    """A pool task with a visible side effect: the file it leaves is its finished work."""
    open(path, "wb").close()
    return path


def test_ordered_pool_keeps_work_ahead_of_a_slow_consumer_within_its_bound(tmp_path):
    from tools.parallel_write import OrderedPool

    # As many workers as the bound: every task in flight is running or done, none queued.
    bound, n = 2, 24
    done_dir = tmp_path / "done"
    done_dir.mkdir()
    consumed, ahead = [], []
    with OrderedPool(bound, max_in_flight=bound) as pool:
        submitted = 0
        while len(consumed) < n:
            while submitted < n and pool.has_room():
                pool.submit(_touch, str(done_dir / f"{submitted:03d}"), tag=submitted)
                submitted += 1
            if not pool.has_room():
                with pytest.raises(RuntimeError, match="in flight"):
                    pool.submit(_touch, str(tmp_path / "one-too-many"))
            # A slow writer: the workers get time to finish everything they were handed. Finished
            # and not yet taken back is what a parent would be holding.
            time.sleep(0.05)
            ahead.append(len(os.listdir(done_dir)) - len(consumed))
            tag, path = pool.next()
            assert path == str(done_dir / f"{tag:03d}")
            consumed.append(tag)
        assert pool.peak_in_flight == bound
    assert consumed == list(range(n)), "results come back in submission order"
    assert max(ahead) <= bound, f"workers ran {max(ahead)} tasks ahead of the consumer, bound {bound}"
    assert ahead.count(bound) >= n // 2, "the bound, not the workers' speed, held them back"


def test_conversion_bound_and_piece_size_change_nothing_but_the_work_in_flight(tmp_path):
    from tools.parallel_write import RunStats

    src = str(tmp_path / "src")
    make_dataset(src, train_per_class=7, val_per_class=2, size=48, num_classes=3, seed=6)
    os.makedirs(os.path.join(src, "train", "00_h_stripes", "sub"))
    with open(os.path.join(src, "train", "00_h_stripes", "sub", "bad.JPEG"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 cut short")
    reference = str(tmp_path / "reference")
    convert(src, reference, max_res=32, shard_size=5, workers=0, progress=False)
    for workers, bound, piece in ((2, 2, 1), (2, 5, 2), (1, 1, 3)):
        out = str(tmp_path / f"out-{workers}-{bound}-{piece}")
        stats = RunStats()
        manifest = convert(
            src, out, max_res=32, shard_size=5, workers=workers, progress=False,
            max_in_flight=bound, piece_size=piece, stats=stats,
        )  # fmt: skip
        assert manifest["skipped"]["by_reason"] == {"corrupt": 1}
        assert stats.max_in_flight == bound and stats.peak_in_flight == bound
        assert 0 < stats.main_busy_seconds <= stats.elapsed_seconds
        ours, theirs = files_under(out), files_under(reference)
        assert sorted(ours) == sorted(theirs)
        for rel in ours:
            if rel == "manifest.json":
                assert stable_manifest(ours[rel]) == stable_manifest(theirs[rel])
            else:
                assert filecmp.cmp(ours[rel], theirs[rel], shallow=False), f"{rel} differs"
    with pytest.raises(DataError, match="max_in_flight"):
        convert(src, str(tmp_path / "bad"), workers=1, max_in_flight=0, progress=False)


def test_pieces_concatenate_into_the_reference_shard():
    from tools.shards import ShardSample, build_shard, member_bytes, shard_index, tar_end

    rng = np.random.default_rng(0)
    # Sizes on and around tar's 512-byte blocks, labels of one to four digits.
    sizes = [1, 511, 512, 513, 1024, 3000, 70_000] + rng.integers(100, 5000, size=13).tolist()
    samples = [
        ShardSample(f"{i:08d}", rng.integers(0, 256, size=s, dtype=np.uint8).tobytes(), int(label))
        for i, (s, label) in enumerate(zip(sizes, rng.choice([0, 7, 42, 999, 1000], size=len(sizes))))
    ]
    ref = build_shard(samples)
    for cut in ([], [1], [3, 4, 12], list(range(1, len(samples)))):
        bounds = [0, *cut, len(samples)]
        pieces = [
            b"".join(member_bytes(s.key, s.jpeg, s.label) for s in samples[a:b]) for a, b in itertools.pairwise(bounds)
        ]
        body = b"".join(pieces)
        assert body + tar_end(len(body)) == ref.tar
    index, offsets = shard_index([s.key for s in samples], [len(s.jpeg) for s in samples], [s.label for s in samples])
    assert index == ref.index and offsets == ref.jpeg_offsets


def _random_slices(tmp_path, sizes: list[int], seed: int):
    """A JpegSlices over random bytes of the given sizes, spread over two files (the writers copy
    bytes; they never decode)."""
    from tools.beton import JpegSlices

    rng = np.random.default_rng(seed)
    files, file_ids, offsets = [], [], []
    for f in range(2):
        path = str(tmp_path / f"src{f}.bin")
        mine = sizes[f::2]
        with open(path, "wb") as fh:
            at = 0
            for s in mine:
                fh.write(rng.integers(0, 256, size=s + 3, dtype=np.uint8).tobytes())  # 3 bytes of gap
                offsets.append((f, at))
                at += s + 3
        files.append(path)
    order = sorted(range(len(sizes)), key=lambda i: (i % 2, i))  # file 0's samples, then file 1's
    file_ids = np.asarray([offsets[order.index(i)][0] for i in range(len(sizes))], dtype=np.int64)
    offs = np.asarray([offsets[order.index(i)][1] for i in range(len(sizes))], dtype=np.int64)
    n = len(sizes)
    return JpegSlices(
        files, file_ids, offs, np.asarray(sizes, dtype=np.int64),
        rng.integers(1, 300, size=n), rng.integers(1, 300, size=n), rng.integers(0, 1000, size=n),
        rng.integers(0, 1 << 32, size=n),
    )  # fmt: skip


@pytest.mark.parametrize(
    "sizes, exact_page_ends",
    [
        ([5000], 0),
        # Many samples, pages filling up (2 MiB pages), samples ending exactly on a page's end (the
        # third fills page 0 to its last byte, the fifth page 1: 4 such ends in all), samples that
        # do not fit a page's rest opening the next one.
        ([700_000, 700_000, (2 << 20) - 1_400_000, 900_000, (2 << 20) - 900_000, 1_200_000, 1_100_000] * 3, 4),
        # A sample bigger than the smallest page: the page grows.
        ([100_000, (2 << 20) + 1, 50_000, 3_000_000], 0),
    ],
    ids=["one", "page-breaks", "grown-page"],
)
def test_in_place_beton_equals_ffcvs_one_worker_writer(tmp_path, sizes, exact_page_ends):
    from tools.beton import plan_beton, read_jpeg_table, write_beton, write_beton_in_place
    from tools.parallel_write import OrderedPool

    assert all(s > 0 for s in sizes), "every case is tested as written"
    dataset = _random_slices(tmp_path, sizes, seed=len(sizes))
    ref = str(tmp_path / "ref.beton")
    write_beton(ref, dataset, max_resolution=300, jpeg_quality=90)
    plan = plan_beton(dataset, max_resolution=300, jpeg_quality=90)
    ends = plan.ptrs - plan.ptrs[0] + np.asarray(sizes)  # from the start of the data region
    assert int((ends % plan.page_size == 0).sum()) == exact_page_ends
    with open(ref, "rb") as f:
        want = f.read()
    assert plan.file_size == len(want)
    in_process = str(tmp_path / "in_process.beton")
    write_beton_in_place(in_process, dataset, 300, 90, lambda fn, tasks: [fn(t) for t in tasks])
    pooled = str(tmp_path / "pooled.beton")
    with OrderedPool(2, max_in_flight=2) as pool:
        write_beton_in_place(pooled, dataset, 300, 90, pool.run_all, samples_per_task=2)
    for path in (in_process, pooled):
        with open(path, "rb") as f:
            assert f.read() == want
    table = read_jpeg_table(pooled)
    assert table["sizes"].tolist() == sizes and table["labels"].tolist() == dataset.labels.tolist()
    with open(pooled, "rb") as f:
        for i, (ptr, size) in enumerate(zip(table["offsets"].tolist(), table["sizes"].tolist())):
            f.seek(ptr)
            assert f.read(size) == dataset[i][0].data.tobytes()


# ----------------------------------------------------------------------------------------------
# Options: --strict recorded, --merge and --verify never ignore an output option


def test_strict_is_recorded_in_the_manifest(tmp_path):
    src = str(tmp_path / "src")
    make_dataset(src, train_per_class=2, val_per_class=0, size=32, num_classes=2, seed=8)
    open(os.path.join(src, "train", "00_h_stripes", "zero.JPEG"), "wb").close()
    for strict, code in ((True, 1), (False, 0)):
        out = str(tmp_path / f"out-{strict}")
        argv = [src, out, "--max-res", "32", "--workers", "0", "--no-progress"] + (["--strict"] if strict else [])
        assert main(argv) == code
        with open(os.path.join(out, "manifest.json")) as f:
            assert json.load(f)["options"]["strict"] is strict


def test_merge_checks_the_output_options_it_is_given_and_verify_refuses_them(tmp_path):
    src = str(tmp_path / "src")
    make_dataset(src, train_per_class=4, val_per_class=1, size=32, num_classes=2, seed=9)
    parts = [str(tmp_path / f"part{k}") for k in range(2)]
    for k, part in enumerate(parts):
        convert(src, part, max_res=32, shard_size=3, workers=0, progress=False, shard=(k, 2))
    given = [
        ("--max-res", "64", "256"),
        ("--quality", "80", "90"),
        ("--formats", "wds", "ffcv,wds"),
        ("--shard-size", "4", "1000"),
        ("--splits", "train", "train,val"),
        ("--seed", "1", "0"),
        ("--max-pixels", "1000", str(DEFAULT_MAX_PIXELS)),
    ]
    for flag, other, _ in given:
        target = str(tmp_path / f"merged{flag}")
        with pytest.raises(DataError, match=f"{flag} {other} differs from the parts'"):
            main(["--merge", *parts, target, flag, other, "--no-progress"])
        assert not os.path.exists(target), "refused before anything is written"
    # Default values that the parts do not use are refused too: the flag was given, so it is checked.
    with pytest.raises(DataError, match="--max-res 256 differs from the parts' 32"):
        main(["--merge", *parts, str(tmp_path / "m-default"), "--max-res", "256", "--no-progress"])
    merged = str(tmp_path / "merged")
    same = ["--max-res", "32", "--shard-size", "3", "--formats", "ffcv,wds", "--splits", "train,val", "--seed", "0"]
    assert main(["--merge", *parts, merged, *same, "--workers", "2", "--strict", "--no-progress"]) == 0
    with open(os.path.join(merged, "manifest.json")) as f:
        assert json.load(f)["options"]["strict"] is True
    assert verify(merged) == []
    for flag, other, _ in given + [("--shard", "0/2", None), ("--strict", None, None)]:
        with pytest.raises(DataError, match=f"{flag} does not apply"):
            main(["--verify", merged, flag, *([other] if other else []), "--no-progress"])
