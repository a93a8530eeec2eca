"""The hub layouts as input: the Hugging Face `imagenet-1k` parquet files and `imagenet-1k-wds`
tars, generated here from the same images as an ImageFolder tree. Same images, same output bytes;
labels equal torchvision's ImageFolder; bad rows, mismatched labels, truncated files reported and
counted with nothing else lost; --shard K/N + --merge and kill -9 + resume as for the other layouts."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from imagenet_layouts import (
    WNIDS,
    files_under,
    jpeg_bytes,
    kill_after_chunks,
    make_layouts,
    same_outputs,
    tar_bytes,
    wds_samples,
)
from procs import REPO

from pipelines.errors import DataError
from supmae.cli import main as cli_main
from tools.convert import convert, main, verify

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def folder_images(folder: str, split: str) -> list[tuple[str, int, bytes]]:
    """(file name, label, bytes) of a split of the ImageFolder tree, in a scrambled order (the hub
    files are not sorted by class)."""
    out = []
    for label, wnid in enumerate(WNIDS):
        d = os.path.join(folder, split, wnid)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                out.append((name, label, f.read()))
    return out[1::2] + out[::2]


def write_parquet(path: str, rows: list[tuple[str | None, int | None, bytes | None]], row_group_size: int = 3) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images = pa.array([{"bytes": b, "path": n} for n, _, b in rows], type=IMAGE_TYPE)
    table = pa.table({"image": images, "label": pa.array([lab for _, lab, _ in rows], type=pa.int64())})
    pq.write_table(table, path, row_group_size=row_group_size)


def make_parquet(folder: str, root: str) -> str:
    """The tree as `data/{train,validation,test}-NNNNN-of-NNNNN.parquet` (train over two files)."""
    train = folder_images(folder, "train")
    half = len(train) // 2
    write_parquet(os.path.join(root, "data", "train-00000-of-00002.parquet"), train[:half])
    write_parquet(os.path.join(root, "data", "train-00001-of-00002.parquet"), train[half:])
    write_parquet(os.path.join(root, "data", "validation-00000-of-00001.parquet"), folder_images(folder, "val"))
    write_parquet(os.path.join(root, "data", "test-00000-of-00001.parquet"), [("test_1.JPEG", -1, jpeg_bytes(5))])
    return root


def wds_members(images: list[tuple[str, int, bytes]], with_json: bool) -> list[tuple[str, bytes]]:
    members = []
    for i, (name, label, data) in enumerate(images):
        key = name.rsplit(".", 1)[0]
        members.append((f"{key}.cls", str(label).encode()))
        members.append((f"{key}.jpg", data))
        if with_json and i % 2 == 0:
            members.append((f"{key}.json", json.dumps({"filename": name, "label": label}).encode()))
    return members


def make_wds(folder: str, root: str) -> str:
    """The tree as `imagenet1k-{train,validation}-NNNN.tar` (train over two tars, some .json)."""
    os.makedirs(root, exist_ok=True)
    train = folder_images(folder, "train")
    half = len(train) // 2
    for k, part in enumerate((train[:half], train[half:])):
        with open(os.path.join(root, f"imagenet1k-train-{k:04d}.tar"), "wb") as f:
            f.write(tar_bytes(wds_members(part, with_json=k == 0)))
    with open(os.path.join(root, "imagenet1k-validation-00.tar"), "wb") as f:
        f.write(tar_bytes(wds_members(folder_images(folder, "val"), with_json=True)))
    return root


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _skipped(out: str) -> list[list[str]]:
    with open(os.path.join(out, "skipped.tsv")) as f:
        return [line.rstrip("\n").split("\t") for line in f][1:]


@pytest.fixture(scope="module")
def hubs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hubs")
    folder = make_layouts(str(root / "layouts"))["folder"]
    return {"folder": folder, "hf": make_parquet(folder, str(root / "hf")), "wds": make_wds(folder, str(root / "wds"))}


@pytest.mark.slow
def test_hub_layouts_give_the_imagefolder_dataset_byte_for_byte(hubs, tmp_path):
    from torchvision.datasets import ImageFolder

    outs = {}
    for name, src in hubs.items():
        outs[name] = str(tmp_path / name)
        m = convert(src, outs[name], max_res=32, workers=0, shard_size=5, progress=False)
        assert m["layout"] == {"folder": "imagefolder", "hf": "hf-parquet", "wds": "wds"}[name]
        assert m["classes"] == WNIDS and m["skipped"]["count"] == 0, m["skipped"]
    assert any("test" in w for w in _json(os.path.join(outs["hf"], "manifest.json"))["warnings"])
    for split in ("train", "val"):
        reference = ImageFolder(os.path.join(hubs["folder"], split))
        for name in ("hf", "wds"):
            with open(os.path.join(outs[name], "sources", f"{split}.tsv")) as f:
                rows = [line.rstrip("\n").split("\t") for line in f][1:]
            # The same files in the same order with the same labels (a tar member is KEY.jpg).
            assert [(_stem(p), int(lab)) for _, lab, p in rows] == [(_stem(p), lab) for p, lab in reference.samples], (
                name
            )
            assert wds_samples(outs[name], split) == wds_samples(outs["folder"], split), name
    for name in ("hf", "wds"):
        same_outputs(outs["folder"], outs[name])  # .beton, shards, their indexes, byte for byte
    assert verify(outs["hf"]) == [] and verify(outs["wds"]) == []


def test_parquet_bad_rows_and_a_truncated_file_are_reported_and_nothing_else_is_lost(hubs, tmp_path):
    good = folder_images(hubs["folder"], "train")
    src = tmp_path / "src"
    rows = list(good)
    rows.insert(2, ("n01000001_99.JPEG", 0, b"\xff\xd8\xff\xe0 not really a jpeg"))  # corrupt image bytes
    rows.insert(5, ("n02000002_98.JPEG", 0, jpeg_bytes(77)))  # its file name says class 1, its label 0
    rows.insert(7, ("n03000003_97.JPEG", None, jpeg_bytes(78)))  # no label
    write_parquet(str(src / "data" / "train-00000-of-00002.parquet"), rows)
    # A second file cut short (an interrupted download): no footer, so none of its rows is reachable.
    cut = str(src / "data" / "train-00001-of-00002.parquet")
    write_parquet(cut, [("n01000001_50.JPEG", 0, jpeg_bytes(79)), ("n02000002_51.JPEG", 1, jpeg_bytes(80))])
    with open(cut, "rb") as f:
        data = f.read()
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    out = str(tmp_path / "out")
    m = convert(str(src), out, max_res=32, workers=0, shard_size=4, progress=False)
    reasons = {os.path.basename(r[1]): r[2] for r in _skipped(out)}
    assert reasons["n01000001_99.JPEG"] in ("corrupt", "truncated", "not-an-image")
    assert reasons["n02000002_98.JPEG"] == "label-mismatch"
    assert reasons["n03000003_97.JPEG"] == "no-label"
    assert reasons["train-00001-of-00002.parquet"] == "truncated-archive"
    s = m["splits"]["train"]
    assert s["count"] == len(good)  # every good row converted
    assert s["count"] + s["skipped"] == s["seen"] == len(good) + 4
    assert any("truncated" in w for w in m["warnings"])
    assert verify(out) == []


def test_wds_bad_samples_and_a_truncated_tar_are_reported_and_nothing_else_is_lost(hubs, tmp_path):
    good = folder_images(hubs["folder"], "train")
    src = tmp_path / "src"
    src.mkdir()
    members = wds_members(good[:6], with_json=True)
    members += [("bad_1.cls", b"0"), ("bad_1.jpg", b"\xff\xd8\xff garbage")]  # corrupt image
    members += [("n02000002_98.cls", b"0"), ("n02000002_98.jpg", jpeg_bytes(81))]  # wnid of class 1, label 0
    members += [
        ("nolabel.jpg", jpeg_bytes(82)),
        ("onlylabel.cls", b"1"),
        ("badcls.cls", b"x"),
        ("badcls.jpg", jpeg_bytes(83)),
    ]
    (src / "imagenet1k-train-0000.tar").write_bytes(tar_bytes(members))
    rest = tar_bytes(wds_members(good[6:], with_json=False))
    with tarfile.open(fileobj=io.BytesIO(rest)) as tar:
        last = tar.getmembers()[-1]  # the last sample's image
    # Cut inside the last image: the samples before the cut are kept.
    (src / "imagenet1k-train-0001.tar").write_bytes(rest[: last.offset_data + last.size // 2])
    out = str(tmp_path / "out")
    m = convert(str(src), out, max_res=32, workers=0, shard_size=4, progress=False)
    reasons = {}
    for r in _skipped(out):
        reasons.setdefault(r[2], []).append(os.path.basename(r[1]))
    assert "bad_1.jpg" in reasons.get("corrupt", []) + reasons.get("truncated", []) + reasons.get("not-an-image", [])
    assert reasons["label-mismatch"] == ["n02000002_98.jpg"]
    assert sorted(reasons["no-label"]) == ["badcls.jpg", "nolabel.jpg"]
    assert reasons["missing-image"] == ["onlylabel"]
    assert "imagenet1k-train-0001.tar" in reasons["truncated-archive"]
    s = m["splits"]["train"]
    assert s["count"] == len(good) - 1  # the cut sample only
    assert s["count"] + s["skipped"] == s["seen"]
    assert verify(out) == []


def test_parquet_classes_come_from_a_classes_file_or_the_train_names(hubs, tmp_path):
    src = hubs["hf"]
    # val alone: the train file names still name the classes.
    m = convert(src, str(tmp_path / "val"), splits=["val"], max_res=32, workers=0, progress=False)
    assert m["classes"] == WNIDS and m["splits"]["val"]["skipped"] == 0
    # A classes.py (the HF repository's table) in another label order: labels are remapped to ours.
    alt = tmp_path / "alt"
    order = [WNIDS[2], WNIDS[0], WNIDS[1]]
    rows = [(n, order.index(WNIDS[lab]), b) for n, lab, b in folder_images(hubs["folder"], "val")]
    write_parquet(str(alt / "data" / "validation-00000-of-00001.parquet"), rows)
    (alt / "classes.py").write_text(
        "from collections import OrderedDict\nIMAGENET2012_CLASSES = OrderedDict(\n"
        + "".join(f'    {{"{w}": "name of {w}"}},\n' for w in order).replace("{", "").replace("}", "")
        + ")\n"
    )
    out = str(tmp_path / "alt_out")
    m = convert(str(alt), out, max_res=32, workers=0, progress=False)
    assert m["classes"] == WNIDS
    assert wds_samples(out, "val") == wds_samples(str(tmp_path / "val"), "val")
    # Neither a classes file nor train names: a one-line refusal.
    (alt / "classes.py").unlink()
    with pytest.raises(DataError, match="classes.py"):
        convert(str(alt), str(tmp_path / "none"), max_res=32, workers=0, progress=False)


def test_parquet_labels_in_another_order_than_the_sorted_wnids_are_refused(hubs, tmp_path):
    rows = [(n, (lab + 1) % len(WNIDS), b) for n, lab, b in folder_images(hubs["folder"], "train")]
    src = tmp_path / "src"
    write_parquet(str(src / "data" / "train-00000-of-00001.parquet"), rows)
    with pytest.raises(DataError, match="classes.txt"):
        convert(str(src), str(tmp_path / "out"), max_res=32, workers=0, progress=False)


def test_parquet_sharded_parts_merge_into_the_unsharded_conversion(hubs, tmp_path):
    src = hubs["hf"]
    whole = str(tmp_path / "whole")
    args = ["--max-res", "32", "--workers", "0", "--shard-size", "3", "--no-progress"]
    assert cli_main(["convert", src, whole, *args]) == 0
    parts = [str(tmp_path / f"part{k}") for k in range(2)]
    for k, part in enumerate(parts):
        convert(src, part, max_res=32, workers=0, shard_size=3, progress=False, shard=(k, 2))
    merged = str(tmp_path / "merged")
    assert main(["--merge", *parts, merged, "--no-progress"]) == 0
    same_outputs(whole, merged, skip=("manifest.json",))
    assert not os.path.exists(os.path.join(whole, ".work"))  # the unpacked rows are gone


@pytest.mark.slow
def test_kill_9_during_a_parquet_conversion_then_resume_is_byte_identical(tmp_path):
    folder = make_layouts(str(tmp_path / "layouts"), per_class=16, val_per_class=2)["folder"]
    src = make_parquet(folder, str(tmp_path / "hf"))
    reference = str(tmp_path / "reference")
    convert(src, reference, max_res=32, shard_size=4, workers=0, progress=False)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "supmae.cli", "convert", src, out, "--max-res", "32", "--shard-size", "4"]
    cmd += ["--workers", "2", "--no-progress"]
    kill_after_chunks(cmd, out)
    assert os.listdir(os.path.join(out, ".work", "hf-parquet"))  # the unpacked rows, reused by the resume
    final = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    fa, fb = files_under(out), files_under(reference)
    assert sorted(fa) == sorted(fb)
    same_outputs(out, reference, skip=("manifest.json",))


def test_a_missing_pyarrow_is_a_one_line_error_naming_it(hubs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what `import pyarrow.parquet` meets without it
    assert cli_main(["convert", hubs["hf"], str(tmp_path / "out"), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'pyarrow'" in err and len(err.splitlines()) == 1


def test_parquet_files_of_another_schema_are_refused_in_one_line(tmp_path):
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    table = pa.table({"image": pa.array([b"x"], pa.binary()), "label": pa.array([0], pa.int64())})
    pq.write_table(table, str(src / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(DataError, match="image' {bytes, path}"):
        convert(str(src), str(tmp_path / "out"), workers=0, progress=False)


def _failing_image_reads(monkeypatch, failures: int, exc: BaseException) -> list[int]:
    """pyarrow's own `read_row_group`, except that its first `failures` reads of the image bytes
    raise `exc` (a flaky disk, a MemoryError): the fault injected into the real reader."""
    import pyarrow.parquet as pq

    real = pq.ParquetFile.read_row_group
    seen = [0]

    def read_row_group(self, i, columns=None, **kw):
        if columns == ["image.bytes"]:
            seen[0] += 1
            if seen[0] <= failures:
                raise exc
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    return seen


def test_a_transient_parquet_read_error_is_retried_and_never_a_skip(hubs, tmp_path, monkeypatch):
    seen = _failing_image_reads(monkeypatch, 1, OSError(5, "Input/output error"))
    out = str(tmp_path / "out")
    m = convert(hubs["hf"], out, max_res=32, workers=0, shard_size=4, progress=False)
    assert seen[0] > 1
    assert m["skipped"]["count"] == 0 and _skipped(out) == []
    ref = str(tmp_path / "ref")
    convert(hubs["folder"], ref, max_res=32, workers=0, shard_size=4, progress=False)
    same_outputs(out, ref)  # every row converted, byte for byte


def test_a_persistent_parquet_read_error_fails_the_run_and_the_rerun_converts_everything(hubs, tmp_path, monkeypatch):
    _failing_image_reads(monkeypatch, 10**9, MemoryError())
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match="row group .* cannot be read after 3 tries .*MemoryError"):
        convert(hubs["hf"], out, max_res=32, workers=0, shard_size=4, progress=False)
    assert not os.path.exists(os.path.join(out, "skipped.tsv"))
    monkeypatch.undo()
    m = convert(hubs["hf"], out, max_res=32, workers=0, shard_size=4, progress=False)
    assert m["skipped"]["count"] == 0 and verify(out) == []
