"""Pretraining recipes: the paper's configurations as published, the MAE baseline and a CPU demo.

Every recipe is a zero-argument function returning a fresh `PretrainConfig`; `supmae pretrain
--recipe NAME` starts from it and applies dotted overrides. The ViT-B/16 recipes keep the
paper's effective batch of 4096 on any number of devices by deriving gradient accumulation
(`optim.effective_batch`); set `--optim.effective_batch 0` to train with exactly
`batch_size x accum_iter x world_size` instead (the lr follows the linear scaling rule either way).

Names (the first line of each docstring carries the accuracy the paper published for it):

    supmae_vit_b16_400ep       Table 3 / Table 1's SupMAE row (decoder depth 1, 400 epochs)
    mae_vit_b16_1600ep         Table 1's MAE row (MAE's own recipe, 1600 epochs)
    fig2_supmae_<E>ep          Figure 2, SupMAE at E = 100 / 200 / 400 / 800 epochs (decoder depth 1)
    fig2_mae_<E>ep             Figure 2, MAE at E = 100 / 200 / 400 / 800 epochs (decoder depth 8)
    table2<x>_<cell>           Table 2, sub-table x, one recipe per printed cell
    tiny_cpu                   CPU demo (not a paper recipe)

Table 2's caption fixes the ablation default: loss ratio rec 1 / cls 0.01, global pooling,
decoder depth **8**, RandomResizedCrop only, mask ratio 0.75, 200 epochs (and the 2-layer head of
section 3). Each sub-table lists the default among its rows (the grey cell); that cell is a recipe
in every sub-table under the sub-table's own name (`table2a_both`, `table2b_global_pool`,
`table2c_randcrop`, `table2d_cls_0.01`, `table2e_dec8`, `table2f_mlp2` are one configuration), so a
sub-table runs exactly as printed. What the paper leaves open and what we chose:

- warm-up of the ablations: not stated; Table 3's 20 epochs (the paper's only pretraining
  warm-up figure), with the 200-epoch cosine.
- colour-jitter strength (2c "randcrop, cjit"): not stated; 0.4 for brightness, contrast and
  saturation, the value timm / DeiT and MAE's code use (`color_jitter=0.4`), no hue.
- the 3-layer head (2f): not described; Linear(768, 3072)-BN-ReLU-Linear(3072, 3072)-BN-ReLU-
  Linear(3072, 1000): the default 2-layer head with one more hidden Linear-BN-ReLU stage at the
  same hidden width (the reference only implements 1 and 2 layers; see `supmae.models`).
- the 1-layer head (2f): a single Linear(768, 1000), as the reference's `cls_hidden_mlp=0`.
- "cls only" (2a): the classification branch on the visible 25 % with no decoder and no
  reconstruction loss; "cls token" (2b): the cls token instead of the mean of the visible patches.
"""

from __future__ import annotations

from collections.abc import Callable

from supmae.recipes import register
from supmae.train.data import DataConfig
from supmae.train.pretrain_config import (
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
)

__all__ = ["PretrainConfig"]

# Table 2 caption defaults.
ABLATION_EPOCHS = 200
ABLATION_DECODER_DEPTH = 8
# MAE's released pretraining command: --mask_ratio 0.75 --norm_pix_loss --warmup_epochs 40 --blr 1.5e-4
# --weight_decay 0.05 at batch 4096.
MAE_WARMUP_EPOCHS = 40.0
COLOR_JITTER = 0.4


def _supmae_b16(epochs: int, recipe: str, warmup_epochs: float = 20.0, decoder_depth: int = 1) -> PretrainConfig:
    """Table 3: SupMAE ViT-B/16 (global pool, 2-layer head, lambda 1 / 0.01, T = 10), `decoder_depth` blocks."""
    return PretrainConfig(
        recipe=recipe,
        model=ModelConfig(
            name="supmae_vit_base_patch16",
            mask_ratio=0.75,
            decoder_depth=decoder_depth,
            norm_pix_loss=True,
            global_pool=True,
            cls_head_layers=2,
        ),
        data=DataConfig(pipeline="ffcv", batch_size=256, num_workers=8, img_size=224, scale_min=0.2),
        optim=OptimConfig(blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), min_lr=0.0,
                          warmup_epochs=warmup_epochs, effective_batch=4096),
        loss=LossConfig(rec_weight=1.0, cls_weight=0.01, temperature=10.0),
        train=TrainConfig(epochs=epochs, planned_epochs=epochs, log_every=20, save_every=50),
    )


