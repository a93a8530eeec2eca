"""The headline figure of each part of benchmarks/gpu_check.sh, one line, read from the files the part wrote.

    python -m benchmarks.gpu_check_figures PART RESULTS_DIR STATUS [DEVICE PIPELINE]

A part that failed, or whose files are missing, gets "not measured" and the reason, never a zero that
reads as a figure. Standard library only: it runs on the GPU image before anything else is known to work.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from typing import Any


def _json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)


def _jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a kill
    return rows


def preflight(res: str) -> str:
    f = _json(os.path.join(res, "preflight.json"))
    gpu = f.get("gpu", {}).get("name", "no GPU")
    parts = [f"{gpu}, torch {f.get('torch')}, python {f.get('python')}"]
    if "first_compile_seconds" in f:
        parts.append(f"first compile {f['first_compile_seconds']:.1f} s")
    if "matmul_peak_tflops" in f:
        parts.append(f"{f['matmul_peak_dtype']} matmul peak {f['matmul_peak_tflops']:.4g} TFLOP/s")
    return "; ".join(parts)


def step(res: str) -> str:
    s = _json(os.path.join(res, "step", "step.json"))
    rows = {r["name"]: r for r in s["rows"]}
    out = []
    for name in ("trainer", "paper"):
        r = rows.get(name, {})
        if "images_per_sec" in r:
            out.append(f"{name} {r['images_per_sec']:,.0f} img/s (MFU {r['mfu']:.1%}, first iteration "
                       f"{r['first_iter_seconds']:.1f} s, {r['timed_iters']} iterations in "
                       f"{r['timed_seconds']:.1f} s" + (f", peak mem {r['peak_mem_mb']:,.0f} MiB" if r.get("peak_mem_mb") else "")
                       + ")")
        elif r:
            out.append(f"{name} not measured: {r.get('skipped')}")
    if s.get("speedup"):
        out.append(f"trainer/paper {s['speedup']:.2f}x")
    return f"batch {s['batch_size']}: " + "; ".join(out)


def data(res: str) -> str:
    root = os.path.join(os.path.dirname(res), "data")
    raw = {split: sum(len(files) for _, _, files in os.walk(os.path.join(root, "raw", split))) for split in
           ("train", "val")}
    out = f"{raw['train']:,} train + {raw['val']:,} val JPEGs generated"
    manifest = os.path.join(root, "converted", "manifest.json")
    if os.path.isfile(manifest):
        m = _json(manifest)
        splits = m.get("splits", {})
        out += "; converted: " + ", ".join(f"{k} {v.get('count')} ({v.get('skipped')} skipped)"
                                          for k, v in splits.items())
        if m.get("elapsed_seconds"):
            out += f" in {m['elapsed_seconds']:.1f} s"
    return out


def _sync_count(res: str, statuses: str, device: str) -> str:
    if device != "cuda":
        return "host syncs not measured (sync debug watches CUDA only)"
    if statuses != "ok/ok":
        return f"host syncs not measured (pretrain/resume: {statuses})"
    n = 0
    for name in ("pretrain", "resume"):
        with open(os.path.join(res, f"{name}.log"), errors="replace") as fh:
            n += sum("synchronizing CUDA operation" in line for line in fh)
    return f"host syncs in the watched steady steps: {n}"


def trainer(res: str, statuses: str, device: str, pipeline: str) -> str:
    d = os.path.join(res, "trainer")
    epochs = _jsonl(os.path.join(d, "log.jsonl"))
    steps = _jsonl(os.path.join(d, "steps.jsonl"))
    starts = _jsonl(os.path.join(d, "starts.jsonl"))
    out = [f"{pipeline} pipeline; {len(epochs)} epochs logged, {len(starts)} process starts"]
    for e in epochs:
        bits = [f"epoch {e['epoch']}: {e['images_per_sec']:,.0f} img/s"]
        if "images_per_sec_after_first_step" in e:
            bits.append(f"{e['images_per_sec_after_first_step']:,.0f} after the first step "
                        f"(the first step, compilation if any, took {e['first_step_seconds']:.1f} s)")
        bits.append(f"data wait {e['data_wait_frac']:.0%}")
        if e.get("peak_mem_mb") is not None:
            bits.append(f"peak {e['peak_mem_mb']:,.0f} MiB")
        if e.get("checkpoint_seconds") is not None:
            bits.append(f"checkpoint {e['checkpoint_seconds']:.2f} s")
        if e.get("eval_seconds"):
            bits.append(f"eval {e['eval_seconds']:.2f} s")
        if e.get("avg_watts"):
            bits.append(f"{e['avg_watts']:.0f} W")
        out.append(" ".join(bits[:1]) + " (" + ", ".join(bits[1:]) + ")")
    # Steady windows: each process's first log window holds its compilation; the others do not.
    per_epoch = int(epochs[0]["steps"]) if epochs else 0
    log_every = 1
    try:
        log_every = int(_json(os.path.join(d, "config.json"))["train"]["log_every"])
    except (OSError, ValueError, KeyError):
        pass
    first_steps = {int(s.get("start_epoch", 0)) * per_epoch for s in starts}
    steady = [w for w in steps if not any(b < int(w["step"]) <= b + log_every for b in first_steps)]
    if steady:
        out.append(f"steady windows ({len(steady)}): median {statistics.median(w['images_per_sec'] for w in steady):,.0f}"
                   f" img/s, data wait {statistics.median(w['data_wait_frac'] for w in steady):.0%}")
    else:
        out.append("steady windows: none logged")
    for s in starts:
        out.append(f"start at epoch {s.get('start_epoch')}: set-up {s.get('startup_seconds', 0):.1f} s, "
                   f"compile {s.get('compile')}, {s.get('precision')}")
    out.append(_sync_count(res, statuses, device))
    logs = ""
    for name in ("pretrain", "resume"):
        p = os.path.join(res, f"{name}.log")
        if os.path.isfile(p):
            with open(p, errors="replace") as fh:
                logs += fh.read()
    out.append(f"recompile lines {len(re.findall('recompil', logs, re.IGNORECASE))}, "
               f"graph-break lines {len(re.findall('graph break', logs, re.IGNORECASE))}")
    return "; ".join(out)


def doctor(res: str) -> str:
    d = _json(os.path.join(res, "doctor", "doctor.json"))
    s = d["step"]
    node = d.get("node") or {}
    out = [f"step {s['images_per_sec']:,.0f} img/s ({s.get('source', 'measured by the doctor')})"]
    if node:
        out.append(f"node verdict: {node.get('bound')}-bound ({node.get('gpu')} x {node.get('gpus')}, "
                   f"{node.get('cores')} cores)")
    return "; ".join(out)


def table1(res: str) -> str:
    t = _json(os.path.join(res, "table1", "table1.json"))
    bits = []
    for r in t["rows"]:
        hours = r.get("projected_gpu_hours") or r.get("gpu_hours")
        ips = r.get("images_per_sec")
        bits.append(f"{r['key']}: " + (f"{ips:,.0f} img/s, " if ips else "") +
                    (f"{hours:,.1f} GPU-hours projected" if hours else "no projection"))
    return "; ".join(bits)


def nvjpeg(res: str) -> str:
    r = _json(os.path.join(res, "nvjpeg.json"))
    cpu = r["cpu_one_thread_images_per_sec"]
    out = [f"{r['images']} JPEGs of {r['mean_bytes'] / 1e3:.1f} kB: CPU one thread {cpu:,.0f} img/s"]
    for k, v in r.items():
        if k.startswith("gpu_batch"):
            out.append(f"nvJPEG {k[len('gpu_'):].split('_')[0]} {v:,.0f} img/s ({v / cpu:.1f}x a core)")
    return "; ".join(out)


def dali(res: str) -> str:
    r = _json(os.path.join(res, "dali.json"))
    return "; ".join(f"{k} {v['images_per_sec']:,.0f} img/s on {v['device']}" for k, v in r.items())


PARTS = {"preflight": preflight, "step": step, "data": data, "convert": data, "doctor": doctor, "table1": table1, "nvjpeg": nvjpeg,
         "dali": dali}


def main(argv: list[str]) -> int:
    name, res, status = argv[:3]
    try:
        if name == "trainer":
            print(trainer(res, status, *argv[3:5]))
        elif name in PARTS:
            if status != "ok":
                print(f"not measured ({status})")
            else:
                print(PARTS[name](res))
    except Exception as exc:  # noqa: BLE001 (a figure that cannot be read is said so, and the check goes on)
        print(f"not measured ({type(exc).__name__}: {exc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
