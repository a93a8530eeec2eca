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
        step = M.build_step(method, arch, CPU, batch_size=8)
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
    # like with like: our normalised cost against the paper's (DeiT 0.73x of SupMAE in its Table 1)
    assert deit["paper_norm_cost"] == 0.73 and deit["ratio_vs_paper"] == pytest.approx(1.5 / 0.73)
    assert (deit["paper_pt_hours"], deit["paper_ft_hours"], deit["paper_total_hours"]) == (91.5, None, 91.5)
    assert sup["ratio_vs_paper"] == pytest.approx(1.0) and sup["paper_total_hours"] == 125.9
    # one pre-training epoch relative to SupMAE's, both sides: paper (91.5 / 300) / (95.9 / 400)
    assert deit["paper_pt_epoch_norm"] == pytest.approx((91.5 / 300) / (95.9 / 400))
    assert deit["pt_epoch_norm"] == pytest.approx(1000 * 1.0 / (1000 * 0.25))


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
    step = M.build_step("mocov3", arch, CPU, batch_size=8)
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
        M.build_step("simclr", arch, CPU, 8)
    for method in ("deit", "finetune"):
        with pytest.raises(UserError, match="even"):
            M.build_step(method, arch, CPU, 7)
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
    md = (out / "table1.md").read_text()
    assert md.startswith("# Table 1")
    assert (out / "table1.png").read_bytes()[:8] == PNG_MAGIC
    # The paper's Table 1 beside ours, in every output: hours, normalised cost, top-1 of all five rows.
    paper = {"mocov3": (250, 45.7, 295.7, 2.35, 83.2), "mae": (364, 30, 394, 3.12, 83.6),
             "deit": (91.5, None, 91.5, 0.73, 81.8), "mae_scratch": (90, None, 90, 0.71, 82.3),
             "supmae": (95.9, 30, 125.9, 1.0, 83.6)}
    by_key = {r["key"]: r for r in rows}
    for key, (pt_h, ft_h, total_h, norm, top1) in paper.items():
        r = by_key[key]
        assert float(r["paper_pt_hours"]) == pt_h and float(r["paper_total_hours"]) == total_h, key
        assert (r["paper_ft_hours"] == "") if ft_h is None else (float(r["paper_ft_hours"]) == ft_h), key
        assert float(r["paper_norm_cost"]) == norm and float(r["paper_top1"]) == top1, key
        assert float(r["ratio_vs_paper"]) == pytest.approx(float(r["norm_cost"]) / norm), key
        j = next(x for x in data["rows"] if x["key"] == key)
        assert (j["paper_total_hours"], j["paper_norm_cost"], j["paper_top1"]) == (total_h, norm, top1), key
        label = next(x.label for x in T.ROWS if x.key == key)
        line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
        assert f"/ {total_h:.1f} |" in line and f"/ {norm:.2f} |" in line and f"| {top1:.1f} |" in line, line
    assert data["paper"]["hardware"] == "8 x NVIDIA A5000 24 GB"
    for s in data["steps"].values():
        assert s["precision"] == "fp32" and s["compiled"] is False and "CUDA only" in s["compile_reason"]
    assert data["steps"]["supmae"]["source"].startswith("supmae.train.steps.build_pretrain_step")
    assert data["steps"]["finetune"]["source"].startswith("supmae.train.steps.build_downstream_step")


@pytest.fixture(scope="module")
def converted_root(synthetic_converted) -> str:
    """The generated 10-class JPEG set written by `supmae convert` (FFCV .beton + DALI shards)."""
    return synthetic_converted


@pytest.mark.slow
def test_table1_fed_by_a_real_pipeline_reports_step_only_and_fed_rates(tmp_path, converted_root):
    from supmae.cli import main

    out = tmp_path / "t1"
    assert main(["bench", "table1", "--device", "cpu", "--data", converted_root, "--pipeline", "ffcv",
                 "--num-workers", "1", "--model-scale", "tiny", "--depth", "1", "--iters", "2", "--warmup", "1",
                 "--batch-size", "16", "--methods", "deit,supmae", "--gpus", "1", "--out", str(out)]) == 0
    data = json.loads((out / "table1.json").read_text())
    assert data["config"]["num_images"] == 400 and data["config"]["num_classes"] == 10  # the dataset's, not ImageNet's
    assert set(data["steps"]) == {"deit", "supmae", "finetune"}
    for name, s in data["steps"].items():
        assert s["step_only_seconds_per_iter"] > 0 and s["fed_seconds_per_iter"] > 0, name
        assert s["loader_seconds_per_batch"] > 0 and s["bound"] in ("input", "compute"), name
        assert s["bound"] == T.classify_bound(s["step_only_seconds_per_iter"], s["fed_seconds_per_iter"]), name
        assert s["seconds_per_iter"] == s["fed_seconds_per_iter"]  # an epoch costs the fed rate
    sup = next(r for r in data["rows"] if r["key"] == "supmae")
    assert sup["pt_iters_per_epoch"] == 400 // 16 and sup["pt_bound"] in ("input", "compute")
    md = (out / "table1.md").read_text()
    assert "step-only img/s" in md and "fed img/s" in md and "-bound |" in md