def _mae_b16(epochs: int, recipe: str) -> PretrainConfig:
    """MAE ViT-B/16 as MAE released it: reconstruction only, decoder depth 8, 40 warm-up epochs."""
    cfg = _supmae_b16(epochs, recipe, warmup_epochs=MAE_WARMUP_EPOCHS, decoder_depth=8)
    cfg.model.name = "mae_vit_base_patch16_dec512d8b"
    cfg.model.cls_head_layers = 0
    cfg.model.global_pool = None
    cfg.loss.cls_weight = 0.0
    return cfg


def _named(name: str, doc: str, build: Callable[[], PretrainConfig]) -> None:
    """Register `build` as recipe `name`: names such as `table2d_cls_0.005` are not Python identifiers,
    so these recipes are made here rather than written out as `def`s."""

    def recipe() -> PretrainConfig:
        cfg = build()
        cfg.recipe = name
        return cfg

    recipe.__name__ = recipe.__qualname__ = name
    recipe.__doc__ = doc
    register("pretrain")(recipe)


@register("pretrain")
def supmae_vit_b16_400ep() -> PretrainConfig:
    """Table 3 / Table 1 SupMAE (paper: ft 83.6): ViT-B/16, decoder 1, 400 ep, batch 4096, blr 1.5e-4, 20 warmup."""
    return _supmae_b16(400, "supmae_vit_b16_400ep")


@register("pretrain")
def mae_vit_b16_1600ep() -> PretrainConfig:
    """Table 1 MAE (paper: ft 83.6): MAE's recipe, reconstruction only, decoder 8, norm_pix, 1600 ep, 40 warmup."""
    return _mae_b16(1600, "mae_vit_b16_1600ep")


# ---- Figure 2: pretraining length, SupMAE (decoder depth 1) against MAE (decoder depth 8), all
# fine-tuned for 100 epochs. The text states SupMAE 82.6 at 100 epochs (0.6 above MAE, so MAE 82.0),
# 83.1 at 200, no gain at 800 over 400 (83.6, Table 1); the other points are only in the plot.

_FIG2_SUPMAE = {
    100: "paper: ft 82.6",
    200: "paper: ft 83.1",
    400: "paper: ft 83.6, = supmae_vit_b16_400ep",
    800: "paper: ft only plotted, no gain over 400 ep",
}
_FIG2_MAE = {
    100: "paper: ft 82.0, 0.6 below SupMAE",
    200: "paper: ft only plotted",
    400: "paper: ft only plotted",
    800: "paper: ft only plotted",
}

for _epochs, _acc in _FIG2_SUPMAE.items():
    _named(f"fig2_supmae_{_epochs}ep",
           f"Figure 2 SupMAE {_epochs} ep ({_acc}): decoder 1, otherwise Table 3 (20 warmup).",
           lambda e=_epochs: _supmae_b16(e, ""))
for _epochs, _acc in _FIG2_MAE.items():
    _named(f"fig2_mae_{_epochs}ep",
           f"Figure 2 MAE {_epochs} ep ({_acc}): MAE's recipe, decoder 8, norm_pix, mask 0.75, 40 warmup.",
           lambda e=_epochs: _mae_b16(e, ""))


# ---- Table 2: one recipe per printed cell, each the caption's default with that cell's change.


def _ablation() -> PretrainConfig:
    return _supmae_b16(ABLATION_EPOCHS, "", decoder_depth=ABLATION_DECODER_DEPTH)


def _rec_only() -> PretrainConfig:
    cfg = _ablation()
    cfg.model.cls_head_layers = 0
    cfg.model.global_pool = None
    cfg.loss.cls_weight = 0.0
    return cfg


def _cls_only() -> PretrainConfig:
    cfg = _ablation()
    cfg.model.use_decoder = False
    cfg.loss.rec_weight = 0.0
    return cfg


def _cls_token() -> PretrainConfig:
    cfg = _ablation()
    cfg.model.global_pool = False
    return cfg


def _cjit() -> PretrainConfig:
    cfg = _ablation()
    cfg.data.color_jitter = COLOR_JITTER
    return cfg


def _cls_ratio(weight: float) -> Callable[[], PretrainConfig]:
    def build() -> PretrainConfig:
        cfg = _ablation()
        cfg.loss.cls_weight = weight
        return cfg

    return build


def _decoder(depth: int) -> Callable[[], PretrainConfig]:
    def build() -> PretrainConfig:
        cfg = _ablation()
        cfg.model.decoder_depth = depth
        return cfg

    return build


