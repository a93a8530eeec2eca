"""An input that crashes or hangs the decoder is isolated: the piece it was in is retried image by
image in fresh processes, exactly that input is reported (`decoder-crashed` / `decode-timeout`),
everything else converts, and a resume after a kill gives the same output.

The crash and the hang are real (a SIGSEGV, an endless sleep in the worker), injected by the test
hook `SUPMAE_TEST_POISON` (`tools/faults.py`). The conversions run in this process (a `supmae`
subprocess spends ~10 s importing ffcv and torch on a loaded 2-core machine), under a pytest
timeout so that a hang fails the test instead of hanging the suite; the run that is killed runs in
a forked child."""

from __future__ import annotations

import faulthandler
import filecmp
import json
import multiprocessing
import os
import signal
import sys
import time

import psutil
import pytest
from imagenet_layouts import files_under, stable_manifest

from tools import parallel_write
from tools.convert import convert, main, verify
from tools.parallel_write import OrderedPool
from tools.synthetic import make_dataset

POISONED = "train_01_00007.jpg"  # one of the 40 train images
ARGS = ["--max-res", "32", "--shard-size", "16", "--workers", "2", "--no-progress"]
KW = {"max_res": 32, "shard_size": 16, "workers": 2, "progress": False}


def _source(root: str) -> str:
    # 4 classes x 10 train images (48 px), in chunks of 16: the poisoned file shares its chunk (and
    # its piece of up to 32 images) with 15 good ones.
    make_dataset(root, train_per_class=10, val_per_class=0, size=48, num_classes=4, seed=5)
    return root


def _skipped(out: str) -> list[list[str]]:
    with open(os.path.join(out, "skipped.tsv")) as f:
        return [line.rstrip("\n").split("\t") for line in f.readlines()[1:]]


def _check_isolated(out: str, code: str, words: str) -> None:
    rows = _skipped(out)
    assert [(r[0], os.path.basename(r[1]), r[2]) for r in rows] == [("train", POISONED, code)], rows
    assert words in rows[0][3], rows
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    s = m["splits"]["train"]
    assert (s["seen"], s["count"], s["skipped"]) == (40, 39, 1)
    assert m["converted"] + m["skipped"]["count"] == m["seen"] == 40
    assert m["skipped"]["by_reason"] == {code: 1}
    assert verify(out) == []


