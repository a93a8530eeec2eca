"""benchmarks/gpu_check.sh: the one-call device check, rehearsed on the CPU with the very commands the GPU
runs (only the listed substitutions differ), so that a configuration error cannot wait for a GPU to show;
and the trainer's sync-debug switch it relies on."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
# In the order of their value: what a call cut short loses is at the end.
PARTS = ("preflight", "step", "data", "convert", "pretrain", "resume", "doctor", "table1", "nvjpeg", "dali")
# The options whose values the CPU rehearsal may change (device; model width/depth; image count and size;
# iteration counts; workers), and the options only the rehearsal passes (the node the doctor judges: no GPU here).
SUBSTITUTED = {"--device", "--train.device", "--train.sync_debug", "--model.kwargs", "--model-kwargs", "--model", "--depth",
               "--model-scale", "--size", "--train-per-class", "--data.img_size", "--data.num_workers", "--warmup",
               "--iters", "--rounds", "--min-seconds"}
REHEARSAL_ONLY = {"--gpu", "--gpus-per-node", "--cores-per-node"}


def _dry_run(device: str, tmp_path) -> list[tuple[str, list[str]]]:
    env = {**os.environ, "GPU_CHECK_DEVICE": device, "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp_path / device),
           "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = []
    for line in proc.stdout.splitlines():
        if line.startswith("PART "):
            name, cmd = line[5:].split(": ", 1)
            parts.append((name, shlex.split(re.sub(r"gpu_check\.\w+", "gpu_check.W", cmd))))
    return parts


def test_the_script_states_its_call_and_fits_it():
    assert subprocess.run(["bash", "-n", SCRIPT], check=False).returncode == 0
    with open(SCRIPT) as fh:
        text = fh.read()
    budget = int(re.search(r'BUDGET="\$\{GPU_CHECK_BUDGET:-(\d+)\}"', text).group(1))
    timeout_s = int(re.search(r"timeout_s:\s+(\d+)", text).group(1))
    # The whole script, grace and probes included, stops itself within the budget; the call's timeout
    # leaves room for the machine's start-up transfer and the archive.
    assert budget <= 420 and budget < timeout_s <= 600
    assert "carry:" in text and ".ffcv_carry" in text
    assert "PYTHONUNBUFFERED=1" in text and "PYTHONWARNINGS=always" in text
    assert "--train.sync_debug" in text and "TORCH_LOGS=recompiles,graph_breaks" in text


def test_the_rehearsal_runs_the_gpu_commands(tmp_path):
    """GPU_CHECK_DRY_RUN lists each part's command: the CPU list is the CUDA list with only the substituted
    options' values changed (the old rehearsal ran another recipe, which hid a configuration error)."""
    gpu, cpu = _dry_run("cuda", tmp_path), _dry_run("cpu", tmp_path)
    assert [n for n, _ in gpu] == [n for n, _ in cpu] == list(PARTS)
    for (name, g), (_, c) in zip(gpu, cpu, strict=True):
        kept = []
        skip = 0
        for i, tok in enumerate(c):  # the rehearsal-only options and their values
            if skip:
                skip -= 1
                continue
            if tok in REHEARSAL_ONLY:
                skip = 1
                continue
            kept.append(tok)
        assert len(kept) == len(g), (name, g, kept)
        for i, (a, b) in enumerate(zip(g, kept, strict=True)):
            if a != b:
                assert (a, b) == ("cuda", "cpu") or g[i - 1] in SUBSTITUTED, (name, g[i - 1], a, b)
    pretrain = dict(gpu)["pretrain"]
    assert pretrain[pretrain.index("--recipe") + 1] == "supmae_vit_b16_400ep"
    assert pretrain[pretrain.index("--data.batch_size") + 1] == "256"  # the recipe's per-GPU batch
    step = dict(gpu)["step"]
    assert step[step.index("--rows") + 1].startswith("trainer,paper")  # the decisive row first
    assert step[step.index("--batch-size") + 1] == "256"


def test_the_scripts_name_what_the_project_has():
    """The device scripts' Python lines import names from the project (`from pipelines.X import a, b`): each
    must exist, or the device call fails where the rehearsal took another branch (a module split once
    renamed the crop decoder's check and both scripts silently lost the ffcv pipeline)."""
    import importlib

    for script in (SCRIPT, os.path.join(ROOT, "benchmarks", "ffcv_carry.sh")):
        with open(script) as fh:
            text = fh.read()
        found = re.findall(r"from ((?:pipelines|supmae|tools|benchmarks)[\w.]*) import ([\w, ]+)", text)
        assert found, script
        for module, names in found:
            mod = importlib.import_module(module)
            for name in (n.strip() for n in names.split(",")):
                assert hasattr(mod, name), (script, module, name)