def _mlp(layers: int) -> Callable[[], PretrainConfig]:
    def build() -> PretrainConfig:
        cfg = _ablation()
        cfg.model.cls_head_layers = layers
        return cfg

    return build


_DEFAULT_CELL = "the Table 2 default"
# (name, published ft, published lin, what the cell is, builder)
TABLE2: tuple[tuple[str, float, float, str, Callable[[], PretrainConfig]], ...] = (
    ("table2a_rec_only", 82.4, 58.0, "reconstruction loss only, no classification branch", _rec_only),
    ("table2a_cls_only", 79.9, 59.9, "classification of the visible 25% only, no decoder", _cls_only),
    ("table2a_both", 83.1, 70.1, f"rec + cls, {_DEFAULT_CELL}", _ablation),
    ("table2b_cls_token", 79.1, 65.8, "the cls token as the classification feature", _cls_token),
    ("table2b_global_pool", 83.1, 70.1, f"global pool of visible patches, {_DEFAULT_CELL}", _ablation),
    ("table2c_randcrop", 83.1, 70.1, f"RandomResizedCrop + flip, {_DEFAULT_CELL}", _ablation),
    ("table2c_randcrop_cjit", 83.0, 70.3, f"plus colour jitter {COLOR_JITTER} (strength our choice)", _cjit),
    ("table2d_cls_0.02", 82.9, 70.2, "cls loss ratio 0.02", _cls_ratio(0.02)),
    ("table2d_cls_0.01", 83.1, 70.1, f"cls loss ratio 0.01, {_DEFAULT_CELL}", _ablation),
    ("table2d_cls_0.005", 83.1, 69.8, "cls loss ratio 0.005", _cls_ratio(0.005)),
    ("table2d_cls_0.002", 82.8, 68.8, "cls loss ratio 0.002", _cls_ratio(0.002)),
    ("table2e_dec1", 83.1, 65.7, "decoder depth 1", _decoder(1)),
    ("table2e_dec4", 83.1, 68.2, "decoder depth 4", _decoder(4)),
    ("table2e_dec8", 83.1, 70.1, f"decoder depth 8, {_DEFAULT_CELL}", _ablation),
    ("table2f_mlp1", 83.0, 72.5, "1-layer (Linear) classification head", _mlp(1)),
    ("table2f_mlp2", 83.1, 70.1, f"2-layer head Linear-BN-ReLU-Linear, {_DEFAULT_CELL}", _ablation),
    ("table2f_mlp3", 82.9, 69.5, "3-layer head, hidden 3072 (layout our choice)", _mlp(3)),
)

for _name, _ft, _lin, _what, _build in TABLE2:
    _named(_name,
           f"Table 2{_name[6]} (paper: ft {_ft} / lin {_lin}): {_what}; ViT-B/16, decoder 8, 200 ep unless stated.",
           _build)


@register("pretrain")
def tiny_cpu() -> PretrainConfig:
    """CPU demo: supmae_vit_tiny_patch4 on 32x32 crops, a few epochs on 2 cores (not a paper recipe).

    Differences from Table 3 and why: at this scale lambda_cls = 0.01 with temperature 10 scales
    the classification gradient by 1e-3 and the branch barely moves in a few epochs, so this
    recipe uses cls_weight 1.0 and temperature 1.0 (plain cross-entropy) so that the
    classification branch learns visibly: on the generated 10-class dataset (1,000 training
    images) its val top-1 went from chance (11%) to 34.5% in the first 5 of the 8 epochs
    (measured with --train.epochs 5, so with the shorter cosine). The lr is higher (blr
    1.5e-3 at batch 64) and warmup one epoch, because 75 steps of a small model need it; weight
    decay, betas, masking and the head layout are the paper's.
    """
    return PretrainConfig(
        recipe="tiny_cpu",
        model=ModelConfig(
            name="supmae_vit_tiny_patch4",
            mask_ratio=0.75,
            decoder_depth=1,
            norm_pix_loss=True,
            global_pool=True,
            cls_head_layers=2,
        ),
        data=DataConfig(pipeline="ffcv", batch_size=64, num_workers=2, img_size=32, scale_min=0.2),
        optim=OptimConfig(blr=1.5e-3, weight_decay=0.05, betas=(0.9, 0.95), min_lr=0.0, warmup_epochs=1.0),
        loss=LossConfig(rec_weight=1.0, cls_weight=1.0, temperature=1.0),
        train=TrainConfig(epochs=8, planned_epochs=8, log_every=5, save_every=4, device="auto"),
    )
