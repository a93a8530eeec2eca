"""The asynchronous checkpoint writer: host snapshots, one save in flight, failures raised, kills at its two points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from supmae.errors import UserError
from supmae.train import async_checkpoint as ac
from supmae.train import faults
from supmae.train.async_checkpoint import CheckpointWriteError, CheckpointWriter, HostSnapshot
from supmae.train.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trained_payload(epoch: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """A small model with BatchNorm buffers and a stepped AdamW, and its checkpoint payload."""
    torch.manual_seed(epoch)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 8)).square().mean().backward()
    opt.step()
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
               "config": {"train": {"epochs": 3, "name": "x", "betas": (0.9, 0.95)}},
               "rng": {"torch": torch.get_rng_state(), "python": [3, [1, 2, 3], None]}, "elapsed_seconds": 1.5}
    return model, opt, payload


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _gate_writes(monkeypatch) -> tuple[threading.Event, list[str]]:
    """Make the background write wait for an event; returns it and the log of writes begun and ended."""
    release, log = threading.Event(), []
    real = ac.atomic_save

    def gated(obj, path):
        log.append(f"begin {obj['epoch']}")
        assert release.wait(30)
        real(obj, path)
        log.append(f"end {obj['epoch']}")

    monkeypatch.setattr(ac, "atomic_save", gated)
    return release, log


def test_written_file_holds_the_payload_at_snapshot_time(tmp_path, monkeypatch):
    model, opt, payload = _trained_payload()
    expected = _clone(payload)
    release, _ = _gate_writes(monkeypatch)
    done = []
    path = str(tmp_path / "checkpoint-last.pth")
    with CheckpointWriter() as writer:
        stall = writer.save(payload, path, on_done=lambda s: done.append((s, threading.current_thread().name)))
        # The loop goes on at once and changes everything in place while the file is still being written.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model[1].running_mean.fill_(7.0)
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
        payload["config"]["train"]["epochs"] = 99
        payload["rng"]["python"][1].append(4)
        assert not done
        release.set()
        stats = writer.wait()
    assert stall >= stats.snapshot_seconds and stats.stall_seconds == stall
    assert stats.path == path and stats.bytes == os.path.getsize(path) and stats.write_seconds > 0
    assert done and done[0][0] is stats and done[0][1].startswith("supmae-checkpoint")
    ckpt = load_checkpoint(path)
    _assert_same(expected, ckpt)
    fresh, fresh_opt, _ = _trained_payload(epoch=5)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["optimizer"])
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_views_shared_storage_and_odd_dtypes_keep_values_shape_and_dtype(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    payload = {"epoch": 0, "t": base.t(), "row": base[1], "same": base, "half": base.to(torch.bfloat16),
               "flag": torch.tensor([True, False]), "scalar": torch.tensor(3, dtype=torch.int64),
               "empty": torch.empty(0, 3), "param": torch.nn.Parameter(torch.ones(2)), "size": torch.Size([2, 3]),
               "nested": [({"a": torch.zeros(2)}, 1.0)]}
    host = HostSnapshot().copy(payload)
    for key in ("t", "row", "same", "half", "flag", "scalar", "empty", "param"):
        assert host[key].is_contiguous() and not host[key].requires_grad
        assert host[key].data_ptr() != payload[key].data_ptr() or payload[key].numel() == 0
    assert host["t"].untyped_storage().data_ptr() != host["same"].untyped_storage().data_ptr()
    assert isinstance(host["size"], torch.Size) and isinstance(host["nested"][0], tuple)
    path = str(tmp_path / "c.pth")
    with CheckpointWriter() as writer:
        writer.save(payload, path)
    _assert_same({k: v for k, v in payload.items()}, load_checkpoint(path))


def test_state_dict_metadata_survives(tmp_path):
    _, _, payload = _trained_payload()
    host = HostSnapshot().copy(payload)
    assert host["model"]._metadata == payload["model"]._metadata
    assert host["model"]._metadata is not payload["model"]._metadata


def test_buffers_are_reused_and_reallocated_only_on_a_new_shape_or_dtype():
    snap = HostSnapshot()
    payload = {"a": torch.ones(3, 4), "b": [torch.zeros(5)], "epoch": 0}
    first = snap.copy(payload)
    assert snap.allocated == 2 and snap.bytes == (12 + 5) * 4
    payload["a"].mul_(2)
    second = snap.copy(payload)
    assert snap.allocated == 0
    assert second["a"].data_ptr() == first["a"].data_ptr() and second["b"][0].data_ptr() == first["b"][0].data_ptr()
    assert torch.equal(second["a"], torch.full((3, 4), 2.0))
    payload["a"] = torch.ones(4, 4)
    payload["b"] = [torch.zeros(5, dtype=torch.float64)]
    third = snap.copy(payload)
    assert snap.allocated == 2 and third["a"].shape == (4, 4) and third["b"][0].dtype == torch.float64


def test_writer_reuses_its_buffers(tmp_path):
    _, _, payload = _trained_payload()
    seen, allocated = [], []
    with CheckpointWriter() as writer:
        for epoch in range(2):
            payload["epoch"] = epoch
            writer.save(payload, str(tmp_path / "last.pth"))
            writer.wait()
            seen.append(writer.snapshot._buffers[("model", "0.weight")][0].data_ptr())
            allocated.append(writer.snapshot.allocated)
    assert seen[0] == seen[1] and allocated[0] > 0 and allocated[1] == 0


def test_one_save_in_flight_a_second_waits_for_the_first(tmp_path, monkeypatch):
    _, _, payload = _trained_payload()
    release, log = _gate_writes(monkeypatch)
    timer = threading.Timer(0.4, release.set)
    with CheckpointWriter() as writer:
        writer.save(payload, str(tmp_path / "a.pth"))
        timer.start()
        payload = {**payload, "epoch": 1}
        stall = writer.save(payload, str(tmp_path / "b.pth"))
        assert log[:2] == ["begin 0", "end 0"]  # the second snapshot was taken only after the first write ended
        stats = writer.wait()
    assert stall >= 0.3 and stats.wait_previous_seconds >= 0.3 and stats.stall_seconds == stall
    assert stats.path.endswith("b.pth") and log == ["begin 0", "end 0", "begin 1", "end 1"]
    assert load_checkpoint(str(tmp_path / "a.pth"))["epoch"] == 0
    assert load_checkpoint(str(tmp_path / "b.pth"))["epoch"] == 1


def test_a_failed_background_write_is_raised_at_the_next_wait_naming_the_file(tmp_path, monkeypatch):
    def full(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ac, "atomic_save", full)
    path = str(tmp_path / "checkpoint-last.pth")
    writer = CheckpointWriter()
    writer.save({"epoch": 0, "w": torch.ones(2)}, path)
    with pytest.raises(CheckpointWriteError, match=f"{path} failed: OSError: .*No space left on device") as err:
        writer.wait()
    assert isinstance(err.value, UserError) and isinstance(err.value.__cause__, OSError)
    assert writer.wait() is None  # told once
    writer.close()


def test_a_real_filesystem_failure_is_raised_at_the_next_save(tmp_path):
    (tmp_path / "a-file").write_text("")
    bad = str(tmp_path / "a-file" / "run" / "checkpoint-last.pth")  # its directory cannot be created
    good = str(tmp_path / "checkpoint-last.pth")
    with CheckpointWriter() as writer:
        writer.save({"epoch": 0, "w": torch.ones(2)}, bad)
        with pytest.raises(CheckpointWriteError, match="a-file/run/checkpoint-last.pth failed"):
            writer.save({"epoch": 1, "w": torch.ones(2)}, good)
        assert not os.path.exists(good)  # the failing call made no save
        writer.save({"epoch": 1, "w": torch.ones(2)}, good)
    assert load_checkpoint(good)["epoch"] == 1


def test_a_failing_on_done_is_raised_too(tmp_path):
    def broken(stats):
        raise ValueError("bad callback")

    with CheckpointWriter() as writer:
        writer.save({"epoch": 0}, str(tmp_path / "c.pth"), on_done=broken)
        with pytest.raises(RuntimeError, match="on_done callback of .*c.pth failed: ValueError: bad callback"):
            writer.wait()
    assert load_checkpoint(str(tmp_path / "c.pth"))["epoch"] == 0


def test_copies_are_byte_identical(tmp_path):
    _, _, payload = _trained_payload()
    last = tmp_path / "checkpoint-last.pth"
    copies = [tmp_path / "checkpoint-0000.pth", tmp_path / "checkpoint-0001.pth"]
    with CheckpointWriter() as writer:
        writer.save(payload, str(last), copies=[str(c) for c in copies])
        stats = writer.wait()
    assert stats.copies == tuple(str(c) for c in copies)
    for c in copies:
        assert c.read_bytes() == last.read_bytes()


def test_close_stops_the_writer(tmp_path):
    writer = CheckpointWriter()
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="after close"):
        writer.save({"epoch": 0}, str(tmp_path / "c.pth"))


def test_the_fault_hook_knows_snap(monkeypatch):
    monkeypatch.setenv(faults.ENV, "snap=2")
    assert faults.armed("snap") == 2 and faults.armed("save") is None
    faults.after_snapshot({"epoch": 1})  # another epoch: no kill
    monkeypatch.setenv(faults.ENV, "snap=x")
    with pytest.raises(UserError, match="snap=STEP"):
        faults.armed("snap")


_CHILD = """
import sys
import torch
from supmae.train.async_checkpoint import CheckpointWriter

