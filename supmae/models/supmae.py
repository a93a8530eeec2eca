"""SupMAE: a masked autoencoder with a supervised classification branch on the visible patches.

Reads top to bottom: output type, module (construction, initialisation), patchify, masking,
encoder, decoder, classification head, forward. The state-dict layout is the reference
implementation's, so its released pretraining checkpoints load with `strict=True`.

Shape legend:
  N  batch                     L  patches per image, (img_size / patch_size) ** 2
  K  visible patches kept      = int(L * (1 - mask_ratio))
  D  encoder width             E  decoder width
  P  values per patch          = patch_size ** 2 * 3
  C  classes                   H  width of the classification head's hidden layers

Performance notes: visible tokens are taken with `torch.gather` on indices from an `argsort`
(no boolean indexing, so every shape is known from N, L and mask_ratio alone and
`torch.compile(fullgraph=True)` sees one static graph); nothing in `forward` reads a value back
to the host; attention goes through `F.scaled_dot_product_attention` unless the instance is built
with `attn_impl="eager"`, the plain softmax(QK^T)V reference path.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from supmae.errors import UserError
from supmae.losses import reconstruction_loss
from supmae.models.pos_embed import sincos_2d

ATTN_IMPLS = ("sdpa", "eager")
CLS_HEAD_LAYERS = (0, 1, 2, 3)
LAYER_NORM_EPS = 1e-6


class SupMAEOutput(NamedTuple):
    """What one forward pass returns.

    loss_rec: [] reconstruction loss over removed patches (a zero tensor without a decoder).
    pred:     [N, L, P] predicted pixels of every patch, or None without a decoder.
    mask:     [N, L] float, 1 = removed, 0 = visible, in the original patch order.
    logits:   [N, C] raw class scores (no temperature applied), or None without a cls head.
    """

    loss_rec: torch.Tensor
    pred: torch.Tensor | None
    mask: torch.Tensor
    logits: torch.Tensor | None


def _make_block(dim: int, num_heads: int, mlp_ratio: float, attn_impl: str) -> nn.Module:
    """A timm ViT block (keys norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) with qkv bias and
    LayerNorm eps 1e-6, attention switched per instance through timm's `fused_attn` attribute."""
    block = Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS))
    if not hasattr(block.attn, "fused_attn"):
        # Feature check, not a version check: the switch is what we rely on.
        raise UserError("the installed timm's Attention has no 'fused_attn' switch, so attn_impl cannot be chosen "
                        "per model; install a timm release that has it")
    block.attn.fused_attn = attn_impl == "sdpa"
    return block


def _make_cls_head(layers: int, in_dim: int, hidden: int, num_classes: int) -> nn.Module:
    """Classification head on the pooled feature.

    1 layer:  Linear(D, C)                                   keys cls_head.weight / bias
    2 layers: Linear(D, H), BN(H), ReLU, Linear(H, C)         keys cls_head.0 / 1 / 3 (reference)
    3 layers: Linear(D, H), BN(H), ReLU, Linear(H, H), BN(H), ReLU, Linear(H, C)
              keys cls_head.0 / 1 / 3 / 4 / 6: the 2-layer head with one more hidden Linear-BN-ReLU
              stage (the MoCo v3 / SimCLR projector layout; the reference only implements 2).
    """
    if layers == 1:
        return nn.Linear(in_dim, num_classes)
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        # ReLU is not in-place (unlike the reference) so that autograd and torch.compile never
        # have to reason about a mutated BatchNorm output; it has no parameters, keys are unchanged.
        mods += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, num_classes))
    return nn.Sequential(*mods)