def test_classify_bound():
    assert T.classify_bound(step_only_spi=1.0, fed_spi=1.05) == "compute"
    assert T.classify_bound(step_only_spi=1.0, fed_spi=1.5) == "input"


def test_supmae_row_runs_the_trainers_step_on_a_fresh_batch(monkeypatch, tmp_path, converted_root):
    """The SupMAE row and `supmae pretrain` go through the same PretrainStep.micro; and the SupMAE row's
    input is the pristine synthetic batch, though DeiT's Mixup (run before it) mixes its input in place."""
    from supmae.job_cli import build_config
    from supmae.train import steps as S
    from supmae.train.pretrain import run_pretrain

    calls: list[tuple[str, torch.Tensor]] = []
    original = S.PretrainStep.micro

    def spy(self, imgs, labels, *args, **kwargs):
        calls.append((type(self.core).__name__, imgs.detach().clone()))
        return original(self, imgs, labels, *args, **kwargs)

    monkeypatch.setattr(S.PretrainStep, "micro", spy)
    arch = M.arch_for_scale("tiny", depth=1)
    T.run_table1(device="cpu", model_scale="tiny", depth=1, iters=1, warmup=0, batch_size=4,
                 methods=["deit", "supmae"], out=None, log=lambda *_: None)
    harness = list(calls)
    assert len(harness) == 1 and harness[0][0] == "SupMAE"
    pristine, _ = synthetic_batch(4, arch.img_size, arch.num_classes, CPU, seed=0)
    assert torch.equal(harness[0][1], pristine)

    cfg = build_config("tiny_cpu", ["--data.path", converted_root, "--output-dir", str(tmp_path / "run"), "--data.pipeline",
                                    "torchvision", "--data.num_workers", "0", "--data.batch_size", "8",
                                    "--train.epochs", "1", "--train.max_steps_per_epoch", "1", "--train.val", "false",
                                    "--model.kwargs", '{"depth": 1}'])
    run_pretrain(cfg)
    trainer = calls[len(harness):]
    assert len(trainer) == 1 and trainer[0][0] == "SupMAE" and trainer[0][1].shape == (8, 3, 32, 32)


