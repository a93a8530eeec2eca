"""benchmarks/gpu_check.sh: the one-call device check, rehearsed on the CPU so that it cannot rot between
device sessions; and the trainer's sync-debug switch it relies on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
PARTS = ("preflight", "data", "pretrain", "resume", "step", "doctor", "table1")


def _limits(device: str) -> dict[str, int]:
    """The per-part limits the script sets for `device` ("cuda": the first LIMITS line, "cpu": the second)."""
    with open(SCRIPT) as fh:
        lines = [ln for ln in fh if ln.strip().startswith("LIMITS=(")]
    line = lines[0 if device == "cuda" else 1]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def test_the_gpu_parts_fit_one_call():
    assert subprocess.run(["bash", "-n", SCRIPT], check=False).returncode == 0
    limits = _limits("cuda")
    assert set(limits) == {*PARTS, "dali"}
    assert sum(limits.values()) < 420  # a device call is cut at about 7 minutes
    with open(SCRIPT) as fh:
        text = fh.read()
    assert "PYTHONUNBUFFERED=1" in text and "pip install" not in text
    assert "--train.sync_debug warn" in text and "TORCH_LOGS=recompiles,graph_breaks" in text


def test_sync_debug_is_refused_off_cuda_and_checked(synthetic_root, tmp_path, capsys):
    """--train.sync_debug watches CUDA host syncs: on a CPU run it is a clear error, not a flag accepted
    and ignored; a value other than off / warn / error is refused before anything runs."""
    from supmae.cli import main

    base = ["pretrain", "--recipe", "tiny_cpu", "--data.path", synthetic_root, "--data.pipeline", "torchvision",
            "--data.num_workers", "0", "--train.epochs", "1", "--train.max_steps_per_epoch", "1",
            "--train.val", "false", "--model.kwargs", '{"depth": 1}', "--train.device", "cpu"]
    assert main([*base, "--output-dir", str(tmp_path / "a"), "--train.sync_debug", "loud"]) == 2
    assert "--train.sync_debug must be off, warn or error" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "b"), "--train.sync_debug", "warn"]) == 2
    assert "watches CUDA host syncs; this run is on cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_rehearsal_on_the_cpu(tmp_path):
    """GPU_CHECK_DEVICE=cpu runs every part at toy size, exits 0, and leaves each part's figures in $OUT
    (the dali part too where DALI is installed: its CPU graph)."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path)}
    # About 2 minutes on an idle 2-core machine, 4.5 under the load of several test runs: the limit leaves room.
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    for name in PARTS:
        assert f"{name}: ok in" in summary, summary
        assert (out / f"{name}.log").is_file(), name
    assert "trainer: 3 epochs logged" in summary
    assert json.loads((out / "preflight.json").read_text())["compile_seconds"] > 0
    step = json.loads((out / "step" / "step.json").read_text())
    assert step["complete"] and any("images_per_sec" in r for r in step["rows"])
    doctor = json.loads((out / "doctor" / "doctor.json").read_text())
    assert doctor["node"]["gpu"] == "h100" and doctor["node"]["bound"] in ("data", "compute")
    table1 = json.loads((out / "table1" / "table1.json").read_text())
    assert table1["complete"] and [r["key"] for r in table1["rows"]] == ["supmae"]
    assert "left out" in summary
    if "dali: skipped" not in summary:
        assert "dali: ok in" in summary and json.loads((out / "dali.json").read_text())["randaugment"]["images_per_sec"] > 0
