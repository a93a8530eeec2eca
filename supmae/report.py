"""`supmae report RUN_DIR`: the cost report of a pretraining, fine-tuning or linear-probing run.

Reads the books a job writes into its run directory: `config.json` (the resolved config),
`log.jsonl` (one row per epoch), `starts.jsonl` (one row per process start), `steps.jsonl` and
`processes/` (one record per process, heartbeated), and writes `report.md`, `report.json` and
`report.png`:

- the device-hours spent so far: every process from its start to its last heartbeat, times its own
  world size (a process killed with SIGKILL counts up to its last heartbeat; a resume on another
  number of devices does not re-price the earlier processes), and the part of them lost to
  interruptions (work after the checkpoint a resume started from, redone) as its own line, in the
  wall split and in the cost;

- the wall time split into compute, data wait, evaluation, checkpointing, compilation and warm-up
  (each process's first epoch minus a steady epoch of the same length) and start-up (once per
  process, from starts.jsonl);
- MFU per epoch: counted FLOPs per image x images/s / (the matmul peak measured at the process's
  start x world size);
- energy from the NVML figures when present: per training loop in the log (kWh, average watts) and
  over the whole processes in their records; "not measured" otherwise, never estimated;
- the projection of the recipe's full length (total_epochs) from the steady epochs, with a range
  from their epoch-to-epoch spread, its device-hours and money at a price;
- the paper's Table 1 figure for the same recipe, where one exists, beside ours.

Runs written before some of these books existed (no starts.jsonl, no eval_seconds, no
flops_per_image, ...) are still reported: what cannot be computed shows as "n/a".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

from supmae.costs import (
    PAPER_GPUS,
    Run,
    figures,
    load_run,
    number_at,
    project,  # noqa: F401 - kept for callers of the first edition's names
)
from supmae.errors import UserError

# ---------------------------------------------------------------------------------------------- writing


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _epoch_list(ids: list[int]) -> str:
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids))


def _setting_text(s: dict[str, Any]) -> str:
    conf = "/".join(str(v) for v in s["configured"]) if s["configured"] else "n/a"
    res = "/".join(("on" if v else "off") if isinstance(v, bool) else str(v) for v in s["resolved"]) \
        if s["resolved"] else "n/a"
    return f"{conf} (resolved: {res})"


_SPLIT_LABELS = (
    ("compute", "compute (training step)"),
    ("data_wait", "data wait"),
    ("epoch_boundary", "epoch boundaries (the loader's restart: each epoch's first batch)"),
    ("evaluation", "evaluation"),
    ("checkpointing", "checkpointing (the loop's stall: host snapshots)"),
    ("compile_warmup", "compilation and warm-up"),
    ("startup", "start-up"),
    ("lost_to_interruptions", "lost to interruptions (work redone after a resume)"),
    ("other", "other (wall minus the parts)"),
)


def render_markdown(run: Run, fig: dict[str, Any], png_name: str | None) -> str:
    config = run.config
    data, model = config.get("data", {}), config.get("model", {})
    price = fig["price_per_gpu_hour"]
    money = (f"{fig['projected_cost']:,.2f} (range {fig['projected_cost_range'][0]:,.2f}-"
             f"{fig['projected_cost_range'][1]:,.2f}) at {price:g} per device-hour"
             if fig["projected_cost"] is not None else "n/a (pass --price-per-gpu-hour)")
    lines = [
        f"# Cost report: {run.path}",
        "",
        (f"{fig['job']} run, recipe `{config.get('recipe') or '?'}`, model `{model.get('name') or '?'}`, device "
         f"{fig['device']} x {fig['world_size']}, per-device batch {data.get('batch_size', '?')}, pipeline "
         f"{data.get('pipeline', '?')}; precision {_setting_text(fig['precision'])}, compile "
         f"{_setting_text(fig['compile'])}; {fig['epochs_logged']} epochs logged"
         + (f" over {fig['processes']} process(es)." if fig["processes"] else " (no starts.jsonl).")),
        "",
        "## Where the wall time went",
        "",
        "| part | seconds | share |",
        "|---|---|---|",
    ]
    split = fig["split_seconds"]
    wall = split["wall"]
    for key, label in _SPLIT_LABELS:
        v = split[key]
        share = f"{v / wall:.1%}" if v is not None and wall else "n/a"
        lines.append(f"| {label} | {_fmt(v, '.2f')} | {share} |")
    lines.append(f"| **wall (all processes, start-up included)** | {_fmt(wall, '.2f')} | |")
    if split.get("checkpoint_background_write") is not None:
        lines.append(f"| (checkpoint files written in the background, beside training: not in the wall) | "
                     f"{_fmt(split['checkpoint_background_write'], '.2f')} | |")
    lines += [
        "",
        (f"Compilation and warm-up: the first epoch of each process ({_epoch_list(fig['process_first_epochs'])}, "
         f"from {fig['process_first_epochs_source']}) minus what a steady epoch of the same length spends "
         "computing and waiting for data. Start-up: once per process, from starts.jsonl (process start to "
         "its first step, imports included). Lost to interruptions: what a killed process did after the "
         "checkpoint the next process resumed from. The wall is every process from its start to its last "
         "heartbeat (runs written before per-process records: the log's elapsed_seconds). elapsed_seconds "
         f"of the last log line: {_fmt(split['elapsed_seconds'], '.2f')} s."),
        "",
        "## Projection of the full recipe",
        "",
        f"- recipe length: {fig['total_epochs']} epochs ({fig['total_epochs_source']})",
        f"- steady epoch: {fig['mean_epoch_seconds']:.2f} s of training (mean of epochs "
        f"{_epoch_list(fig['epochs_used'])}" + (f", spread {fig['epoch_seconds_spread']:.1%}"
                                               if fig["epoch_seconds_spread"] is not None else "") + ")",
    ]
    if fig["skipped_warmup_epoch"]:
        if fig["warmup_epoch_seconds"] is not None:
            lines.append(f"- epoch {int(run.epochs[0]['epoch'])} ({fig['warmup_epoch_seconds']:.2f} s) skipped: "
                         "the first epoch of a process carries one-off costs (torch.compile, FFCV's JIT, cold caches)")
        lines.append(f"- first epochs of every process skipped: {_epoch_list(fig['process_first_epochs'])}")
    else:
        lines.append("- every logged epoch is the first of its process, so the projection includes their one-off "
                     "warm-up costs (an overestimate)")
    if fig["epoch_images"]:
        lines.append(f"- images per epoch: {fig['epoch_images']:,}")
    if fig["truncated_epochs_steps"]:
        lines.append(f"- note: the run capped epochs at {fig['truncated_epochs_steps']} steps "
                     "(train.max_steps_per_epoch); the projection is for epochs of the logged length unless "
                     "--num-images is given")
    lines += [
        "- evaluation and checkpointing per epoch: "
        + (f"{fig['between_epoch_seconds']:.2f} s ({fig['between_epoch_source']}), included"
           if fig["between_epoch_seconds"] is not None else "not measurable from this log; not included"),
        (f"- one-off costs, paid once: {fig['one_off_seconds']:.2f} s (start-up + compilation and warm-up of one "
        "process)"),
        f"- projected training time alone: {fig['projected_training_hours']:.3f} h",
        (f"- projected wall-clock: {fig['projected_wall_hours']:.3f} h (range "
         f"{fig['projected_wall_hours_range'][0]:.3f}-{fig['projected_wall_hours_range'][1]:.3f} h from the fastest "
         f"and slowest steady epoch); device-hours: {fig['projected_device_hours']:.3f} "
         f"({fig['world_size']} device(s))"),
        f"- projected cost: {money}",
        f"- projected energy: {_fmt(fig['projected_energy_kwh'], '.3f')} kWh",
        (f"- measured so far: {_fmt(fig['elapsed_seconds'], '.1f')} s elapsed, "
         f"{_fmt(fig['device_hours_so_far'], '.4f')} device-hours ({fig['device_hours_source']})"
         + (f", cost {fig['cost_so_far']:,.2f}" if fig["cost_so_far"] is not None else "")
         + f", energy {_fmt(fig['energy_kwh'], '.4f')} kWh at {_fmt(fig['avg_watts'], '.0f')} W average "
         "in the training loops"
         + (f", {fig['process_energy_kwh']:.4f} kWh over the whole processes"
            if fig["process_energy_kwh"] is not None else ", whole processes: "
            + (fig["process_energy_note"] or "not measured"))),
        (f"- lost to interruptions: {_fmt(fig['lost_device_hours'], '.4f')} device-hours"
         + (f", cost {fig['lost_cost']:,.2f}" if fig["lost_cost"] is not None else "")
         + (" (included in the figures above; work after the checkpoint a resume started from, redone by the "
            "next process; at least this much: a kill hides the seconds after its process's last heartbeat)"
            if fig["lost_device_hours"] is not None else " (n/a: the run has no per-process records)")),
        (f"- steady epochs: data-wait {_fmt(fig['data_wait_frac'], '.1%')} of step time, "
         f"{_fmt(fig['images_per_sec'], '.1f')} images/s, MFU {_fmt(fig['mfu'], '.1%')}"),
    ]
    over = [e for e, m in fig["mfu_per_epoch"].items() if m is not None and m > 1.0]
    if over:
        lines.append(f"- MFU above 100% (epochs {_epoch_list(sorted(over))}): the matmul peak recorded at the "
                     "process's start was measured at a busy moment (a shared machine), so it understates the device")
    lines += [
        "",
        "## Beside the paper (Table 1)",
        "",
    ]
    p = fig["paper"]
    if p is None:
        lines.append(f"The paper timed no run of recipe `{config.get('recipe') or '?'}` (Table 1 has ViT-B/16 "
                     "runs: `supmae_vit_b16_400ep`, `mae_vit_b16_1600ep`, `vit_b16_ft100`).")
    else:
        lines += [
            "| | epochs | wall hours | devices | device-hours |",
            "|---|---|---|---|---|",
            (f"| paper: {p['method']} {p['phase']} on {p['server']} | {p['epochs']} | {p['hours']:g} | {PAPER_GPUS} | "
            f"{p['device_hours']:.1f} |"),
            (f"| this run, projected | {fig['total_epochs']} | {fig['projected_wall_hours']:.1f} | "
            f"{fig['world_size']} | {fig['projected_device_hours']:.1f} |"),
            "",
            (f"Ours / paper device-hours (paper scaled to {fig['total_epochs']} epochs): "
            f"{p['ours_over_paper_device_hours']:.2f}x."),
        ]
    if fig["process_costs"]:
        lines += [
            "",
            "## Processes",
            "",
            "| process | started at epoch | devices | wall s | device-hours | lost s | how it ended |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, pc in enumerate(fig["process_costs"]):
            lines.append(f"| {i} | {pc['start_epoch']} | {pc['world_size']} | {pc['wall_seconds']:.2f} | "
                         f"{pc['device_seconds'] / 3600:.4f} | {pc['lost_seconds']:.2f} | {pc['how_it_ended']} |")
    lines += [
        "",
        "## Measured epochs",
        "",
        "| epoch | seconds | images/s | step ms | data-wait | eval s | ckpt s | MFU | peak MB | loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in run.epochs:
        loss = r.get("loss", r.get("train_loss"))
        first = " *" if int(r["epoch"]) in set(fig["process_first_epochs"]) else ""
        lines.append(
            f"| {r['epoch']}{first} | {r['epoch_seconds']:.2f} | {_fmt(number_at(r, 'images_per_sec'), '.1f')} | "
            f"{_fmt(number_at(r, 'step_time_ms'), '.1f')} | {_fmt(number_at(r, 'data_wait_frac'), '.1%')} | "
            f"{_fmt(number_at(r, 'eval_seconds'), '.2f')} | {_fmt(number_at(r, 'checkpoint_seconds'), '.2f')} | "
            f"{_fmt(fig['mfu_per_epoch'][int(r['epoch'])], '.2%')} | {_fmt(number_at(r, 'peak_mem_mb'), '.0f')} | "
            f"{_fmt(loss if isinstance(loss, (int, float)) else None, '.4f')} |"
        )
    lines += ["", "`*` first epoch of a process (compilation and warm-up)."]
    if png_name:
        lines += ["", f"![throughput and epoch times]({png_name})"]
    lines.append("")
    return "\n".join(lines)


def write_plot(path: str, run: Run, fig_data: dict[str, Any]) -> None:
    """Images/s over time (steps.jsonl, or per epoch without it) and the epoch times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs, steps = run.epochs, run.steps
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    timed = [s for s in steps if "elapsed_seconds" in s and "images_per_sec" in s]
    if timed:
        ax1.plot([s["elapsed_seconds"] / 60 for s in timed], [s["images_per_sec"] for s in timed], ".-",
                 label="every log_every steps")
    ax1.plot([r.get("elapsed_seconds", 0) / 60 for r in epochs], [r.get("images_per_sec", 0) for r in epochs], "o",
             label="epoch mean")
    ax1.set_xlabel("elapsed minutes")
    ax1.set_ylabel("images / s")
    ax1.set_title("throughput over time", fontsize=10)
    ax1.legend(fontsize=8)
    waits = [s for s in timed if "data_wait_frac" in s]
    if waits:
        ax1b = ax1.twinx()
        ax1b.plot([s["elapsed_seconds"] / 60 for s in waits], [100 * s["data_wait_frac"] for s in waits],
                  color="tab:red", alpha=0.4, linewidth=1)
        ax1b.set_ylabel("data-wait %", color="tab:red")
    used = set(fig_data["epochs_used"])
    colors = ["tab:blue" if int(r["epoch"]) in used else "tab:grey" for r in epochs]
    ax2.bar([int(r["epoch"]) for r in epochs], [r["epoch_seconds"] for r in epochs], color=colors)
    ax2.axhline(statistics.fmean(r["epoch_seconds"] for r in epochs if int(r["epoch"]) in used),
                color="black", linestyle=":", linewidth=1)
    ax2.set_xticks([int(r["epoch"]) for r in epochs])
    ax2.set_xlabel("epoch (grey: first epoch of a process)")
    ax2.set_ylabel("seconds")
    ax2.set_title(f"epoch times; projected {fig_data['total_epochs']} epochs = "
                  f"{fig_data['projected_device_hours']:.2f} device-h", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str, price_per_gpu_hour: float | None = None, out_dir: str | None = None,
                 num_images: int | None = None) -> dict[str, Any]:
    """Write report.md, report.json and report.png for `run_dir` (into `out_dir`, default the run
    directory) and return their paths ("report_md", "report_json", "report_png") with the figures."""
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise UserError(f"--price-per-gpu-hour must not be negative, got {price_per_gpu_hour}")
    if num_images is not None and num_images < 1:
        raise UserError(f"--num-images must be positive, got {num_images}")
    run = load_run(run_dir)
    fig = figures(run, price_per_gpu_hour, num_images)
    out = out_dir or run_dir
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, f"report.{ext}") for name, ext in
             (("report_md", "md"), ("report_json", "json"), ("report_png", "png"))}
    write_plot(paths["report_png"], run, fig)
    with open(paths["report_md"], "w", encoding="utf-8") as fh:
        fh.write(render_markdown(run, fig, os.path.basename(paths["report_png"])))
    with open(paths["report_json"], "w", encoding="utf-8") as fh:
        json.dump(fig, fh, indent=1)
    return {**paths, **fig}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supmae report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="run directory of supmae pretrain / finetune / linprobe")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="price of one device-hour, for the cost")
    p.add_argument("--out", default=None, help="where to write report.md/.json/.png (default: the run directory)")
    p.add_argument("--num-images", type=int, default=None,
                   help="project epochs of this many images (default: the logged epoch length)")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    result = write_report(a.run_dir, a.price_per_gpu_hour, a.out, a.num_images)
    with open(result["report_md"], encoding="utf-8") as fh:
        print(fh.read())
    print(f"written: {result['report_md']}, {result['report_json']}, {result['report_png']}")
    return 0