def test_step_command_factor_table(tmp_path, capsys):
    from benchmarks import step as B
    from supmae.cli import main

    try:
        rc = main(["bench", "step", "--device", "cpu", "--model", "supmae_vit_tiny_patch4", "--depth", "1",
                   "--batch-size", "4", "--iters", "2", "--warmup", "1", "--rounds", "2", "--threads", "2",
                   "--no-compile", "--out", str(tmp_path)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "one factor at a time" in printed and "Speed-up of supmae pretrain's step" in printed
    data = json.loads((tmp_path / "step.json").read_text())
    assert "2 threads" in data["device_name"] and data["depth"] == 2 - 1 and data["rounds"] == 2
    rows = {r["name"]: r for r in data["rows"]}
    assert [r["name"] for r in data["rows"]] == list(B.FACTORS)
    # One factor added per row, on top of the last carried one.
    assert (rows["paper"]["attention"], rows["paper"]["precision"], rows["paper"]["optimizer"]) == \
        ("eager", "fp32", "AdamW for_loop")
    assert rows["paper"]["host_sync"].startswith(".item()")
    assert (rows["sdpa"]["attention"], rows["sdpa"]["precision"]) == ("sdpa", "fp32")
    assert rows["bf16"]["precision"] == "bf16" and rows["bf16"]["carried"] is False
    assert "auto precision on cpu is fp32" in rows["bf16"]["why_not_carried"]
    assert rows["compile"]["skipped"] == "not measured: --no-compile" and "images_per_sec" not in rows["compile"]
    assert (rows["no_sync"]["precision"], rows["no_sync"]["host_sync"]) == ("fp32", "none")  # bf16 not carried
    assert rows["fused"]["optimizer"] == "AdamW fused" and rows["fused"]["carried"] is False
    trainer = rows["trainer"]
    assert (trainer["attention"], trainer["precision"], trainer["compile"], trainer["optimizer"]) == \
        ("sdpa", "fp32", False, "AdamW foreach")
    for name, r in rows.items():
        if "images_per_sec" in r:
            assert 0 < r["mfu"] < 1, name
            assert math.isclose(r["achieved_tflops"] * 1e12, data["flops_per_image"] * r["images_per_sec"],
                                rel_tol=1e-9)
    assert rows["sdpa"]["vs_previous"] == pytest.approx(rows["sdpa"]["images_per_sec"] / rows["paper"]["images_per_sec"])
    # no_sync is built on sdpa (bf16 was not carried): its "x previous" is against the sdpa row
    assert rows["no_sync"]["vs_previous"] == pytest.approx(rows["no_sync"]["images_per_sec"]
                                                           / rows["sdpa"]["images_per_sec"])
    assert data["speedup"] == pytest.approx(trainer["images_per_sec"] / rows["paper"]["images_per_sec"])
    assert os.path.isfile(tmp_path / "step.md")


@pytest.mark.slow
def test_step_command_a_failing_row_says_why_and_the_others_finish(tmp_path):
    """The trainer row compiled with a backend that does not exist (through the real options): before, its
    error was re-raised and no step.json was written; now it records why and every other row is there,
    the rows before it written to step.json as they finished."""
    from supmae.cli import main

    rc = main(["bench", "step", "--device", "cpu", "--model", "supmae_vit_tiny_patch4", "--depth", "1",
               "--batch-size", "4", "--iters", "1", "--warmup", "1", "--rounds", "1", "--threads", "1",
               "--no-compile", "--trainer-compile", "on", "--compile-backend", "no_such_backend",
               "--out", str(tmp_path)])
    torch.set_num_threads(1)
    assert rc == 0
    data = json.loads((tmp_path / "step.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert data["complete"] is True and data["trainer_compile"] == "on"
    assert rows["trainer"]["skipped"].startswith("failed: ") and "no_such_backend" in rows["trainer"]["skipped"]
    assert "images_per_sec" not in rows["trainer"] and data["speedup"] is None
    for name in ("paper", "sdpa", "bf16", "no_sync", "fused"):
        assert rows[name]["images_per_sec"] > 0, name
    assert "failed: " in (tmp_path / "step.md").read_text()


@pytest.mark.slow
def test_step_bench_writes_each_row_as_it_finishes(tmp_path):
    """A run cut short (here: the log raising after the third row) leaves step.json with the rows done."""
    from benchmarks import step as B

    class Cut(BaseException):  # as a timeout's signal would: not a row's own failure
        pass

    finished: list[str] = []

    def log(line: str) -> None:
        if "ms/iter (warm-up" in line:
            finished.append(line.split()[1])
            if len(finished) == 3:
                raise Cut

    with pytest.raises(Cut):
        B.run_step_bench(device="cpu", model_name="supmae_vit_tiny_patch4", depth=1, batch_size=4, iters=1, warmup=0,
                         rounds=1, compile_row=False, out=str(tmp_path), log=log)
    data = json.loads((tmp_path / "step.json").read_text())
    assert data["complete"] is False
    done = [r["name"] for r in data["rows"] if "images_per_sec" in r]
    assert done == finished[:2]  # the third was cut before its write


@pytest.mark.slow
def test_table1_writes_each_row_as_it_finishes(tmp_path):
    """A run cut short after its second step (the log raising, as a timeout's signal would) leaves
    table1.md/csv/json with what it measured: SupMAE (measured first, the reference) and the
    fine-tuning step, so SupMAE's row, normalised, and the rest pending."""
    class Cut(BaseException):
        pass

    measured: list[str] = []

    def log(line: str) -> None:
        if "ms/iter" in line:
            measured.append(line.split()[1])
            if len(measured) == 3:
                raise Cut

    assert T.measuring_order(T.ROWS)[:2] == ["supmae", "finetune"]
    with pytest.raises(Cut):
        T.run_table1(device="cpu", model_scale="tiny", depth=1, iters=1, warmup=0, batch_size=4,
                     methods=["deit", "supmae", "mae"], out=str(tmp_path), log=log)
    assert measured[:2] == ["supmae", "finetune"]
    data = json.loads((tmp_path / "table1.json").read_text())
    assert data["complete"] is False and set(data["steps"]) == {"supmae", "finetune"}
    assert data["pending"] == ["mae", "deit"]  # Table 1's order
    assert [r["key"] for r in data["rows"]] == ["supmae"] and data["rows"][0]["norm_cost"] == pytest.approx(1.0)
    with open(tmp_path / "table1.csv") as fh:
        assert [r["key"] for r in csv.DictReader(fh)] == ["supmae"]
    assert "not measured yet" in (tmp_path / "table1.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))


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
             "--batch-size", "2", "--iters", "1", "--warmup", "0", "--no-compile",
             "--out", {str(tmp_path / "step")!r}]) == 0
assert not any(m.split(".")[0] in ("ffcv", "nvidia", "matplotlib") for m in sys.modules)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "table1.png not written" in proc.stdout
    assert (tmp_path / "t1" / "table1.csv").is_file() and not (tmp_path / "t1" / "table1.png").exists()
    assert (tmp_path / "step" / "step.json").is_file()


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
