"""Masking noise per sample: a pure function of (seed, epoch, dataset index, patch), computed on the device.

The masking keeps the patches with the smallest noise (`random_masking`, as the reference). Drawn from a
generator per rank, the mask of a sample would depend on the rank that reads it and on the samples
before it there; drawn from the sample's own counter, a sample is masked the same way on 1, 2, 4 or 8
ranks and after a resume anywhere in an epoch. With the pipelines' per-sample augmentation and their
rank-independent order (`pipelines.base.rank_order`), an optimiser step then computes the same loss on
any number of ranks, up to the order of floating-point reductions.

The hash is murmur3's 32-bit finaliser (a bijection on 32 bits) applied twice over the counter's two
halves, in int64 arithmetic split so that no product leaves 63 bits (torch has no wrapping uint64 on
every device); two hashes give a 53-bit uniform in float64, so ties (which `argsort` would break in
an unspecified order) practically never occur.
"""

from __future__ import annotations

import numpy as np
import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32): the product split in 16-bit halves (each below 2**49)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _keys(seed: int, epoch: int) -> tuple[int, int, int]:
    a, b, c = np.random.SeedSequence([int(seed) & _M32, int(epoch) & _M32, 0x6D61736B]).generate_state(3)
    return int(a), int(b), int(c)


def sample_noise(seed: int, epoch: int, indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """float64 [B, L] uniform noise in [0, 1) for the samples of dataset `indices` ([B] int64, any device)."""
    k1, k2, k3 = _keys(seed, epoch)
    idx = indices.to(torch.int64).view(-1, 1)
    counter = idx * num_patches + torch.arange(num_patches, device=idx.device, dtype=torch.int64).view(1, -1)
    lo, hi = counter & _M32, counter >> 32
    h1 = _fmix32(_fmix32(lo ^ k1) ^ hi)
    h2 = _fmix32(h1 ^ k2 ^ (_fmix32(hi ^ k3)))
    return (h1 * (1 << 21) + (h2 >> 11)).to(torch.float64) * (1.0 / (1 << 53))
