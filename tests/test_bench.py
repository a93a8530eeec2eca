"""The wall-clock harness: method steps, timing, FLOP counting, Table 1 projection and outputs, step bench."""

from __future__ import annotations

import csv
import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks import methods as M
from benchmarks import table1 as T
from benchmarks.timing import (
    constant_batches,
    count_flops,
    iters_per_epoch,
    measure_matmul_peak,
    synthetic_batch,
    time_steps,
)
from supmae.errors import UserError

CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads competing with other
    processes run these small steps up to 10x slower than one thread does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def arch() -> M.Arch:
    # The tiny scale (32 px, patch 4, width 192) at depth 2 keeps every step well under a second.
    return M.arch_for_scale("tiny", num_classes=10, depth=2)


@pytest.fixture(scope="module")
def stepped(arch) -> dict[str, dict]:
    """Each method built once and run for one real step, with its counted FLOPs per image."""
    out = {}
    images, labels = synthetic_batch(8, arch.img_size, arch.num_classes, CPU)
    for method in M.METHODS:
        torch.manual_seed(0)
        step = M.build_step(method, arch, CPU, batch_size=8, dtype=None)
        trainable = [p for g in step.optimizer.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in trainable]
        loss = step(images.clone(), labels)
        changed = sum(not torch.equal(b, p) for b, p in zip(before, trainable))
        fpi = step.flops_per_step(images.clone(), labels) / 8
        model_fpi = M.model_flops_per_image(step, arch)
        out[method] = {"loss": loss, "changed": changed, "trainable": len(trainable), "fpi": fpi,
                       "model_fpi": model_fpi}
    return out


def _result(method: str, spi: float, fpi: float, batch: int = 8, wait: float = 0.0) -> T.StepResult:
    return T.StepResult(method=method, batch_size=batch, seconds_per_iter=spi, data_wait_frac=wait, spread=0.0,
                        flops_per_image=fpi, flops_source="test", step_flops_per_image=fpi, params=1,
                        peak_mem_mb=None, notes="")


# ---- projection arithmetic against hand-computed values


def test_iters_per_epoch_drops_the_last_partial_batch():
    assert iters_per_epoch(1_281_167, 4096) == 312  # 1,281,167 / 4096 = 312.78
    assert iters_per_epoch(1_281_167, 4096, drop_last=False) == 313
    assert iters_per_epoch(400, 64) == 6
    with pytest.raises(UserError, match="larger than the dataset"):
        iters_per_epoch(10, 64)


def test_project_row_matches_hand_computation():
    row = T.Row("supmae", "SupMAE", "supmae", pt_epochs=400, ft_epochs=100)
    pt = _result("supmae", spi=0.5, fpi=2e10, batch=512, wait=0.1)
    ft = _result("finetune", spi=2.0, fpi=5e10, batch=512, wait=0.0)
    r = T.project_row(row, pt, ft, num_images=1_281_167, gpus=8)
    # global batch 4096 -> 312 iterations per epoch
    assert r["pt_iters_per_epoch"] == 312
    assert r["pt_wall_hours"] == pytest.approx(400 * 312 * 0.5 / 3600)  # 17.333 h
    assert r["ft_wall_hours"] == pytest.approx(100 * 312 * 2.0 / 3600)  # 17.333 h
    assert r["wall_hours"] == pytest.approx(34.6666667)
    assert r["gpu_hours"] == pytest.approx(34.6666667 * 8)
    assert r["pt_epoch_seconds"] == pytest.approx(156.0)
    assert r["train_flops"] == pytest.approx(400 * 312 * 4096 * 2e10 + 100 * 312 * 4096 * 5e10)
    # data wait weighted by time: 10 % of the pre-training half, 0 % of the fine-tuning half
    assert r["data_wait_frac"] == pytest.approx(0.05)


