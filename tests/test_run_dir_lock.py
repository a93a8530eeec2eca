"""One job per run directory (`run.lock`), and `--resume auto` on a run stopped before its first checkpoint.

The fast tests drive `RunDir` and `decide_resume` directly; the slow ones run the `supmae` command:
a second job on a busy directory (held mid-run with SIGSTOP) exits at once naming the holder, on one
rank and under torchrun, and the first job's books hold each epoch once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from procs import REPO, subprocess_env, torchrun_command

from supmae.errors import UserError
from supmae.train import faults
from supmae.train.distributed import DistInfo
from supmae.train.engine import decide_resume
from supmae.train.run_dir import LOCK_FILE, RunDir, job_locks, read_jsonl


def _quiet(_message: str) -> None:
    pass


# ------------------------------------------------------------------------------------------ the lock


def test_a_second_holder_is_refused_with_the_holders_pid_and_host(tmp_path):
    path = str(tmp_path / "run")
    with job_locks():
        assert RunDir(path).lock() == ""
        with open(os.path.join(path, LOCK_FILE), encoding="utf-8") as fh:
            holder = json.loads(fh.read())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        # flock conflicts between two opens even in one process: a second job in this process is refused too.
        refusal = RunDir(path).lock()
        assert refusal == (f"run directory {path} is in use by another job (pid {os.getpid()} on host "
                           f"{socket.gethostname()}); wait for it to end, or choose another --output-dir")
        assert RunDir(path, writer=False).lock() == ""  # other ranks take nothing
    # The job ended: the lock is free again and the file names nobody.
    assert os.path.getsize(os.path.join(path, LOCK_FILE)) == 0
    with job_locks():
        assert RunDir(path).lock() == ""


def test_job_locks_releases_on_an_exception(tmp_path):
    path = str(tmp_path / "run")
    with pytest.raises(RuntimeError), job_locks():
        assert RunDir(path).lock() == ""
        raise RuntimeError("the job failed")
    with job_locks():
        assert RunDir(path).lock() == ""


_HOLD_AND_DIE = """
import os, signal, sys, time
from supmae.train.run_dir import RunDir
assert RunDir(sys.argv[1]).lock() == ""
r, w = os.pipe()
child = os.fork()
if child == 0:  # a DataLoader worker, say: outlives its parent by a few seconds
    os.write(w, b"1")  # running: its at-fork handler has run (on a loaded machine it may not yet have been)
    time.sleep(60)
    os._exit(0)
os.read(r, 1)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_of_the_holder_frees_the_lock_even_while_its_forked_children_live(tmp_path):
    path = str(tmp_path / "run")
    # Not subprocess.run: the child keeps the output pipe open, and reading it to the end would wait for the child.
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_AND_DIE, path], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=REPO)
    child = int(proc.stdout.readline())
    assert proc.wait(timeout=120) == -signal.SIGKILL
    try:
        os.kill(child, 0)  # still alive, and it inherited the lock's file descriptor
        with job_locks():
            assert RunDir(path).lock() == ""
    finally:
        os.kill(child, signal.SIGKILL)
        proc.stdout.close()


# ------------------------------------------------------------------------------------------ the decision


