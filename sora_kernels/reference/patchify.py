"""Reference 3D patchify and variable-size packing in plain PyTorch.

Tokens are in raster (t, h, w) order and features in (C, pt, ph, pw) order, so
``tokens @ w.reshape(D_out, -1).T + b`` equals ``Conv3d(kernel=stride=patch_size)``
rearranged to tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch


def patchify3d(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """x [B, C, T, H, W] -> tokens [B, (T/pt)(H/ph)(W/pw), C*pt*ph*pw]."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch_size
    x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # B, Tg, Hg, Wg, C, pt, ph, pw
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify3d(tokens: torch.Tensor, patch_size: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """tokens [B, L, D] -> x [B, C, T, H, W] with grid = (T/pt, H/ph, W/pw); inverse of patchify3d."""
    B, L, D = tokens.shape
    pt, ph, pw = patch_size
    Tg, Hg, Wg = grid
    C = D // (pt * ph * pw)
    x = tokens.reshape(B, Tg, Hg, Wg, C, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # B, C, Tg, pt, Hg, ph, Wg, pw
    return x.reshape(B, C, Tg * pt, Hg * ph, Wg * pw)


def pack_patchify(videos: Sequence[torch.Tensor], patch_size: Sequence[int]) -> torch.Tensor:
    """videos: list of [C, Ti, Hi, Wi] -> tokens [N, D], the videos' tokens one after another."""
    return torch.cat([patchify3d(v.unsqueeze(0), patch_size)[0] for v in videos])


def unpack_unpatchify(tokens: torch.Tensor, patch_size: Sequence[int],
                      sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """tokens [N, D] -> list of [C, Ti, Hi, Wi] for sizes[i] = (Ti, Hi, Wi); inverse of pack_patchify."""
    pt, ph, pw = patch_size
    grids = [(T // pt, H // ph, W // pw) for T, H, W in sizes]
    lengths = [t * h * w for t, h, w in grids]
    return [unpatchify3d(chunk.unsqueeze(0), patch_size, g)[0]
            for chunk, g in zip(torch.split(tokens, lengths), grids)]


def packed_positions(grids: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """int32 [N, 3]: the (t, h, w) grid index of each token of videos with patch grids `grids`."""
    return torch.cat([torch.stack(torch.meshgrid(*(torch.arange(n, device=device) for n in g), indexing="ij"),
                                  dim=-1).reshape(-1, 3) for g in grids]).to(torch.int32)
