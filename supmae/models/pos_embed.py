"""Fixed 2-D sine-cosine position embeddings, laid out exactly as the reference MAE / SupMAE code.

timm has sin-cos helpers, but their channel order differs; the reference's order matters because
its checkpoints store these tables and a model trained from scratch should see the same ones.

Layout of the `[gs*gs, D]` table (row-major over the patch grid, row = y, column = x):
  channels [0, D/2)   encode the column index x, channels [D/2, D) the row index y;
  within each half, the first D/4 channels are sin(pos * w_i), the last D/4 cos(pos * w_i),
  with w_i = 1 / 10000^(i / (D/4)), i = 0 .. D/4 - 1.
Computed in float64 (as the reference computes it with numpy) and cast to float32 at the end.
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: [M] positions -> [M, dim] embedding, sin half then cos half."""
    assert dim % 2 == 0, "1-D sin-cos embedding needs an even width"
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    out = pos.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # [M, dim/2], outer product
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """[grid_size**2 (+1), dim] float32 table; with cls_token an all-zero row is put first."""
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # [gs, gs] each; x varies along a row
    emb = torch.cat([sincos_1d(dim // 2, x.reshape(-1)), sincos_1d(dim // 2, y.reshape(-1))], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