@pytest.mark.timeout(90)
def test_a_decoder_crash_is_isolated_and_reported(tmp_path, monkeypatch):
    src = _source(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    monkeypatch.setenv("SUPMAE_TEST_POISON", f"crash:{POISONED}")
    assert main([src, out, *ARGS]) == 0
    _check_isolated(out, "decoder-crashed", "crashed the decoder (killed by SIGSEGV)")


@pytest.mark.timeout(90)
def test_a_hung_decode_times_out_and_is_reported(tmp_path, monkeypatch):
    src = _source(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    monkeypatch.setenv("SUPMAE_TEST_POISON", f"hang:{POISONED}")
    t0 = time.monotonic()
    assert main([src, out, *ARGS, "--decode-timeout", "1.5"]) == 0
    # Twice the limit (the piece, then the file alone) and the work: never the 90 s of a hang.
    assert time.monotonic() - t0 < 30
    _check_isolated(out, "decode-timeout", "decode timed out (no result after 1.5 s")


def _killed_run(src: str, out: str, stderr_fd: int) -> None:
    # The hook's "hanging" line comes to the test through this pipe (pytest holds fd 2 and sys.stderr).
    os.dup2(stderr_fd, 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - this process's stderr until it dies
    convert(src, out, decode_timeout=600, **KW)


@pytest.mark.timeout(120)
def test_resume_after_a_kill_during_a_hang_gives_the_uninterrupted_output(tmp_path, monkeypatch):
    """The kill lands while the poisoned piece is stuck (the hook says when); the resumed run meets
    the poisoned file again, isolates it again, and ends byte-identical to a run never killed."""
    src = _source(str(tmp_path / "src"))
    reference = str(tmp_path / "reference")
    monkeypatch.setenv("SUPMAE_TEST_POISON", f"crash:{POISONED}")
    convert(src, reference, **KW)

    out = str(tmp_path / "out")
    monkeypatch.setenv("SUPMAE_TEST_POISON", f"hang:{POISONED}")
    r, w = os.pipe()
    child = multiprocessing.get_context("fork").Process(target=_killed_run, args=(src, out, w))
    child.start()
    os.close(w)
    try:
        with os.fdopen(r) as lines:
            for line in lines:  # until the hook hangs (EOF: the run ended without hanging)
                if line.startswith("test hook: hanging on"):
                    break
            else:
                pytest.fail("the poisoned file was never decoded")
        workers = psutil.Process(child.pid).children(recursive=True)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == -signal.SIGKILL
    psutil.wait_procs(workers, timeout=15)  # they die with the converter (PDEATHSIG)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    assert not os.path.exists(os.path.join(out, "manifest.json"))

    monkeypatch.setenv("SUPMAE_TEST_POISON", f"crash:{POISONED}")
    convert(src, out, **KW)
    _check_isolated(out, "decoder-crashed", "crashed the decoder (killed by SIGSEGV)")
    ours, theirs = files_under(out), files_under(reference)
    assert sorted(ours) == sorted(theirs), "same files, no temporaries or work state left"
    for rel in ours:
        if rel == "manifest.json":
            assert stable_manifest(ours[rel]) == stable_manifest(theirs[rel])
        else:
            assert filecmp.cmp(ours[rel], theirs[rel], shallow=False), f"{rel} differs"


# ----------------------------------------------------------------------------------------------
# The pool itself


def _segfault(x: int) -> int:
    if x == 3:
        faulthandler.disable()  # pytest's dump of the threads would only be noise
        os.kill(os.getpid(), signal.SIGSEGV)
    return x * x


def _sleepy(x: int) -> int:
    if x == 2:
        time.sleep(600)
    return x


def test_pool_reports_a_dead_or_stuck_task_and_keeps_working():
    with OrderedPool(2) as pool:
        for x in range(6):
            pool.submit(_segfault, x, tag=x)
        got = []
        for _ in range(6):
            try:
                got.append(pool.next())
            except parallel_write.WorkerDied as exc:
                got.append((exc.tag, exc.signal_name))
        assert got == [(0, 0), (1, 1), (2, 4), (3, "SIGSEGV"), (4, 16), (5, 25)]
        t0 = time.monotonic()
        for x in range(4):
            pool.submit(_sleepy, x, tag=x, limit=0.5)
        got = []
        for _ in range(4):
            try:
                got.append(pool.next()[1])
            except parallel_write.TaskTimedOut as exc:
                got.append(("timed out", exc.tag))
        assert got == [0, 1, ("timed out", 2), 3]
        assert time.monotonic() - t0 < 10
        assert pool.run_all(_segfault, [5, 6]) == [25, 36]  # the replaced workers serve on


def test_sigkill_of_an_input_alone_stops_the_run_instead_of_skipping_it():
    """No decoder SIGKILLs itself: the OOM killer or a person did, so the input is not to blame."""
    from pipelines.errors import DataError
    from tools.conversion import _lost_result

    item = ("/src/train/a/x.jpg", -1, -1, "0007", 0)
    assert _lost_result(parallel_write.WorkerDied(-signal.SIGABRT), item)[1:3] == (
        "decoder-crashed", "crashed the decoder (killed by SIGABRT)")  # fmt: skip
    assert _lost_result(parallel_write.WorkerDied(3), item)[2] == "crashed the decoder (exit status 3)"
    with pytest.raises(DataError, match="x.jpg was killed by SIGKILL.*rerun the same command to resume"):
        _lost_result(parallel_write.WorkerDied(-signal.SIGKILL), item)