class SupMAE(nn.Module):
    """Masked autoencoder ViT with a classification branch (SupMAE).

    Constructor defaults are the paper's default model, `mae_vit_base_patch16_dec512d1b`, with
    the 2-layer head, global pooling and per-patch normalised targets, as the authors ran it
    (`--global_pool --norm_pix_loss`).

    decoder_depth 0 is allowed: the decoder is then decoder_embed -> mask tokens and positions ->
    decoder_norm -> decoder_pred, with no transformer block.
    cls_head_layers 0 removes the classification branch (MAE; `logits` is None); a
    cls_hidden_dim of 0 makes the head a single Linear whatever cls_head_layers says, which is how
    the reference switches to its 1-layer head (`cls_hidden_mlp=0`).
    use_decoder False removes the decoder (masked supervised training only; `loss_rec` is a zero
    tensor, `pred` None).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 1,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        num_classes: int = 1000,
        cls_head_layers: int = 2,
        cls_hidden_dim: int = 3072,
        global_pool: bool = True,
        use_decoder: bool = True,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        self._check_args(img_size, patch_size, embed_dim, num_heads, decoder_embed_dim, decoder_num_heads,
                         depth, decoder_depth, num_classes, cls_head_layers, cls_hidden_dim, use_decoder, attn_impl)
        self.model_args: dict[str, Any] = {
            "name": "supmae",  # create_model replaces this with the registry name it was built from
            "img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
            "num_heads": num_heads, "decoder_embed_dim": decoder_embed_dim, "decoder_depth": decoder_depth,
            "decoder_num_heads": decoder_num_heads, "mlp_ratio": float(mlp_ratio), "norm_pix_loss": norm_pix_loss,
            "num_classes": num_classes, "cls_head_layers": cls_head_layers, "cls_hidden_dim": cls_hidden_dim,
            "global_pool": global_pool, "use_decoder": use_decoder, "attn_impl": attn_impl,
        }
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        self.global_pool = global_pool
        self.attn_impl = attn_impl
        norm_layer = partial(nn.LayerNorm, eps=LAYER_NORM_EPS)
        block = partial(_make_block, mlp_ratio=mlp_ratio, attn_impl=attn_impl)

        # Encoder.
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.grid_size = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos positions; kept as (frozen) parameters, not buffers, because that is where
        # the reference's state dict has them.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # Decoder (absent in the classification-only ablation, so DDP sees no unused parameters).
        self.use_decoder = use_decoder
        if use_decoder:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(
                torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
            )
            self.decoder_blocks = nn.ModuleList([block(decoder_embed_dim, decoder_num_heads)
                                                 for _ in range(decoder_depth)])
            self.decoder_norm = norm_layer(decoder_embed_dim)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * 3)

        # Classification branch.
        self.num_classes = num_classes
        layers = 1 if (cls_head_layers > 1 and cls_hidden_dim == 0) else cls_head_layers
        self.cls_head = _make_cls_head(layers, embed_dim, cls_hidden_dim, num_classes) if layers else None

        self.initialize_weights()

    @staticmethod
    def _check_args(img_size: int, patch_size: int, embed_dim: int, num_heads: int, decoder_embed_dim: int,
                    decoder_num_heads: int, depth: int, decoder_depth: int, num_classes: int, cls_head_layers: int,
                    cls_hidden_dim: int, use_decoder: bool, attn_impl: str) -> None:
        if attn_impl not in ATTN_IMPLS:
            raise UserError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {attn_impl!r}")
        if patch_size <= 0 or img_size <= 0 or img_size % patch_size:
            raise UserError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
        if embed_dim % 4 or embed_dim % num_heads:
            raise UserError(f"embed_dim {embed_dim} must be divisible by 4 (sin-cos positions) "
                            f"and by num_heads {num_heads}")
        if use_decoder and (decoder_embed_dim % 4 or decoder_embed_dim % decoder_num_heads):
            raise UserError(f"decoder_embed_dim {decoder_embed_dim} must be divisible by 4 (sin-cos positions) "
                            f"and by decoder_num_heads {decoder_num_heads}")
        if depth < 0 or decoder_depth < 0:
            raise UserError(f"depth and decoder_depth must be >= 0, got {depth} and {decoder_depth}")
        if cls_head_layers not in CLS_HEAD_LAYERS:
            raise UserError(f"cls_head_layers must be one of {CLS_HEAD_LAYERS}, got {cls_head_layers}")
        if cls_head_layers and num_classes < 1:
            raise UserError(f"num_classes must be >= 1 with a classification head, got {num_classes}")
        if cls_hidden_dim < 0:
            raise UserError(f"cls_hidden_dim must be >= 0, got {cls_hidden_dim}")
        if not use_decoder and cls_head_layers == 0:
            raise UserError("nothing to train: use_decoder=False and cls_head_layers=0 remove both branches")

    def initialize_weights(self) -> None:
        """The reference initialisation: sin-cos positions; patch embedding xavier-uniform as a Linear
        (the conv bias keeps PyTorch's default); cls and mask tokens normal(0.02); every Linear
        xavier-uniform with zero bias; LayerNorm 1 / 0. BatchNorm keeps its defaults (1 / 0)."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid_size, cls_token=True).unsqueeze(0))
            if self.use_decoder:
                table = sincos_2d(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)
                self.decoder_pos_embed.copy_(table.unsqueeze(0))
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.use_decoder:
            nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay by name: the frozen position tables. The
        reference's pretraining exempts by rule instead (1-D tensors and biases) and does decay
        cls_token and mask_token; the training loop's optimiser groups apply that rule."""
        names = {"pos_embed"}
        if self.use_decoder:
            names.add("decoder_pos_embed")
        return names

    # ------------------------------------------------------------------ patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, 3, H, W] -> [N, L, P], each patch in (row, column, channel) order."""
        p = self.patch_size
        n, c, h_px, w_px = imgs.shape
        if c != 3 or h_px != w_px or h_px % p:
            raise UserError(f"expected square RGB images with a side divisible by {p}, got shape {tuple(imgs.shape)}")
        h = w = h_px // p
        x = imgs.reshape(n, 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * 3)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, P] -> imgs [N, 3, H, W]; the inverse of `patchify`."""
        p = self.patch_size
        n, length, _ = x.shape
        h = w = self.grid_size
        if length != h * w:
            raise UserError(f"expected {h * w} patches, got {length}")
        x = x.reshape(n, h, w, p, p, 3)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, 3, h * p, w * p)

    # ------------------------------------------------------------------ masking

    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by sorting noise: the `int(L * (1 - mask_ratio))` patches with
        the smallest noise are kept, as the reference's `random_masking` does.

        x: [N, L, D]; noise: [N, L] or None (uniform noise is drawn on x's device).
        Returns x_kept [N, K, D], mask [N, L] (1 = removed, original order), ids_restore [N, L].
        """
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise UserError(f"noise must have shape {(n, length)} (batch, patches), got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # [N, L] ascending: smallest noise first = kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L] rank of each patch in the shuffle
        ids_keep = ids_shuffle[:, :len_keep]  # [N, K]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, K, D]
        # A patch is removed exactly when its rank in the shuffle is >= K; the same mask the
        # reference builds by writing ones/zeros in shuffled order and un-shuffling them.
        mask = (ids_restore >= len_keep).to(torch.float32)  # [N, L]
        return x_kept, mask, ids_restore

    # ------------------------------------------------------------------ encoder

    def _run_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, T, D] patch tokens (positions added) -> [N, 1+T, D] with the cls token in front."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1)  # [N, 1+T, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def _check_imgs(self, imgs: torch.Tensor) -> None:
        size = self.grid_size * self.patch_size
        if imgs.ndim != 4 or imgs.shape[1] != 3 or imgs.shape[2] != size or imgs.shape[3] != size:
            raise UserError(f"expected images of shape [N, 3, {size}, {size}], got {tuple(imgs.shape)}")

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [N, 3, H, W] -> latent [N, 1+K, D] (normed), mask [N, L], ids_restore [N, L].

        Order as the reference: embed all patches, add positions (without the cls row), mask,
        prepend cls_token + its position, blocks on the visible tokens only, LayerNorm.
        """
        self._check_imgs(imgs)
        if not 0.0 <= mask_ratio < 1.0 or int(self.num_patches * (1 - mask_ratio)) < 1:
            raise UserError(f"mask_ratio {mask_ratio} must be in [0, 1) and keep at least one of "
                            f"{self.num_patches} patches")
        x = self.patch_embed(imgs)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, K, D]
        return self._run_encoder(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, 3, H, W] -> [N, 1+L, D]: the encoder on every patch, no masking, no shuffling."""
        self._check_imgs(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # [N, L, D]
        return self._run_encoder(x)

    # ------------------------------------------------------------------ decoder

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D], ids_restore [N, L] -> pred [N, L, P] for every patch (cls dropped)."""
        x = self.decoder_embed(latent)  # [N, 1+K, E]
        n, kept, e = x.shape[0], x.shape[1] - 1, x.shape[2]
        length = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(n, length - kept, -1)  # [N, L-K, E]
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, E] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, e))  # [N, L, E] original order
        x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1+L, E]
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # [N, 1+L, P]
        return x[:, 1:, :]

    # ------------------------------------------------------------------ classification

    def forward_head(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+T, D] -> logits [N, C]: mean of the patch tokens (cls excluded) with
        global_pool, else the cls token, through the head. Raw logits, no temperature."""
        feat = latent[:, 1:, :].mean(dim=1) if self.global_pool else latent[:, 0, :]  # [N, D]
        return self.cls_head(feat)

    # ------------------------------------------------------------------ forward

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None) -> SupMAEOutput:
        """One pretraining forward pass: imgs [N, 3, H, W] (normalised) -> SupMAEOutput.

        noise [N, L] makes the masking deterministic (the K patches with the smallest noise stay).
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)  # [N, 1+K, D]
        if self.use_decoder:
            pred = self.forward_decoder(latent, ids_restore)  # [N, L, P]
            loss_rec = reconstruction_loss(pred, self.patchify(imgs), mask, self.norm_pix_loss)
        else:
            pred = None
            loss_rec = latent.new_zeros((), dtype=torch.float32)
        logits = self.forward_head(latent) if self.cls_head is not None else None
        return SupMAEOutput(loss_rec, pred, mask, logits)

    @torch.no_grad()
    def classify(self, imgs: torch.Tensor) -> torch.Tensor:
        """logits [N, C] with every patch visible: no masking, decoder not run. For validation of the
        classification branch; call `model.eval()` first so BatchNorm uses its running statistics."""
        if self.cls_head is None:
            raise UserError("this model has no classification head (cls_head_layers=0)")
        return self.forward_head(self.forward_features(imgs))
