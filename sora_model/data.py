"""Video data for the model layer.

- synthetic clips (moving shapes, no files needed) and fixed-size clips from a folder of video
  files: the VAE's training data;
- captioned clips at native size from a JSONL manifest of (path, caption): the DiT's data, with
  only an upper bound in tokens (a clip over it is downscaled, aspect ratio kept, never
  cropped); their sizes come from the files' metadata, so a batch is planned before anything
  is decoded and only its clips are;
- token-budget batching: clips of mixed sizes packed into batches of at most N latent tokens,
  first-fit decreasing, no padding (the physics world of sora_model/physics_world.py feeds it
  too).

Every source yields float videos [3, T, H, W] in [-1, 1].
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from sora_model.checks import is_int

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


def folder_videos(root: str, frames: int, height: int, width: int, seed: int = 0,
                  skip: int = 0) -> Iterator[torch.Tensor]:
    """Clips of `frames` frames from the files under root, in random order, each cropped at a
    random place to height x width (files shorter or smaller than that are skipped, with a
    ValueError if none is long and large enough). The first `skip` clips are passed over without
    decoding them (a resumed run's clips of the steps done): their files are probed up to
    `frames` packets (video_io.probe_video) and their crops drawn, so the clips after them are
    an uninterrupted run's where each packet decodes to one frame (a file with none raises, as
    read_video does)."""
    from sora_model.video_io import probe_video, read_video, to_model
    if not is_int(skip) or skip < 0:
        raise ValueError(f"skip: expected an int >= 0, got {skip!r}")
    files = video_files(root)
    g = torch.Generator().manual_seed(seed)
    while True:
        used = 0
        for i in torch.randperm(len(files), generator=g).tolist():
            if skip:
                clip = None
                T, H, W = probe_video(files[i], max_frames=frames)
                if T == 0:
                    raise ValueError(f"path: {files[i]!r} has no frames from frame 0")
            else:
                clip, _ = read_video(files[i], max_frames=frames)
                T, H, W, _ = clip.shape
            if T < frames or H < height or W < width:
                continue
            y0 = int(torch.randint(0, H - height + 1, (1,), generator=g))
            x0 = int(torch.randint(0, W - width + 1, (1,), generator=g))
            used += 1
            if clip is None:
                skip -= 1
            else:
                yield to_model(clip[:, y0:y0 + height, x0:x0 + width])
        if not used:
            raise ValueError(f"root: no video under {root!r} has {frames} frames of at least {height}x{width}")


# -----------------------------------------------------------------------------
# Captioned clips at native size, and token-budget batches
# -----------------------------------------------------------------------------

# The VAE's compression: `temporal` and `spatial` below are its cfg's temporal_compression and
# spatial_compression (the defaults are the tiny, small and base VAE's: sora_model/vae.py SIZES).

def check_compression(temporal: int, spatial: int) -> None:
    for name, f in (("temporal", temporal), ("spatial", spatial)):
        if not is_int(f) or f < 1:
            raise ValueError(f"{name}: expected the VAE's {name}_compression, a positive int, got {f!r}")


def latent_tokens(shape: Sequence[int], patch_size: Sequence[int] = (1, 2, 2), temporal: int = 4,
                  spatial: int = 8) -> int:
    """DiT tokens of a video [3, T, H, W] once encoded (1 + (T - 1) / temporal frames, H and W
    / spatial) and cut into patches."""
    check_compression(temporal, spatial)
    _, T, H, W = shape
    t = 1 + (T - 1) // temporal
    return (t // patch_size[0]) * (H // spatial // patch_size[1]) * (W // spatial // patch_size[2])


def check_max_tokens(max_tokens: int) -> None:
    if not is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive int (latent tokens per clip), got {max_tokens!r}")


def _aspect_grids(short: int, long: int, ratio: float) -> Iterator[tuple[int, int]]:
    """(a, b) unit counts of the short and the long side, 1 <= a <= short, 1 <= b <= long, with
    the long side within half a unit of a * ratio (the clip's long / short side): the closest
    to its aspect ratio the unit grid allows at each short side."""
    for a in range(1, short + 1):
        x = a * ratio
        for b in sorted({math.floor(x), math.ceil(x)}):
            if 1 <= b <= long and abs(b - x) <= 0.5:
                yield a, b


def _aspect_grid(short: int, long: int, ratio: float, room: int) -> tuple[int, int]:
    """Of _aspect_grids's within `room` tokens (a * b), the one of most tokens, then of least
    aspect error (log ratio); (0, 0) when none is. (The clip's exact ratio at fewer tokens,
    9 x 16 units for 1080 x 1920 in 256 tokens where 12 x 21 is 1.6% off, would waste much of
    the bound.)"""
    fits = [(a, b) for a, b in _aspect_grids(short, long, ratio) if a * b <= room]
    return max(fits, key=lambda ab: (ab[0] * ab[1], -abs(math.log(ab[1] / (ab[0] * ratio))))) if fits else (0, 0)


def fitted_shape(shape: Sequence[int], max_tokens: int, patch_size: Sequence[int] = (1, 2, 2), temporal: int = 4,
                 spatial: int = 8) -> tuple[int, int, int, int]:
    """The [C, T, H, W] shape fit_to_tokens gives a clip of `shape`, computed from the shape alone:
    T to the VAE's frame rule, H and W each down to its unit (spatial * patch) when the clip's
    tokens are within max_tokens; over it, the unit grid within max_tokens that keeps the
    aspect ratio best (_aspect_grid: the long side within half a unit of the short side times
    the clip's ratio)."""
    check_compression(temporal, spatial)
    check_max_tokens(max_tokens)
    C, T, H, W = shape
    pt = patch_size[0]
    t = (1 + (T - 1) // temporal) // pt * pt           # latent frames: as many as the patch's frames divide
    unit_t, unit_h, unit_w = 1 + (pt - 1) * temporal, spatial * patch_size[1], spatial * patch_size[2]
    if t < 1 or H < unit_h or W < unit_w:
        frames = "1 frame" if unit_t == 1 else f"{unit_t} frames"
        raise ValueError(f"video: {(C, T, H, W)} is smaller than one token ({frames} of {unit_h}x{unit_w} pixels: the "
                         f"VAE's compression {temporal} in time and {spatial} in space, the DiT's patch "
                         f"{tuple(patch_size)})")
    T, frames = 1 + (t - 1) * temporal, t // pt
    nh, nw = H // unit_h, W // unit_w                   # the unit grid at native size
    if frames * nh * nw <= max_tokens:
        return C, T, nh * unit_h, nw * unit_w
    wide = H / unit_h <= W / unit_w                      # in units: the short side is H
    short, long = (nh, nw) if wide else (nw, nh)
    ratio = (W / unit_w) / (H / unit_h) if wide else (H / unit_h) / (W / unit_w)   # long / short, >= 1
    a, b = _aspect_grid(short, long, ratio, max_tokens // frames)
    if not a:
        smallest = frames * min(a * b for a, b in _aspect_grids(short, long, ratio))
        raise ValueError(f"max_tokens: {max_tokens} is fewer than the {smallest} tokens of the smallest size of a "
                         f"{(C, T, H, W)} clip with its aspect ratio")
    gh, gw = (a, b) if wide else (b, a)
    return C, T, gh * unit_h, gw * unit_w


def fit_to_tokens(video: torch.Tensor, max_tokens: int, patch_size: Sequence[int] = (1, 2, 2), temporal: int = 4,
                  spatial: int = 8) -> torch.Tensor:
    """The clip as the model takes it: T down to the largest 1 + temporal*k (the VAE's frame
    rule: at most temporal - 1 last frames dropped; with a patch of pt > 1 frames, the largest
    whose 1 + k latent frames pt divides), H and W to multiples of spatial * patch, and, when
    its tokens exceed max_tokens, downscaled to the unit grid within them nearest its aspect
    ratio (fitted_shape; no crop). temporal and spatial: the VAE's compression."""
    _, T, H, W = video.shape
    _, T, h, w = fitted_shape(video.shape, max_tokens, patch_size, temporal, spatial)
    video = video[:, :T]
    if (h, w) != (H, W):
        video = F.interpolate(video.transpose(0, 1), size=(h, w), mode="bilinear", antialias=True,
                              align_corners=False).transpose(0, 1)
    return video


@dataclass(frozen=True)
class ManifestClip:
    """A manifest entry whose size is known before it is decoded: `shape` is the [3, T, H, W]
    that load() returns (fit_to_tokens's), from the file's metadata (video_io.probe_video). So
    token_batches can pack clips by shape and only the clips of the batch are decoded."""
    path: str
    shape: tuple[int, int, int, int]
    max_tokens: int
    patch_size: tuple[int, int, int]
    temporal: int = 4                 # the VAE's compression
    spatial: int = 8

    def load(self) -> torch.Tensor:
        from sora_model.video_io import read_video, to_model
        frames, _ = read_video(self.path)
        video = fit_to_tokens(to_model(frames), self.max_tokens, self.patch_size, self.temporal, self.spatial)
        if tuple(video.shape) != self.shape:
            raise ValueError(f"{self.path!r}: decodes to a {tuple(video.shape)} clip, but its metadata gave "
                             f"{self.shape} (packets that are not one frame each?)")
        return video


@functools.lru_cache(maxsize=1 << 16)
def _probe(path: str, version: tuple[int, int, int]) -> tuple[int, int, int]:
    """video_io.probe_video, once per file version (mtime, size, inode: training steps draw the
    same files again)."""
    from sora_model.video_io import probe_video
    return probe_video(path)


JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


def read_manifest(manifest: str) -> list[tuple[int, str, str, str]]:
    """(line number, path as written, absolute path, caption) of each entry of a JSONL manifest of
    {"path": ..., "caption": ...} objects (paths relative to the manifest's folder; blank lines
    skipped), each checked: a JSON object, a "path" string naming a file that exists, a
    non-empty "caption" string. Errors say `manifest <manifest> line <i> (<path>): ...`."""
    if not os.path.isfile(manifest):
        raise ValueError(f"manifest: expected a JSONL file of {{\"path\", \"caption\"}} objects, got {manifest!r} "
                         f"(no such file)")
    folder = os.path.dirname(os.path.abspath(manifest))
    entries = []
    with open(manifest, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"manifest {manifest!r} line {i}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from e
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected a JSON object {{\"path\": ..., \"caption\": ...}}, got "
                                 f"{JSON_KINDS.get(type(entry), type(entry).__name__)}")
            path = entry.get("path")
            if not isinstance(path, str) or not path:
                got = "none" if "path" not in entry else repr(path)
                raise ValueError(f"{where}: \"path\": expected the clip's file (a non-empty string, relative to the "
                                 f"manifest's folder), got {got}")
            where += f" ({path!r})"
            caption = entry.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                got = "none" if "caption" not in entry else repr(caption)
                raise ValueError(f"{where}: \"caption\": expected a non-empty string, got {got}")
            full = os.path.join(folder, path)
            if not os.path.isfile(full):
                raise ValueError(f"{where}: no such file {full!r}")
            entries.append((i, path, full, caption))
    if not entries:
        raise ValueError(f"manifest: no entries in {manifest!r}")
    return entries


def _fit_entry(manifest: str, line: int, path: str, full: str, max_tokens: int, patch_size: tuple[int, int, int],
               temporal: int, spatial: int) -> tuple[int, int, int, int]:
    """The fitted shape of a manifest entry's file as it is now (probed once per file version):
    a file that is gone, is not a video, or fits no size within max_tokens is an error naming
    the manifest's line."""
    try:
        st = os.stat(full)
        probed = _probe(full, (st.st_mtime_ns, st.st_size, st.st_ino))
        return fitted_shape((3, *probed), max_tokens, patch_size, temporal, spatial)
    except (OSError, ValueError) as e:          # os.stat's and probe_video's (PyAV's subclass these), fitted_shape's
        raise ValueError(f"manifest {manifest!r} line {line} ({path!r}): {e}") from e


@functools.lru_cache(maxsize=8)
def _checked_manifest(manifest: str, version: tuple[int, int], max_tokens: int, patch_size: tuple[int, int, int],
                      temporal: int, spatial: int) -> tuple[tuple[int, str, str, str], ...]:
    """read_manifest's entries (line, path, absolute path, caption), every file probed and
    fitted once per manifest version (mtime, size) and settings, so that a bad entry is an
    error before any step runs."""
    entries = tuple(read_manifest(manifest))
    for entry in entries:
        _fit_entry(manifest, *entry[:3], max_tokens, patch_size, temporal, spatial)
    return entries


def captioned_clips(manifest: str, max_tokens: int, patch_size: Sequence[int] = (1, 2, 2), seed: int = 0,
                    temporal: int = 4, spatial: int = 8) -> Iterator[tuple[ManifestClip, str]]:
    """(ManifestClip, caption) in random order, from a JSONL manifest of {"path": ...,
    "caption": ...} (paths relative to the manifest's folder), nothing decoded: the clips'
    shapes come from their metadata (fitted for the VAE's compression temporal, spatial and
    the DiT's patch). Images are 1-frame videos. Every entry is checked when the manifest is
    read (read_manifest, then each file probed and fitted, once per manifest version): a bad
    line, a missing file or a clip that fits no size within max_tokens is an error naming the
    manifest, the line and the file, raised before the first clip. Each clip's shape is that
    of its file when the clip is drawn (a file replaced or removed later is seen then)."""
    check_compression(temporal, spatial)
    check_max_tokens(max_tokens)
    if not os.path.isfile(manifest):
        read_manifest(manifest)                                          # its error: no such file
    manifest = os.path.abspath(manifest)
    st = os.stat(manifest)
    patch_size = tuple(patch_size)
    entries = _checked_manifest(manifest, (st.st_mtime_ns, st.st_size), max_tokens, patch_size, temporal, spatial)
    g = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(entries), generator=g).tolist():
            line, path, full, caption = entries[i]
            shape = _fit_entry(manifest, line, path, full, max_tokens, patch_size, temporal, spatial)
            yield ManifestClip(full, shape, max_tokens, patch_size, temporal, spatial), caption


def captioned_videos(manifest: str, max_tokens: int, patch_size: Sequence[int] = (1, 2, 2), seed: int = 0,
                     temporal: int = 4, spatial: int = 8) -> Iterator[tuple[torch.Tensor, str]]:
    """(video [3, T, H, W] in [-1, 1], caption) at native size and duration (fit_to_tokens), in
    random order, from a JSONL manifest (captioned_clips, decoded)."""
    for clip, caption in captioned_clips(manifest, max_tokens, patch_size, seed, temporal, spatial):
        yield clip.load(), caption


def first_fit_decreasing(tokens: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of items grouped into bins of at most `budget` tokens: the largest item first,
    each into the first bin with room for it."""
    for i, n in enumerate(tokens):
        if n > budget:
            raise ValueError(f"item {i}: {n} tokens, over the batch budget of {budget} (lower the clip's "
                             f"max_tokens or raise the budget)")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(tokens)), key=lambda j: -tokens[j]):
        for b in range(len(bins)):
            if tokens[i] <= room[b]:
                bins[b].append(i)
                room[b] -= tokens[i]
                break
        else:
            bins.append([i])
            room.append(budget - tokens[i])
    return bins


def token_batches(clips: Iterable[tuple[torch.Tensor, str]], budget: int, patch_size: Sequence[int] = (1, 2, 2),
                  window: int = 64, temporal: int = 4, spatial: int = 8) -> Iterator[list[tuple[torch.Tensor, str]]]:
    """Batches of (video, caption) of at most `budget` latent tokens each (latent_tokens with
    the VAE's compression temporal, spatial), no padding: at least `window` clips (and more
    than one batch's worth) at a time, packed first-fit decreasing; the emptiest bin of a
    window goes back into the next one (so batches stay full)."""
    check_compression(temporal, spatial)
    it = iter(clips)
    carry: list[tuple[torch.Tensor, str]] = []
    drawn = 0
    while True:
        items, counts = carry, [latent_tokens(v.shape, patch_size, temporal, spatial) for v, _ in carry]
        done = False
        while len(items) < window or sum(counts) <= budget:
            clip = next(it, None)
            if clip is None:
                done = True
                break
            n = latent_tokens(clip[0].shape, patch_size, temporal, spatial)
            if n > budget:      # named as the caller knows it, before any batch of its window is yielded
                raise ValueError(f"clips: clip {drawn} ({clip[1]!r}, shape {tuple(clip[0].shape)}) has {n} latent "
                                 f"tokens, over the batch budget of {budget} (downscale it, e.g. fit_to_tokens, "
                                 f"or raise budget)")
            drawn += 1
            items.append(clip)
            counts.append(n)
        if not items:
            return
        bins = first_fit_decreasing(counts, budget)
        bins.sort(key=lambda b: -sum(counts[i] for i in b))
        for b in bins if done else bins[:-1]:          # the source ran out: yield every bin
            yield [items[i] for i in b]
        if done:
            return
        carry = [items[i] for i in bins[-1]]
