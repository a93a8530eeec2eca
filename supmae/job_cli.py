"""The jobs' command lines: `supmae pretrain`, `supmae finetune`, `supmae linprobe` (a named recipe,
then dotted overrides, then the run) and `supmae eval` (a checkpoint on a val split).

They live above both `supmae.recipes` (the named configurations) and `supmae.train` (the jobs),
which the recipes build their configs from: the jobs never import the recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from supmae.config import apply_overrides, from_dict, to_dict
from supmae.errors import UserError
from supmae.recipes import get_recipe, list_recipes
from supmae.train.data import DataConfig
from supmae.train.finetune_config import DownstreamConfig
from supmae.train.pretrain_config import PretrainConfig

# The jobs themselves (and their libraries: torch, timm, the pipelines) are imported when a command
# runs, so that '--help' and '--list-recipes' answer at once.

def _print(*args: Any) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------- pretrain


def build_config(recipe: str, overrides: list[str]) -> PretrainConfig:
    """Recipe `recipe` with dotted command-line overrides applied (strict: unknown keys are errors)."""
    cfg = get_recipe(recipe, "pretrain")
    apply_overrides(cfg, overrides)
    return cfg


_EPILOG = """\
common overrides (any config key works as --section.key VALUE or --section.key=VALUE):
  --data.path DIR            dataset written by 'supmae convert' (or an ImageFolder root for torchvision)
  --output-dir DIR           run directory: config.json, log.jsonl, steps.jsonl, checkpoints
  --resume auto|PATH         continue from the newest valid checkpoint of --output-dir, or from PATH
  --seed S                   seed of initialisation, data order and masking
  --train.epochs N           epochs to train (also the length of the lr schedule)
  --data.pipeline NAME       ffcv | dali | torchvision
  --optim.blr / --optim.lr   base lr (scaled by effective batch / 256) / absolute peak lr
  --model.decoder_depth N, --loss.cls_weight W, --train.precision bf16, --train.compile off, ...

'supmae pretrain --recipe NAME --print-config' shows every key with its value.
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="supmae pretrain",
        description="Timed SupMAE / MAE pretraining (one CPU to many GPUs; launch multi-GPU runs with torchrun).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--recipe", help="named configuration to start from (see --list-recipes)")
    parser.add_argument("--list-recipes", action="store_true", help="list the pretraining recipes and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    args, rest = parser.parse_known_args(argv)

    if args.list_recipes:
        recipes = list_recipes("pretrain")
        width = max(len(n) for n in recipes)
        for name, doc in recipes.items():
            print(f"{name:<{width}}  {doc}")
        return 0
    if not args.recipe:
        raise UserError("--recipe NAME is required (see 'supmae pretrain --list-recipes')")
    cfg = build_config(args.recipe, rest)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    from supmae.train.pretrain import run_pretrain

    summary = run_pretrain(cfg)
    if summary["rank"] == 0 and summary["final_log"] is not None:
        row = summary["final_log"]
        print(f"done: {summary['epochs_run']} epochs in {summary['run_dir']}; final loss {row['loss']:.4f}; "
              f"{row['images_per_sec']:.1f} img/s; last checkpoint {summary['checkpoint']}")
    return 0


# ---------------------------------------------------------------------------------------------- finetune, linprobe, eval


def _eval_data_config(ckpt: dict[str, Any], vit_args: dict[str, Any]) -> DataConfig:
    """The data section the checkpoint was trained with (so the val transform matches), if it has one."""
    saved = ckpt.get("config", {})
    if isinstance(saved, dict) and isinstance(saved.get("data"), dict):
        try:
            data = from_dict(DataConfig, saved["data"])
        except UserError:
            data = None  # a data section of another version: the plain eval transform below does
        if data is not None:
            data.randaugment = ""  # training-only augmentation; it would also pin the pipeline
            return data
    return DataConfig(pipeline="torchvision", img_size=int(vit_args["img_size"]))


@dataclass
class EvalConfig:
    """What `supmae eval` overrides with --data.key VALUE (defaults: the checkpoint's own data section)."""

    data: DataConfig = field(default_factory=DataConfig)


def _recipe_parser(prog: str, task: str, default_recipe: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=f"{'Fine-tune' if task == 'finetune' else 'Linearly probe'} a pretrained encoder. "
        "Any config leaf can be overridden with --section.key VALUE (e.g. --data.path DIR, --optim.blr 5e-4).",
    )
    p.add_argument("--recipe", default=default_recipe, help=f"named configuration (default {default_recipe})")
    p.add_argument("--pretrained", help="pretraining checkpoint (ours or the reference's)")
    p.add_argument("--output-dir", help="run directory (config.json, log.jsonl, checkpoints)")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint of --output-dir) or a checkpoint path")
    p.add_argument("--model", help="supmae model name: the encoder shape when the checkpoint has no model_args")
    p.add_argument("--seed", type=int)
    p.add_argument("--list-recipes", action="store_true", help="list the recipes of this command and exit")
    return p


