"""Video data for the model layer: synthetic clips (moving shapes, no files needed) and clips
read from a folder of video files.

Every source yields float videos [3, T, H, W] in [-1, 1].
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")


def synthetic_video(frames: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A [3, frames, height, width] clip in [-1, 1]: a colour gradient background and a few
    squares moving in straight lines (learnable structure, no files)."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator)
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    y = torch.linspace(0, 1, height).view(1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width)
    c0, c1 = rand(3, 1, 1, 1) * 2 - 1, rand(3, 1, 1, 1) * 2 - 1
    video = (c0 * (1 - x) + c1 * x).expand(3, frames, height, width).clone()
    for _ in range(3):
        size = 0.1 + 0.2 * rand(1).item()
        py, px = rand(1).item(), rand(1).item()
        vy, vx = (rand(2) * 2 - 1).tolist()
        cy = (py + 0.05 * vy * t) % 1.0
        cx = (px + 0.05 * vx * t) % 1.0
        inside = ((y - cy).abs() < size / 2) & ((x - cx).abs() < size / 2)       # [T, H, W]
        color = rand(3, 1, 1, 1) * 2 - 1
        video = torch.where(inside.unsqueeze(0), color, video)
    return video


def synthetic_videos(frames: int, height: int, width: int, seed: int = 0) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        yield synthetic_video(frames, height, width, g)


def video_files(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise ValueError(f"root: expected a folder of video files, got {root!r}")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                   if f.lower().endswith(VIDEO_EXTENSIONS))
    if not files:
        raise ValueError(f"root: no video files ({', '.join(VIDEO_EXTENSIONS)}) under {root!r}")
    return files


def folder_videos(root: str, frames: int, height: int, width: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Clips of `frames` frames from the files under root, in random order, each cropped at a
    random place to height x width (files shorter or smaller than that are skipped, with a
    ValueError if none is long and large enough)."""
    from sora_model.video_io import read_video, to_model
    files = video_files(root)
    g = torch.Generator().manual_seed(seed)
    while True:
        used = 0
        for i in torch.randperm(len(files), generator=g).tolist():
            clip, _ = read_video(files[i], max_frames=frames)
            T, H, W, _ = clip.shape
            if T < frames or H < height or W < width:
                continue
            y0 = int(torch.randint(0, H - height + 1, (1,), generator=g))
            x0 = int(torch.randint(0, W - width + 1, (1,), generator=g))
            used += 1
            yield to_model(clip[:, y0:y0 + height, x0:x0 + width])
        if not used:
            raise ValueError(f"root: no video under {root!r} has {frames} frames of at least {height}x{width}")
