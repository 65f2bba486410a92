"""The Packed record: many videos of different sizes as one token sequence."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packed:
    """Videos of different sizes packed into one sequence, with no padding.

    tokens      [N, D]     every video's tokens, one video after another
    cu_seqlens  [n+1]      int32, token offset of each video (cu_seqlens[-1] == N)
    positions   [N, 3]     int32, (t, h, w) grid index of each token in its video
    grid_sizes  [n, 3]     int32, (T/pt, H/ph, W/pw) of each video
    max_seqlen  int        the longest video's token count
    grids       host copy of grid_sizes, so unpacking needs no device sync
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    grid_sizes: torch.Tensor
    max_seqlen: int
    grids: tuple[tuple[int, int, int], ...]

    @property
    def num_videos(self) -> int:
        return len(self.grids)


def packed_metadata(grids: list[tuple[int, int, int]], device: torch.device):
    """cu_seqlens [n+1], grid_sizes [n, 3] and positions [N, 3] (int32) for videos with `grids`.

    One host-to-device copy for cu_seqlens and grid_sizes; positions are computed on the
    device with a handful of vectorised ops, whatever the number of videos.
    """
    lengths = [t * h * w for t, h, w in grids]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    flat = cu + [x for g in grids for x in g]
    meta = torch.tensor(flat, dtype=torch.int32).to(device, non_blocking=True)
    n = len(grids)
    cu_seqlens, grid_sizes = meta[: n + 1], meta[n + 1:].view(n, 3)
    token = torch.arange(cu[-1], device=device, dtype=torch.int32)
    video = torch.searchsorted(cu_seqlens[1:], token, right=True)  # owner of each token
    local = token - cu_seqlens[video]
    g = grid_sizes[video]                                           # [N, 3]
    hw = g[:, 1] * g[:, 2]
    positions = torch.stack([local // hw, (local % hw) // g[:, 2], local % g[:, 2]], dim=1)
    return cu_seqlens, grid_sizes, positions.to(torch.int32), max(lengths)
