"""The lr schedule against hand-computed values of the reference's per-iteration formula, and the
optimiser's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from supmae.train.optim import adamw_impl, build_adamw, freeze_fixed_pos_embed, param_groups
from supmae.train.schedule import CosineSchedule, lr_at, peak_lr, set_lr


def test_peak_lr_linear_scaling_rule():
    assert peak_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert peak_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    assert peak_lr(1.5e-4, 4096, lr=1e-3) == 1e-3  # an absolute lr wins


# Table 3 numbers: peak 2.4e-3 (1.5e-4 x 4096 / 256), 20 warmup epochs of 400, 312 steps per epoch
# (1,281,167 images // 4096). Values computed by hand from
#   warmup: peak * e / 20;  after: peak * 0.5 * (1 + cos(pi * (e - 20) / 380)),  e = epoch + step / 312.
@pytest.mark.parametrize(
    ("epoch", "step", "expected"),
    [
        (0, 0, 0.0),
        (0, 156, 2.4e-3 * 0.5 / 20),  # e = 0.5 -> 6.0e-5
        (10, 0, 1.2e-3),  # half-way through warmup
        (19, 234, 2.4e-3 * 19.75 / 20),  # e = 19.75 -> 2.37e-3
        (20, 0, 2.4e-3),  # peak
        (115, 0, 2.4e-3 * 0.5 * (1 + math.cos(math.pi / 4))),  # quarter of the cosine -> 2.0485e-3
        (210, 0, 1.2e-3),  # half of the cosine
        (305, 0, 2.4e-3 * 0.5 * (1 - math.cos(math.pi / 4))),  # three quarters -> 3.515e-4
        (399, 311, 2.4e-3 * 0.5 * (1 + math.cos(math.pi * (379 + 311 / 312) / 380))),  # last step, ~4.1e-11
    ],
)
def test_reference_schedule_at_sampled_steps(epoch, step, expected):
    sched = CosineSchedule(peak=2.4e-3, warmup_epochs=20, epochs=400, steps_per_epoch=312)
    assert sched(epoch, step) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_hand_written_numbers():
    # The same formula written out as plain numbers, so a wrong formula cannot hide behind itself.
    sched = CosineSchedule(peak=2.4e-3, warmup_epochs=20, epochs=400, steps_per_epoch=312)
    assert sched(0, 156) == pytest.approx(6.0e-5)
    assert sched(19, 234) == pytest.approx(2.37e-3)
    assert sched(115, 0) == pytest.approx(2.0485281e-3)
    assert sched(305, 0) == pytest.approx(3.5147186e-4)


def test_min_lr_and_end_of_schedule():
    assert lr_at(400.0, 1.0, 20, 400, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(210.0, 1.0, 20, 400, min_lr=0.1) == pytest.approx(0.55)
    assert lr_at(5.0, 1.0, 10, 10) == pytest.approx(0.5)  # warmup covering the run only rises


def test_set_lr_respects_lr_scale():
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q], "lr_scale": 0.5}], lr=1.0)
    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]


def _tiny_model():
    from supmae.models import create_model

    return create_model("supmae_vit_tiny_patch4", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                        decoder_num_heads=2, cls_hidden_dim=16, num_classes=10)


def test_param_groups_follow_the_reference_rule():
    model = _tiny_model()
    assert freeze_fixed_pos_embed(model) == []  # the model already stores them frozen
    groups = param_groups(model, 0.05)
    no_decay = {id(p) for p in groups[0]["params"]}
    decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.05
    names = dict(model.named_parameters())
    for name, param in names.items():
        if name in ("pos_embed", "decoder_pos_embed"):
            assert id(param) not in no_decay | decay, name  # fixed positions are not trained at all
            assert not param.requires_grad
        elif param.ndim == 1 or name.endswith(".bias"):
            assert id(param) in no_decay, name
        else:
            assert id(param) in decay, name
    # As in the reference, the [1, 1, D] tokens are decayed; norms and BN weights are not.
    assert id(names["cls_token"]) in decay and id(names["mask_token"]) in decay
    assert id(names["norm.weight"]) in no_decay and id(names["cls_head.1.weight"]) in no_decay


def test_freeze_catches_a_trainable_position_table():
    model = _tiny_model()
    model.pos_embed.requires_grad_(True)
    assert freeze_fixed_pos_embed(model) == ["pos_embed"]
    assert not model.pos_embed.requires_grad


def test_adamw_implementation_choice():
    assert adamw_impl("cpu") == "foreach"
    assert adamw_impl("cuda") == "fused"
    assert adamw_impl("cpu", "for_loop") == "for_loop"
    model = _tiny_model()
    opt = build_adamw(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), device="cpu")
    assert opt.defaults["foreach"] is True and opt.defaults["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError):
        adamw_impl("cpu", "fastest")
