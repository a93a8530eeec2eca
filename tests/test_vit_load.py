"""Loading pretraining checkpoints into the downstream ViT: ours and the reference's layout,
position-embedding resampling, refusals of other architectures and of unsafe pickles."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from supmae.cli import main as cli_main
from supmae.errors import UserError
from supmae.models import create_model
from supmae.models.vit import (
    build_vit,
    encoder_args_from_checkpoint,
    infer_encoder_args,
    load_pretrained,
)
from supmae.recipes import get_recipe
from supmae.train.checkpoint import atomic_save, load_checkpoint
from supmae.train.finetune import build_downstream_model

SMALL = {"embed_dim": 64, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
         "cls_hidden_dim": 64, "num_classes": 10}
PRETEXT = ("decoder_", "mask_token", "cls_head.")


def small_supmae(**overrides):
    torch.manual_seed(0)
    return create_model("supmae_vit_tiny_patch4", **{**SMALL, **overrides})


def save_ours(path, model) -> str:
    atomic_save({"model": model.state_dict(), "model_args": model.model_args, "epoch": 3}, str(path))
    return str(path)


def silent(_msg: str) -> None:
    """A log callback that drops its message (these tests check results, not wording)."""


def encoder_keys(state):
    return {k for k in state if not k.startswith(PRETEXT)}


def test_our_checkpoint_leaves_exactly_head_and_fc_norm_missing(tmp_path):
    src = small_supmae()
    cfg = get_recipe("tiny_cpu_ft")
    cfg.pretrained = save_ours(tmp_path / "pre.pth", src)
    model, vit_args = build_downstream_model(cfg, num_classes=10, log=silent)
    assert (vit_args["embed_dim"], vit_args["depth"], vit_args["num_heads"], vit_args["patch_size"]) == (64, 2, 2, 4)
    missing = load_pretrained(model, src.state_dict(), log=silent)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    own, ref = model.state_dict(), src.state_dict()
    for key in encoder_keys(ref) - {"norm.weight", "norm.bias"}:  # the final norm gives way to fc_norm
        assert torch.equal(own[key], ref[key]), key
    assert "norm.weight" not in own  # timm drops the final norm when pooling into fc_norm
    # The new head is initialised as the reference does: (trunc) normal std 2e-5, zero bias.
    assert 1e-5 < model.head.weight.std() < 3e-5
    assert torch.count_nonzero(model.head.bias) == 0


def test_probe_model_keeps_the_final_norm_and_misses_only_the_head():
    src = small_supmae()
    probe = build_vit(32, 4, 64, 2, 2, num_classes=10, probe=True, feature="token")
    missing = load_pretrained(probe, src.state_dict(), log=silent)
    assert missing and all(k.startswith("head.") for k in missing)
    assert torch.equal(probe.norm.weight, src.norm.weight)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    bn = probe.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert 0.005 < probe.head[1].weight.std() < 0.015  # trunc normal std 0.01
    probe.train()
    assert probe.training and probe.head.training
    assert not any(m.training for name, m in probe.named_modules() if name and not name.startswith("head"))


def test_reference_layout_with_namespace_args_is_inferred_from_shapes(tmp_path):
    # The reference saves {"model", "optimizer", "epoch", "scaler", "args": Namespace}; its model name
    # ("mae_vit_base_patch16") is not one of ours, so the encoder is read off the weights.
    torch.manual_seed(0)
    src = create_model("supmae_vit_tiny_patch4", depth=1, decoder_embed_dim=32, decoder_num_heads=2,
                       cls_hidden_dim=64, num_classes=10)  # width 192: 3 heads by the ViT-Ti convention
    path = str(tmp_path / "ref.pth")
    torch.save({"model": src.state_dict(), "epoch": 399,
                "args": argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True)}, path)
    ckpt = load_checkpoint(path)
    notes = []
    enc = encoder_args_from_checkpoint(ckpt, log=notes.append)
    assert {k: enc[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")} == {
        "img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 1, "num_heads": 3, "mlp_ratio": 4.0}
    assert any("not a supmae model" in n for n in notes)
    cfg = get_recipe("tiny_cpu_lin")
    cfg.pretrained = path
    model, vit_args = build_downstream_model(cfg, num_classes=10, log=silent)
    assert vit_args["num_heads"] == 3 and vit_args["probe"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_model_name_applies_only_without_model_args(tmp_path):
    src = small_supmae()
    bare = str(tmp_path / "bare.pth")
    torch.save({"model": src.state_dict()}, bare)
    # Width 64 alone would mean 1 head (width / 64): --model gives the architecture instead ...
    assert infer_encoder_args(src.state_dict())["num_heads"] == 1
    assert encoder_args_from_checkpoint(load_checkpoint(bare), "supmae_vit_tiny_patch4", log=silent)["num_heads"] == 3
    # ... which then has to fit the weights (the registry's tiny is 192 wide).
    cfg = get_recipe("tiny_cpu_ft")
    cfg.pretrained, cfg.model.name = bare, "supmae_vit_tiny_patch4"
    with pytest.raises(UserError, match="another architecture"):
        build_downstream_model(cfg, num_classes=10, log=silent)
    # With model_args in the checkpoint, the recipe's model name does not override them.
    cfg.pretrained = save_ours(tmp_path / "ours.pth", src)
    _, vit_args = build_downstream_model(cfg, num_classes=10, log=silent)
    assert vit_args["num_heads"] == 2 and vit_args["embed_dim"] == 64


def test_pos_embed_of_a_32px_checkpoint_is_resampled_for_48px(tmp_path):
    src = small_supmae()  # 32 px, patch 4: 8x8 grid
    cfg = get_recipe("tiny_cpu_ft")
    cfg.pretrained = save_ours(tmp_path / "pre.pth", src)
    cfg.data.img_size = 48  # 12x12 grid
    model, vit_args = build_downstream_model(cfg, num_classes=10, log=silent)
    assert vit_args["img_size"] == 48
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 1 + 12 * 12, 64)
    ref = src.pos_embed.detach()
    assert torch.equal(pos[:, 0], ref[:, 0])  # cls row kept as is
    grid = ref[:, 1:].reshape(1, 8, 8, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 144, 64), rtol=1e-5, atol=1e-6)
    logits = model(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("change, message", [
    ({"embed_dim": 96, "num_heads": 2},
     r"shape mismatch: .*patch_embed\.proj\.weight \(64, 3, 4, 4\) vs \(96, 3, 4, 4\)"),
    ({"depth": 1}, r"unexpected encoder keys: blocks\.1\."),
    ({"patch_size": 8, "img_size": 64}, r"shape mismatch: .*patch_embed\.proj\.weight"),
])
def test_checkpoint_of_another_architecture_is_refused_listing_keys(change, message):
    state = small_supmae().state_dict()
    args = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2, **change}
    model = build_vit(num_classes=10, **args)
    with pytest.raises(UserError, match=message):
        load_pretrained(model, state, log=silent)


def test_missing_encoder_weights_are_refused():
    state = small_supmae().state_dict()
    model = build_vit(32, 4, 64, 3, 2, num_classes=10)  # one block more than the checkpoint has
    with pytest.raises(UserError, match=r"lacks encoder weights .*blocks\.2\."):
        load_pretrained(model, state, log=silent)


class Payload:
    """Anything that is not a tensor, number, string or plain container."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        # Unpickling this would create the marker file: proof that loading ran code.
        return (open, (self.marker, "w"))


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "ran")
    path = str(tmp_path / "evil.pth")
    torch.save({"model": small_supmae().state_dict(), "extra": Payload(marker)}, path)
    with pytest.raises(UserError, match="refusing to load .* not a plain tensor, number or string"):
        load_checkpoint(path)
    cfg = get_recipe("tiny_cpu_ft")
    cfg.pretrained = path
    with pytest.raises(UserError, match="refusing to load"):
        build_downstream_model(cfg, num_classes=10, log=silent)
    assert not os.path.exists(marker)


