"""Helpers of the converter's tests: the same small JPEGs as ImageNet is downloaded (the official
archives, with a devkit whose ILSVRC2012_ID order is not the sorted-wnid order and which holds a
non-leaf synset, as the real one does), as the Kaggle layout and as an ImageFolder tree; comparing
converted folders; killing a conversion mid-run."""

from __future__ import annotations

import filecmp
import io
import json
import os
import signal
import subprocess
import tarfile
import time

import numpy as np
from PIL import Image
from procs import REPO

from tools.shards import read_tar_samples

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
# Devkit row order (= ILSVRC2012_ID 1, 2, 3) differs from the sorted wnids; ID 4 is a non-leaf synset.
DEVKIT_WNIDS = ["n03000003", "n01000001", "n02000002"]
WNIDS = sorted(DEVKIT_WNIDS)


def jpeg_bytes(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.kron(rng.integers(0, 255, (size[1] // 5, size[0] // 5, 3)), np.ones((5, 5, 1))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_devkit(path: str, val_wnids: list[str]) -> None:
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
    write_file(path, buf.getvalue())


def make_layouts(root: str, per_class: int = 4, val_per_class: int = 2) -> dict[str, str]:
    """The same images as an ImageFolder tree, the official archives and the Kaggle layout."""
    train = {w: [(f"{w}_{i}.JPEG", jpeg_bytes(100 * c + i)) for i in range(per_class)] for c, w in enumerate(WNIDS)}
    # Validation images interleave the classes, as the real flat folder does.
    val_wnids = [WNIDS[(i * 2) % len(WNIDS)] for i in range(val_per_class * len(WNIDS))]
    val = [(f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg_bytes(9000 + i), w) for i, w in enumerate(val_wnids)]
    folder, archives, kaggle = (os.path.join(root, n) for n in ("folder", "archives", "kaggle"))
    for w, files in train.items():
        for name, data in files:
            write_file(os.path.join(folder, "train", w, name), data)
            write_file(os.path.join(kaggle, "ILSVRC", "Data", "CLS-LOC", "train", w, name), data)
    for name, data, w in val:
        write_file(os.path.join(folder, "val", w, name), data)
        write_file(os.path.join(kaggle, "ILSVRC", "Data", "CLS-LOC", "val", name), data)
    write_file(
        os.path.join(archives, TRAIN_TAR),
        tar_bytes([(f"{w}.tar", tar_bytes(files)) for w, files in reversed(list(train.items()))]),
    )
    write_file(os.path.join(archives, VAL_TAR), tar_bytes([(n, d) for n, d, _ in val]))
    write_devkit(os.path.join(archives, DEVKIT), val_wnids)
    rows = [f"{n[:-5]},{w} 1 2 30 40 {w} 3 4 20 20 \n" for n, _, w in val]
    write_file(
        os.path.join(kaggle, "LOC_val_solution.csv"), ("ImageId,PredictionString\n" + "".join(rows[::-1])).encode()
    )
    write_file(
        os.path.join(kaggle, "LOC_synset_mapping.txt"), "".join(f"{w} class {w}\n" for w in DEVKIT_WNIDS).encode()
    )
    return {"folder": folder, "archives": archives, "kaggle": kaggle}


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def files_under(root: str) -> dict[str, str]:
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = path
    return found


def same_outputs(a: str, b: str, skip=("manifest.json", "sources/train.tsv", "sources/val.tsv")) -> None:
    fa, fb = files_under(a), files_under(b)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        if rel not in skip:
            assert filecmp.cmp(fa[rel], fb[rel], shallow=False), f"{rel} differs"


def wds_samples(out: str, split: str) -> list[tuple[str, int, bytes]]:
    m = read_json(os.path.join(out, "manifest.json"))
    rows = []
    for f in m["formats"]["wds"][split]["files"]:
        for key, members in read_tar_samples(os.path.join(out, f["path"])):
            rows.append((key, int(members["cls"][1]), members["jpg"][1]))
    return rows


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


def stable_manifest(path: str) -> dict:
    """A manifest.json less what differs between two runs of one conversion (timings, resumes, workers)."""
    with open(path) as f:
        m = json.load(f)
    for key in ("elapsed_seconds", "encode_seconds", "resumed_chunks", "encoded_this_run"):
        m.pop(key)
    m["options"].pop("workers")
    return m