def test_the_ffcv_check_of_the_script_passes_where_ffcv_is_installed():
    """gpu_check.sh's own ffcv_ready command, run here (ffcv and the crop decoder are built): it must say yes,
    or the check trains on torchvision although the product's pipeline is there."""
    pytest.importorskip("ffcv")
    with open(SCRIPT) as fh:
        text = fh.read()
    body = re.search(r"ffcv_ready\(\) \{[^\n]*\n(.*?)\n\}", text, re.DOTALL).group(1)
    proc = subprocess.run(["bash", "-c", body.replace('"$PY"', shlex.quote(sys.executable))], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, body


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


def test_doctor_step_json_errors(tmp_path):
    """--step-json: a missing file, a failed trainer row or another device is one clear error."""
    import torch

    from supmae.doctor import read_step_json
    from supmae.errors import UserError

    with pytest.raises(UserError, match="cannot read it"):
        read_step_json(str(tmp_path / "none.json"), torch.device("cpu"))
    path = tmp_path / "step.json"
    path.write_text(json.dumps({"device": "cuda", "rows": [{"name": "trainer", "skipped": "failed: OOM"}]}))
    with pytest.raises(UserError, match="no measured trainer row .failed: OOM"):
        read_step_json(str(tmp_path), torch.device("cpu"))
    path.write_text(json.dumps({"device": "cuda", "rows": [{"name": "trainer", "images_per_sec": 1.0}]}))
    with pytest.raises(UserError, match="measured on cuda; the doctor runs on cpu"):
        read_step_json(str(path), torch.device("cpu"))


@pytest.mark.slow
def test_gpu_check_rehearsal_on_the_cpu(tmp_path):
    """GPU_CHECK_DEVICE=cpu runs every part with the GPU's commands: the recipe supmae_vit_b16_400ep at its
    per-GPU batch on the product's ffcv pipeline, killed-and-resumed; exits 0; leaves at most 8 files in
    $OUT, none deeper than 2 folders, each under 16 MiB; every figure in the archive."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path)}
    env.pop("GPU_CHECK_DRY_RUN", None)
    # About 3 minutes on a quiet 2-core machine; the script's own budget (600 s on the CPU) stops it first.
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=700,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8, files
    for f in files:
        assert os.path.relpath(f, out).count(os.sep) <= 2 and os.path.getsize(f) < 16 * 2**20, f
    summary = (out / "summary.txt").read_text()
    for name in PARTS:
        if name == "dali" and "dali: skipped" in summary:
            continue
        assert re.search(rf"^{name}: ok in \d+ s", summary, re.MULTILINE), (name, summary)
    assert "trainer: ffcv pipeline; 3 epochs logged, 2 process starts" in summary
    assert "host syncs not measured (sync debug watches CUDA only)" in summary
    with tarfile.open(out / "results.tar.gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    res = tmp_path / "x" / "results"
    config = json.loads((res / "trainer" / "config.json").read_text())
    assert config["recipe"] == "supmae_vit_b16_400ep" and config["model"]["name"] == "supmae_vit_base_patch16"
    assert config["data"]["pipeline"] == "ffcv" and config["data"]["batch_size"] == 256
    epochs = [json.loads(line) for line in (res / "trainer" / "log.jsonl").read_text().splitlines()]
    # Each process's first epoch is also given without its first step (compilation); later ones need not.
    assert [("images_per_sec_after_first_step" in e) for e in epochs] == [True, False, True]
    assert (res / "trainer" / "steps.jsonl").stat().st_size > 0
    starts = [json.loads(line) for line in (res / "trainer" / "starts.jsonl").read_text().splitlines()]
    assert [s["start_epoch"] for s in starts] == [0, 2]
    assert json.loads((res / "preflight.json").read_text())["matmul_peak_tflops"] > 0
    step = json.loads((res / "step" / "step.json").read_text())
    assert step["complete"] and [r["name"] for r in step["rows"]] == ["trainer", "paper", "sdpa", "bf16"]
    for r in step["rows"]:
        assert min(r["window_seconds"]) >= step["min_seconds"] and r["first_iter_seconds"] > 0, r["name"]
    doctor = json.loads((res / "doctor" / "doctor.json").read_text())
    assert doctor["node"]["gpu"] == "h100" and doctor["node"]["bound"] in ("data", "compute")
    assert doctor["step"]["source"].startswith("supmae bench step")
    assert doctor["step"]["images_per_sec"] == pytest.approx(step["rows"][0]["images_per_sec"])
    table1 = json.loads((res / "table1" / "table1.json").read_text())
    assert table1["complete"] and [r["key"] for r in table1["rows"]] == ["supmae"]
    assert json.loads((res / "nvjpeg.json").read_text())["cpu_one_thread_images_per_sec"] > 0
