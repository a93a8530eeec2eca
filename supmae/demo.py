"""`supmae demo`: the whole product end to end on the CPU, on a dataset made on the fly.

generate 10-class JPEG dataset -> `convert` to .beton + DALI shards -> `pretrain` a tiny SupMAE
with the FFCV pipeline -> evaluate (the classification branch on val, and a linear probe of the
frozen encoder) -> cost report (markdown + PNG). Prints where everything is.

Run again into the same directory, it reuses what is done and redoes nothing: the dataset and the
conversion are kept when complete, the pretraining and the probe continue with `--resume auto`
(and find themselves finished), so a second run takes seconds. An interrupted demo continues where
it stopped. When the pretraining does train further (a larger --epochs than last time), the probe
of the older encoder is moved aside to `linprobe-superseded-N/` and the new encoder is probed.
Delete the output directory to start afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from supmae.errors import UserError


def main(argv: list[str]) -> int:
    from pipelines import KINDS

    p = argparse.ArgumentParser(prog="supmae demo", description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="runs/demo", help="where the dataset, runs and reports go")
    # Fewer epochs than the recipes plan keep the demo within about five minutes on 2 cores; the
    # classification branch and the probe are already far above chance by then.
    p.add_argument("--epochs", type=int, default=6, help="pretraining epochs (the tiny_cpu recipe plans 8)")
    p.add_argument("--probe-epochs", type=int, default=3, help="linear-probe epochs (the tiny_cpu_lin recipe plans 8)")
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=40)
    p.add_argument("--pipeline", default="ffcv", choices=KINDS)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.epochs < 1 or a.probe_epochs < 1:
        raise UserError("--epochs and --probe-epochs must be at least 1")

    from supmae.recipes import get_recipe
    from supmae.report import write_report
    from supmae.train.finetune import run_linprobe
    from supmae.train.pretrain import run_pretrain
    from tools.convert import convert
    from tools.synthetic import make_dataset

    out = os.path.abspath(a.output_dir)
    raw = os.path.join(out, "data", "raw")
    converted = os.path.join(out, "data", "converted")
    t0 = time.perf_counter()

    if not os.path.isfile(os.path.join(raw, ".complete")):
        print(f"[1/5] generating a 10-class JPEG dataset in {raw}")
        make_dataset(raw, train_per_class=a.train_per_class, val_per_class=a.val_per_class, size=64, seed=a.seed)
        open(os.path.join(raw, ".complete"), "w").close()
    else:
        print(f"[1/5] dataset already generated in {raw}")

    if os.path.isfile(os.path.join(converted, "manifest.json")):  # written last: the conversion is complete
        print(f"[2/5] FFCV .beton and DALI shards already in {converted} (checked against the dataset, reused)")
    else:
        print(f"[2/5] converting to FFCV .beton and DALI shards in {converted}")
    manifest = convert(raw, converted, formats=("ffcv", "wds"), max_res=64, quality=90, workers=a.workers,
                       seed=a.seed, progress=False)
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    print(f"      converted {counts}")

    print(f"[3/5] pretraining a tiny SupMAE with the {a.pipeline} pipeline")
    cfg = get_recipe("tiny_cpu", kind="pretrain")
    cfg.data.path = converted
    cfg.data.pipeline = a.pipeline
    cfg.data.num_workers = a.workers
    cfg.output_dir = os.path.join(out, "pretrain")
    cfg.seed = a.seed
    cfg.resume = "auto"
    cfg.train.epochs = a.epochs
    cfg.train.planned_epochs = a.epochs
    pre = run_pretrain(cfg)
    ckpt = _final_checkpoint(pre)

    print("[4/5] linear probe of the frozen encoder")
    probe_dir = os.path.join(out, "linprobe")
    if pre["epochs_run"] and _holds_a_run(probe_dir):
        aside = _move_aside(probe_dir)
        print(f"      the encoder trained further: the earlier probe moved to {aside}")
    lin = get_recipe("tiny_cpu_lin", kind="linprobe")
    lin.data.path = converted
    lin.data.pipeline = a.pipeline
    lin.data.num_workers = a.workers
    lin.pretrained = ckpt
    lin.output_dir = probe_dir
    lin.seed = a.seed
    lin.resume = "auto"
    lin.train.epochs = a.probe_epochs
    probe = run_linprobe(lin)
    if probe.get("final_acc1") is None:
        raise UserError(f"the linear probe in {probe['output_dir']} produced no accuracy (no val split?)")

    print("[5/5] cost report")
    report = write_report(pre["run_dir"])

    with open(os.path.join(pre["run_dir"], "log.jsonl")) as fh:
        log = [json.loads(line) for line in fh if line.strip()]
    first, last = log[0], log[-1]
    chance = 100.0 / len(manifest["classes"])
    summary = {
        "pretrain_run_dir": pre["run_dir"],
        "checkpoint": ckpt,
        "log": os.path.join(pre["run_dir"], "log.jsonl"),
        "report": report["report_md"],
        "plot": report["report_png"],
        "loss_first_epoch": first["loss"],
        "loss_last_epoch": last["loss"],
        "val_cls_acc1": last.get("val_cls_acc1"),
        "linprobe_acc1": probe["final_acc1"],
        "linprobe_run_dir": probe["output_dir"],
        "chance_acc1": chance,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)

    print()
    print(f"pretraining loss: {first['loss']:.4f} (epoch {first['epoch']}) -> {last['loss']:.4f} (epoch {last['epoch']})")
    if summary["val_cls_acc1"] is not None:
        print(f"classification branch, val top-1: {summary['val_cls_acc1']:.1f}%  (chance {chance:.1f}%)")
    print(f"linear probe, val top-1:          {probe['final_acc1']:.1f}%  (chance {chance:.1f}%)")
    print(f"run directory:  {pre['run_dir']}")
    print(f"  log:          {summary['log']}")
    print(f"  checkpoint:   {ckpt}")
    print(f"  cost report:  {report['report_md']}")
    print(f"  plot:         {report['report_png']}")
    print(f"summary:        {os.path.join(out, 'summary.json')}  ({summary['wall_seconds']} s)")
    return 0


def _final_checkpoint(pre: dict[str, Any]) -> str:
    """The last trained epoch's numbered checkpoint: the same path whether this run trained or found the
    pretraining finished (then `run_pretrain` names checkpoint-last.pth), so that a probe resumed by a
    later demo sees the config it started with."""
    last_epoch = pre["start_epoch"] + pre["epochs_run"] - 1
    numbered = os.path.join(pre["run_dir"], f"checkpoint-{last_epoch:04d}.pth")
    return numbered if os.path.isfile(numbered) else pre["checkpoint"]


def _holds_a_run(path: str) -> bool:
    from supmae.train.run_dir import RunDir

    return RunDir(path).holds_a_run()


def _move_aside(path: str) -> str:
    n = 1
    while os.path.exists(f"{path}-superseded-{n}"):
        n += 1
    os.replace(path, f"{path}-superseded-{n}")
    return f"{path}-superseded-{n}"
