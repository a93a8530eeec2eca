"""End-to-end pretraining on the CPU: a tiny SupMAE on the generated JPEG dataset, converted once.

Every run uses the `tiny_cpu` recipe shrunk further (1 encoder block of width 32, 6 steps of 32
images per epoch) so that a run takes seconds; the contracts checked are those of the full
trainer: log and checkpoint files, the lr schedule, exact resume after `kill -9`, DDP through
torchrun, and clear failures that leave written files intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from procs import REPO, run_job, subprocess_env, torchrun_command

from supmae.cli import main as cli_main
from supmae.train.checkpoint import load_checkpoint
from supmae.train.run_dir import read_jsonl

TINY_MODEL = json.dumps({"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32,
                         "decoder_num_heads": 2, "cls_hidden_dim": 32})
LOG_KEYS = {"epoch", "train_lr", "loss", "rec_loss", "cls_loss", "epoch_seconds", "images_per_sec", "step_time_ms",
            "data_wait_frac", "data_wait_seconds", "eval_seconds", "checkpoint_seconds", "peak_mem_mb",
            "device_hours", "elapsed_seconds", "world_size", "device", "steps", "images", "total_epochs",
            "process_epoch", "flops_per_image"}
STEP_KEYS = {"step", "epoch", "lr", "loss", "images_per_sec", "data_wait_frac", "elapsed_seconds"}


@pytest.fixture(scope="module")
def converted(synthetic_converted) -> str:
    """The session's synthetic dataset converted to FFCV and webdataset (64 px max side)."""
    return synthetic_converted


def run_args(data: str, out: str, pipeline: str = "ffcv", epochs: int = 2, steps: int = 6, *extra: str) -> list[str]:
    return [
        "--recipe", "tiny_cpu", "--data.path", data, "--output-dir", out, "--data.pipeline", pipeline,
        "--train.epochs", str(epochs), "--data.batch_size", "32", "--train.max_steps_per_epoch", str(steps),
        "--train.log_every", "2", "--train.cpu_threads", "1", "--data.num_workers", "1",
        "--model.kwargs", TINY_MODEL, "--optim.lr", "2e-3", "--optim.warmup_epochs", "0.5", *extra,
    ]


