"""Device time from the moment a process starts to the moment it dies: the process record is
written as soon as the run directory is locked (before loaders, DDP, the model), and a heartbeat
thread keeps it current whatever the main thread is doing (set-up, compilation, a long step, a
save), so a kill during set-up or a long first step still leaves that time in the books."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

from procs import REPO, subprocess_env

from supmae.train.process import ProcessRecord, end_job_records, open_early_record, take_early_record


def _records(run_dir: str) -> list[dict]:
    rows = []
    for path in glob.glob(os.path.join(run_dir, "processes", "*.json")):
        with open(path) as f:
            rows.append(json.load(f))
    return rows


def test_the_heartbeat_does_not_wait_for_a_step(tmp_path):
    record = ProcessRecord(str(tmp_path), True, job="pretrain", world_size=1, device="cpu", start_epoch=0,
                           started=time.time(), started_from="run_call")  # fmt: skip
    record.beat()
    first = _records(str(tmp_path))[0]["heartbeat"]
    record.start_heartbeat(interval=0.05)
    try:
        time.sleep(0.5)  # a long first step, a compilation, a save: the main thread does not beat
        assert _records(str(tmp_path))[0]["heartbeat"] > first + 0.2
    finally:
        end_job_records()


def test_an_early_record_is_adopted_or_removed_when_the_job_ends_normally(tmp_path):
    open_early_record(str(tmp_path / "a"), world_size=2, start_epoch=3)
    open_early_record(str(tmp_path / "b"), world_size=1, start_epoch=0)
    (row,) = _records(str(tmp_path / "a"))
    assert row["world_size"] == 2 and row["start_epoch"] == 3 and row["heartbeat"] >= row["start"]
    adopted = take_early_record(str(tmp_path / "a"))
    assert adopted is not None and take_early_record(str(tmp_path / "a")) is None
    end_job_records()  # b found nothing to do: its record goes; a's is the Engine's
    assert len(_records(str(tmp_path / "a"))) == 1 and _records(str(tmp_path / "b")) == []


def test_a_kill_during_set_up_leaves_the_process_in_the_books(synthetic_root, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "supmae.cli", "pretrain", "--recipe", "tiny_cpu", "--output-dir", out,
           "--data.path", synthetic_root, "--data.pipeline", "torchvision", "--data.num_workers", "0",
           "--train.epochs", "1", "--train.device", "cpu", "--train.cpu_threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = os.path.join(out, "run.lock")
    try:
        deadline = time.monotonic() + 120
        while not (os.path.isfile(lock) and os.path.getsize(lock)) and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.01)
        time.sleep(0.3)
        # Still setting up (no step, no starts.jsonl line): this is the time that went unpaid.
        assert not os.path.exists(os.path.join(out, "starts.jsonl"))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (row,) = _records(out)
    assert row["pid"] == proc.pid and row["heartbeat"] >= row["start"] and not row["ended"]
