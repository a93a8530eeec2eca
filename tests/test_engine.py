"""The engine the three jobs share, and the step objects (`supmae.train.steps`) every caller goes through.

Tiny models on the generated JPEG dataset (torchvision pipeline, the raw ImageFolder tree), a few
steps each: the trainer calls `PretrainStep.micro`, the books are the same in every job, a numbered
checkpoint is serialised once, and a compiled CPU fine-tune step matches the eager one.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from supmae.cli import main as cli_main
from supmae.models import create_model
from supmae.recipes import get_recipe
from supmae.train import steps as steps_mod
from supmae.train.checkpoint import atomic_save, load_checkpoint
from supmae.train.run_dir import read_jsonl

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
        "cls_hidden_dim": 32}
# The downstream checkpoint: a width whose head count the ViT loader can read off the model args.
SMALL = {"embed_dim": 64, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
         "cls_hidden_dim": 64}
# Keys of log.jsonl that are the jobs' own; every other key is the engine's and must be in all three.
JOB_KEYS = {"pretrain": {"loss", "rec_loss", "cls_loss", "val_cls_acc1"},
            "downstream": {"train_loss", "test_loss", "test_acc1", "test_acc5", "best_acc1", "n_parameters"}}


def pretrain_argv(data: str, out: str, epochs: int = 1, steps: int = 2, *extra: str) -> list[str]:
    return ["pretrain", "--recipe", "tiny_cpu", "--data.path", data, "--output-dir", out, "--data.pipeline",
            "torchvision", "--train.epochs", str(epochs), "--data.batch_size", "16", "--train.max_steps_per_epoch",
            str(steps), "--train.log_every", "1", "--train.cpu_threads", "1", "--data.num_workers", "1",
            "--model.kwargs", json.dumps(TINY), "--optim.lr", "1e-3", "--optim.warmup_epochs", "0.5", *extra]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = create_model("supmae_vit_tiny_patch4", **SMALL, num_classes=10)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    atomic_save({"model": model.state_dict(), "model_args": model.model_args, "epoch": 0}, path)
    return path


def test_the_trainer_calls_the_step_objects_and_serialises_each_checkpoint_once(synthetic_root, tmp_path,
                                                                                monkeypatch, capsys):
    calls = {"micro": 0, "update": 0, "save": 0}
    real_micro, real_update, real_save = steps_mod.PretrainStep.micro, steps_mod.PretrainStep.update, torch.save

    def micro(self, *args, **kwargs):
        calls["micro"] += 1
        return real_micro(self, *args, **kwargs)

    def update(self):
        calls["update"] += 1
        return real_update(self)

    def save(*args, **kwargs):
        calls["save"] += 1
        return real_save(*args, **kwargs)

    monkeypatch.setattr(steps_mod.PretrainStep, "micro", micro)
    monkeypatch.setattr(steps_mod.PretrainStep, "update", update)
    monkeypatch.setattr(torch, "save", save)
    out = str(tmp_path / "pre")
    assert cli_main(pretrain_argv(synthetic_root, out, 2, 2, "--optim.accum_iter", "2", "--train.save_every",
                                  "1")) == 0
    assert calls == {"micro": 4, "update": 2, "save": 2}  # 2 epochs x 2 micro-batches; one torch.save per epoch
    # checkpoint-0001.pth holds exactly checkpoint-last.pth's bytes (a copy, not a second serialisation).
    with open(os.path.join(out, "checkpoint-last.pth"), "rb") as a, open(os.path.join(out, "checkpoint-0001.pth"),
                                                                           "rb") as b:
        assert a.read() == b.read()
    assert "augmentation:" in capsys.readouterr().out


def _book_keys(run_dir: str, job: str) -> tuple[set[str], set[str]]:
    rows = read_jsonl(os.path.join(run_dir, "log.jsonl"))
    starts = read_jsonl(os.path.join(run_dir, "starts.jsonl"))
    assert rows and len(starts) == 1 and starts[0]["job"] == job
    return set(rows[-1]) - JOB_KEYS["pretrain"] - JOB_KEYS["downstream"], set(starts[0])


def test_finetune_and_probe_write_the_books_pretraining_writes(synthetic_root, tiny_ckpt, tmp_path):
    pre = str(tmp_path / "pre")
    assert cli_main(pretrain_argv(synthetic_root, pre)) == 0
    books = {"pretrain": _book_keys(pre, "pretrain")}
    for job, recipe in (("finetune", "tiny_cpu_ft"), ("linprobe", "tiny_cpu_lin")):
        out = str(tmp_path / job)
        assert cli_main([job, "--recipe", recipe, "--pretrained", tiny_ckpt, "--data.path", synthetic_root,
                         "--output-dir", out, "--data.pipeline", "torchvision", "--data.num_workers", "1",
                         "--train.epochs", "1", "--train.max_steps_per_epoch", "2", "--train.cpu_threads", "1"]) == 0
        books[job] = _book_keys(out, job)
        row = read_jsonl(os.path.join(out, "log.jsonl"))[-1]
        assert row["steps"] == 2 and row["images"] == 2 * 32 and row["flops_per_image"] > 0
        assert row["eval_seconds"] > 0 and row["checkpoint_seconds"] > 0 and row["process_epoch"] == 0
    assert books["finetune"] == books["pretrain"] == books["linprobe"]
    assert {"epoch_seconds", "data_wait_seconds", "device_hours", "flops_per_image"} <= books["pretrain"][0]


def test_a_compiled_cpu_finetune_step_matches_the_eager_step(tiny_ckpt):
    from supmae.train.finetune import build_downstream_model
    from supmae.train.steps import build_downstream_step

    def one_step(compile_setting: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
        cfg = get_recipe("tiny_cpu_ft")
        cfg.pretrained = tiny_ckpt
        cfg.model.drop_path = 0.0  # no RNG inside the forward: the two steps see the same computation
        cfg.aug.mixup = cfg.aug.cutmix = cfg.aug.reprob = 0.0
        cfg.train.compile, cfg.train.compile_backend = compile_setting, "aot_eager"
        torch.manual_seed(0)  # the same head initialisation for both
        model, _ = build_downstream_model(cfg, 10, log=lambda _m: None)
        step = build_downstream_step(cfg, model, torch.device("cpu"), 10)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(8, 3, 32, 32, generator=gen)
        labels = torch.randint(0, 10, (8,), generator=gen)
        loss = step(images, labels)
        return loss, {k: v.detach().clone() for k, v in step.core.state_dict().items()}, step.compiled

    eager_loss, eager_state, eager_compiled = one_step("off")
    comp_loss, comp_state, compiled = one_step("on")
    assert compiled and not eager_compiled
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for key, value in eager_state.items():
        torch.testing.assert_close(comp_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The step actually trained: the head moved away from the initial weights.
    init = load_checkpoint(tiny_ckpt)["model"]
    assert not torch.equal(eager_state["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])


def test_compile_auto_is_off_on_the_cpu_and_says_why():
    from supmae.train.compiling import resolve_compile

    assert resolve_compile("auto", torch.device("cpu"))[0] is False
    assert "CUDA" in resolve_compile("auto", torch.device("cpu"))[1]
    assert resolve_compile("on", torch.device("cpu")) == (True, "")
    assert resolve_compile("off", torch.device("cpu")) == (False, "--train.compile off")


@pytest.fixture(scope="module")
def converted(synthetic_converted) -> str:
    return synthetic_converted


@pytest.mark.slow
def test_cpu_threads_survive_the_ffcv_loader(converted, tmp_path, monkeypatch):
    """FFCV's Loader sets torch's thread count to its worker count; --train.cpu_threads must win."""
    seen: list[int] = []
    real_micro = steps_mod.PretrainStep.micro

    def micro(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_micro(self, *args, **kwargs)

    monkeypatch.setattr(steps_mod.PretrainStep, "micro", micro)
    argv = pretrain_argv(converted, str(tmp_path / "ffcv"), 1, 2)
    argv[argv.index("--data.pipeline") + 1] = "ffcv"
    argv[argv.index("--train.cpu_threads") + 1] = "2"  # the loader's 1 worker would make it 1
    assert cli_main(argv) == 0
    assert seen == [2, 2]


def test_only_the_first_job_of_a_process_counts_the_process_start_as_its_start_up():
    """The demo runs pretraining and then a probe in one process: the probe's start-up begins at its
    own run call, not at the interpreter's start (which would bill it the whole pretraining)."""
    import subprocess
    import sys

    code = ("from supmae.train.process import process_start_time as p; import time; "
            "a = p(time.time()); b = p(123.0); print(a[1], b[0], b[1], time.time() - a[0] < 120)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split()
    assert out == ["process", "123.0", "run_call", "True"], out
