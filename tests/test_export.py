"""`supmae export`: the encoder alone, for timm (safetensors, strict load, same features) and for the
MAE / SupMAE fine-tuning code (exactly the head keys missing); `--pretrained` reads the timm file."""

from __future__ import annotations

import pytest
import torch

from supmae.cli import main as cli_main
from supmae.errors import UserError
from supmae.models import create_model
from supmae.models.vit import build_vit
from supmae.recipes import get_recipe
from supmae.train.checkpoint import atomic_save, load_checkpoint
from supmae.train.finetune import build_downstream_model

PRETEXT = ("decoder_", "mask_token", "cls_head.")


def tiny_checkpoint(path) -> tuple[torch.nn.Module, str]:
    """The tiny recipe's model with every weight moved off its initial value (so a swapped or
    missing tensor shows in the features), saved as our pretraining checkpoint."""
    name = get_recipe("tiny_cpu").model.name
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    atomic_save({"model": model.state_dict(), "model_args": model.model_args, "epoch": 1}, str(path))
    return model, str(path)


def silent(_msg: str) -> None:
    """Log callback that drops its message."""


def test_timm_export_loads_strictly_and_gives_our_features(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors import safe_open

    ours, ck = tiny_checkpoint(tmp_path / "pre.pth")
    out = tmp_path / "encoder.safetensors"
    assert cli_main(["export", "--checkpoint", ck, "--to", "timm", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    assert keys and not any(k.startswith(PRETEXT) for k in keys)
    assert {"norm.weight", "pos_embed", "cls_token", "patch_embed.proj.weight"} <= keys
    a = ours.model_args
    # The call, at the tiny recipe's size; strict loading is timm's default.
    vit = timm.create_model(
        "vit_base_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(out)},
        num_classes=0,
        img_size=a["img_size"],
        patch_size=a["patch_size"],
        embed_dim=a["embed_dim"],
        depth=a["depth"],
        num_heads=a["num_heads"],
    ).eval()
    assert set(vit.state_dict()) == keys
    torch.manual_seed(1)
    images = torch.randn(4, 3, a["img_size"], a["img_size"])
    with torch.no_grad():
        # timm's forward_features: every token after the final norm, as ours (no pooling, no fc_norm).
        theirs, mine = vit.forward_features(images), ours.forward_features(images)
    assert theirs.shape == mine.shape == (4, 1 + (a["img_size"] // a["patch_size"]) ** 2, a["embed_dim"])
    assert (theirs - mine).abs().max().item() <= 1e-5


def test_mae_export_leaves_exactly_the_head_keys_missing(tmp_path):
    ours, ck = tiny_checkpoint(tmp_path / "pre.pth")
    out = tmp_path / "encoder.pth"
    assert cli_main(["export", "--checkpoint", ck, "--to", "mae", str(out)]) == 0
    exported = torch.load(str(out), map_location="cpu", weights_only=True)
    state = exported["model"]
    assert not any(k.startswith(PRETEXT) for k in state)
    a = ours.model_args
    vit_args = {k: a[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")} | {"num_classes": 100}
    # The MAE fine-tuning code: strict=False, then an assertion on the missing keys.
    pooled = build_vit(**vit_args, feature="avg")
    msg = pooled.load_state_dict(state, strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert set(msg.unexpected_keys) == {"norm.weight", "norm.bias"}  # the global-pool model has no final norm
    token = build_vit(**vit_args, feature="token")
    msg = token.load_state_dict(state, strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias"} and not msg.unexpected_keys
    for k, v in state.items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_finetune_pretrained_reads_a_timm_safetensors_file(tmp_path):
    ours, ck = tiny_checkpoint(tmp_path / "pre.pth")
    out = tmp_path / "encoder.safetensors"
    assert cli_main(["export", "--checkpoint", ck, "--to", "timm", str(out)]) == 0
    ckpt = load_checkpoint(str(out))
    assert ckpt["model_args"]["embed_dim"] == ours.model_args["embed_dim"]
    cfg = get_recipe("tiny_cpu_ft")
    cfg.pretrained = str(out)
    model, vit_args = build_downstream_model(cfg, num_classes=10, log=silent)
    assert (vit_args["embed_dim"], vit_args["depth"], vit_args["num_heads"]) == (
        ours.model_args["embed_dim"],
        ours.model_args["depth"],
        ours.model_args["num_heads"],
    )
    own, ref = model.state_dict(), ours.state_dict()
    last = vit_args["depth"] - 1
    for key in ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", f"blocks.{last}.mlp.fc2.bias"):
        assert torch.equal(own[key], ref[key]), key


def test_a_foreign_safetensors_file_without_our_metadata_is_read_off_its_shapes(tmp_path):
    from safetensors.torch import save_file

    ours, _ = tiny_checkpoint(tmp_path / "pre.pth")
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items() if not k.startswith(PRETEXT)}, str(path))
    ckpt = load_checkpoint(str(path))
    assert "model_args" not in ckpt
    cfg = get_recipe("tiny_cpu_ft")
    cfg.pretrained = str(path)
    _, vit_args = build_downstream_model(cfg, num_classes=10, log=silent)
    assert vit_args["num_heads"] == ours.model_args["num_heads"]  # width 192: ViT-Ti's 3 heads


def test_export_refusals_are_one_line_errors(tmp_path, capsys):
    _, ck = tiny_checkpoint(tmp_path / "pre.pth")
    assert cli_main(["export", "--checkpoint", ck, "--to", "timm", str(tmp_path / "x.pth")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert cli_main(["export", "--checkpoint", str(tmp_path / "nope.pth"), "--to", "mae", str(tmp_path / "o.pth")]) == 2
    assert "not found" in capsys.readouterr().err
    # A fine-tuned global-pool model has no final norm: not a pretrained encoder.
    ft = build_vit(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, num_classes=10, feature="avg")
    atomic_save({"model": ft.state_dict()}, str(tmp_path / "ft.pth"))
    assert cli_main(["export", "--checkpoint", str(tmp_path / "ft.pth"), "--to", "mae", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert "fc_norm" in err and len(err.strip().splitlines()) <= 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="cannot read safetensors"):
        load_checkpoint(str(bad))


def test_a_missing_package_is_named():
    from supmae.errors import require_package

    with pytest.raises(UserError, match="'no-such-package'"):
        require_package("no_such_module_for_supmae", "no-such-package")