def test_rows_without_fine_tuning_and_normalisation():
    deit = T.project_row(T.Row("deit", "DeiT", "deit", 300, 0), _result("deit", 1.0, 3e10), None, 8000, 1)
    sup = T.project_row(T.Row("supmae", "SupMAE", "supmae", 400, 100), _result("supmae", 0.25, 1e10),
                        _result("finetune", 1.0, 3e10), 8000, 1)
    assert deit["ft_wall_hours"] == 0 and deit["ft_seconds_per_iter"] is None
    # 1000 iterations per epoch at batch 8 on one GPU
    assert deit["gpu_hours"] == pytest.approx(300 * 1000 * 1.0 / 3600)
    assert sup["gpu_hours"] == pytest.approx((400 * 1000 * 0.25 + 100 * 1000 * 1.0) / 3600)
    T.normalise([deit, sup])
    assert sup["norm_cost"] == pytest.approx(1.0)
    assert deit["norm_cost"] == pytest.approx(300_000 / 200_000)
    assert deit["compute_norm_cost"] == pytest.approx((300 * 3e10) / (400 * 1e10 + 100 * 3e10))
    assert deit["ratio_vs_paper"] is None  # no paper value was found: never invented
    assert sup["ratio_vs_paper"] == pytest.approx(1.0)


def test_a_fine_tuned_row_needs_the_fine_tuning_step():
    with pytest.raises(UserError, match="fine-tuning step"):
        T.project_row(T.Row("mae", "MAE", "mae", 1600, 100), _result("mae", 1.0, 1.0), None, 8000, 1)


def test_compute_boundness_fractions():
    steps = {"a": _result("a", spi=1.0, fpi=1e9, batch=10), "b": _result("b", spi=1.0, fpi=5e8, batch=10)}
    b = T.compute_boundness(steps, peak_flops=2e10)
    assert b["a"]["achieved_tflops"] == pytest.approx(0.01)
    assert b["a"]["frac_of_peak"] == pytest.approx(0.5)
    assert b["b"]["frac_of_best"] == pytest.approx(0.5)


# ---- timing tools


def test_time_steps_counts_the_data_wait():
    def slow_batches():
        x, y = torch.zeros(2), torch.zeros(2)
        while True:
            time.sleep(0.02)
            yield x, y

    t = time_steps(lambda x, y: None, slow_batches(), CPU, warmup=1, iters=5)
    assert t.iters == 5 and len(t.iter_seconds) == 5
    assert t.seconds_per_iter >= 0.02
    assert t.data_wait_frac > 0.9


def test_time_steps_rejects_bad_counts():
    with pytest.raises(UserError):
        time_steps(lambda x, y: None, constant_batches(torch.zeros(1), torch.zeros(1)), CPU, warmup=0, iters=0)


def test_flop_counter_counts_linear_and_cpu_attention():
    lin = torch.nn.Linear(16, 32)
    x = torch.randn(4, 16)
    assert count_flops(lambda: lin(x)) == 2 * 4 * 16 * 32
    q = torch.randn(2, 3, 10, 8)
    # two matmuls of [10, 8] x [8, 10] and [10, 10] x [10, 8] per (batch, head)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * 3 * (2 * 10 * 10 * 8) * 2


def test_matmul_peak_is_positive():
    peak = measure_matmul_peak(CPU, torch.float32, seconds=0.2)
    assert 1e8 < peak < 1e14


# ---- the method steps themselves


@pytest.mark.parametrize("method", M.METHODS)
def test_every_method_step_trains(method, stepped):
    r = stepped[method]
    assert r["loss"].shape == () and torch.isfinite(r["loss"])
    assert not r["loss"].requires_grad
    assert r["changed"] >= 0.9 * r["trainable"], f"{method}: only {r['changed']}/{r['trainable']} tensors updated"
    assert r["fpi"] > 0


def test_mocov3_momentum_encoder_and_frozen_patch_projection(arch):
    step = M.build_step("mocov3", arch, CPU, batch_size=8, dtype=None)
    base, _, momentum = step.modules
    patch_w = base[0].patch_embed.proj.weight.detach().clone()
    mom_before = [p.detach().clone() for p in momentum.parameters()]
    images, labels = synthetic_batch(8, arch.img_size, arch.num_classes, CPU)
    step(images, labels)
    step(images, labels)
    assert torch.equal(patch_w, base[0].patch_embed.proj.weight)  # MoCo v3 freezes the patch projection
    assert all(not p.requires_grad for p in momentum.parameters())
    moved = sum(not torch.equal(b, p) for b, p in zip(mom_before, momentum.parameters()))
    assert moved > 0  # the EMA update reached the momentum encoder


