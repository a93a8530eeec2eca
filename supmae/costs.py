"""The figures of a run's cost, from the books a job writes into its run directory (`Run`,
`load_run`, `figures`), and the paper's Table 1 figure for the same recipe; `supmae report`
(supmae/report.py) says what they are and writes them.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from supmae.errors import UserError

# ---------------------------------------------------------------------------------------------- the paper


@dataclass(frozen=True)
class PaperCost:
    """One cell pair of the paper's Table 1: wall-clock hours of a phase on the paper's server."""

    method: str
    phase: str  # "PT" (pre-training) | "FT" (fine-tuning)
    epochs: int
    hours: float


# Table 1 of the SupMAE paper (arXiv 2205.14540): wall-clock hours of ViT-B/16 runs "benchmarked on
# 8 GPUs", the server of Appendix A. benchmarks/table1.py keeps its own copy of the Table 1 facts for
# the harness; the two should become one table (noted in the issue that added this one).
PAPER_SERVER = "8 x NVIDIA A5000 24 GB"
PAPER_GPUS = 8
PAPER_TABLE1: tuple[PaperCost, ...] = (
    PaperCost("MoCo v3", "PT", 300, 250.0),
    PaperCost("MoCo v3", "FT", 150, 45.7),
    PaperCost("MAE", "PT", 1600, 364.0),
    PaperCost("MAE", "FT", 100, 30.0),
    PaperCost("DeiT", "PT", 300, 91.5),
    PaperCost("MAE scratch", "PT", 300, 90.0),
    PaperCost("SupMAE", "PT", 400, 95.9),
    PaperCost("SupMAE", "FT", 100, 30.0),
)
# Our recipes that run what a Table 1 cell measured (same model, epochs and batch).
PAPER_RECIPES: dict[str, tuple[str, str]] = {
    "supmae_vit_b16_400ep": ("SupMAE", "PT"),
    "mae_vit_b16_1600ep": ("MAE", "PT"),
    "vit_b16_ft100": ("SupMAE", "FT"),
}


def paper_figure(recipe: str) -> PaperCost | None:
    """The Table 1 cell of `recipe`, or None when the paper timed no such run."""
    key = PAPER_RECIPES.get(recipe)
    if key is None:
        return None
    return next(p for p in PAPER_TABLE1 if (p.method, p.phase) == key)


# ---------------------------------------------------------------------------------------------- reading


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    from supmae.train.run_dir import read_jsonl

    return read_jsonl(path)


@dataclass
class Run:
    """The books of one run directory, as read (missing files are empty)."""

    path: str
    config: dict[str, Any]
    epochs: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    starts: list[dict[str, Any]]
    processes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def job(self) -> str:
        for s in reversed(self.starts):
            if s.get("job"):
                return str(s["job"])
        if self.config.get("task") in ("finetune", "linprobe"):
            return str(self.config["task"])
        return "pretrain" if any("loss" in r for r in self.epochs) else "finetune"


def load_run(run_dir: str) -> Run:
    """The books of `run_dir`; `UserError` if it holds no timed epoch."""
    if not os.path.isdir(run_dir):
        raise UserError(f"run directory not found: {run_dir}")
    config: dict[str, Any] = {}
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as fh:
                config = json.load(fh)
        except json.JSONDecodeError as exc:
            raise UserError(f"cannot parse {cfg_path}: {exc}") from None
    epochs = [r for r in _read_jsonl(os.path.join(run_dir, "log.jsonl"))
              if isinstance(r.get("epoch_seconds"), (int, float)) and "epoch" in r]
    if not epochs:
        raise UserError(f"{run_dir} has no timed epoch in log.jsonl (is it a supmae pretrain / finetune / linprobe "
                        "run directory, and has its first epoch finished?)")
    epochs.sort(key=lambda r: int(r["epoch"]))
    steps = _read_jsonl(os.path.join(run_dir, "steps.jsonl"))
    starts = sorted(_read_jsonl(os.path.join(run_dir, "starts.jsonl")), key=lambda s: float(s.get("time", 0.0)))
    from supmae.train.process import read_process_records

    return Run(os.path.abspath(run_dir), config, epochs, steps, starts, read_process_records(run_dir))


def number_at(row: dict[str, Any], key: str) -> float | None:
    """`row[key]` as a float when it is a number (not a bool), else None."""
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _planned_epochs(config: dict[str, Any], epochs: list[dict[str, Any]]) -> tuple[int, str]:
    last = epochs[-1]
    if last.get("total_epochs"):
        return int(last["total_epochs"]), "total_epochs in log.jsonl"
    train = config.get("train", {})
    if train.get("planned_epochs"):
        return int(train["planned_epochs"]), "config train.planned_epochs"
    if train.get("epochs"):
        return int(train["epochs"]), "config train.epochs"
    return int(last["epoch"]) + 1, "epochs run so far (no planned length found)"


def process_first_epochs(run: Run) -> tuple[set[int], str]:
    """Epochs that were the first of their process (they carry compilation and warm-up), and how they
    were found: `process_epoch == 0` in the log, else the start epochs of starts.jsonl, else the first
    logged epoch (an old log: a resumed run's later starts cannot be seen)."""
    if all("process_epoch" in r for r in run.epochs):
        return {int(r["epoch"]) for r in run.epochs if int(r["process_epoch"]) == 0}, "process_epoch in log.jsonl"
    logged = {int(r["epoch"]) for r in run.epochs}
    firsts = {int(r["epoch"]) for r in run.epochs if r.get("process_epoch") == 0}
    if run.starts:
        firsts |= {int(s["start_epoch"]) for s in run.starts if "start_epoch" in s} & logged
        return firsts | {int(run.epochs[0]["epoch"])}, "start_epoch in starts.jsonl"
    return firsts | {int(run.epochs[0]["epoch"])}, "the first logged epoch (no starts.jsonl)"


def _start_of(run: Run, epoch: int) -> dict[str, Any] | None:
    """The starts.jsonl row of the process that ran `epoch` (the latest start at or before it)."""
    best = None
    for s in run.starts:
        if "start_epoch" in s and int(s["start_epoch"]) <= epoch and (
                best is None or int(s["start_epoch"]) >= int(best["start_epoch"])):
            best = s
    return best


def epoch_mfu(run: Run, row: dict[str, Any]) -> float | None:
    """Model FLOPs utilisation of one epoch: flops_per_image x images/s / (peak_flops x world size)."""
    fpi, ips = number_at(row, "flops_per_image"), number_at(row, "images_per_sec")
    start = _start_of(run, int(row["epoch"]))
    peak = number_at(start, "peak_flops") if start else None
    world = int(row.get("world_size") or (start or {}).get("world_size") or 1)
    if fpi is None or ips is None or not peak:
        return None
    return fpi * ips / (peak * world)


# ---------------------------------------------------------------------------------------------- processes


def process_costs(run: Run) -> list[dict[str, Any]]:
    """Each process of the run from its record: wall seconds from its start to its last heartbeat, device
    seconds at its *own* world size, and the part lost to the interruption that followed it.

    Lost: the work after the checkpoint the next process resumed from, which that process redid: from
    the moment that checkpoint was complete (or, when the next process did not resume from one of this
    process's checkpoints, from this process's first step: all of its training was redone) to its last
    heartbeat. A process that ended by itself right after the checkpoint the next one resumed from
    (`--train.epochs_per_run`) lost nothing. The last process has no successor: nothing of it is redone
    yet. A heartbeat is written every few seconds of training, so a kill hides at most that much.
    """
    from supmae.train.process import process_span

    out = []
    records = run.processes
    for i, rec in enumerate(records):
        span = process_span(rec)
        world = int(rec.get("world_size") or 1)
        beat = float(rec.get("heartbeat", rec["start"]))
        # [last complete epoch, time, global step] (records from before checkpoints inside epochs: no step)
        saves = [(int(s[0]), float(s[1]), s[2] if len(s) > 2 else None) for s in rec.get("saves") or []]
        lost = 0.0
        nxt = records[i + 1] if i + 1 < len(records) else None
        if nxt is not None:
            resumed_from = int(nxt.get("start_epoch") or 0) - 1
            resumed_step = nxt.get("start_step")
            if resumed_step is not None and any(st is not None for _, _, st in saves):
                kept = [t for _, t, st in saves if st == int(resumed_step)]
                last_is_it = bool(saves) and saves[-1][2] == int(resumed_step)
            else:
                kept = [t for e, t, _ in saves if e == resumed_from]
                last_is_it = bool(saves) and saves[-1][0] == resumed_from
            if kept and rec.get("ended") and last_is_it:
                lost = 0.0  # stopped by itself after that checkpoint: the tail is the process's own end
            else:
                begin = kept[-1] if kept else float(rec.get("first_step") or rec["start"])
                lost = max(0.0, beat - begin)
        if rec.get("ended"):
            how = "ended"
        elif nxt is not None:
            how = "killed (no end recorded)"
        else:
            how = "running, or killed (no end recorded yet)"
        out.append({"start_epoch": int(rec.get("start_epoch") or 0), "world_size": world, "wall_seconds": span,
                    "device_seconds": span * world, "lost_seconds": lost, "lost_device_seconds": lost * world,
                    "energy_kwh": number_at(rec, "energy_kwh"), "how_it_ended": how, "start": float(rec["start"]),
                    "device": rec.get("device")})
    return out


# ---------------------------------------------------------------------------------------------- figures


def _wait_seconds(row: dict[str, Any]) -> float | None:
    w = number_at(row, "data_wait_seconds")
    if w is not None:
        return w
    frac = number_at(row, "data_wait_frac")
    return frac * float(row["epoch_seconds"]) if frac is not None else None


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def figures(run: Run, price_per_gpu_hour: float | None = None, num_images: int | None = None) -> dict[str, Any]:
    """Every figure of the report (the JSON written beside it)."""
    epochs = run.epochs
    firsts, firsts_source = process_first_epochs(run)
    steady = [r for r in epochs if int(r["epoch"]) not in firsts]
    used = steady or epochs
    total_epochs, total_source = _planned_epochs(run.config, epochs)
    last = epochs[-1]
    world = int(last.get("world_size") or 1)

    # ---- per-image rates of a steady epoch: what a first epoch "should" have cost without warm-up.
    def per_image(rows: list[dict[str, Any]], value: Any) -> float | None:
        vals = [value(r) / float(r["images"]) for r in rows if r.get("images") and value(r) is not None]
        return _mean(vals) if len(vals) == len(rows) else None

    wait_pi = per_image(steady, _wait_seconds) if steady else None
    compute_pi = per_image(steady, lambda r: float(r["epoch_seconds"]) - (_wait_seconds(r) or 0.0)) if steady else None

    # ---- the wall-time split of the logged epochs.
    split = {"compute": 0.0, "data_wait": 0.0, "epoch_boundary": 0.0, "evaluation": 0.0, "checkpointing": 0.0,
             "compile_warmup": 0.0}
    have = {"data_wait": False, "evaluation": False, "checkpointing": False, "epoch_boundary": False}
    warmups: list[float] = []
    background_writes = 0.0
    for r in epochs:
        e = float(r["epoch_seconds"])
        wait = _wait_seconds(r)
        have["data_wait"] |= wait is not None
        wait = wait or 0.0
        ev, ck = number_at(r, "eval_seconds"), number_at(r, "checkpoint_seconds")
        # Inside the epoch's seconds: the saves' stalls inside it, and its first batch's wait (the loader's
        # restart at the epoch boundary), each a line of its own instead of compute and data wait.
        inside = number_at(r, "checkpoint_stall_inside_seconds") or 0.0
        boundary = number_at(r, "epoch_start_wait_seconds")
        have["epoch_boundary"] |= boundary is not None
        boundary = min(boundary or 0.0, wait)
        background_writes += number_at(r, "checkpoint_write_seconds") or 0.0
        have["evaluation"] |= ev is not None
        have["checkpointing"] |= ck is not None
        split["evaluation"] += ev or 0.0
        split["checkpointing"] += (ck or 0.0) + inside
        split["epoch_boundary"] += boundary
        e -= inside + boundary
        wait -= boundary
        if int(r["epoch"]) in firsts and steady and compute_pi is not None and r.get("images"):
            # What a steady epoch of this length spends waiting and computing; any excess of either
            # (torch.compile, FFCV's JIT, cold caches) is this process's compilation and warm-up.
            images = float(r["images"])
            wait_steady = min(wait, (wait_pi or 0.0) * images)
            compute_steady = min(e - wait, compute_pi * images)
            warm = e - wait_steady - compute_steady
            warmups.append(warm)
            split["compile_warmup"] += warm
            split["data_wait"] += wait_steady
            split["compute"] += compute_steady
        else:
            split["data_wait"] += wait
            split["compute"] += e - wait
    startups = [float(s["startup_seconds"]) for s in run.starts if number_at(s, "startup_seconds") is not None]
    split["startup"] = sum(startups)
    wall = number_at(last, "elapsed_seconds")
    procs = process_costs(run)
    if procs:
        # Every process from its start to its last heartbeat: a killed process's last minutes count.
        split["lost_to_interruptions"] = sum(p["lost_seconds"] for p in procs)
        process_wall: float | None = sum(p["wall_seconds"] for p in procs)
    else:
        process_wall = None
    parts = sum(split.values())
    split_out: dict[str, Any] = {k: (v if have.get(k, True) else None) for k, v in split.items()}
    if not startups:
        split_out["startup"] = None
    if not (steady and compute_pi is not None):
        split_out["compile_warmup"] = None
    # Start-up runs from the process's start (imports included) to its first step, while elapsed_seconds
    # starts at the run call, after the imports: the two overlap by the set-up inside the run call. The
    # wall is therefore start-up + everything after the first step; "other" is what elapsed_seconds
    # holds beyond the measured parts (gaps, logging; with start-up known, only what exceeds it).
    if process_wall is not None:
        split_out["other"] = max(0.0, process_wall - parts)
        split_out["wall"] = parts + split_out["other"]
    else:
        split_out["lost_to_interruptions"] = None  # a run written before per-process records: unknown
        split_out["other"] = max(0.0, wall - parts) if wall is not None else None
        split_out["wall"] = parts + split_out["other"] if wall is not None else None
    split_out["elapsed_seconds"] = wall
    # Not a part of the wall: the checkpoint files were written on a background thread while training went on.
    split_out["checkpoint_background_write"] = background_writes if have["checkpointing"] else None

    # ---- the projection from the steady epochs.
    def epoch_train_seconds(r: dict[str, Any]) -> float:
        if num_images is not None:
            return float(r["epoch_seconds"]) / float(r["images"]) * num_images
        return float(r["epoch_seconds"])

    if num_images is not None and not all(r.get("images") for r in used):
        raise UserError("the log has no 'images' per epoch, so it cannot be projected to --num-images")
    between_source = "eval_seconds + checkpoint_seconds (+ the stalls of saves inside the epoch) in log.jsonl"
    if have["evaluation"] or have["checkpointing"]:
        between = [(number_at(r, "eval_seconds") or 0.0) + (number_at(r, "checkpoint_seconds") or 0.0)
                   + (number_at(r, "checkpoint_stall_inside_seconds") or 0.0) for r in used]
    else:
        # An older log: evaluation and checkpointing happen between epochs, outside epoch_seconds, so
        # measure that gap from the cumulative elapsed time of consecutive epochs of one process.
        used_ids = {int(r["epoch"]) for r in used}
        between = [
            cur["elapsed_seconds"] - prev["elapsed_seconds"] - cur["epoch_seconds"]
            for prev, cur in itertools.pairwise(epochs)
            if int(cur["epoch"]) == int(prev["epoch"]) + 1 and int(cur["epoch"]) in used_ids
            and int(cur["epoch"]) not in firsts and "elapsed_seconds" in cur and "elapsed_seconds" in prev
        ]
        between = [max(0.0, b) for b in between]
        between_source = "gaps between consecutive epochs' elapsed_seconds"
    between_mean = _mean(between)
    train_secs = [epoch_train_seconds(r) for r in used]
    epoch_mean = statistics.fmean(train_secs)
    full_epoch = [t + (between_mean or 0.0) for t in train_secs]
    # The full recipe in one process pays one start-up and one compilation / warm-up.
    one_off = (_mean(startups) or 0.0) + (_mean(warmups) or 0.0)
    per_epoch = statistics.fmean(full_epoch)

    def hours(per: float) -> float:
        return (per * total_epochs + one_off) / 3600.0

    wall_hours = hours(per_epoch)
    low, high = hours(min(full_epoch)), hours(max(full_epoch))
    device_hours = wall_hours * world
    energy_rows = [r for r in epochs if number_at(r, "energy_kwh") is not None]
    energy_used = [float(r["energy_kwh"]) for r in used if number_at(r, "energy_kwh") is not None]
    watts = [(float(r["avg_watts"]), float(r["epoch_seconds"])) for r in energy_rows if number_at(r, "avg_watts")]
    energy_projected = statistics.fmean(energy_used) * total_epochs if energy_used else None
    if energy_projected is not None and num_images is not None:
        energy_projected *= num_images / float(used[-1]["images"])
    paper = paper_figure(str(run.config.get("recipe", "")))
    paper_out = None
    if paper is not None:
        scale = total_epochs / paper.epochs
        paper_out = {"method": paper.method, "phase": paper.phase, "epochs": paper.epochs, "hours": paper.hours,
                     "server": PAPER_SERVER, "device_hours": paper.hours * PAPER_GPUS,
                     "device_hours_for_total_epochs": paper.hours * PAPER_GPUS * scale,
                     "ours_over_paper_device_hours": device_hours / (paper.hours * PAPER_GPUS * scale)}
    if procs:
        so_far: float | None = sum(p["device_seconds"] for p in procs) / 3600.0
        so_far_source = "every process's span (start to last heartbeat) x its own world size"
        lost_dh: float | None = sum(p["lost_device_seconds"] for p in procs) / 3600.0
        energies = [p["energy_kwh"] for p in procs]
        process_energy = sum(energies) if all(e is not None for e in energies) else None
        notes = [str(r["energy_note"]) for r in run.processes if r.get("energy_note") and r.get("energy_kwh") is None]
        energy_note = notes[-1] if notes and process_energy is None else None
    else:
        so_far, lost_dh, process_energy, energy_note = number_at(last, "device_hours"), None, None, None
        so_far_source = "device_hours of the last log line (a run written before per-process records)"
    mfus = {int(r["epoch"]): epoch_mfu(run, r) for r in epochs}
    steady_mfu = [mfus[int(r["epoch"])] for r in used if mfus[int(r["epoch"])] is not None]
    return {
        "run_dir": run.path,
        "job": run.job,
        "recipe": run.config.get("recipe"),
        "epochs_logged": len(epochs),
        # The records count a process killed before its first step too; older runs have only starts.jsonl.
        "processes": len(run.processes) or (len(run.starts) if run.starts else None),
        "process_first_epochs": sorted(firsts),
        "process_first_epochs_source": firsts_source,
        "epochs_used": [int(r["epoch"]) for r in used],
        "skipped_warmup_epoch": bool(steady),
        "warmup_epoch_seconds": epochs[0]["epoch_seconds"] if steady and int(epochs[0]["epoch"]) in firsts else None,
        "split_seconds": split_out,
        "mean_epoch_seconds": epoch_mean,
        "epoch_seconds_spread": statistics.pstdev(train_secs) / epoch_mean if len(train_secs) > 1 and epoch_mean
        else None,
        "epoch_images": num_images if num_images is not None else (int(used[-1]["images"]) if used[-1].get("images")
                                                                    else None),
        "total_epochs": total_epochs,
        "total_epochs_source": total_source,
        "world_size": world,
        "device": last.get("device", "unknown"),
        "between_epoch_seconds": between_mean,
        "between_epoch_source": between_source if between_mean is not None else None,
        "one_off_seconds": one_off,
        "projected_training_hours": epoch_mean * total_epochs / 3600.0,
        "projected_wall_hours": wall_hours,
        "projected_wall_hours_range": [low, high],
        "projected_device_hours": device_hours,
        "projected_device_hours_range": [low * world, high * world],
        "price_per_gpu_hour": price_per_gpu_hour,
        "projected_cost": device_hours * price_per_gpu_hour if price_per_gpu_hour is not None else None,
        "projected_cost_range": [low * world * price_per_gpu_hour, high * world * price_per_gpu_hour]
        if price_per_gpu_hour is not None else None,
        "elapsed_seconds": wall,
        "device_hours_so_far": so_far,
        "device_hours_source": so_far_source,
        "cost_so_far": so_far * price_per_gpu_hour if price_per_gpu_hour is not None and so_far is not None else None,
        "lost_device_hours": lost_dh,
        "lost_cost": lost_dh * price_per_gpu_hour if price_per_gpu_hour is not None and lost_dh is not None else None,
        "process_costs": procs,
        "process_energy_kwh": process_energy,
        "process_energy_note": energy_note,
        "data_wait_frac": _mean([float(r["data_wait_frac"]) for r in used if number_at(r, "data_wait_frac") is not None]),
        "images_per_sec": _mean([float(r["images_per_sec"]) for r in used if number_at(r, "images_per_sec") is not None]),
        "mfu_per_epoch": mfus,
        "mfu": _mean(steady_mfu),
        "energy_kwh": sum(float(r["energy_kwh"]) for r in energy_rows) if energy_rows else None,
        "avg_watts": sum(w * s for w, s in watts) / sum(s for _, s in watts) if watts else None,
        "projected_energy_kwh": energy_projected,
        "precision": _setting(run, "precision_config", "precision", "precision"),
        "compile": _setting(run, "compile_config", "compile", "compile"),
        "paper": paper_out,
        "truncated_epochs_steps": int(run.config.get("train", {}).get("max_steps_per_epoch", 0) or 0),
    }


def _setting(run: Run, configured_key: str, resolved_key: str, config_key: str) -> dict[str, Any]:
    """Configured and resolved value of a train setting: from starts.jsonl (each process's, distinct),
    else the configured value from config.json and the resolved one unknown."""
    configured = [s[configured_key] for s in run.starts if configured_key in s]
    resolved = [s[resolved_key] for s in run.starts if resolved_key in s]
    if not configured:
        value = run.config.get("train", {}).get(config_key)
        configured = [value] if value is not None else []
    return {"configured": list(dict.fromkeys(configured)) or None, "resolved": list(dict.fromkeys(resolved)) or None}


# Kept for callers of the first edition's names.
def project(run: Run, price_per_gpu_hour: float | None = None, num_images: int | None = None) -> dict[str, Any]:
    """Alias of `figures`."""
    return figures(run, price_per_gpu_hour, num_images)
