"""The torchvision baseline reads a conversion made from any layout the converter accepts: the
official archives and the Kaggle download have no ImageFolder tree to read, so it reads the JPEG
bytes the converter stored (pipelines/stored.py), in ImageFolder's order with ImageFolder's labels,
keeping the (seed, epoch, index) augmentation contract. Fixtures from tests/test_convert_layouts.py."""

from __future__ import annotations

import os

import pytest
import torch
from imagenet_layouts import WNIDS, make_layouts

SIZE = 16


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, str]:
    from tools.convert import convert

    root = tmp_path_factory.mktemp("tv_layouts")
    layouts = make_layouts(str(root / "src"))
    outs = {"raw_folder": layouts["folder"]}
    for name, src in layouts.items():
        outs[name] = str(root / "out" / name)
        convert(src, outs[name], formats=("wds",), max_res=32, workers=0, shard_size=5, progress=False)
    return outs


def tv(path: str, **kw):
    from pipelines import build_pipeline

    args = {"batch_size": 4, "img_size": SIZE, "num_workers": 0, "seed": 5} | kw
    return build_pipeline("torchvision", path, **args)


def epoch(pipe, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pipe.set_epoch(e)
    return [(x.clone(), y.clone()) for x, y in pipe]


@pytest.mark.parametrize("split", ["train", "val"])
def test_archives_and_kaggle_conversions_give_imagefolders_samples_and_labels(converted, split):
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(os.path.join(converted["raw_folder"], split))
    assert reference.classes == WNIDS
    for name in ("archives", "kaggle"):
        pipe = tv(converted[name], split=split, train=False, drop_last=False)
        assert pipe.source == "converted" and pipe.num_classes == len(WNIDS)
        assert pipe.dataset.targets == reference.targets, name
        labels = [int(y) for _, ys in epoch(pipe, 0) for y in ys]
        assert labels == reference.targets, name  # validation reads in dataset order
    # The folder conversion reads its raw tree by default; its stored bytes on request.
    assert tv(converted["folder"], split=split).source == "raw"
    assert tv(converted["folder"], split=split, source="converted").dataset.targets == reference.targets


def test_training_batches_equal_on_every_layout_and_follow_the_index_contract(converted):
    """Same stored bytes (the converter writes byte-identical shards from every layout) and the
    same index -> sample map: the same seeded batches, in a forked worker as in the main process;
    the raw tree gives the same labels at every step (the same augmentation draws per index)."""
    ref = epoch(tv(converted["folder"], source="converted"), 1)
    for name in ("archives", "kaggle"):
        got = epoch(tv(converted[name], num_workers=1), 1)
        assert len(got) == len(ref) > 1
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, ref)), name
    raw = epoch(tv(converted["folder"], source="raw"), 1)
    assert [y.tolist() for _, y in raw] == [y.tolist() for _, y in ref]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch(tv(converted["archives"]), 2), ref))


def test_raw_source_of_an_archive_conversion_is_a_clear_error(converted):
    from pipelines import DataError

    with pytest.raises(DataError, match="archives layout.*source='converted'"):
        tv(converted["archives"], source="raw")
    with pytest.raises(DataError, match="source must be one of"):
        tv(converted["archives"], source="tar")
    with pytest.raises(DataError, match="needs a directory written by 'supmae convert'"):
        tv(converted["raw_folder"], source="converted")


@pytest.mark.slow
def test_pretrain_with_the_torchvision_pipeline_on_an_archive_conversion(converted, tmp_path):
    import json

    from supmae.cli import main as cli_main

    tiny = json.dumps(
        {
            "embed_dim": 32,
            "depth": 1,
            "num_heads": 2,
            "decoder_embed_dim": 32,
            "decoder_num_heads": 2,
            "cls_hidden_dim": 32,
        }
    )
    out = str(tmp_path / "run")
    argv = [
        "pretrain",
        "--recipe",
        "tiny_cpu",
        "--data.path",
        converted["archives"],
        "--output-dir",
        out,
        "--data.pipeline",
        "torchvision",
        "--train.epochs",
        "1",
        "--data.batch_size",
        "4",
        "--data.img_size",
        "32",
        "--train.log_every",
        "1",
        "--train.cpu_threads",
        "1",
        "--data.num_workers",
        "0",
        "--model.kwargs",
        tiny,
    ]
    assert cli_main(argv) == 0
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert rows and rows[-1]["images"] == 12 and all(r["loss"] == r["loss"] for r in rows)