def test_cli_refuses_unsafe_and_pretraining_checkpoints(tmp_path, capsys, synthetic_root):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "extra": Payload(str(tmp_path / "ran"))}, path)
    assert cli_main(["finetune", "--recipe", "tiny_cpu_ft", "--pretrained", path, "--data.path", synthetic_root,
                     "--output-dir", str(tmp_path / "run"), "--data.num_workers", "0"]) == 2
    assert "refusing to load" in capsys.readouterr().err
    pre = save_ours(tmp_path / "pre.pth", small_supmae())
    assert cli_main(["eval", "--checkpoint", pre, "--data.path", synthetic_root]) == 2
    assert "is a pretraining checkpoint" in capsys.readouterr().err


def test_unknown_head_count_asks_for_a_model_name_unless_the_checkpoint_declares_it():
    src = small_supmae(embed_dim=40, num_heads=2)
    assert infer_encoder_args(src.state_dict())["num_heads"] is None
    with pytest.raises(UserError, match="--model NAME"):
        encoder_args_from_checkpoint({"model": src.state_dict()}, log=lambda _msg: None)
    # Our checkpoints carry model_args: the declared head count is used, whatever the width.
    declared = encoder_args_from_checkpoint({"model": src.state_dict(), "model_args": src.model_args})
    assert declared["num_heads"] == 2 and declared["embed_dim"] == 40
