"""`supmae report RUN_DIR`: the cost report of a timed pretraining run.

Reads the run directory written by `supmae pretrain` (`config.json`, `log.jsonl` one line per
epoch, `steps.jsonl` every `log_every` steps) and writes `report.md` and `report.png`: measured
epoch times, the projected total for the recipe's epochs (`total_epochs` in the log, else the
config's `train.planned_epochs` / `train.epochs`), device-hours, money at a given price, the
data-wait fraction, and images/s over time.

Epoch 0 carries one-off costs (torch.compile, FFCV's numba compilation, cold caches), so when
later epochs exist the projection uses only those, and says so.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
from typing import Any

from supmae.errors import UserError


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    from supmae.train.run_dir import read_jsonl

    return read_jsonl(path)


def load_run(run_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(config, epoch rows, step rows) of a run directory; `UserError` if it holds no timed epoch."""
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
    epochs = [r for r in _read_jsonl(os.path.join(run_dir, "log.jsonl")) if "epoch_seconds" in r]
    if not epochs:
        raise UserError(f"{run_dir} has no timed epoch in log.jsonl (is it a 'supmae pretrain' run directory, "
                        "and has its first epoch finished?)")
    epochs.sort(key=lambda r: int(r["epoch"]))
    steps = _read_jsonl(os.path.join(run_dir, "steps.jsonl"))
    return config, epochs, steps


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


