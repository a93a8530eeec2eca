"""A run checkpointed inside an epoch and resumed on another number of ranks (2 -> 1, 1 -> 2) continues
the very sequence of global batches the uninterrupted run reads, with the same augmentation and the same
masking noise (per sample), so its weights match it up to the order of floating-point reductions.

What makes it so (see `pipelines.base.rank_order` and `supmae.train.masking_noise`): one permutation per
(seed, epoch) dealt out in blocks of a batch, so that rank r's batch k is the batch k S + r a single
process reads (same micro-batches, BatchNorm statistics included); per-sample augmentation and masking
noise; the same effective batch (accumulation makes up the ranks).

Tolerance: measured on this CPU the parameters come out identical to the bit (gloo's mean of two ranks'
gradients equals the accumulated mean of the same two micro-batches here); the test allows 1e-6 absolute
for reductions in another order. BatchNorm's running statistics are not compared: under DDP they are rank
0's own (its micro-batches only), on one process every micro-batch's, by design of DDP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from procs import REPO, kill_job, run_job, subprocess_env, torchrun_command

from supmae.train import faults
from supmae.train.checkpoint import load_checkpoint
from supmae.train.run_dir import read_jsonl

pytestmark = pytest.mark.slow

TINY = json.dumps({"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
                   "cls_hidden_dim": 32})
# 6 optimiser steps of 32 images an epoch (--train.max_steps_per_epoch counts a rank's micro-batches: 12 on one
# rank at accumulation 2, 6 on two at 1), 2 epochs: step 9 is inside epoch 1.
STEPS, KILL_STEP = 6, 9
TOLERANCE = 1e-6


def _args(data: str, out: str, pipeline: str, *extra: str, trace: bool = True, ranks: int = 1) -> list[str]:
    return ["pretrain", "--train.max_steps_per_epoch", str(2 * STEPS // ranks), "--recipe", "tiny_cpu", "--model.kwargs", TINY, "--optim.lr", "2e-3",
            "--optim.warmup_epochs", "0.5", "--data.path", data, "--data.pipeline", pipeline,
            "--data.num_workers", "1", "--data.batch_size", "16", "--optim.effective_batch", "32",
            "--train.epochs", "2", "--train.log_every", "1", "--train.cpu_threads", "1", "--train.device", "cpu",
            "--train.deterministic", "true", "--train.checkpoint_minutes", "1e-6", "--train.trace_samples",
            str(trace).lower(), "--train.dist_timeout_s", "200", "--output-dir", out, *extra]


def _command(ranks: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "supmae.cli", *args] if ranks == 1 else torchrun_command(ranks, ["-m", "supmae.cli",
                                                                                                    *args])


def _killed(ranks: int, args: list[str], point: str) -> None:
    proc = subprocess.Popen(_command(ranks, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**subprocess_env(), faults.ENV: point}, cwd=REPO, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        kill_job(proc.pid)
        if proc.poll() is None:
            proc.wait(timeout=60)
    assert proc.returncode != 0, err[-3000:]
    if ranks == 1:
        assert proc.returncode == -signal.SIGKILL, err[-3000:]


@pytest.mark.parametrize(("pipeline", "before", "after"), [("ffcv", 2, 1), ("torchvision", 1, 2)],
                         ids=["ffcv-2-to-1", "torchvision-1-to-2"])
def test_a_resume_on_another_rank_count_reads_the_same_global_batches(synthetic_converted, tmp_path, pipeline,
                                                                       before, after):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    done = run_job(_command(1, _args(synthetic_converted, ref, pipeline)), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _killed(before, _args(synthetic_converted, run, pipeline, ranks=before), f"done={KILL_STEP}")
    assert load_checkpoint(os.path.join(run, "checkpoint-last.pth"))["position"]["world_size"] == before
    resumed = run_job(_command(after, _args(synthetic_converted, run, pipeline, "--resume", "auto", ranks=after)),
                      timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming inside epoch 1 on {after} rank(s) (the checkpoint's: {before})" in resumed.stdout

    # The same global batches, step by step: samples.jsonl of the killed-and-resumed run equals the reference's.
    ref_samples, run_samples = read_jsonl(os.path.join(ref, "samples.jsonl")), read_jsonl(os.path.join(run, "samples.jsonl"))
    assert len(ref_samples) == 2 * STEPS and [r["step"] for r in run_samples] == list(range(1, 2 * STEPS + 1))
    assert run_samples == ref_samples
    starts = read_jsonl(os.path.join(run, "starts.jsonl"))
    assert [(s["world_size"], s["start_step"]) for s in starts] == [(before, 0), (after, KILL_STEP)]

    a = load_checkpoint(os.path.join(ref, "checkpoint-last.pth"))["model"]
    b = load_checkpoint(os.path.join(run, "checkpoint-last.pth"))["model"]
    params = [k for k in a if "running_" not in k and "num_batches_tracked" not in k]
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in params)
    assert diff <= TOLERANCE, diff
    ref_rows, rows = read_jsonl(os.path.join(ref, "log.jsonl")), read_jsonl(os.path.join(run, "log.jsonl"))
    for key in ("loss", "rec_loss", "cls_loss"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref_rows], rel=1e-6, abs=1e-9), key


def test_dali_refuses_another_rank_count_inside_an_epoch_and_tracing(synthetic_converted, tmp_path):
    """DALI's reader cuts the shards between ranks itself: a checkpoint inside an epoch resumes on its own rank
    count only (one line naming it), and --train.trace_samples is refused (its reader does not tell the order)."""
    run = str(tmp_path / "run")
    args = _args(synthetic_converted, run, "dali", trace=False, ranks=2)
    _killed(2, args, "done=3")
    refused = run_job(_command(1, [*args, "--resume", "auto"]), timeout=300)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "resume it on 2 rank(s)" in refused.stderr and refused.stderr.count("\n") <= 3, refused.stderr
    traced = run_job(_command(1, _args(synthetic_converted, str(tmp_path / "t"), "dali", "--train.epochs", "1")),
                     timeout=300)
    assert traced.returncode == 2 and "--train.trace_samples needs a pipeline" in traced.stderr, traced.stderr[-2000:]
