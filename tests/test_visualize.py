"""`supmae visualize`: the PNG grid, the seeded masking and the norm_pix un-normalisation."""

from __future__ import annotations

import argparse
import glob
import os

import pytest
import torch
from PIL import Image

from supmae.cli import main as cli_main
from supmae.models import create_model
from supmae.train.checkpoint import atomic_save
from supmae.visualize import load_images, load_pretraining_model, reconstruct, unnormalize_pred

SMALL = {"embed_dim": 64, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
         "cls_hidden_dim": 64, "num_classes": 10}


def small_supmae(**overrides):
    torch.manual_seed(0)
    return create_model("supmae_vit_tiny_patch4", **{**SMALL, **overrides}).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    model = small_supmae()
    path = str(tmp_path_factory.mktemp("vis") / "pre.pth")
    atomic_save({"model": model.state_dict(), "model_args": model.model_args, "epoch": 0}, path)
    return path


def some_images(root: str, n: int) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "val", "*", "*.jpg")))[:: 10][:n]


def test_cli_writes_a_png_grid_of_four_columns(ckpt, synthetic_root, tmp_path, capsys):
    images = some_images(synthetic_root, 3)
    out = str(tmp_path / "grid.png")
    assert cli_main(["visualize", "--checkpoint", ckpt, "--images", *images, "--out", out, "--mask-ratio", "0.75",
                     "--seed", "3"]) == 0
    assert "3 image(s)" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG"
        width, height = im.size
    assert width > height  # four columns, three rows
    # A directory is expanded to the images under it.
    out2 = str(tmp_path / "dir.png")
    folder = os.path.dirname(images[0])
    assert cli_main(["visualize", "--checkpoint", ckpt, "--images", folder, "--out", out2]) == 0
    assert f"{len(os.listdir(folder))} image(s)" in capsys.readouterr().out


def test_panels_paste_visible_patches_back_and_the_seed_fixes_the_mask(ckpt, synthetic_root):
    model = load_pretraining_model(ckpt)
    imgs = load_images(some_images(synthetic_root, 2), 32)
    assert imgs.shape == (2, 3, 32, 32)
    a = reconstruct(model, imgs, mask_ratio=0.75, seed=5)
    b = reconstruct(model, imgs, mask_ratio=0.75, seed=5)
    c = reconstruct(model, imgs, mask_ratio=0.75, seed=6)
    assert torch.equal(a["mask"], b["mask"]) and not torch.equal(a["mask"], c["mask"])
    assert a["mask"].sum(dim=1).tolist() == [48.0, 48.0]  # 64 patches, 16 kept
    removed = model.unpatchify(a["mask"].unsqueeze(-1).expand(-1, -1, 4 * 4 * 3)).bool()
    # Visible pixels: original in the masked and pasted panels; removed ones: grey / reconstruction.
    assert torch.equal(a["pasted"][~removed], imgs[~removed])
    assert torch.equal(a["masked"][~removed], imgs[~removed])
    assert torch.equal(a["pasted"][removed], a["reconstruction"][removed])
    assert a["loss"] > 0


def test_norm_pix_predictions_are_mapped_back_with_each_patch_statistics():
    torch.manual_seed(0)
    target = torch.rand(2, 64, 48) * 3 - 1  # [N, L, P]
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    normalised = (target - mean) / (var + 1e-6) ** 0.5  # the norm_pix_loss target
    torch.testing.assert_close(unnormalize_pred(normalised, target), target)


def test_norm_pix_off_shows_the_raw_prediction(synthetic_root, tmp_path):
    model = small_supmae(norm_pix_loss=False)
    imgs = load_images(some_images(synthetic_root, 1), 32)
    panels = reconstruct(model, imgs, seed=0)
    out = model(imgs, mask_ratio=0.75, noise=torch.rand(1, 64, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(panels["reconstruction"], model.unpatchify(out.pred))


def test_refusals(ckpt, synthetic_root, tmp_path, capsys):
    images = some_images(synthetic_root, 1)
    out = str(tmp_path / "x.png")
    # A reference checkpoint has no model_args: it needs --model, and then loads.
    model = small_supmae()
    ref = str(tmp_path / "ref.pth")
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(norm_pix_loss=True)}, ref)
    assert cli_main(["visualize", "--checkpoint", ref, "--images", *images, "--out", out]) == 2
    assert "--model NAME" in capsys.readouterr().err
    assert cli_main(["visualize", "--checkpoint", ref, "--images", *images, "--out", out,
                     "--model", "supmae_vit_tiny_patch4"]) == 2  # the registry's tiny is wider than this one
    assert "does not fit supmae_vit_tiny_patch4" in capsys.readouterr().err
    assert cli_main(["visualize", "--checkpoint", ckpt, "--images", str(tmp_path / "none.jpg"), "--out", out]) == 2
    assert "image not found" in capsys.readouterr().err
    assert cli_main(["visualize", "--checkpoint", ckpt, "--images", *images, "--out", out,
                     "--mask-ratio", "1.0"]) == 2
    assert "--mask-ratio" in capsys.readouterr().err
    # A fine-tuned model has no decoder.
    from supmae.models.vit import build_vit

    vit_args = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 1, "num_heads": 2, "num_classes": 10}
    tuned = str(tmp_path / "tuned.pth")
    atomic_save({"model": build_vit(**vit_args).state_dict(), "vit_args": vit_args, "task": "finetune"}, tuned)
    assert cli_main(["visualize", "--checkpoint", tuned, "--images", *images, "--out", out]) == 2
    assert "no decoder" in capsys.readouterr().err
    assert not os.path.exists(out)