def project(
    config: dict[str, Any], epochs: list[dict[str, Any]], price_per_gpu_hour: float | None = None,
    num_images: int | None = None,
) -> dict[str, Any]:
    """Key figures of the report. The projected epoch time is the mean of the epochs used (all but
    epoch 0 when later ones exist), scaled to `num_images` per epoch when given."""
    skipped_warmup = len(epochs) > 1 and int(epochs[0]["epoch"]) == 0
    used = epochs[1:] if skipped_warmup else epochs
    total_epochs, total_source = _planned_epochs(config, epochs)
    world = int(epochs[-1].get("world_size", 1))
    sec_per_image = statistics.fmean(r["epoch_seconds"] / max(r.get("images", 0), 1) for r in used) \
        if all(r.get("images") for r in used) else None
    epoch_images = int(used[-1]["images"]) if used[-1].get("images") else None
    if num_images is not None:
        if sec_per_image is None:
            raise UserError("the log has no 'images' per epoch, so it cannot be projected to --num-images")
        epoch_seconds = sec_per_image * num_images
        epoch_images = num_images
    else:
        epoch_seconds = statistics.fmean(r["epoch_seconds"] for r in used)
    # Evaluation and checkpointing happen between epochs, outside epoch_seconds: measure that gap from
    # the cumulative elapsed time of consecutive epochs, and count it, because it is paid for too.
    used_ids = {int(r["epoch"]) for r in used}
    gaps = [
        cur["elapsed_seconds"] - prev["elapsed_seconds"] - cur["epoch_seconds"]
        for prev, cur in itertools.pairwise(epochs)
        if int(cur["epoch"]) == int(prev["epoch"]) + 1 and int(cur["epoch"]) in used_ids
        and "elapsed_seconds" in cur and "elapsed_seconds" in prev
    ]
    overhead = max(0.0, statistics.fmean(gaps)) if gaps else 0.0
    training_hours = epoch_seconds * total_epochs / 3600.0
    wall_hours = (epoch_seconds + overhead) * total_epochs / 3600.0
    device_hours = wall_hours * world
    waits = [r["data_wait_frac"] for r in used if "data_wait_frac" in r]
    last = epochs[-1]
    truncated = int(config.get("train", {}).get("max_steps_per_epoch", 0) or 0)
    return {
        "epochs_logged": len(epochs),
        "epochs_used": [int(r["epoch"]) for r in used],
        "skipped_warmup_epoch": skipped_warmup,
        "warmup_epoch_seconds": epochs[0]["epoch_seconds"] if skipped_warmup else None,
        "mean_epoch_seconds": epoch_seconds,
        "epoch_seconds_spread": statistics.pstdev(r["epoch_seconds"] for r in used) / epoch_seconds
        if len(used) > 1 and epoch_seconds > 0 and num_images is None else None,
        "epoch_images": epoch_images,
        "total_epochs": total_epochs,
        "total_epochs_source": total_source,
        "world_size": world,
        "device": last.get("device", "unknown"),
        "between_epoch_seconds": overhead if gaps else None,
        "projected_training_hours": training_hours,
        "projected_wall_hours": wall_hours,
        "projected_device_hours": device_hours,
        "price_per_gpu_hour": price_per_gpu_hour,
        "projected_cost": device_hours * price_per_gpu_hour if price_per_gpu_hour is not None else None,
        "elapsed_seconds": last.get("elapsed_seconds"),
        "device_hours_so_far": last.get("device_hours"),
        "data_wait_frac": statistics.fmean(waits) if waits else None,
        "images_per_sec": statistics.fmean(r["images_per_sec"] for r in used if "images_per_sec" in r)
        if any("images_per_sec" in r for r in used) else None,
        "truncated_epochs_steps": truncated,
    }


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def render_markdown(run_dir: str, config: dict[str, Any], epochs: list[dict[str, Any]], fig: dict[str, Any],
                    png_name: str | None) -> str:
    data = config.get("data", {})
    model = config.get("model", {})
    train = config.get("train", {})
    money = (f"{fig['projected_cost']:,.2f} at {fig['price_per_gpu_hour']:g} per device-hour"
             if fig["projected_cost"] is not None else "n/a (pass --price-per-gpu-hour)")
    lines = [
        f"# Cost report: {os.path.abspath(run_dir)}",
        "",
        (f"Recipe `{config.get('recipe', '?')}`, model `{model.get('name', '?')}`, device {fig['device']} x "
        f"{fig['world_size']}, per-device batch {data.get('batch_size', '?')}, pipeline {data.get('pipeline', '?')}, "
        f"precision {train.get('precision', '?')}, compile {train.get('compile', '?')}."),
        "",
        "## Projection",
        "",
        f"- epoch time used: {fig['mean_epoch_seconds']:.2f} s (mean of epochs {_epoch_list(fig['epochs_used'])}"
        + (f", spread {fig['epoch_seconds_spread']:.1%}" if fig["epoch_seconds_spread"] is not None else "") + ")",
    ]
    if fig["skipped_warmup_epoch"]:
        lines.append(f"- epoch 0 ({fig['warmup_epoch_seconds']:.2f} s) skipped: it carries one-off warm-up costs "
                     "(torch.compile, FFCV/numba compilation, cold caches)")
    else:
        lines.append("- only epoch 0 is logged, so the projection includes its one-off warm-up costs (an "
                     "overestimate)")
    if fig["epoch_images"]:
        lines.append(f"- images per epoch: {fig['epoch_images']:,}")
    if fig["truncated_epochs_steps"]:
        lines.append(f"- note: the run capped epochs at {fig['truncated_epochs_steps']} steps "
                     "(train.max_steps_per_epoch); the projection is for epochs of the logged length unless "
                     "--num-images is given")
    lines += [
        f"- recipe length: {fig['total_epochs']} epochs ({fig['total_epochs_source']})",
        "- time between epochs (evaluation, checkpoint): "
        + (f"{fig['between_epoch_seconds']:.2f} s per epoch, included below"
           if fig["between_epoch_seconds"] is not None else "not measurable from this log (needs two consecutive "
           "epochs after the warm-up one); not included"),
        f"- projected training time alone: {fig['projected_training_hours']:.3f} h",
        (f"- projected wall-clock: {fig['projected_wall_hours']:.3f} h; device-hours: "
        f"{fig['projected_device_hours']:.3f} ({fig['world_size']} device(s))"),
        f"- projected cost: {money}",
        (f"- measured so far: {_fmt(fig['elapsed_seconds'], '.1f')} s elapsed, "
        f"{_fmt(fig['device_hours_so_far'], '.4f')} device-hours"),
        (f"- mean data-wait: {_fmt(fig['data_wait_frac'], '.1%')} of step time; mean throughput "
        f"{_fmt(fig['images_per_sec'], '.1f')} images/s"),
        "",
        "## Measured epochs",
        "",
        "| epoch | seconds | images/s | step ms | data-wait | peak MB | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in epochs:
        lines.append(
            f"| {r['epoch']} | {r['epoch_seconds']:.2f} | {_fmt(r.get('images_per_sec'), '.1f')} | "
            f"{_fmt(r.get('step_time_ms'), '.1f')} | {_fmt(r.get('data_wait_frac'), '.1%')} | "
            f"{_fmt(r.get('peak_mem_mb'), '.0f')} | {_fmt(r.get('loss'), '.4f')} |"
        )
    if png_name:
        lines += ["", f"![throughput and epoch times]({png_name})"]
    lines.append("")
    return "\n".join(lines)


def _epoch_list(ids: list[int]) -> str:
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids))


