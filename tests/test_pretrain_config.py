"""Pretraining recipes, the config they build, and the command line's strictness (no training here)."""

from __future__ import annotations

import pytest

from supmae.cli import main as cli_main
from supmae.config import to_dict
from supmae.errors import UserError
from supmae.job_cli import build_config
from supmae.recipes import get_recipe, list_recipes
from supmae.train.pretrain import config_differences, resolve_accumulation
from supmae.train.pretrain_config import OptimConfig, PretrainConfig


def test_every_pretrain_recipe_builds_a_config():
    names = list_recipes("pretrain")
    for required in ("supmae_vit_b16_400ep", "fig2_supmae_100ep", "fig2_supmae_200ep", "fig2_supmae_800ep",
                     "fig2_mae_100ep", "mae_vit_b16_1600ep", "tiny_cpu"):
        assert required in names
    for name in names:
        cfg = get_recipe(name, "pretrain")
        assert isinstance(cfg, PretrainConfig) and cfg.recipe == name
        assert names[name], f"{name} has no docstring"


def test_table3_recipe():
    cfg = get_recipe("supmae_vit_b16_400ep")
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.blr == 1.5e-4 and cfg.optim.weight_decay == 0.05
    assert cfg.optim.effective_batch == 4096 and cfg.optim.warmup_epochs == 20 and cfg.train.epochs == 400
    assert cfg.model.mask_ratio == 0.75 and cfg.model.decoder_depth == 1 and cfg.model.norm_pix_loss
    assert cfg.model.global_pool and cfg.model.cls_head_layers == 2
    assert (cfg.loss.rec_weight, cfg.loss.cls_weight, cfg.loss.temperature) == (1.0, 0.01, 10.0)
    assert cfg.data.scale_min == 0.2 and cfg.data.img_size == 224
    # Figure 2's SupMAE schedules are Table 3 with another length; its 400-epoch point is Table 3 itself.
    for e in (100, 200, 400, 800):
        diffs = config_differences(to_dict(cfg), to_dict(get_recipe(f"fig2_supmae_{e}ep")), ignore=("recipe",))
        assert sorted(d.split(":")[0] for d in diffs) == ([] if e == 400 else ["train.epochs", "train.planned_epochs"])


def test_mae_baseline():
    cfg = get_recipe("mae_vit_b16_1600ep")
    assert cfg.train.epochs == 1600 and cfg.model.decoder_depth == 8 and cfg.model.cls_head_layers == 0
    assert cfg.loss.cls_weight == 0.0
    # MAE's released command: --norm_pix_loss --mask_ratio 0.75 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05
    assert cfg.model.norm_pix_loss and cfg.model.mask_ratio == 0.75 and cfg.optim.warmup_epochs == 40
    assert (cfg.optim.blr, cfg.optim.weight_decay, cfg.optim.effective_batch) == (1.5e-4, 0.05, 4096)
    for e in (100, 200, 400, 800):
        fig2 = get_recipe(f"fig2_mae_{e}ep")
        diffs = config_differences(to_dict(cfg), to_dict(fig2), ignore=("recipe",))
        assert sorted(d.split(":")[0] for d in diffs) == ["train.epochs", "train.planned_epochs"]
        assert fig2.train.epochs == e


def test_the_invented_grid_is_gone():
    names = list_recipes("pretrain")
    assert not [n for n in names if n.startswith("supmae_vit_b16_200ep")]


def test_overrides_and_aliases():
    cfg = build_config("tiny_cpu", ["--data.path", "/d", "--output-dir", "/o", "--seed", "7", "--train.epochs=3",
                                    "--optim.betas", "0.9,0.99", "--model.decoder_depth", "2", "--optim.lr", "1e-3"])
    assert (cfg.data.path, cfg.output_dir, cfg.seed, cfg.train.epochs) == ("/d", "/o", 7, 3)
    assert cfg.optim.betas == (0.9, 0.99) and cfg.model.decoder_depth == 2 and cfg.optim.lr == 1e-3


def test_effective_batch_derives_accumulation():
    o = OptimConfig(effective_batch=4096)
    assert resolve_accumulation(o, 256, 8) == 2
    assert resolve_accumulation(o, 256, 16) == 1
    with pytest.raises(UserError, match="not a multiple"):
        resolve_accumulation(o, 256, 3)
    with pytest.raises(UserError, match="contradicts"):
        resolve_accumulation(OptimConfig(effective_batch=4096, accum_iter=4), 256, 8)
    assert resolve_accumulation(OptimConfig(accum_iter=3), 64, 2) == 3


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--recipe", "tiny_cpu", "--optim.bl", "1"], "unknown config key --optim.bl (did you mean --optim.blr"),
        (["--recipe", "tiny_cpu", "--train.epochs", "two"], "bad value for --train.epochs"),
        (["--recipe", "tiny_cpux"], "unknown pretrain recipe 'tiny_cpux'"),
        (["--recipe", "tiny_cpu", "--data.path", "/nonexistent/data", "--output-dir", "/tmp/x"], "dataset not found"),
        (["--recipe", "tiny_cpu", "--data.path", "/tmp"], "--output-dir"),
        (["--data.path", "/tmp"], "--recipe NAME is required"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(capsys, argv, needle):
    assert cli_main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_cli_lists_recipes(capsys):
    assert cli_main(["pretrain", "--list-recipes"]) == 0
    out = capsys.readouterr().out
    assert "supmae_vit_b16_400ep" in out and "tiny_cpu" in out
    # every Table 2 cell, with the accuracy the paper published for it
    assert "table2d_cls_0.005" in out and "ft 83.1 / lin 69.8" in out