def run_cli(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return run_job([sys.executable, "-m", "supmae.cli", "pretrain", *argv], timeout=timeout)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def snapshot(run_dir: str) -> dict[str, str]:
    return {name: digest(os.path.join(run_dir, name)) for name in sorted(os.listdir(run_dir))
            if os.path.isfile(os.path.join(run_dir, name))}


@pytest.mark.slow
@pytest.mark.core
@pytest.mark.parametrize("pipeline", ["ffcv", "dali", "torchvision"])
def test_two_epochs_lower_the_loss_and_write_the_run_dir(converted, tmp_path, capsys, pipeline):
    out = str(tmp_path / "run")
    assert cli_main(["pretrain", *run_args(converted, out, pipeline)]) == 0
    files = set(os.listdir(out))
    assert {"config.json", "log.jsonl", "steps.jsonl", "checkpoint-last.pth", "checkpoint-0001.pth"} <= files
    assert not any(name.startswith(".") for name in files)  # no leftover temporary files

    config = read_json(os.path.join(out, "config.json"))
    assert config["recipe"] == "tiny_cpu" and config["data"]["pipeline"] == pipeline

    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert LOG_KEYS <= set(r), LOG_KEYS - set(r)
        assert r["world_size"] == 1 and r["device"] == "cpu" and r["steps"] == 6 and r["images"] == 6 * 32
        assert r["total_epochs"] == 8  # the recipe's planned length, not this shortened run's
        assert 0.0 <= r["data_wait_frac"] <= 1.0 and r["images_per_sec"] > 0
        assert r["loss"] == pytest.approx(r["rec_loss"] + r["cls_loss"])
        assert 0.0 <= r["val_cls_acc1"] <= 100.0  # the dataset has a val split
    assert rows[1]["loss"] < rows[0]["loss"]
    assert rows[1]["elapsed_seconds"] > rows[0]["elapsed_seconds"]

    # steps.jsonl: every 2 steps; its lr is the reference formula (peak 2e-3, warmup 0.5 epoch of 2).
    steps = read_jsonl(os.path.join(out, "steps.jsonl"))
    assert [s["step"] for s in steps] == [2, 4, 6, 8, 10, 12]
    for s in steps:
        assert STEP_KEYS <= set(s)
        e = s["epoch"] + ((s["step"] - 1) % 6) / 6  # the lr was set before step `step` (1-based)
        expected = 2e-3 * e / 0.5 if e < 0.5 else 2e-3 * 0.5 * (1 + math.cos(math.pi * (e - 0.5) / 1.5))
        assert s["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)

    ckpt = load_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    assert {"model", "optimizer", "scaler", "epoch", "step", "config", "model_args", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 12 and ckpt["model_args"]["name"] == "supmae_vit_tiny_patch4"
    assert "patch_embed.proj.weight" in ckpt["model"] and "cls_head.0.weight" in ckpt["model"]
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"])
    assert "pos_embed" in ckpt["model"]  # stored (reference layout) though never trained

    # --resume auto on a finished run has nothing to do and changes nothing.
    before = snapshot(out)
    assert cli_main(["pretrain", *run_args(converted, out, pipeline), "--resume", "auto"]) == 0
    assert snapshot(out) == before
    capsys.readouterr()


def _wait_for_epoch_step(steps_path: str, proc: subprocess.Popen, epoch: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before epoch {epoch}: {proc.stderr.read()}")
        if any(r.get("epoch") == epoch for r in read_jsonl(steps_path)):
            return
        time.sleep(0.01)
    raise AssertionError(f"no step of epoch {epoch} within {timeout} s")


def assert_same_weights(dir_a: str, dir_b: str, name: str) -> None:
    a = load_checkpoint(os.path.join(dir_a, name))
    b = load_checkpoint(os.path.join(dir_b, name))
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    ref_rows = read_jsonl(os.path.join(dir_a, "log.jsonl"))
    rows = read_jsonl(os.path.join(dir_b, "log.jsonl"))
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert [r["val_cls_acc1"] for r in rows] == [r["val_cls_acc1"] for r in ref_rows]


# Exact resume needs a pipeline whose epoch e is a function of (seed, e) only: all three are
# (augmentation drawn from (seed, epoch, sample index)). The chunked resume runs on the two quick
# ones; ffcv's kill -9 resume, on one and two ranks, is in test_production_matrix.py.
DETERMINISTIC_PIPELINES = ["torchvision", "dali"]


@pytest.mark.slow
def test_kill_during_epoch_2_then_resume_gives_identical_weights(converted, tmp_path):
    common = ("--train.deterministic", "true", "--train.log_every", "1")
    ref_dir, run_dir = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")

    ref = run_cli(run_args(converted, ref_dir, "torchvision", 3, 6, *common))
    assert ref.returncode == 0, ref.stderr

    proc = subprocess.Popen([sys.executable, "-m", "supmae.cli", "pretrain",
                             *run_args(converted, run_dir, "torchvision", 3, 6, *common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            cwd=REPO)
    try:
        _wait_for_epoch_step(os.path.join(run_dir, "steps.jsonl"), proc, epoch=1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # It died inside epoch 2 (index 1): only epoch 0 is checkpointed.
    assert load_checkpoint(os.path.join(run_dir, "checkpoint-last.pth"))["epoch"] == 0
    assert not os.path.exists(os.path.join(run_dir, "checkpoint-0002.pth"))

    resumed = run_cli(run_args(converted, run_dir, "torchvision", 3, 6, *common, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout

    assert_same_weights(ref_dir, run_dir, "checkpoint-0002.pth")
    # The resumed logs continue the interrupted ones: the killed epoch's step lines were replaced.
    assert [s["step"] for s in read_jsonl(os.path.join(run_dir, "steps.jsonl"))] == list(range(1, 19))


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", DETERMINISTIC_PIPELINES)
def test_resume_in_chunks_is_exact(converted, tmp_path, capsys, pipeline):
    ref_dir, run_dir = str(tmp_path / "whole"), str(tmp_path / "chunks")
    common = ("--train.deterministic", "true")
    assert cli_main(["pretrain", *run_args(converted, ref_dir, pipeline, 3, 4, *common)]) == 0
    assert cli_main(["pretrain", *run_args(converted, run_dir, pipeline, 3, 4, *common),
                     "--train.epochs_per_run", "2"]) == 0
    assert load_checkpoint(os.path.join(run_dir, "checkpoint-last.pth"))["epoch"] == 1
    assert cli_main(["pretrain", *run_args(converted, run_dir, pipeline, 3, 4, *common),
                     "--train.epochs_per_run", "2", "--resume", "auto"]) == 0
    capsys.readouterr()
    assert_same_weights(ref_dir, run_dir, "checkpoint-0002.pth")


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(converted, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli_main(["pretrain", *run_args(converted, out, "torchvision", 1)]) == 0
    before = snapshot(out)
    capsys.readouterr()
    code = cli_main(["pretrain", *run_args(converted, out, "torchvision", 3), "--optim.lr", "1e30", "--resume", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "non-finite loss at step" in err[0] and "checkpoint-last.pth) is intact" in err[0]
    # Nothing written before the failure changed: no checkpoint after the bad step, log untouched.
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k not in ("steps.jsonl", "config.json", "starts.jsonl")} == {
        k: v for k, v in before.items() if k not in ("steps.jsonl", "config.json", "starts.jsonl")}
    assert load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["epoch"] == 0


@pytest.mark.slow
def test_corrupt_checkpoints_and_refusals_leave_files_intact(converted, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli_main(["pretrain", *run_args(converted, out, "torchvision", 2), "--train.save_every", "1"]) == 0
    capsys.readouterr()
    last = os.path.join(out, "checkpoint-last.pth")
    with open(last, "r+b") as fh:  # truncate: a half-written file from a crash on another writer
        fh.truncate(os.path.getsize(last) // 3)
    before = snapshot(out)

    # Starting afresh in a directory that holds a run would overwrite it: refused.
    assert cli_main(["pretrain", *run_args(converted, out, "torchvision", 2)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # An explicitly named corrupt checkpoint: a clear one-line error.
    assert cli_main(["pretrain", *run_args(converted, out, "torchvision", 3), "--resume", last]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read checkpoint" in err[0] and "checkpoint-last.pth" in err[0]
    # A missing dataset while resuming.
    assert cli_main(["pretrain", *run_args(str(tmp_path / "nowhere"), out, "torchvision", 3), "--resume", "auto"]) == 2
    assert "dataset not found" in capsys.readouterr().err
    assert snapshot(out) == before

    # --resume auto reports the corrupt file and continues from the newest valid one.
    assert cli_main(["pretrain", *run_args(converted, out, "torchvision", 3), "--resume", "auto"]) == 0
    captured = capsys.readouterr()
    assert "skipping unusable checkpoint" in captured.out and "checkpoint-0001.pth" in captured.out
    assert load_checkpoint(last)["epoch"] == 2
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, "log.jsonl"))] == [0, 1, 2]

    # Every checkpoint unusable and a run in the directory: refuse rather than start over.
    for name in os.listdir(out):
        if name.endswith(".pth"):
            with open(os.path.join(out, name), "wb") as fh:
                fh.write(b"not a checkpoint")
    before = snapshot(out)
    assert cli_main(["pretrain", *run_args(converted, out, "torchvision", 4), "--resume", "auto"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err
    assert snapshot(out) == before


def torchrun(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return run_job(torchrun_command(2, args), timeout=timeout)


@pytest.mark.slow
@pytest.mark.core
def test_torchrun_two_cpu_ranks(converted, tmp_path):
    out = str(tmp_path / "ddp")
    proc = torchrun(["-m", "supmae.cli", "pretrain", *run_args(converted, out, "torchvision", 2, 3)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The trainer compares a fingerprint of every parameter and buffer across ranks at the end.
    assert "weights identical on all 2 ranks" in proc.stdout
    assert proc.stdout.count("done: 2 epochs") == 1  # rank 0 alone reports ...
    assert sorted(os.listdir(out)) == ["checkpoint-0001.pth", "checkpoint-last.pth", "config.json", "log.jsonl",
                                       "processes", "run.lock", "starts.jsonl", "steps.jsonl"]  # ... and writes
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert r["world_size"] == 2 and r["steps"] == 3 and r["images"] == 2 * 3 * 32
    assert [s["step"] for s in read_jsonl(os.path.join(out, "steps.jsonl"))] == [2, 4, 6]
    config = read_json(os.path.join(out, "config.json"))
    assert config["output_dir"] == out


SHARD_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from supmae.train import distributed as D
    from supmae.train.data import DataConfig

    data, pipeline, out = sys.argv[1], sys.argv[2], sys.argv[3]
    with D.distributed("cpu", 120) as info:
        cfg = DataConfig(path=data, pipeline=pipeline, batch_size=16, img_size=32, num_workers=1)
        # The trainer's call, with train=False so that a sample's pixels identify it (no random crop).
        loader = cfg.build("train", train=False, device=info.device, rank=info.rank,
                           world_size=info.world_size, seed=0)
        loader.set_epoch(0)
        mine = [hashlib.sha1(img.numpy().tobytes()).hexdigest() for imgs, _ in loader for img in imgs]
        everyone = D.all_gather_object(mine)
        if info.rank == 0:
            json.dump({"ranks": everyone, "len": len(loader)}, open(out, "w"))
""")


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["dali", "torchvision"])
def test_torchrun_ranks_read_disjoint_shards(converted, tmp_path, pipeline):
    script = tmp_path / "shards.py"
    script.write_text(SHARD_SCRIPT)
    result = tmp_path / "shards.json"
    proc = torchrun([str(script), converted, pipeline, str(result)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = read_json(str(result))
    a, b = (set(r) for r in got["ranks"])
    # Without drop_last: 200 samples per rank in 13 batches (the last one of 8), together all 400 once.
    assert got["len"] == 13 and len(got["ranks"][0]) == len(got["ranks"][1]) == 200
    assert len(a) == 200 and len(b) == 200 and not a & b


@pytest.mark.slow
def test_accumulation_bf16_and_the_batch_norm_warning(converted, tmp_path, capsys):
    out = str(tmp_path / "accum")
    argv = run_args(converted, out, "dali", 1, 6, "--data.batch_size", "16", "--optim.accum_iter", "2",
                    "--train.precision", "bf16", "--train.val", "false")
    assert cli_main(["pretrain", *argv]) == 0
    stdout = capsys.readouterr().out
    assert "effective batch 32 = 16 per device x 2 accumulation x 1 devices; peak lr 0.002" in stdout
    assert "precision bf16" in stdout
    assert "warning: gradient accumulation (2) with the BatchNorm classification head" in stdout
    (row,) = read_jsonl(os.path.join(out, "log.jsonl"))
    assert row["steps"] == 3 and row["images"] == 6 * 16 and "val_cls_acc1" not in row
    assert math.isfinite(row["loss"])


@pytest.mark.gpu
def test_gpu_run_bf16_compiled(synthetic_root, tmp_path, capsys):
    # torchvision reads the raw ImageFolder tree: no conversion needed on a GPU machine.
    out = str(tmp_path / "gpu")
    argv = run_args(synthetic_root, out, "torchvision", 2, 6, "--train.device", "cuda", "--train.cpu_threads", "0")
    assert cli_main(["pretrain", *argv]) == 0
    stdout = capsys.readouterr().out
    assert "precision bf16" in stdout and "compile on" in stdout
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert rows[0]["device"] != "cpu" and rows[0]["peak_mem_mb"] > 0 and rows[1]["loss"] < rows[0]["loss"]
    assert load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["optimizer"]["param_groups"][0]["fused"]


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["ffcv", "dali", "torchvision"])
def test_validation_counts_every_sample_once_across_ranks(converted, pipeline):
    # 100 val images over 3 ranks: 34 per rank, 2 repeats; the counted samples are exactly the 100.
    from supmae.train.data import DataConfig
    from supmae.train.pretrain import real_samples

    cfg = DataConfig(path=converted, pipeline=pipeline, batch_size=16, img_size=32, num_workers=1)
    counted, repeats = [], []
    for rank in range(3):
        loader = cfg.build("val", train=False, device="cpu", rank=rank, world_size=3, seed=0)
        hashes = [hashlib.sha1(img.numpy().tobytes()).hexdigest() for imgs, _ in loader for img in imgs]
        assert len(hashes) == 34
        real = real_samples(loader)
        counted += hashes[:real]
        repeats += hashes[real:]
    assert len(counted) == 100 and len(set(counted)) == 100
    assert len(repeats) == 2 and set(repeats) <= set(counted)


def test_tensorboard_is_feature_detected(converted, tmp_path, capsys):
    from supmae.train.run_dir import tensorboard_available

    out = str(tmp_path / "tb")
    code = cli_main(["pretrain", *run_args(converted, out, "dali", 1, 2), "--train.tensorboard", "true",
                     "--train.val", "false"])
    if tensorboard_available():
        assert code == 0 and os.listdir(os.path.join(out, "tb"))
    else:
        assert code == 2 and "needs the 'tensorboard' package" in capsys.readouterr().err
        assert os.listdir(out) == ["run.lock"]  # refused before writing anything but the job's lock