def write_plot(path: str, epochs: list[dict[str, Any]], steps: list[dict[str, Any]], fig_data: dict[str, Any]) -> None:
    """Images/s over time (steps.jsonl, or per epoch without it) and the epoch times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax1b = ax1.twinx()
    waits = [s for s in timed if "data_wait_frac" in s]
    if waits:
        ax1b.plot([s["elapsed_seconds"] / 60 for s in waits], [100 * s["data_wait_frac"] for s in waits],
                  color="tab:red", alpha=0.4, linewidth=1)
        ax1b.set_ylabel("data-wait %", color="tab:red")
    used = set(fig_data["epochs_used"])
    colors = ["tab:blue" if int(r["epoch"]) in used else "tab:grey" for r in epochs]
    ax2.bar([int(r["epoch"]) for r in epochs], [r["epoch_seconds"] for r in epochs], color=colors)
    ax2.axhline(statistics.fmean(r["epoch_seconds"] for r in epochs if int(r["epoch"]) in used),
                color="black", linestyle=":", linewidth=1)
    ax2.set_xticks([int(r["epoch"]) for r in epochs])
    ax2.set_xlabel("epoch (grey: excluded warm-up)")
    ax2.set_ylabel("seconds")
    ax2.set_title(f"epoch times; projected {fig_data['total_epochs']} epochs = "
                  f"{fig_data['projected_device_hours']:.2f} device-h", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str, price_per_gpu_hour: float | None = None, out_dir: str | None = None,
                 num_images: int | None = None) -> dict[str, Any]:
    """Write report.md and report.png for `run_dir` (into `out_dir`, default the run directory) and
    return the written paths ("report_md", "report_png") with the key figures of `project`."""
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise UserError(f"--price-per-gpu-hour must not be negative, got {price_per_gpu_hour}")
    if num_images is not None and num_images < 1:
        raise UserError(f"--num-images must be positive, got {num_images}")
    config, epochs, steps = load_run(run_dir)
    fig = project(config, epochs, price_per_gpu_hour, num_images)
    out = out_dir or run_dir
    os.makedirs(out, exist_ok=True)
    md_path = os.path.join(out, "report.md")
    png_path = os.path.join(out, "report.png")
    write_plot(png_path, epochs, steps, fig)
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(render_markdown(run_dir, config, epochs, fig, os.path.basename(png_path)))
    return {"report_md": md_path, "report_png": png_path, **fig}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supmae report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="run directory of 'supmae pretrain' (config.json, log.jsonl, steps.jsonl)")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="price of one device-hour, for the cost")
    p.add_argument("--out", default=None, help="where to write report.md / report.png (default: the run directory)")
    p.add_argument("--num-images", type=int, default=None,
                   help="project epochs of this many images (default: the logged epoch length)")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    result = write_report(a.run_dir, a.price_per_gpu_hour, a.out, a.num_images)
    with open(result["report_md"], encoding="utf-8") as fh:
        print(fh.read())
    print(f"written: {result['report_md']}, {result['report_png']}")
    return 0
