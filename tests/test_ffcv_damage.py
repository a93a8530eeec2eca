"""Stored JPEGs damaged after conversion (a bad disk, a bad copy, a cut transfer) never train
silently on the ffcv pipeline: each record's CRC-32 (the .beton's crc32 field) is checked before
its decode, and libjpeg's warnings and TurboJPEG's status fail the decode, so damage inside the
entropy-coded scan, not only in the header, stops the job with one line naming the sample.
A .beton written before the crc32 field still reads (the decoder's checks alone)."""

from __future__ import annotations

import functools
import os
import shutil

import numpy as np
import pytest
import torch

from pipelines import build_pipeline
from pipelines.constants import beton_path
from pipelines.errors import DataError
from tools.beton import read_jpeg_table

DAMAGED = 5  # the sample index (in the .beton) whose stored JPEG is damaged


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    from tools.convert import convert
    from tools.synthetic import make_dataset

    root = tmp_path_factory.mktemp("damage")
    src = make_dataset(str(root / "src"), train_per_class=8, val_per_class=0, size=64, num_classes=2, seed=4)
    out = str(root / "out")
    convert(src, out, formats=["ffcv"], max_res=64, workers=0, progress=False)
    return out


def _scan_start(jpeg: bytes) -> int:
    """Offset of the first byte of entropy-coded data (after the SOS segment)."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def _damaged_copy(out: str, dst: str, how: str) -> str:
    """A copy of the conversion whose sample DAMAGED has its stored JPEG damaged in place."""
    shutil.copytree(out, dst)
    path = beton_path(dst, "train")
    table = read_jpeg_table(path)
    ptr, size = int(table["offsets"][DAMAGED]), int(table["sizes"][DAMAGED])
    with open(path, "r+b") as f:
        f.seek(ptr)
        jpeg = bytearray(f.read(size))
        start = _scan_start(bytes(jpeg))
        if how == "eoi-in-scan":  # an end-of-image marker 20% into the scan: libjpeg warns, decodes grey
            at = start + (size - start) // 5
            jpeg[at : at + 2] = b"\xff\xd9"
        elif how == "quant-table":  # a changed quantisation value: decodes cleanly to wrong pixels
            dqt = jpeg.index(b"\xff\xdb")
            jpeg[dqt + 10] ^= 0x10
        f.seek(ptr)
        f.write(jpeg)
    return dst


def _epoch(path: str, *, train: bool, **kw) -> int:
    pipe = build_pipeline(
        "ffcv", path, split="train", batch_size=4, img_size=32, device=torch.device("cpu"), train=train,
        num_workers=1, dtype=torch.uint8, drop_last=False, **kw,
    )  # fmt: skip
    return sum(len(images) for images, _ in pipe)


@pytest.mark.parametrize(
    "how, train, crop_decode",
    [
        ("eoi-in-scan", True, True),
        ("eoi-in-scan", False, False),
        ("quant-table", True, True),
    ],
)
def test_damage_after_conversion_stops_the_ffcv_pipeline_naming_the_sample(
    converted, tmp_path, how, train, crop_decode
):
    damaged = _damaged_copy(converted, str(tmp_path / "d"), how)
    with pytest.raises(DataError) as info:
        _epoch(damaged, train=train, crop_decode=crop_decode)
    message = str(info.value)
    assert f"sample {DAMAGED} of split 'train' is damaged" in message and "crc32" in message
    assert len(message.splitlines()) == 1


def _without_checksums(out: str, dst: str) -> str:
    """The conversion with its .beton rewritten as before the crc32 field: image and label only."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from tools.beton import JPEG_MODE, EncodedJpeg, _store_encoded_jpeg

    shutil.copytree(out, dst)
    path = beton_path(dst, "train")
    table = read_jpeg_table(path)
    with open(path, "rb") as f:
        data = f.read()
    samples = [
        (EncodedJpeg(np.frombuffer(data[p : p + s], np.uint8), int(h), int(w)), int(label))
        for p, s, h, w, label in zip(table["offsets"], table["sizes"], table["heights"], table["widths"], table["labels"])
    ]  # fmt: skip
    image = RGBImageField(write_mode="jpg", max_resolution=64)
    image.encode = functools.partial(_store_encoded_jpeg, mode=JPEG_MODE)
    os.remove(path)
    DatasetWriter(path, {"image": image, "label": IntField()}, num_workers=1).from_indexed_dataset(samples)
    return dst


def test_a_beton_without_checksums_still_reads_and_libjpeg_catches_damage_inside_the_scan(converted, tmp_path):
    old = _without_checksums(converted, str(tmp_path / "old"))
    assert _epoch(old, train=False) == 16
    damaged = _damaged_copy(old, str(tmp_path / "old-damaged"), "eoi-in-scan")
    for crop_decode in (True, False):
        with pytest.raises(DataError, match=f"sample {DAMAGED} of split 'train' is damaged: libjpeg"):
            _epoch(damaged, train=False, crop_decode=crop_decode)


def test_the_torchvision_pipelines_stored_reader_checks_the_same_checksums(converted, tmp_path):
    from pipelines.stored import StoredJpegs

    damaged = _damaged_copy(converted, str(tmp_path / "d"), "quant-table")
    stored = StoredJpegs(damaged, "train")
    stored.read(DAMAGED - 1)
    with pytest.raises(DataError, match=f"sample {DAMAGED} of split 'train' is damaged: .* crc32"):
        stored.read(DAMAGED)