def test_step_flops_agree_with_the_model_flop_counter(stepped):
    """SupMAE/MAE rows use supmae.models.flops; the step counter of the other rows must agree with it."""
    for method in ("supmae", "mae"):
        assert stepped[method]["fpi"] == pytest.approx(stepped[method]["model_fpi"]["total"], rel=0.02), method
    assert stepped["deit"]["model_fpi"] is None


def test_meta_device_flop_count_matches_the_real_step(stepped, arch):
    """Table 1 counts FLOPs on a meta-device replica of each step; it must agree with the real step."""
    for method in M.METHODS:
        assert M.count_step_flops(method, arch, 8) / 8 == pytest.approx(stepped[method]["fpi"], rel=0.02), method


def test_flops_order_of_the_methods(stepped):
    fpi = {m: r["fpi"] for m, r in stepped.items()}
    assert fpi["deit"] == pytest.approx(fpi["mae_scratch"], rel=0.01) == pytest.approx(fpi["finetune"], rel=0.01)
    # SupMAE's encoder sees a quarter of the tokens: far fewer FLOPs than full-token supervised training
    assert fpi["supmae"] < 0.6 * fpi["deit"]
    # MoCo v3: two views through base encoder + projector + predictor, plus the momentum forward
    assert fpi["mocov3"] > 2.0 * fpi["deit"]


def test_user_errors():
    with pytest.raises(UserError, match="model-scale"):
        M.arch_for_scale("enormous")
    arch = M.arch_for_scale("tiny", num_classes=10, depth=1)
    with pytest.raises(UserError, match="unknown method"):
        M.build_step("simclr", arch, CPU, 8, None)
    with pytest.raises(UserError, match="even"):
        M.build_step("deit", arch, CPU, 7, None)
    with pytest.raises(UserError, match="unknown method"):
        T.run_table1(device="cpu", model_scale="tiny", methods=["nope"], out=None)


# ---- the commands end to end


