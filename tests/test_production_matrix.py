"""The paths users run, as they run them: every job x pipeline x rank count, killed with SIGKILL
and resumed with `--resume auto`, against an uninterrupted run.

Each case runs the killed process and the resumed one on a tiny model and dataset, with gradient
accumulation 2, deterministic CPU kernels and a checkpoint after every optimiser step (the
time-based checkpoints inside epochs, `--train.checkpoint_minutes`, at a tiny interval; written in
the background), and requires the resumed run to end with exactly the uninterrupted reference's
weights, optimiser state and logged losses (one reference per job x pipeline x ranks). Two ranks run
under torchrun (gloo). An epoch is 2 optimiser steps (steps 1-2 epoch 0, 3-4 epoch 1): two epochs give
every kill point (inside an epoch, at its end, after the first checkpoint) at the least cost.
Every cell is killed once, at one of:

- `mid`: every process of the job (torchrun and its ranks) is SIGKILLed from outside, as a lost node
  would be, as soon as a step of epoch 1 is logged (whatever save is then in flight);
- `step1`: rank 0 SIGKILLs itself right after step 1's line, before any checkpoint: `--resume auto`
  must move the books aside and start over;
- `saveS`: half-way through writing step S's checkpoint on the writer's thread (a torn temporary
  file on disk; S = 2 an epoch's end, S = 3 inside epoch 1): it must never be taken for a checkpoint;
- `snapS`: between the host snapshot of step S's checkpoint and the start of its write;
- `doneS`: right after step S's checkpoint is in place (S = 1 or 3: inside an epoch), so the run
  resumes inside that epoch, its consumed batches skipped without being read.
The exact points go through the trainer's test hook `SUPMAE_TEST_KILL_AT` (`supmae.train.faults`);
a poller outside the process could hit them only by luck.

The matrix is marked `slow` (CI runs it; `-m "not slow"` skips it on a laptop).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from procs import REPO, kill_job, run_job, subprocess_env, torchrun_command

from supmae.cli import main as cli_main
from supmae.train import faults
from supmae.train.checkpoint import load_checkpoint
from supmae.train.run_dir import read_jsonl

TINY_PRETRAIN = json.dumps({"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32,
                            "decoder_num_heads": 2, "cls_hidden_dim": 32})
TINY_ENCODER = {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
                "cls_hidden_dim": 32, "num_classes": 10}
EPOCHS, MICRO_STEPS, BATCH = 2, 4, 16
# A run takes 5-40 s here; one still going after JOB_TIMEOUT is stuck and is killed with its threads' stacks
# (procs.run_job). A collective stuck on one rank raises after DIST_TIMEOUT first, with its traceback.
JOB_TIMEOUT, DIST_TIMEOUT = 300, 200

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(synthetic_converted) -> str:
    return synthetic_converted


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory) -> str:
    from supmae.models import create_model
    from supmae.train.checkpoint import atomic_save

    torch.manual_seed(0)
    model = create_model("supmae_vit_tiny_patch4", **TINY_ENCODER)
    path = str(tmp_path_factory.mktemp("matrix-ckpt") / "encoder.pth")
    atomic_save({"model": model.state_dict(), "model_args": model.model_args, "epoch": 0}, path)
    return path


def _job_args(job: str, pipeline: str, data: str, out: str, ckpt: str) -> list[str]:
    common = ["--output-dir", out, "--data.path", data, "--data.pipeline", pipeline, "--data.num_workers", "1",
              "--data.batch_size", str(BATCH), "--train.epochs", str(EPOCHS),
              "--train.max_steps_per_epoch", str(MICRO_STEPS), "--optim.accum_iter", "2", "--train.log_every", "1",
              "--train.cpu_threads", "1", "--train.device", "cpu", "--train.deterministic", "true",
              "--train.dist_timeout_s", str(DIST_TIMEOUT), "--train.checkpoint_minutes", "1e-6"]
    # Evaluation at the last epoch only: a killed run then never builds its evaluation pipeline (FFCV compiles
    # one per loader), and the resumed run's evaluation is still compared with the reference's.
    if job == "pretrain":
        return ["pretrain", "--recipe", "tiny_cpu", "--model.kwargs", TINY_PRETRAIN, "--optim.lr", "2e-3",
                "--optim.warmup_epochs", "0.5", "--train.val_every", str(EPOCHS), *common]
    recipe = {"finetune": "tiny_cpu_ft", "linprobe": "tiny_cpu_lin"}[job]
    extra = ["--data.randaugment", ""] if job == "finetune" and pipeline == "ffcv" else []
    return [job, "--recipe", recipe, "--pretrained", ckpt, "--optim.warmup_epochs", "0.5",
            "--train.eval_every", str(EPOCHS), *extra, *common]


def _command(ranks: int, args: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "supmae.cli", *args]
    return torchrun_command(ranks, ["-m", "supmae.cli", *args])


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """The uninterrupted run of each (job, pipeline, ranks), made once for all its kill points."""
    return {"root": tmp_path_factory.mktemp("matrix-references"), "done": {}}


def _reference(references: dict, job: str, pipeline: str, ranks: int, data: str, ckpt: str) -> str:
    key = (job, pipeline, ranks)
    if key not in references["done"]:
        ref_dir = str(references["root"] / f"{job}-{pipeline}-{ranks}")
        ref = _run(ranks, _job_args(job, pipeline, data, ref_dir, ckpt))
        if ranks > 1:
            assert "weights identical on all 2 ranks" in ref.stdout
        references["done"][key] = ref_dir
    return references["done"][key]


def _run(ranks: int, args: list[str]) -> subprocess.CompletedProcess:
    """An uninterrupted run (a reference, or the resumed run) to its end. One rank runs in this test process
    through the very command-line entry (`supmae.cli.main`): a subprocess would add only the interpreter's
    and the imports' start-up, about 5 s of the CPU per run; the killed runs are real processes (they must
    die by SIGKILL), and two ranks run under torchrun."""
    if ranks == 1:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(args)
        proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    else:
        proc = run_job(_command(ranks, args), timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _kill_mid_run(ranks: int, args: list[str], run_dir: str) -> int:
    """Start the job, SIGKILL all its processes as soon as a step of epoch 1 is logged;
    returns how many step lines had been written (some of them after the last checkpoint)."""
    steps_path = os.path.join(run_dir, "steps.jsonl")
    proc = subprocess.Popen(_command(ranks, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}")
            if any(r.get("epoch", -1) >= 1 for r in read_jsonl(steps_path)):
                break
            time.sleep(0.005)
        else:
            raise AssertionError("no step of epoch 1 within 300 s")
        kill_job(proc.pid)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_job(proc.pid)
            proc.wait(timeout=60)
    return len(read_jsonl(steps_path))


def _assert_same_run(ref_dir: str, run_dir: str, loss_keys: tuple[str, ...]) -> None:
    a = load_checkpoint(os.path.join(ref_dir, "checkpoint-last.pth"))
    b = load_checkpoint(os.path.join(run_dir, "checkpoint-last.pth"))
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"weights differ after resume: {key}"
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b["optimizer"]["state"][pid][key]), ("optimizer state", pid, key)
    ref_rows = read_jsonl(os.path.join(ref_dir, "log.jsonl"))
    rows = read_jsonl(os.path.join(run_dir, "log.jsonl"))
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    for key in loss_keys:
        assert [r.get(key) for r in rows] == [r.get(key) for r in ref_rows], key
    # Every step's logged loss too (a resume inside an epoch starts its first window from the restored sums).
    ref_steps = [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(ref_dir, "steps.jsonl"))]
    assert [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(run_dir, "steps.jsonl"))] == ref_steps


def _kill_at(ranks: int, args: list[str], run_dir: str, kill: str) -> None:
    """Run the job with the test hook armed at `kill` (step1, saveS, snapS or doneS) and check it died there."""
    name, value = kill.rstrip("0123456789"), int(kill[len(kill.rstrip("0123456789")):])
    point = f"{name}={value}"
    proc = subprocess.Popen(_command(ranks, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**subprocess_env(), faults.ENV: point}, cwd=REPO, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        # Under torchrun the agent tears the other rank down; anything left of the job goes too.
        kill_job(proc.pid)
        if proc.poll() is None:
            proc.wait(timeout=60)
    if ranks == 1:
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    else:
        assert proc.returncode != 0, stderr[-3000:]
    last = os.path.join(run_dir, "checkpoint-last.pth")
    torn = glob.glob(os.path.join(run_dir, ".checkpoint-last.pth.tmp-*"))
    if name == "step":  # died right after that step's line, before any checkpoint
        assert read_jsonl(os.path.join(run_dir, "steps.jsonl"))[-1]["step"] == value
        assert not glob.glob(os.path.join(run_dir, "checkpoint-*.pth"))
    elif name == "done":  # the checkpoint of that step is in place, nothing after it
        assert load_checkpoint(last)["step"] == value and not torn
    else:  # save: a torn temporary file; snap: none. Either way the checkpoint in place is the step before.
        assert (len(torn) == 1 and os.path.getsize(torn[0]) > 0) if name == "save" else not torn, os.listdir(run_dir)
        assert load_checkpoint(last)["step"] == value - 1


CELLS = [
    *[("pretrain", p, r) for p in ("ffcv", "dali", "torchvision") for r in (1, 2)],
    *[(job, p, r) for job in ("finetune", "linprobe") for p in ("ffcv", "dali", "torchvision") for r in (1, 2)],
]
# One kill point per cell keeps the matrix within CI's time (each case is a reference, a killed and a
# resumed run). The exact points go to twelve cells: each job on 1 and 2 ranks, each kind of kill on more
# than one job, and a resume inside an epoch (done1/done3, save2/snap2: the checkpoint in place is one
# inside an epoch) on every pipeline at 1 and 2 ranks; the other six are killed from outside mid-run
# (every job, 1 and 2 ranks, and the external kill of a whole torchrun group).
SPECIAL = {
    ("pretrain", "torchvision", 1): "step1",
    ("pretrain", "dali", 2): "step1",
    ("finetune", "ffcv", 1): "step1",
    ("linprobe", "torchvision", 2): "step1",
    ("pretrain", "ffcv", 2): "save2",
    ("finetune", "torchvision", 1): "save3",
    ("linprobe", "dali", 1): "snap2",
    ("linprobe", "ffcv", 2): "snap3",
    ("pretrain", "ffcv", 1): "done3",
    ("finetune", "dali", 2): "done3",
    ("linprobe", "torchvision", 1): "done1",
    ("finetune", "torchvision", 2): "done1",
}
CASES = [(*cell, SPECIAL.get(cell, "mid")) for cell in CELLS]
# The cases `make test-fast` runs too: with test_pretrain's pipelines they train every job on every pipeline.
CORE = {("finetune", "dali", 1), ("linprobe", "ffcv", 1)}


def _case_id(job: str, pipeline: str, ranks: int, kill: str) -> str:
    return f"{job}-{pipeline}-{ranks}rank" + ("" if kill == "mid" else f"-kill-{kill}")


@pytest.mark.parametrize(("job", "pipeline", "ranks", "kill"),
                         [pytest.param(*c, marks=[pytest.mark.core] if c[:3] in CORE else []) for c in CASES],
                         ids=[_case_id(*c) for c in CASES])
def test_kill_then_resume_equals_uninterrupted(job, pipeline, ranks, kill, converted, encoder_ckpt, references,
                                               tmp_path):
    ref_dir = _reference(references, job, pipeline, ranks, converted, encoder_ckpt)
    run_dir = str(tmp_path / "killed")
    args = _job_args(job, pipeline, converted, run_dir, encoder_ckpt)

    if kill == "mid":
        # Under a loaded machine the poller may see epoch 1 only after the run has finished its last
        # checkpoint; such a try tests nothing, so it is made again in a clean directory.
        for _attempt in range(3):
            logged = _kill_mid_run(ranks, args, run_dir)
            last = os.path.join(run_dir, "checkpoint-last.pth")
            if not os.path.exists(last) or load_checkpoint(last)["epoch"] < EPOCHS - 1:
                break
            shutil.rmtree(run_dir)
        else:
            pytest.fail("three runs finished before the kill reached them")
        assert logged >= 1
    else:
        _kill_at(ranks, args, run_dir, kill)
    resumed = _run(ranks, [*args, "--resume", "auto"])
    if kill == "step1":
        # No checkpoint yet: the books are moved aside (kept, not overwritten) and the run starts over.
        assert "stopped before its first checkpoint" in resumed.stdout, resumed.stdout[-2000:]
        aside = os.path.join(run_dir, "interrupted-1")
        assert read_jsonl(os.path.join(aside, "steps.jsonl")), os.listdir(aside)
    else:
        assert "resum" in resumed.stdout, resumed.stdout[-2000:]
    assert not glob.glob(os.path.join(run_dir, ".checkpoint-*"))  # the torn file was never taken for a checkpoint
    # starts.jsonl is the run's history: the killed process's start and the resumed one's.
    starts = read_jsonl(os.path.join(run_dir, "starts.jsonl"))
    assert [s["job"] for s in starts] == [job, job], (starts, resumed.stdout[-2000:])
    if kill in ("save2", "snap2", "done1", "done3"):  # the checkpoint in place was one inside an epoch
        assert starts[1]["start_micro"] > 0 and "inside epoch" in resumed.stdout, (starts, resumed.stdout[-2000:])

    loss_keys = ("loss", "rec_loss", "cls_loss", "val_cls_acc1") if job == "pretrain" else (
        "train_loss", "test_loss", "test_acc1")
    _assert_same_run(ref_dir, run_dir, loss_keys)
    # The killed epoch's step lines were replaced, not duplicated.
    steps = [s["step"] for s in read_jsonl(os.path.join(run_dir, "steps.jsonl"))]
    assert steps == sorted(set(steps)), steps
    if ranks > 1 and pipeline == "dali" and kill == "mid":
        # A finished run resumed again is a no-op on every rank, and the ranks leave together
        # (an early rank tearing down its gloo group used to abort its peer).
        again = _run(ranks, [*_job_args(job, pipeline, converted, run_dir, encoder_ckpt), "--resume", "auto"])
        assert "nothing to do" in again.stdout
