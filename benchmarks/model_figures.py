"""Figures of the SupMAE network itself: FLOPs of a training step and the speed of one step on this machine.

    python -m benchmarks.model_figures                 # FLOPs of ViT-B/16 d1b and d8b, then CPU speed
    python -m benchmarks.model_figures --no-speed      # FLOPs only (under a second per model)

FLOPs: `supmae.models.flops.training_flops_per_image` (forward + loss + backward per image, at the
given mask ratio). Speed: one training step (forward, loss, backward, AdamW) at a fixed batch, fp32,
of `supmae pretrain`'s own step (`supmae.train.steps.build_pretrain_step`: SDPA attention, no host
sync, the trainer's AdamW) next to the paper-faithful one (eager attention, `.item()` of the three
losses every step, AdamW's per-parameter loop), the two interleaved round by round in one process so
that load from other work on the machine hits both alike. `supmae bench step` breaks the difference
down factor by factor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from supmae.errors import UserError

REFERENCE_MODELS = ("mae_vit_base_patch16_dec512d1b", "mae_vit_base_patch16_dec512d8b")


def flops_table(names: tuple[str, ...], mask_ratio: float) -> dict[str, dict[str, int]]:
    """FLOPs per image of one training step of each named model."""
    from supmae.models import create_model
    from supmae.models.flops import training_flops_per_image

    out = {}
    for name in names:
        with torch.device("meta"):
            model = create_model(name)
        out[name] = training_flops_per_image(model, mask_ratio=mask_ratio)
    return out


def _build_step(name: str, config: str, batch_size: int, mask_ratio: float) -> Any:
    """A zero-argument training step of model `name` in `config`: "ours" is `supmae pretrain`'s own step
    (`build_pretrain_step` with the recipe's auto settings), "paper" the reference's loop body on a step
    built with its settings (eager attention, fp32 on the CPU, AdamW's per-parameter loop); both as
    `benchmarks.step` builds its first and last rows."""
    from benchmarks.step import Settings, reference_loop_body, step_config
    from supmae.models import model_defaults
    from supmae.train.steps import build_pretrain_step

    device = torch.device("cpu")
    defaults = model_defaults(name)
    settings = None if config == "ours" else Settings()
    ps = build_pretrain_step(step_config(name, batch_size, None, mask_ratio, settings), device,
                             int(defaults["num_classes"]))
    fn = ps if settings is None else reference_loop_body(ps, device)
    size = int(defaults["img_size"])
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch_size, 3, size, size, generator=g)
    labels = torch.randint(0, int(defaults["num_classes"]), (batch_size,), generator=g)

    def step() -> None:
        fn(imgs, labels)

    return step


def step_speed(name: str, batch_size: int, mask_ratio: float, rounds: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Seconds per step and images/s of both configurations, interleaved round by round."""
    steps = {config: _build_step(name, config, batch_size, mask_ratio) for config in ("ours", "paper")}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {config: [] for config in steps}
    for _ in range(rounds):
        for config, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[config].append(time.perf_counter() - t0)
    result = {}
    for config, ts in times.items():
        med = statistics.median(ts)
        result[config] = {"seconds_per_step": med, "images_per_sec": batch_size / med, "steps": ts}
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_figures", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mae_vit_base_patch16_dec512d1b", help="model timed for speed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--rounds", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-speed", action="store_true", help="FLOPs only")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.batch_size < 2:
        raise UserError("--batch-size must be >= 2 (the head's BatchNorm needs more than one sample)")
    if args.rounds < 1 or args.warmup < 0:
        raise UserError("--rounds must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    figures: dict[str, Any] = {"mask_ratio": args.mask_ratio, "torch": torch.__version__,
                               "threads": torch.get_num_threads()}
    flops = flops_table(tuple(dict.fromkeys((*REFERENCE_MODELS, args.model))), args.mask_ratio)
    figures["flops_per_image"] = flops
    print(f"FLOPs per image of one training step (fwd + bwd), mask ratio {args.mask_ratio}:")
    print(f"  {'model':<34} {'total':>8} {'forward':>8} {'encoder':>8} {'decoder':>8} {'head':>8}  (GFLOP)")
    for name, f in flops.items():
        print(f"  {name:<34} " + " ".join(f"{f[k] / 1e9:8.2f}" for k in ("total", "forward", "encoder", "decoder",
                                                                           "head")))

    if not args.no_speed:
        print(f"\nCPU training step, {args.model}, batch {args.batch_size}, fp32, {torch.get_num_threads()} threads, "
              f"median of {args.rounds} interleaved steps:")
        speed = step_speed(args.model, args.batch_size, args.mask_ratio, args.rounds, args.warmup)
        figures["speed"] = {"model": args.model, "batch_size": args.batch_size, **speed}
        labels = {"ours": "supmae pretrain's step (SDPA, no host sync, AdamW foreach)",
                  "paper": "paper-faithful (eager attention, .item() x3 per step, AdamW loop)"}
        for config, r in speed.items():
            print(f"  {labels[config]:<66} {r['seconds_per_step']:7.2f} s/step  {r['images_per_sec']:7.2f} img/s")
        print(f"  speed-up: {speed['paper']['seconds_per_step'] / speed['ours']['seconds_per_step']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