def _config_from_argv(argv: list[str], task: str, default_recipe: str) -> DownstreamConfig | None:
    parser = _recipe_parser(f"supmae {task}", task, default_recipe)
    args, rest = parser.parse_known_args(argv)
    if args.list_recipes:
        for name, doc in list_recipes(task).items():
            _print(f"{name:<16} {doc}")
        return None
    cfg = get_recipe(args.recipe, kind=task)
    apply_overrides(cfg, rest)
    for key, value in (("pretrained", args.pretrained), ("output_dir", args.output_dir), ("resume", args.resume),
                       ("seed", args.seed)):
        if value is not None:
            setattr(cfg, key, value)
    if args.model is not None:
        cfg.model.name = args.model
    if cfg.task != task:
        raise UserError(f"recipe {args.recipe} is a {cfg.task} recipe; use 'supmae {cfg.task}'")
    return cfg


def main_finetune(argv: list[str]) -> int:
    """`supmae finetune --recipe vit_b16_ft100 --pretrained CKPT --data.path DIR --output-dir DIR`."""
    cfg = _config_from_argv(argv, "finetune", "vit_b16_ft100")
    if cfg is not None:
        from supmae.train.finetune import run_finetune

        run_finetune(cfg)
    return 0


def main_linprobe(argv: list[str]) -> int:
    """`supmae linprobe --recipe vit_b16_lin90 --pretrained CKPT --data.path DIR --output-dir DIR`."""
    cfg = _config_from_argv(argv, "linprobe", "vit_b16_lin90")
    if cfg is not None:
        from supmae.train.finetune import run_linprobe

        run_linprobe(cfg)
    return 0


def main_eval(argv: list[str]) -> int:
    """`supmae eval --checkpoint CKPT --data.path DIR [--output-dir DIR]`: top-1 / top-5 on the val split."""
    p = argparse.ArgumentParser(
        prog="supmae eval",
        allow_abbrev=False,
        description="Top-1 / top-5 of a fine-tuned or probed checkpoint on a val split. The data section "
        "defaults to the one the checkpoint was trained with; override it with --data.key VALUE.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by supmae finetune / linprobe")
    p.add_argument("--output-dir", help="also append the result to DIR/log.jsonl")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
    args, rest = p.parse_known_args(argv)
    from supmae.train.distributed import distributed
    from supmae.train.process import process_settings

    with process_settings(), distributed(args.device) as info:
        return _eval(args, rest, info)


def _eval(args: argparse.Namespace, rest: list[str], info: Any) -> int:
    from supmae.train.engine import load_on_main
    from supmae.train.finetune import amp_settings, evaluate, load_downstream_checkpoint
    from supmae.train.run_dir import RunDir

    # Rank 0 reads the checkpoint from its disk; the other ranks receive it (no shared filesystem).
    ckpt = load_on_main(args.checkpoint, info)
    model, vit_args, ckpt = load_downstream_checkpoint(args.checkpoint, ckpt)
    cfg = apply_overrides(EvalConfig(data=_eval_data_config(ckpt, vit_args)), rest)
    if cfg.data.randaugment:
        raise UserError("evaluation uses no RandAugment: drop --data.randaugment")
    if cfg.data.img_size != vit_args["img_size"]:
        raise UserError(f"the model was trained at {vit_args['img_size']} px; --data.img_size {cfg.data.img_size} "
                        "would not fit its position embeddings")
    amp_dtype, _ = amp_settings(args.precision, info.device)
    model.to(info.device)
    loader = cfg.data.build(cfg.data.val_split, train=False, device=info.device, rank=info.rank,
                            world_size=info.world_size)
    t0 = time.perf_counter()
    stats = evaluate(model, loader, info.device, amp_dtype)
    seconds = time.perf_counter() - t0
    if info.is_main:
        row = {"checkpoint": os.path.abspath(args.checkpoint), "epoch": ckpt.get("epoch"),
               "test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "test_loss": stats["loss"],
               "samples": int(stats["samples"]), "eval_seconds": seconds, "split": cfg.data.val_split,
               "pipeline": cfg.data.pipeline, "world_size": info.world_size}
        if args.output_dir:
            run_dir = RunDir(args.output_dir)
            run_dir.create()
            run_dir.log_epoch(row)
        _print(f"top-1 {stats['acc1']:.2f}% top-5 {stats['acc5']:.2f}% loss {stats['loss']:.4f} "
               f"on {int(stats['samples'])} images ({seconds:.1f} s)")
    return 0