d = sys.argv[1]
writer = CheckpointWriter()
for epoch in range(2):
    payload = {"model": {"w": torch.full((256, 256), float(epoch))}, "epoch": epoch, "step": epoch}
    writer.save(payload, f"{d}/checkpoint-last.pth", copies=[f"{d}/checkpoint-{epoch:04d}.pth"])
    writer.wait()
    print(f"saved {epoch}", flush=True)
"""


@pytest.mark.parametrize("point", ["snap=1", "save=1"])
def test_a_kill_during_an_async_save_leaves_the_previous_checkpoint(tmp_path, point):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env[faults.ENV] = point
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], check=False, env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split("\n")[:-1] == ["saved 0"]
    ckpt = load_checkpoint(str(tmp_path / "checkpoint-last.pth"))
    assert ckpt["epoch"] == 0 and torch.equal(ckpt["model"]["w"], torch.zeros(256, 256))
    assert load_checkpoint(str(tmp_path / "checkpoint-0000.pth"))["epoch"] == 0
    assert not (tmp_path / "checkpoint-0001.pth").exists()
    torn = [n for n in os.listdir(tmp_path) if n.startswith(".checkpoint-last.pth.tmp-")]
    if point.startswith("snap"):
        assert torn == []  # killed before the write began
    else:
        assert len(torn) == 1 and 0 < (tmp_path / torn[0]).stat().st_size  # killed half-way through it


def test_the_bench_runs_on_a_tiny_model(tmp_path, capsys):
    from benchmarks.cli import main

    threads = torch.get_num_threads()
    out = tmp_path / "figures.json"
    try:
        rc = main(["checkpoint", "--model", "supmae_vit_tiny_patch4", "--repeats", "1", "--threads", "1",
                   "--dir", str(tmp_path / "files"), "--json", str(out), "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = capsys.readouterr().out
    assert "| sync stall (atomic_save) |" in text and "stall(async) / stall(sync)" in text and "target <= 1.10" in text
    result = json.loads(out.read_text())
    assert result["model"] == "supmae_vit_tiny_patch4" and result["payload_bytes"] > 0
    for name in ("sync_stall", "snapshot", "async_stall", "async_background_write"):
        f = result["figures"][name]
        assert len(f["seconds"]) == 1 and f["min"] <= f["median"] <= f["max"]
    assert os.listdir(tmp_path / "files") == []  # the bench's files are removed, the folder kept
    assert isinstance(result["target_met"], bool)


@pytest.mark.gpu
def test_cuda_tensors_are_copied_to_reused_pinned_buffers(tmp_path):
    src = {"w": torch.randn(256, 256, device="cuda"), "v": torch.randn(64, 8, device="cuda").t(), "epoch": 0,
           "cpu": torch.ones(3)}
    snap = HostSnapshot()
    first = snap.copy(src)
    assert first["w"].device.type == "cpu" and first["w"].is_pinned() and not first["cpu"].is_pinned()
    assert torch.equal(first["w"], src["w"].cpu()) and torch.equal(first["v"], src["v"].cpu())
    src["w"].mul_(2)
    second = snap.copy(src)
    assert second["w"].data_ptr() == first["w"].data_ptr() and torch.equal(second["w"], src["w"].cpu())
    with CheckpointWriter() as writer:
        writer.save(src, str(tmp_path / "c.pth"))
        src["w"].zero_()
    assert torch.equal(load_checkpoint(str(tmp_path / "c.pth"))["w"], second["w"])
