"""Fine-tuning, probing and evaluation under torchrun with two CPU ranks (gloo), and their exact resume.

A 5-class dataset with 15 val images, so that two ranks read a padded val split (one repeat on one
rank): the evaluation must still count each image once and equal a one-process evaluation of the
same weights. Deterministic CPU mode: a run stopped after one epoch (`--train.epochs_per_run 1`)
and continued with `--resume auto` ends with the weights of an uninterrupted run, bit for bit (one
process here; on two ranks, killed anywhere, in the kill matrix).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from procs import REPO, run_job, subprocess_env, torchrun_command

from supmae.cli import main as cli_main
from supmae.models import create_model
from supmae.train.checkpoint import atomic_save, load_checkpoint
from supmae.train.run_dir import read_jsonl

SMALL = {"embed_dim": 64, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
         "cls_hidden_dim": 64}
RECIPES = {"finetune": "tiny_cpu_ft", "linprobe": "tiny_cpu_lin"}


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> str:
    """5 classes x 12 train / 3 val JPEGs (val: 15, odd: two ranks pad it)."""
    from tools.synthetic import make_dataset

    return make_dataset(str(tmp_path_factory.mktemp("odd")), train_per_class=12, val_per_class=3, size=32,
                        num_classes=5, seed=1)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = create_model("supmae_vit_tiny_patch4", **SMALL, num_classes=5)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    atomic_save({"model": model.state_dict(), "model_args": model.model_args, "epoch": 0}, path)
    return path


def torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = torchrun_command(2, ["-m", "supmae.cli", *args])
    proc = run_job(cmd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def job_args(job: str, data: str, ckpt: str, out: str, *extra: str) -> list[str]:
    return [job, "--recipe", RECIPES[job], "--pretrained", ckpt, "--data.path", data, "--output-dir", out,
            "--data.pipeline", "torchvision", "--data.num_workers", "1", "--data.batch_size", "8",
            "--train.epochs", "2", "--train.max_steps_per_epoch", "2", "--train.log_every", "1",
            "--train.device", "cpu", "--train.cpu_threads", "1", "--train.deterministic", "true",
            "--optim.warmup_epochs", "0.5", *extra]


def evaluate_once(ckpt: str, data: str, out: str) -> dict:
    assert cli_main(["eval", "--checkpoint", ckpt, "--data.path", data, "--data.num_workers", "1",
                     "--device", "cpu", "--output-dir", out]) == 0
    return read_jsonl(os.path.join(out, "log.jsonl"))[-1]


def assert_same_weights(a: str, b: str) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs (max abs {(wa[key] - wb[key]).abs().max()})"


@pytest.mark.slow
@pytest.mark.parametrize(("job", "accum"), [("linprobe", "1"), ("finetune", "2")])
def test_two_ranks_train_and_evaluate_once_per_sample(odd_root, tiny_ckpt, tmp_path, job, accum):
    whole = str(tmp_path / "whole")
    extra = ["--optim.accum_iter", accum]
    proc = torchrun(job_args(job, odd_root, tiny_ckpt, whole, *extra))
    # The BatchNorm head's buffers are synchronised before evaluation and saving: the ranks agree.
    assert "weights identical on all 2 ranks" in proc.stdout
    rows = read_jsonl(os.path.join(whole, "log.jsonl"))
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["world_size"] == 2 for r in rows)
    assert sorted(os.listdir(whole)) == ["checkpoint-best.pth", "checkpoint-last.pth", "config.json", "log.jsonl",
                                         "processes", "run.lock", "starts.jsonl", "steps.jsonl"]  # rank 0 alone writes

    # The 2-rank evaluation of the final weights = a 1-process evaluation of the same checkpoint,
    # which = a 2-rank `supmae eval`: all 15 images, each once.
    last = os.path.join(whole, "checkpoint-last.pth")
    single = evaluate_once(last, odd_root, str(tmp_path / "eval1"))
    assert single["samples"] == 15 and single["world_size"] == 1
    assert single["test_acc1"] == rows[-1]["test_acc1"] and single["test_acc5"] == rows[-1]["test_acc5"]
    assert single["test_loss"] == pytest.approx(rows[-1]["test_loss"], rel=1e-6)
    eval2 = str(tmp_path / "eval2")
    torchrun(["eval", "--checkpoint", last, "--data.path", odd_root, "--data.num_workers", "1", "--device", "cpu",
              "--output-dir", eval2])
    double = read_jsonl(os.path.join(eval2, "log.jsonl"))[-1]
    assert double["world_size"] == 2 and double["samples"] == 15 and double["test_acc1"] == single["test_acc1"]

    # A 2-rank resume of both jobs is exact in the kill matrix (finetune-*-2rank, linprobe-*-2rank, killed inside
    # and at the end of epochs), and a run that stops itself (--train.epochs_per_run) then resumes is exact in
    # test_one_process_resume_is_exact below and test_pretrain's chunks: the engine's path is the same.


@pytest.mark.slow
@pytest.mark.parametrize("job", ["finetune", "linprobe"])
def test_one_process_resume_is_exact(odd_root, tiny_ckpt, tmp_path, job):
    whole, chunked = str(tmp_path / "whole"), str(tmp_path / "chunked")
    assert cli_main(job_args(job, odd_root, tiny_ckpt, whole)) == 0
    assert cli_main(job_args(job, odd_root, tiny_ckpt, chunked, "--train.epochs_per_run", "1")) == 0
    assert cli_main(job_args(job, odd_root, tiny_ckpt, chunked, "--resume", "auto")) == 0
    assert_same_weights(os.path.join(whole, "checkpoint-last.pth"), os.path.join(chunked, "checkpoint-last.pth"))


@pytest.mark.slow
def test_finetune_killed_mid_epoch_then_resumed_is_exact(odd_root, tiny_ckpt, tmp_path):
    args = ["--train.epochs", "3", "--train.max_steps_per_epoch", "6"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert cli_main(job_args("finetune", odd_root, tiny_ckpt, whole, *args)) == 0
    cmd = [sys.executable, "-m", "supmae.cli", *job_args("finetune", odd_root, tiny_ckpt, killed, *args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(), cwd=REPO)
    steps = os.path.join(killed, "steps.jsonl")
    deadline = time.time() + 120
    try:
        # kill -9 inside epoch 1 (its first steps logged, its checkpoint not yet written)
        while not any(r["epoch"] == 1 for r in read_jsonl(steps)):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert load_checkpoint(os.path.join(killed, "checkpoint-last.pth"))["epoch"] == 0
    assert cli_main(job_args("finetune", odd_root, tiny_ckpt, killed, *args, "--resume", "auto")) == 0
    assert_same_weights(os.path.join(whole, "checkpoint-last.pth"), os.path.join(killed, "checkpoint-last.pth"))
    assert [r["epoch"] for r in read_jsonl(os.path.join(killed, "log.jsonl"))] == [0, 1, 2]
