"""Fine-tuning, linear probing and evaluation on the CPU, on the generated 10-class JPEG dataset.

Fast tests use a small randomly initialised SupMAE checkpoint and a few steps per epoch; they
check the parts (layer-wise decay, LARS groups, frozen encoder, run directory, resume, eval).
The slow ones pretrain a small SupMAE once (the pretraining loop, a minute) and check that
fine-tuning and probing it learn, and that its probe beats the probe of the same encoder at
random initialisation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from supmae.cli import main as cli_main
from supmae.errors import UserError
from supmae.models import create_model
from supmae.models.vit import build_vit
from supmae.recipes import get_recipe
from supmae.train.checkpoint import atomic_save, load_checkpoint
from supmae.train.finetune import finetune_param_groups, probe_param_groups, run_finetune, run_linprobe
from supmae.train.process import read_process_records
from supmae.train.run_dir import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"embed_dim": 64, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
         "cls_hidden_dim": 64, "num_classes": 10}
# The engine's per-epoch keys, the same in every job (pretraining's test checks its own loss keys).
ENGINE_KEYS = {"epoch", "train_lr", "epoch_seconds", "images_per_sec", "step_time_ms", "data_wait_frac",
               "data_wait_seconds", "eval_seconds", "checkpoint_seconds", "peak_mem_mb", "elapsed_seconds",
               "device_hours", "world_size", "device", "steps", "images", "total_epochs", "process_epoch",
               "flops_per_image"}
LOG_KEYS = ENGINE_KEYS | {"train_loss", "test_loss", "test_acc1", "test_acc5", "best_acc1", "n_parameters"}
START_KEYS = {"job", "start_epoch", "startup_seconds", "time", "precision_config", "precision", "compile_config",
              "compile", "device", "world_size", "peak_flops", "peak_dtype", "augmentation"}


def save_random_supmae(path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = create_model("supmae_vit_tiny_patch4", **SMALL)
    atomic_save({"model": model.state_dict(), "model_args": model.model_args, "epoch": 0}, str(path))
    return str(path)


def quick(cfg, data: str, out: str, pretrained: str, epochs: int = 1, steps: int = 3):
    """`cfg` shrunk to a few steps on the torchvision pipeline (the raw ImageFolder tree)."""
    cfg.pretrained, cfg.output_dir = pretrained, out
    cfg.data.path, cfg.data.pipeline, cfg.data.num_workers = data, "torchvision", 1
    cfg.train.epochs, cfg.train.max_steps_per_epoch, cfg.train.log_every = epochs, steps, 2
    cfg.train.cpu_threads = 1
    cfg.optim.warmup_epochs = 0.5
    return cfg


@pytest.fixture(scope="module")
def converted(synthetic_converted) -> str:
    """The session's synthetic dataset converted to FFCV and webdataset (64 px max side)."""
    return synthetic_converted


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> str:
    return save_random_supmae(tmp_path_factory.mktemp("ckpt") / "random.pth")


# ------------------------------------------------------------------------------------------ parts


def test_layer_decay_scales_every_block_and_skips_decay_on_1d_and_tokens():
    depth, decay = 4, 0.65
    model = build_vit(32, 4, 64, depth, 2, num_classes=10)
    groups = finetune_param_groups(model, weight_decay=0.05, layer_decay=decay)
    scale, wd = {}, {}
    for g in groups:
        for p in g["params"]:
            scale[id(p)], wd[id(p)] = g["lr_scale"], g["weight_decay"]
    for name, p in model.named_parameters():
        if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            layer_id = 0
        elif name.startswith("blocks."):
            layer_id = int(name.split(".")[1]) + 1
        else:
            assert name.startswith(("fc_norm.", "head.")), name
            layer_id = depth + 1
        assert scale[id(p)] == pytest.approx(decay ** (depth + 1 - layer_id)), name
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert wd[id(p)] == (0.0 if no_decay else 0.05), name
    assert scale[id(model.head.weight)] == 1.0
    assert scale[id(model.blocks[0].attn.qkv.weight)] == pytest.approx(decay**4)
    assert scale[id(model.patch_embed.proj.weight)] == pytest.approx(decay**5)


def test_probe_lars_groups_follow_the_reference_rule_unless_asked():
    probe = build_vit(32, 4, 64, 2, 2, num_classes=10, probe=True, feature="token")
    ref = probe_param_groups(probe, 0.0)
    assert [(len(g["params"]), g["always_adapt"]) for g in ref] == [(1, True), (1, False)]
    assert ref[0]["params"][0] is probe.head[1].weight and ref[1]["params"][0] is probe.head[1].bias
    every = probe_param_groups(probe, 0.0, adapt_1d=True)
    assert [(len(g["params"]), g["always_adapt"]) for g in every] == [(2, True)]



