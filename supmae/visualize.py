"""`supmae visualize`: what a pretrained SupMAE sees and reconstructs, as a PNG grid.

One row per image, four columns: the original, the masked input (removed patches grey), the
reconstruction of every patch, and the reconstruction with the visible patches pasted back.
With `norm_pix_loss` the decoder predicts each patch normalised by its own mean and variance,
so predictions are mapped back with the target patch's own statistics, as MAE's visualisation
does. The model is rebuilt from the checkpoint's `model_args` (`--model NAME` for a reference
checkpoint, which has none) and the masking is seeded (`--seed`), so a grid can be reproduced.

    supmae visualize --checkpoint run/checkpoint-last.pth --images a.jpg dir/ --out grid.png

Shape legend: N images, L patches, P values per patch (patch_size^2 * 3), H = W image side.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from supmae.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
MASKED_FILL = 0.5  # grey, in [0, 1] pixel space, for removed patches
NORM_PIX_EPS = 1e-6  # the reference's epsilon of the per-patch normalisation


def load_pretraining_model(checkpoint: str, model_name: str = "") -> torch.nn.Module:
    """The SupMAE of a pretraining checkpoint, rebuilt with `create_model(**model_args)` and loaded strictly."""
    from supmae.models import create_model
    from supmae.train.checkpoint import load_checkpoint, model_state

    ckpt = load_checkpoint(checkpoint)
    state = model_state(ckpt)
    if "vit_args" in ckpt:
        raise UserError(f"{checkpoint} is a fine-tuned / probed checkpoint: it has no decoder to reconstruct with")
    args = ckpt.get("model_args")
    if isinstance(args, dict):
        args = dict(args)
        name = args.pop("name", "supmae")
        if model_name and model_name != name:
            raise UserError(f"{checkpoint} was made by {name}; --model {model_name} contradicts its model_args")
    elif model_name or getattr(ckpt.get("args"), "model", None):
        # A reference checkpoint: its registry name, with the class count read off its head.
        name = model_name or ckpt["args"].model
        args = {}
        head = state.get("cls_head.3.weight", state.get("cls_head.weight"))
        if head is not None:
            args["num_classes"] = int(head.shape[0])
        elif not any(k.startswith("cls_head.") for k in state):
            args["cls_head_layers"] = 0
        if "cls_head.0.weight" in state and "cls_head.3.weight" in state:
            args["cls_hidden_dim"] = int(state["cls_head.0.weight"].shape[0])
        if hasattr(ckpt.get("args"), "norm_pix_loss"):
            args["norm_pix_loss"] = bool(ckpt["args"].norm_pix_loss)
    else:
        raise UserError(f"{checkpoint} has no model_args: pass --model NAME (the supmae model it was trained as)")
    model = create_model(name, **args)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{checkpoint} does not fit {name}: {str(exc).splitlines()[0]}") from None
    if not getattr(model, "use_decoder", True):
        raise UserError(f"{checkpoint} has no decoder (classification-only model): nothing to reconstruct")
    return model.eval()


def image_paths(inputs: list[str]) -> list[str]:
    """Files given directly, plus the image files (sorted) of any directory given."""
    out = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files
                           if f.lower().endswith(IMAGE_EXTS))
            if not found:
                raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) under {path}")
            out.extend(found)
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise UserError(f"image not found: {path}")
    return out


def load_images(paths: list[str], img_size: int) -> torch.Tensor:
    """Images [N, 3, S, S] normalised with the ImageNet mean/std: shorter side resized to S (bicubic),
    centre-cropped, so the whole picture shows."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from pipelines.constants import IMAGENET_MEAN, IMAGENET_STD

    batch = []
    for path in paths:
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None
        img = F.center_crop(F.resize(img, img_size, interpolation=InterpolationMode.BICUBIC), img_size)
        batch.append(F.normalize(F.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(batch)


def unnormalize_pred(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-patch-normalised predictions [N, L, P] back to pixel values with each target patch's own
    mean and (unbiased) variance: the inverse of the norm_pix_loss target."""
    mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
    var = target.var(dim=-1, keepdim=True)  # [N, L, 1]
    return pred * (var + NORM_PIX_EPS).sqrt() + mean


@torch.no_grad()
def reconstruct(model: torch.nn.Module, imgs: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0
                ) -> dict[str, Any]:
    """The four panels (normalised images [N, 3, H, W]) and the loss of one seeded masked pass:
    {"original", "masked", "reconstruction", "pasted", "mask" [N, L] (1 = removed), "loss"}."""
    if not 0.0 <= mask_ratio < 1.0:
        raise UserError(f"--mask-ratio must be in [0, 1), got {mask_ratio}")
    n, length = imgs.shape[0], model.patch_embed.num_patches
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, length, generator=gen)  # [N, L]: the same seed masks the same patches
    out = model(imgs, mask_ratio=mask_ratio, noise=noise)
    pred = out.pred  # [N, L, P]
    if model.norm_pix_loss:
        pred = unnormalize_pred(pred, model.patchify(imgs))
    recon = model.unpatchify(pred)  # [N, 3, H, W]
    p = pred.shape[-1]
    removed = model.unpatchify(out.mask.unsqueeze(-1).expand(-1, -1, p))  # [N, 3, H, W], 1 = removed
    return {
        "original": imgs,
        "masked": imgs * (1 - removed) + _grey_like(imgs) * removed,
        "reconstruction": recon,
        "pasted": imgs * (1 - removed) + recon * removed,
        "mask": out.mask,
        "loss": float(out.loss_rec),
    }


def _grey_like(imgs: torch.Tensor) -> torch.Tensor:
    """A grey image in normalised space (so that it shows as grey once de-normalised)."""
    from pipelines.constants import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((MASKED_FILL - mean) / std).expand_as(imgs)


def to_pixels(imgs: torch.Tensor) -> torch.Tensor:
    """Normalised images [N, 3, H, W] -> [N, H, W, 3] in [0, 1] for display."""
    from pipelines.constants import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (imgs * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def save_grid(panels: dict[str, Any], names: list[str], out: str, mask_ratio: float) -> None:
    """Write the N x 4 grid to `out` (PNG) with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("original", "original"), ("masked", f"masked ({mask_ratio:.0%})"),
               ("reconstruction", "reconstruction"), ("pasted", "reconstruction + visible")]
    pix = {key: to_pixels(panels[key]).numpy() for key, _ in columns}
    n = len(names)
    fig, axes = plt.subplots(n, len(columns), figsize=(2.4 * len(columns), 2.4 * n), squeeze=False)
    for i in range(n):
        for j, (key, title) in enumerate(columns):
            ax = axes[i][j]
            ax.imshow(pix[key][i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(os.path.basename(names[i])[:24], fontsize=7)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def visualize(checkpoint: str, images: list[str], out: str, mask_ratio: float = 0.75, seed: int = 0,
              model_name: str = "") -> dict[str, Any]:
    """Write the grid of `images` through `checkpoint`'s model to `out`; returns {"out", "images", "loss"}."""
    model = load_pretraining_model(checkpoint, model_name)
    paths = image_paths(images)
    size = model.grid_size * model.patch_size
    panels = reconstruct(model, load_images(paths, size), mask_ratio, seed)
    save_grid(panels, paths, out, mask_ratio)
    return {"out": os.path.abspath(out), "images": len(paths), "loss": panels["loss"]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="supmae visualize", allow_abbrev=False,
                                description="PNG grid: original | masked | reconstruction | reconstruction + visible.")
    p.add_argument("--checkpoint", required=True, help="a pretraining checkpoint")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or directories of images")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0, help="seed of the masking noise")
    p.add_argument("--model", default="", help="supmae model name, for a reference checkpoint without model_args")
    a = p.parse_args(argv)
    result = visualize(a.checkpoint, a.images, a.out, a.mask_ratio, a.seed, a.model)
    print(f"wrote {result['out']}: {result['images']} image(s), reconstruction loss {result['loss']:.4f}")
    return 0