def _books(path: str, checkpoint: bytes | None = None) -> None:
    """The books a run leaves when killed in epoch 0: config, a process start, step lines."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        fh.write("{}\n")
    with open(os.path.join(path, "starts.jsonl"), "a") as fh:
        fh.write(json.dumps({"job": "pretrain", "start_epoch": 0}) + "\n")
    with open(os.path.join(path, "steps.jsonl"), "w") as fh:
        fh.write(json.dumps({"step": 1, "epoch": 0}) + "\n")
    with open(os.path.join(path, ".checkpoint-last.pth.tmp-123"), "wb") as fh:
        fh.write(b"half a checkpoint")
    if checkpoint is not None:
        with open(os.path.join(path, "checkpoint-last.pth"), "wb") as fh:
            fh.write(checkpoint)


def test_resume_auto_before_the_first_checkpoint_moves_the_books_aside_and_starts_over(tmp_path):
    path = str(tmp_path / "run")
    _books(path)
    messages: list[str] = []
    with job_locks():
        assert decide_resume("auto", RunDir(path), DistInfo(), messages.append) == ("", None)
    aside = os.path.join(path, "interrupted-1")
    assert sorted(os.listdir(aside)) == ["config.json", "steps.jsonl"]
    assert read_jsonl(os.path.join(aside, "steps.jsonl")) == [{"step": 1, "epoch": 0}]
    # starts.jsonl stays: the stopped process belongs to the run's history.
    assert sorted(os.listdir(path)) == [".checkpoint-last.pth.tmp-123", "interrupted-1", "run.lock", "starts.jsonl"]
    assert any("stopped before its first checkpoint" in m and aside in m for m in messages)

    _books(path)  # killed in epoch 0 once more: a second folder, the first untouched
    with job_locks():
        assert decide_resume("auto", RunDir(path), DistInfo(), _quiet) == ("", None)
    assert os.path.isdir(os.path.join(path, "interrupted-2")) and len(read_jsonl(os.path.join(path, "starts.jsonl"))) == 2


def test_refusals_stay_where_starting_over_would_lose_work(tmp_path):
    path = str(tmp_path / "run")
    _books(path)
    with job_locks(), pytest.raises(UserError, match="already holds a run"):
        decide_resume("", RunDir(path), DistInfo(), _quiet)
    # Checkpoint files none of which loads need a look, not a silent restart.
    _books(path, checkpoint=b"not a checkpoint")
    before = sorted(os.listdir(path))
    with job_locks(), pytest.raises(UserError, match="no usable checkpoint"):
        decide_resume("auto", RunDir(path), DistInfo(), _quiet)
    assert sorted(os.listdir(path)) == before
    # A busy directory is refused before anything is looked at or moved.
    with job_locks():
        assert RunDir(path).lock() == ""
        with pytest.raises(UserError, match="is in use by another job"):
            decide_resume("auto", RunDir(str(tmp_path / "run")), DistInfo(), _quiet)


def test_an_uncreatable_run_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    with job_locks(), pytest.raises(UserError, match="cannot create or lock the run directory .*a-file/run"):
        decide_resume("auto", RunDir(str(tmp_path / "a-file" / "run")), DistInfo(), _quiet)


def test_the_fault_hook_refuses_a_malformed_value(monkeypatch):
    monkeypatch.setenv(faults.ENV, "step=two")
    with pytest.raises(UserError, match="expected step=N, save=STEP, snap=STEP or done=STEP"):
        faults.armed("step")
    monkeypatch.setenv(faults.ENV, "save=3")
    assert faults.armed("save") == 3 and faults.armed("step") is None


# ------------------------------------------------------------------------------------------ two jobs


def _pretrain_args(data: str, out: str, epochs: int) -> list[str]:
    return ["-m", "supmae.cli", "pretrain", "--recipe", "tiny_cpu", "--output-dir", out, "--data.path", data,
            "--data.pipeline", "torchvision", "--data.num_workers", "0", "--data.batch_size", "16",
            "--train.epochs", str(epochs), "--train.max_steps_per_epoch", "2", "--train.log_every", "1",
            "--train.cpu_threads", "1", "--train.device", "cpu",
            "--model.kwargs", json.dumps({"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32,
                                          "decoder_num_heads": 2, "cls_hidden_dim": 32})]


def _wait_for_step(proc: subprocess.Popen, steps_path: str) -> None:
    deadline = time.monotonic() + 300
    while not read_jsonl(steps_path):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no step within 300 s"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_second_job_on_a_busy_run_directory_exits_at_once(synthetic_root, tmp_path):
    out = str(tmp_path / "run")
    epochs = 3
    first = subprocess.Popen([sys.executable, *_pretrain_args(synthetic_root, out, epochs)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO,
                             start_new_session=True)
    try:
        _wait_for_step(first, os.path.join(out, "steps.jsonl"))
        os.killpg(first.pid, signal.SIGSTOP)  # held mid-run, however loaded the machine
        try:
            # A double launch, and a requeue of the same job with --resume auto: both refused at once.
            for extra in ([], ["--resume", "auto"]):
                t0 = time.monotonic()
                second = subprocess.run([sys.executable, *_pretrain_args(synthetic_root, out, epochs), *extra],
                                        capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300,
                                        check=False)
                assert second.returncode == 2, second.stdout + second.stderr
                err = second.stderr.strip().splitlines()
                expected = (f"supmae pretrain: error: run directory {out} is in use by another job (pid {first.pid} "
                            f"on host {socket.gethostname()}); wait for it to end, or choose another --output-dir")
                assert err == [expected], err
                assert time.monotonic() - t0 < 120  # start-up and refusal only: no data, no model
            # Under torchrun rank 0 decides and every rank leaves with the same error (no rank left waiting).
            two = subprocess.run(torchrun_command(2, _pretrain_args(synthetic_root, out, epochs)),
                                 capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300,
                                 check=False)
            assert two.returncode != 0
            assert (two.stdout + two.stderr).count(f"is in use by another job (pid {first.pid}") == 2, two.stderr
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, "log.jsonl"))] == list(range(epochs))
    assert len(read_jsonl(os.path.join(out, "starts.jsonl"))) == 1


# ------------------------------------------------------------------------------ the file system's flock


def test_flock_is_checked_on_the_real_file_system_at_start(tmp_path, capsys):
    """The check runs against the file system itself (no mock): on the test's local tmp it holds, so the
    job says nothing; a mount that ignores flock or holds it per host would be named in one warning."""
    from supmae.train.run_dir import flock_excludes, mount_of

    path = str(tmp_path / "run")
    lines: list[str] = []
    with job_locks():
        assert RunDir(path).lock(log=lines.append) == ""
        kind, _options = mount_of(os.path.realpath(path))
        assert kind  # /proc/self/mounts names the file system holding tmp_path
        assert flock_excludes(os.path.join(path, LOCK_FILE)) == ""
    assert lines == []
    # /dev/shm (tmpfs) enforces flock too, when this machine has it.
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        import tempfile

        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm, job_locks():
            assert RunDir(os.path.join(shm, "run")).lock(log=lines.append) == ""
        assert lines == []


def test_mounts_whose_flock_holds_on_one_host_are_named():
    from supmae.train.run_dir import host_local_flock

    assert host_local_flock("ext4", {"rw"}) == ""
    assert host_local_flock("nfs4", {"rw", "vers=4.2"}) == ""  # flock emulated by byte-range locks: cluster-wide
    assert "local_lock=flock" in host_local_flock("nfs", {"rw", "local_lock=flock"})
    assert host_local_flock("lustre", {"flock"}) == "" and "localflock" in host_local_flock("lustre", {"localflock"})
    assert "FUSE" in host_local_flock("fuse.gcsfuse", {"rw"})
