"""The `wids` shard index beside a split's webdataset shards, so the webdataset ecosystem reads our
shards as they are.

`wids.ShardListDataset(OUT/wds/<split>/<split>.wids.json)` opens the shards listed there (urls
relative to the index file, which `wids` resolves against the index's own folder), and
`webdataset.WebDataset` reads the same tars by name. The index is wids' dataset description v1:

    {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "<split>",
     "shardlist": [{"url": "<split>-000000.tar", "md5sum": "...", "nsamples": 1000, "filesize": 123}, ...]}

It is written (atomically) whenever the converter writes a manifest: after a conversion, for one
part of a `--shard K/N` run (its own shards) and after `--merge` (all of them). The md5 is taken by
reading each finished tar once; `wids` checks it when it opens a shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from tools.files import atomic_write

KIND = "wids-shard-index-v1"
WIDS_VERSION = 1


def index_name(split: str) -> str:
    return f"{split}.wids.json"


def file_md5(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_wids_index(out: str, split: str, shards: Sequence[dict]) -> str | None:
    """Write the wids index of `split`'s shards; `shards` are the manifest's wds file entries
    (`path` relative to `out`, `count` samples). Returns the index path relative to `out` (None
    when the split has no shard, as a split whose files were all skipped)."""
    if not shards:
        return None
    folder = os.path.dirname(os.path.join(out, shards[0]["path"]))
    shardlist = []
    for s in shards:
        full = os.path.join(out, s["path"])
        if os.path.dirname(full) != folder:
            raise ValueError(f"shard {s['path']} is not in {folder}: one index lists one folder")
        shardlist.append(
            {
                "url": os.path.basename(full),
                "md5sum": s.get("md5") or file_md5(full),  # the converter's workers took it when writing
                "nsamples": int(s["count"]),
                "filesize": os.path.getsize(full),
            }
        )
    index = {"__kind__": KIND, "wids_version": WIDS_VERSION, "name": split, "shardlist": shardlist}
    path = os.path.join(folder, index_name(split))
    atomic_write(path, (json.dumps(index, indent=1) + "\n").encode())
    return os.path.relpath(path, out)