def test_probe_biases_are_never_adapted_nor_decayed_even_with_weight_decay():
    """timm's Lars adapts any group whose weight decay is non-zero: the 1-D group must carry none."""
    from timm.optim import Lars

    probe = build_vit(32, 4, 64, 2, 2, num_classes=10, probe=True, feature="token")
    groups = probe_param_groups(probe, 0.1)
    assert [(g["weight_decay"], g["always_adapt"]) for g in groups] == [(0.1, True), (0.0, False)]
    bias = probe.head[1].bias
    with torch.no_grad():
        bias.fill_(1.0)
    bias.grad = torch.full_like(bias, 0.5)
    probe.head[1].weight.grad = torch.ones_like(probe.head[1].weight)
    Lars(groups, lr=0.1, momentum=0.9).step()
    # Plain SGD on the bias: 1 - lr * grad, no trust ratio (1e-3 scale) and no decay (+ 0.1 * p).
    assert torch.allclose(bias.detach(), torch.full_like(bias, 1.0 - 0.1 * 0.5))


# ------------------------------------------------------------------------------------------ runs


def test_linprobe_trains_only_the_head_and_writes_the_run_dir(synthetic_root, random_ckpt, tmp_path, capsys):
    out = str(tmp_path / "lin")
    cfg = quick(get_recipe("tiny_cpu_lin"), synthetic_root, out, random_ckpt, epochs=2, steps=3)
    result = run_linprobe(cfg)
    assert "final top-1" in capsys.readouterr().out
    # (run.lock: the run directory's lock, held for the job's life)
    assert sorted(set(os.listdir(out)) - {"run.lock"}) == [
        "checkpoint-best.pth", "checkpoint-last.pth", "config.json", "log.jsonl", "processes", "starts.jsonl",
        "steps.jsonl"]
    (record,) = read_process_records(out)  # this process's device time, at its own world size
    assert record["ended"] and record["world_size"] == 1 and [e for e, *_ in record["saves"]] == [0, 1]
    assert record["energy_kwh"] is None and record["energy_note"].startswith("not measured")  # no GPU: no guess
    before = load_checkpoint(random_ckpt)["model"]
    after = load_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    assert after["task"] == "linprobe" and after["epoch"] == 1 and after["step"] == 6
    for key, value in after["model"].items():
        if key.startswith("head."):
            continue
        assert torch.equal(value, before[key]), f"frozen encoder weight {key} changed"
    assert not torch.equal(after["model"]["head.1.weight"], build_vit(**after["vit_args"]).head[1].weight)
    assert int(after["model"]["head.0.num_batches_tracked"]) == 6  # BN statistics did follow the features
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["epoch"] for r in rows] == [0, 1]
    assert LOG_KEYS <= set(rows[-1]) and rows[-1]["steps"] == 3 and rows[-1]["images"] == 3 * 32
    assert [r["process_epoch"] for r in rows] == [0, 1] and rows[-1]["flops_per_image"] > 0
    starts = read_jsonl(os.path.join(out, "starts.jsonl"))
    assert len(starts) == 1 and START_KEYS <= set(starts[0]) and starts[0]["job"] == "linprobe"
    assert starts[0]["precision"] == "fp32" and starts[0]["compile"] is False and starts[0]["peak_flops"] > 0
    assert result["final_acc1"] == rows[-1]["test_acc1"] and 0 <= result["final_acc1"] <= 100
    with open(os.path.join(out, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    assert config["task"] == "linprobe" and config["optim"]["name"] == "lars"


def test_finetune_resume_auto_continues_and_eval_matches_the_log(synthetic_root, random_ckpt, tmp_path, capsys):
    out = str(tmp_path / "ft")
    run_finetune(quick(get_recipe("tiny_cpu_ft"), synthetic_root, out, random_ckpt, epochs=2, steps=2))
    # A fresh start into a used directory is refused; --resume auto continues to the longer schedule.
    with pytest.raises(UserError, match="already holds a run"):
        run_finetune(quick(get_recipe("tiny_cpu_ft"), synthetic_root, out, random_ckpt, epochs=3, steps=2))
    cfg = quick(get_recipe("tiny_cpu_ft"), synthetic_root, out, random_ckpt, epochs=3, steps=2)
    cfg.resume = "auto"
    capsys.readouterr()
    result = run_finetune(cfg)
    assert "resumed from" in capsys.readouterr().out
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["steps"] for r in rows] == [2, 2, 2] and [r["process_epoch"] for r in rows] == [0, 1, 0]
    assert [s["start_epoch"] for s in read_jsonl(os.path.join(out, "starts.jsonl"))] == [0, 2]
    assert load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["step"] == 6
    assert result["last_epoch"] == 2
    # A completed run resumed again does nothing and writes nothing.
    stamp = os.path.getmtime(os.path.join(out, "log.jsonl"))
    cfg = quick(get_recipe("tiny_cpu_ft"), synthetic_root, out, random_ckpt, epochs=3, steps=2)
    cfg.resume = "auto"
    run_finetune(cfg)
    assert "nothing to do" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "log.jsonl")) == stamp
    # `supmae eval` of the last checkpoint reproduces the last logged top-1 and appends its own line.
    eval_dir = str(tmp_path / "eval")
    assert cli_main(["eval", "--checkpoint", os.path.join(out, "checkpoint-last.pth"), "--data.path", synthetic_root,
                     "--data.num_workers", "1", "--output-dir", eval_dir]) == 0
    assert f"top-1 {rows[-1]['test_acc1']:.2f}%" in capsys.readouterr().out
    evaluated = read_jsonl(os.path.join(eval_dir, "log.jsonl"))[0]
    assert evaluated["test_acc1"] == pytest.approx(rows[-1]["test_acc1"])
    assert evaluated["test_acc5"] == pytest.approx(rows[-1]["test_acc5"])


