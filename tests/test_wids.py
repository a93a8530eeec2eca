"""Our webdataset shards as the webdataset ecosystem reads them: the wids shard index beside them,
read by the real `wids.ShardListDataset` and `webdataset.WebDataset`, every sample's bytes and label
checked; the index of a merged --shard conversion equals the unsharded one."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os

import pytest
from imagenet_layouts import make_layouts

from tools.convert import convert, main
from tools.shards import read_tar_samples


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def expected_samples(out: str, split: str) -> dict[str, tuple[bytes, int]]:
    """key -> (JPEG bytes, label): bytes read with tarfile, labels from the manifest's permutation and
    sources table (the ImageFolder label of each source), not from the shards' own `.cls` members."""
    m = _json(os.path.join(out, "manifest.json"))
    with open(os.path.join(out, "sources", f"{split}.tsv")) as f:
        labels = [int(line.split("\t")[1]) for line in f.read().splitlines()[1:]]
    rows = {}
    for f in m["formats"]["wds"][split]["files"]:
        for key, members in read_tar_samples(os.path.join(out, f["path"])):
            rows[key] = members["jpg"][1]
    permutation = m["splits"][split]["permutation"]
    assert len(rows) == len(permutation)
    # Keys are output positions; with nothing skipped position i holds permutation[i].
    return {key: (rows[key], labels[permutation[int(key)]]) for key in sorted(rows)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("wids")
    src = make_layouts(str(root / "src"), per_class=4, val_per_class=2)["folder"]
    out = str(root / "out")
    convert(src, out, max_res=32, workers=0, shard_size=5, progress=False)
    return src, out


def test_the_index_describes_every_shard(converted):
    _, out = converted
    m = _json(os.path.join(out, "manifest.json"))
    for split in ("train", "val"):
        rel = m["formats"]["wds"][split]["wids_index"]
        assert rel == f"wds/{split}/{split}.wids.json"
        index = _json(os.path.join(out, rel))
        assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        files = m["formats"]["wds"][split]["files"]
        assert [s["url"] for s in index["shardlist"]] == [os.path.basename(f["path"]) for f in files]
        for shard, f in zip(index["shardlist"], files):
            path = os.path.join(out, f["path"])
            with open(path, "rb") as fh:
                assert shard["md5sum"] == hashlib.md5(fh.read()).hexdigest()
            assert shard["filesize"] == os.path.getsize(path) == f["bytes"]
            assert shard["nsamples"] == f["count"]
        assert sum(s["nsamples"] for s in index["shardlist"]) == m["splits"][split]["count"]


def test_wids_reads_every_sample_with_its_bytes_and_label(converted, tmp_path):
    wids = pytest.importorskip("wids")
    _, out = converted
    for split in ("train", "val"):
        expected = expected_samples(out, split)
        index = os.path.join(out, "wds", split, f"{split}.wids.json")
        # Opened from another working directory: urls resolve against the index's folder.
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            ds = wids.ShardListDataset(index, transformations=[], cache_dir=str(tmp_path / "cache"))
            got = {}
            for i in range(len(ds)):
                sample = ds[i]
                # wids hands each member over as a stream (transformations=[]: nothing decoded).
                got[sample["__key__"]] = (sample[".jpg"].read(), int(sample[".cls"].read()))
            ds.close()
        finally:
            os.chdir(cwd)
        assert len(ds) == len(expected)
        assert got == expected


def test_webdataset_reads_every_sample_with_its_bytes_and_label(converted):
    webdataset = pytest.importorskip("webdataset")
    _, out = converted
    for split in ("train", "val"):
        expected = expected_samples(out, split)
        index = _json(os.path.join(out, "wds", split, f"{split}.wids.json"))
        urls = [os.path.join(out, "wds", split, s["url"]) for s in index["shardlist"]]
        got = {}
        for sample in webdataset.WebDataset(urls, shardshuffle=False):
            got[sample["__key__"]] = (sample["jpg"], int(sample["cls"]))
        assert got == expected


def test_a_merged_sharded_conversion_has_the_unsharded_index(converted, tmp_path):
    src, whole = converted
    parts = [str(tmp_path / f"part{k}") for k in range(2)]
    for k, part in enumerate(parts):
        convert(src, part, max_res=32, workers=0, shard_size=5, progress=False, shard=(k, 2))
        # Each part describes its own shards.
        own = _json(os.path.join(part, "manifest.json"))["formats"]["wds"]["train"]
        index = _json(os.path.join(part, own["wids_index"]))
        assert [s["url"] for s in index["shardlist"]] == [os.path.basename(f["path"]) for f in own["files"]]
    merged = str(tmp_path / "merged")
    assert main(["--merge", *parts, merged, "--no-progress"]) == 0
    for split in ("train", "val"):
        rel = os.path.join("wds", split, f"{split}.wids.json")
        assert filecmp.cmp(os.path.join(whole, rel), os.path.join(merged, rel), shallow=False)
