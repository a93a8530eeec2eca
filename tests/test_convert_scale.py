"""The converter's promise at real scale: every input converted or reported, whatever the shard
count, the open-file limit, the disk or a second conversion into the same OUT.

- imagenet-1k-wds as published (1,024 train + 64 val tars) under `ulimit -n 1024`, with duplicate
  keys, a `.jpg` beside a `.png` and a pathological `.json` sidecar: converted + reported = image
  members (tiny images, so it stays a few seconds);
- a shortage of this machine (file descriptors) fails the run; it is never a skipped image;
- a second conversion into a busy OUT exits at once naming the holder, and the first one's output
  verifies;
- a short write (a full disk, a file-size limit) fails the stitch instead of shifting offsets.
"""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from imagenet_layouts import tar_bytes
from PIL import Image

from tools.convert import verify

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONVERT = [sys.executable, "-m", "supmae.cli", "convert"]


def _tiny(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _nofile(limit: int):
    def apply() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    return apply


def make_hub_wds(root: str, train_tars: int = 1024, val_tars: int = 64, per_tar: int = 2) -> int:
    """imagenet-1k-wds's published layout at its real shard counts, `per_tar` tiny images per tar,
    two classes; in train tar 0 a sample with both .jpg and .png, a repeated KEY.jpg and a .json
    sidecar of 200,000 nested brackets. Returns the number of image members written."""
    os.makedirs(root, exist_ok=True)
    images = 0
    jpegs = [_tiny(s) for s in range(8)]
    for split, count in (("train", train_tars), ("validation", val_tars)):
        for t in range(count):
            members = []
            for i in range(per_tar):
                label = (t + i) % 2
                key = f"n0{label + 1}000001_{t}_{i}" if split == "train" else f"ILSVRC2012_val_{t:05d}{i}"
                members += [(f"{key}.cls", str(label).encode()), (f"{key}.jpg", jpegs[(t + i) % 8])]
                images += 1
            if split == "train" and t == 0:
                members += [
                    ("n01000001_png.cls", b"0"),
                    ("n01000001_png.jpg", jpegs[1]),
                    ("n01000001_png.png", _tiny(9, "PNG")),  # a second image of the key
                    ("n01000001_0_0.jpg", jpegs[2]),  # the key and extension of an earlier member
                    ("n01000001_deep.cls", b"0"),
                    ("n01000001_deep.jpg", jpegs[3]),
                    ("n01000001_deep.json", b"[" * 200_000 + b"]" * 200_000),  # RecursionError in json
                ]
                images += 4
            name = f"imagenet1k-{split}-{t:04d}.tar" if split == "train" else f"imagenet1k-{split}-{t:02d}.tar"
            with open(os.path.join(root, name), "wb") as f:
                f.write(tar_bytes(members))
    return images


@pytest.mark.slow
def test_the_published_wds_layout_converts_under_ulimit_1024_and_every_image_member_is_accounted_for(tmp_path):
    src = str(tmp_path / "wds")
    images = make_hub_wds(src)
    out = str(tmp_path / "out")
    # One worker reads from every tar, as each of 16 workers does over the real 1.28M images.
    cmd = CONVERT + [src, out, "--max-res", "16", "--workers", "1", "--no-progress"]
    run = subprocess.run(
        cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=_nofile(1024)
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    with open(os.path.join(out, "skipped.tsv")) as f:
        skipped = [line.rstrip("\n").split("\t") for line in f.readlines()[1:]]
    reasons = {row[1]: row[2] for row in skipped}
    assert reasons == {
        "imagenet1k-train-0000.tar/n01000001_png.png": "second-image",
        "imagenet1k-train-0000.tar/n01000001_0_0.jpg": "duplicate-member",
    }
    assert m["converted"] + m["skipped"]["count"] == m["seen"] == images
    assert m["splits"]["val"]["count"] == 64 * 2
    assert any("sidecar" in w for w in m["warnings"])
    assert verify(out, workers=1) == []


def test_a_shortage_of_file_descriptors_fails_the_read_instead_of_skipping_the_image(tmp_path):
    """EMFILE while opening an input (or an archive) is this machine's limit, not a bad input."""
    path = tmp_path / "a.jpg"
    path.write_bytes(_tiny(1))
    tar = tmp_path / "x.tar"
    tar.write_bytes(tar_bytes([("a.jpg", _tiny(1))]))
    script = textwrap.dedent(f"""
        import os, resource
        from tools import parallel_write as pw
        soft = 64
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for args in (({str(path)!r}, -1, -1), ({str(tar)!r}, 512, 100)):
            try:
                print("returned", pw.encode_source(*args)[:3])
            except OSError as exc:
                print("raised", exc.errno)
    """)
    run = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr

    assert run.stdout.split("\n")[:2] == [f"raised {errno.EMFILE}"] * 2, run.stdout


@pytest.mark.slow
def test_a_second_conversion_into_a_busy_out_exits_at_once_and_the_first_one_verifies(tmp_path):
    from tools.synthetic import make_dataset

    src = make_dataset(str(tmp_path / "src"), train_per_class=30, val_per_class=2, size=24, num_classes=4, seed=3)
    out = str(tmp_path / "out")
    cmd = CONVERT + [src, out, "--max-res", "24", "--shard-size", "10", "--workers", "1", "--no-progress"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        state = os.path.join(out, ".work", "state.json")
        t0 = time.monotonic()
        while not os.path.isfile(state) and first.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.002)
        # The first conversion is mid-run (its state written, chunks to go): freeze it there.
        os.kill(first.pid, signal.SIGSTOP)
        assert first.poll() is None, "the first conversion ended before it could be caught mid-run"
        t1 = time.monotonic()
        second = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t1
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr and "being written by another conversion" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert took < 20
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert verify(out, workers=1) == []
    assert not os.path.exists(os.path.join(out, ".work"))


def test_a_short_write_fails_the_stitch_instead_of_shifting_the_shard(tmp_path):
    """A file-size limit makes the kernel write part of a buffer and return the count, as a full
    disk does: the tar end must not be recorded as written when only part of it was."""
    script = textwrap.dedent(f"""
        import os, resource, signal
        from tools.parallel_write import StitchTask, stitch_chunk
        from tools.shards import member_bytes
        out = {str(tmp_path)!r}
        piece = os.path.join(out, "p.piece")
        data = member_bytes("000", b"x" * 3000, 1)
        with open(piece, "wb") as f:
            f.write(data)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(data) + 100, resource.RLIM_INFINITY))
        rec = {{"samples": [[0, 0, 1, 8, 8]], "skipped": []}}
        task = StitchTask(out, os.path.join(out, "s.tar"), None, os.path.join(out, "rec.json"), [piece], ["000"],
                          [3000], rec)
        try:
            got = stitch_chunk(task)
            print("recorded", got["tar_bytes"], "on disk", os.path.getsize(os.path.join(out, "s.tar")))
        except OSError as exc:
            print("raised", exc.errno)
    """)
    run = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr

    assert run.stdout.strip() == f"raised {errno.EFBIG}", run.stdout
    assert not (tmp_path / "rec.json").exists(), "no record (commit point) for a shard that is not whole"