def test_randaugment_in_a_pipeline_without_it_is_the_pipelines_clear_error(converted, random_ckpt, tmp_path, capsys):
    # The loop no longer refuses RandAugment itself: a pipeline that lacks it says so (one line).
    argv = ["finetune", "--recipe", "tiny_cpu_ft", "--pretrained", random_ckpt, "--data.path", converted,
            "--output-dir", str(tmp_path / "x"), "--data.pipeline", "ffcv"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "randaugment" in err[0].lower()
    assert cli_main(["linprobe", "--recipe", "tiny_cpu_ft"]) == 2
    assert "unknown linprobe recipe 'tiny_cpu_ft' (did you mean tiny_cpu_lin?)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ learning


@pytest.fixture(scope="module")
def pretrained(synthetic_root, tmp_path_factory) -> str:
    """A small SupMAE pretrained for 8 epochs by the pretraining loop (tiny_cpu, shrunk)."""
    from supmae.config import apply_overrides
    from supmae.train.pretrain import run_pretrain

    out = str(tmp_path_factory.mktemp("pretrain"))
    cfg = get_recipe("tiny_cpu", kind="pretrain")
    apply_overrides(cfg, [
        "--data.path", synthetic_root, "--data.pipeline", "torchvision", "--data.num_workers", "1",
        "--data.batch_size", "32", "--data.scale_min", "0.35", "--model.kwargs", json.dumps(
            {k: v for k, v in SMALL.items() if k != "num_classes"}),
        "--model.mask_ratio", "0.5", "--optim.blr", "3e-2", "--train.epochs", "8", "--train.cpu_threads", "1",
    ])
    cfg.output_dir = out
    return run_pretrain(cfg)["checkpoint"]


def full(cfg, data: str, out: str, pretrained_path: str, epochs: int):
    cfg.pretrained, cfg.output_dir = pretrained_path, out
    cfg.data.path, cfg.data.pipeline, cfg.data.num_workers = data, "torchvision", 1
    cfg.train.epochs, cfg.train.cpu_threads = epochs, 1
    return cfg


@pytest.mark.slow
def test_finetuning_a_pretrained_encoder_learns(synthetic_root, pretrained, tmp_path):
    result = run_finetune(full(get_recipe("tiny_cpu_ft"), synthetic_root, str(tmp_path / "ft"), pretrained, 5))
    # Chance is 10%; this run reaches about 30% (100 val images: one image is 1%).
    assert result["final_acc1"] >= 20.0 and result["best_acc1"] >= 25.0, result


@pytest.mark.slow
def test_probe_of_the_pretrained_encoder_beats_its_random_initialisation(synthetic_root, pretrained, tmp_path):
    random_init = save_random_supmae(tmp_path / "random.pth", seed=1)
    probe = run_linprobe(full(get_recipe("tiny_cpu_lin"), synthetic_root, str(tmp_path / "pre"), pretrained, 5))
    baseline = run_linprobe(full(get_recipe("tiny_cpu_lin"), synthetic_root, str(tmp_path / "rnd"), random_init, 5))
    # Chance is 10%; these runs reach about 30% against 8%.
    assert probe["final_acc1"] >= 20.0, probe
    assert probe["final_acc1"] >= baseline["final_acc1"] + 10.0, (probe, baseline)


# ------------------------------------------------------------------------------------------ torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_finetune(synthetic_root, random_ckpt, tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "supmae.cli", "finetune", "--recipe", "tiny_cpu_ft",
           "--pretrained", random_ckpt, "--data.path", synthetic_root, "--output-dir", out,
           "--data.pipeline", "torchvision", "--data.num_workers", "1", "--train.epochs", "2",
           "--train.max_steps_per_epoch", "2", "--train.device", "cpu", "--train.cpu_threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "weights identical on all 2 ranks" in proc.stdout
    assert proc.stdout.count("final top-1") == 1  # rank 0 alone reports
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["world_size"] == 2 and r["images"] == 2 * 2 * 32 for r in rows)
    ckpt = load_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4
    # Both ranks' val shards were counted: evaluating the checkpoint in one process agrees.
    eval_dir = str(tmp_path / "eval")
    assert cli_main(["eval", "--checkpoint", os.path.join(out, "checkpoint-last.pth"), "--data.path", synthetic_root,
                     "--data.num_workers", "1", "--output-dir", eval_dir]) == 0
    evaluated = read_jsonl(os.path.join(eval_dir, "log.jsonl"))[0]
    assert evaluated["samples"] == 100
    assert evaluated["test_acc1"] == pytest.approx(rows[-1]["test_acc1"])