def test_table1_command_all_rows_tiny(tmp_path, capsys):
    from supmae.cli import main

    out = tmp_path / "t1"
    rc = main(["bench", "table1", "--device", "cpu", "--model-scale", "tiny", "--depth", "2", "--iters", "1",
               "--warmup", "1", "--batch-size", "8", "--gpus", "8", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for row in T.ROWS:
        assert f"| {row.label} |" in printed
    with open(out / "table1.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["key"] for r in rows] == [r.key for r in T.ROWS]
    sup = next(r for r in rows if r["key"] == "supmae")
    assert float(sup["norm_cost"]) == pytest.approx(1.0)
    mae = next(r for r in rows if r["key"] == "mae")
    # the projection written is the hand formula applied to the measured step times
    ipe = iters_per_epoch(1_281_167, 8 * 8)
    expected = (1600 * ipe * float(mae["pt_seconds_per_iter"]) + 100 * ipe * float(mae["ft_seconds_per_iter"])) / 3600
    assert float(mae["wall_hours"]) == pytest.approx(expected, rel=1e-6)
    assert float(mae["gpu_hours"]) == pytest.approx(8 * expected, rel=1e-6)
    data = json.loads((out / "table1.json").read_text())
    assert set(data["steps"]) == {"mocov3", "mae", "deit", "mae_scratch", "supmae", "finetune"}
    assert data["peak_tflops"] > 0
    for name, b in data["compute_bound"].items():
        assert 0 < b["frac_of_best"] <= 1.0 + 1e-9, name
    assert (out / "table1.md").read_text().startswith("# Table 1")
    assert (out / "table1.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_table1_with_a_real_pipeline_reports_data_wait(tmp_path, synthetic_root):
    # The torchvision pipeline reads the ImageFolder tree directly (FFCV would first compile its decoders).
    result = T.run_table1(device="cpu", data=synthetic_root, pipeline="torchvision", num_workers=1,
                          model_scale="tiny", depth=2, iters=2, warmup=1, batch_size=16, methods=["supmae"],
                          gpus=1, out=str(tmp_path), log=lambda *_: None)
    assert result["config"]["num_images"] == 400  # the dataset's train split, not ImageNet's
    assert result["config"]["num_classes"] == 10
    row = result["rows"][0]
    assert row["pt_iters_per_epoch"] == 400 // 16
    assert 0.0 <= row["data_wait_frac"] < 1.0
    assert "data-wait" in (tmp_path / "table1.md").read_text()


def test_step_command_ours_vs_paper(tmp_path, capsys):
    from supmae.cli import main

    try:
        rc = main(["bench", "step", "--device", "cpu", "--model", "supmae_vit_tiny_patch4", "--depth", "2",
                   "--batch-size", "4", "--iters", "2", "--warmup", "1", "--rounds", "2", "--threads", "2",
                   "--out", str(tmp_path)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Speed-up ours / paper" in printed
    data = json.loads((tmp_path / "step.json").read_text())
    assert "2 threads" in data["device_name"]
    ours, paper = data["configs"]["ours"], data["configs"]["paper"]
    assert ours["attention"] == "sdpa" and paper["attention"] == "eager"
    assert data["depth"] == 2 and data["rounds"] == 2
    assert ours["compile"] is False  # off by default on CPU
    assert ours["precision"] == paper["precision"] == "fp32"
    assert data["speedup"] == pytest.approx(ours["images_per_sec"] / paper["images_per_sec"])
    assert 0 < ours["mfu"] < 1 and 0 < paper["mfu"] < 1
    assert math.isclose(ours["achieved_tflops"] * 1e12, data["flops_per_image"] * ours["images_per_sec"], rel_tol=1e-9)
    assert os.path.isfile(tmp_path / "step.md")


@pytest.mark.slow
def test_harness_runs_without_ffcv_dali_or_matplotlib(tmp_path):
    """The GPU image has only torch, timm and torchvision: gpu_check.sh's commands must run there."""
    import subprocess
    import sys

    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ffcv", "nvidia", "matplotlib", "numba", "cv2"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
torch.set_num_threads(1)
from supmae.cli import main
assert main(["bench", "table1", "--device", "cpu", "--model-scale", "tiny", "--depth", "1", "--iters", "1",
             "--warmup", "0", "--methods", "supmae", "--out", {str(tmp_path / "t1")!r}]) == 0
assert main(["bench", "step", "--device", "cpu", "--model", "supmae_vit_tiny_patch4", "--depth", "1",
             "--batch-size", "2", "--iters", "1", "--warmup", "0", "--out", {str(tmp_path / "step")!r}]) == 0
assert not any(m.split(".")[0] in ("ffcv", "nvidia", "matplotlib") for m in sys.modules)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "table1.png not written" in proc.stdout
    assert (tmp_path / "t1" / "table1.csv").is_file() and not (tmp_path / "t1" / "table1.png").exists()
    assert (tmp_path / "step" / "step.json").is_file()


def test_gpu_check_script_is_valid_bash():
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
    with open(script) as fh:
        text = fh.read()
    assert "set -euo pipefail" in text and "pip install" not in text
    assert "--batch-size 256" in text and "bench table1" in text and "bench step" in text


def test_bench_cli_reports_user_errors(capsys):
    from supmae.cli import main

    assert main(["bench", "table1", "--device", "cpu", "--methods", "mocov3,byol", "--out", ""]) == 2
    assert "byol" in capsys.readouterr().err
    assert main(["bench", "table1", "--device", "cpu", "--threads", "-1", "--out", ""]) == 2
    if not torch.cuda.is_available():
        assert main(["bench", "step", "--device", "cuda"]) == 2


@pytest.mark.gpu
def test_table1_on_gpu_runs_bf16(tmp_path):
    result = T.run_table1(device="cuda", model_scale="tiny", depth=2, iters=2, warmup=1, batch_size=16,
                          out=str(tmp_path), log=lambda *_: None)
    assert result["config"]["precision"] == "bf16"
    assert len(result["rows"]) == len(T.ROWS)
