"""Exact spatial tiling of the causal video decoder, and the memory planner behind
`VideoAutoencoder.decode(z, max_memory_gb=...)`.

Tiling. The decoder is split into segments (Decoder.segments: the layers between two
up-samplings). A tiled segment keeps its input and its output as whole frames and runs
everything in between tile by tile, each tile cropped from the input with a halo equal to
the segment's receptive field (one pixel per 3x3 convolution, at the segment's resolution),
so the tile's own pixels come out exactly as in the untiled decode. The one whole-frame
dependency is GroupNorm: its statistics are over the frame. So a segment with n norms runs
n statistics passes first: pass i runs every tile up to norm i (norms before it applying the
whole-frame statistics already found), takes the moments of norm i's input over the tile's own
pixels (sk.group_norm_moments: mean and M2 per batch, frame and group, read in place), merges
them into the frame's (Chan et al.'s pairwise formula, float64), and stops; the merged moments
give norm i's mean and rstd.
A last pass runs every tile through the whole segment with all statistics known. No
blending, no seams: the tiled decode equals the untiled one up to float reassociation.
Cost: each tile keeps what its next pass resumes from (a layer's input, and inside a ResBlock
its conv1 output), so every convolution runs once per tile, on the tile and its halo; where
those kept tensors do not fit, the statistics passes recompute prefixes of the segment (about
n / 2 extra segment runs). The planner only tiles the segments that do not fit.

Causal convolutions carry their last frames from chunk to chunk per tile (each convolution's
one full run in a chunk stores them; runs stopped at a norm only read them).

Planning. `plan_decode` estimates the peak bytes of a decode for a chunk size and a tile size
(the activations of the largest segment, the carried frames of every convolution, the whole
frames kept between segments, and the output) and returns the fastest plan that fits the
budget: untiled with the largest chunk, else tiled with the largest tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import sora_kernels as sk

from sora_model.vae import CausalConv3d, DecodeState, GroupNormSiLU, ResBlock, Upsample, run_layers


class StopPass(Exception):
    """Raised by the norm a statistics pass collects, to end the pass there."""


class TileNorms:
    """The GroupNorms of a tiled segment (DecodeState.norms): a norm whose whole-frame
    statistics are known applies them; the target norm merges the moments of its input over
    the current tile's own pixels into the frame's and stops the pass."""

    def __init__(self):
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(norm) -> mean, rstd fp32 [B, T, G]
        self.target: GroupNormSiLU | None = None
        self.region: tuple[int, int, int, int] = (0, 0, 0, 0)           # oy, ox, th, tw in the tile's tensor
        self._moments: tuple[int, torch.Tensor, torch.Tensor] | None = None  # count, mean, m2 float64 [B, T, G]

    def run(self, norm: GroupNormSiLU, x: torch.Tensor) -> torch.Tensor:
        if norm is self.target:
            self._collect(norm, x)
            raise StopPass
        if id(norm) not in self.stats:
            raise RuntimeError("tiled decode: a GroupNorm ran before its statistics pass")
        mean, rstd = self.stats[id(norm)]
        return apply_group_norm(x, mean, rstd, norm)

    def _collect(self, norm: GroupNormSiLU, x: torch.Tensor) -> None:
        oy, ox, th, tw = self.region
        own = x[..., oy:oy + th, ox:ox + tw]
        mb, m2b = sk.group_norm_moments(own, norm.groups)
        nb = own.shape[1] // norm.groups * own.shape[3] * own.shape[4]    # what was read: finish checks the sum
        if self._moments is None:
            self._moments = (nb, mb, m2b)
            return
        n, mean, m2 = self._moments
        if nb == 0:
            return
        d, total = mb - mean, n + nb
        self._moments = (total, mean + d * (nb / total), m2 + m2b + d.square() * (n * nb / total))

    def finish(self, norm: GroupNormSiLU, count: int) -> None:
        """The target's statistics from the moments merged over all tiles (count elements per
        group: checked against the tiles' own pixels)."""
        n, mean, m2 = self._moments
        if n != count:
            raise RuntimeError(f"tiled decode: the tiles' own pixels hold {n} elements per group, the frame {count}")
        var = m2 / count
        self.stats[id(norm)] = (mean.float(), torch.rsqrt(var + norm.eps).float())
        self._moments, self.target = None, None


def apply_group_norm(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, norm: GroupNormSiLU) -> torch.Tensor:
    """GroupNorm of x [B, C, T, H, W] with given statistics [B, T, G], affine, SiLU when the
    norm has it: sora_kernels.group_norm_silu(statistics=...), one pass (Triton's apply kernel
    on a GPU, the C++ apply on the CPU in fp32; elsewhere the reference's folded multiply-add
    and SiLU)."""
    return sk.group_norm_silu(x, norm.groups, norm.weight, norm.bias, act=norm.act, statistics=(mean, rstd))


# -----------------------------------------------------------------------------
# Segments and tiles
# -----------------------------------------------------------------------------

@dataclass
class Segment:
    """A run of decoder layers at `factor` times the latent resolution, reading its input at
    factor / scale (scale 2 when it starts with an up-sampling)."""
    layers: list[nn.Module]
    factor: int
    scale: int
    halo: int                      # pixels at the segment's resolution: one per 3x3 convolution
    norms: list[GroupNormSiLU]
    convs: list[CausalConv3d]
    temporal: bool                 # starts with a temporal up-sampling (frames double)
    in_channels: int
    out_channels: int
    max_channels: int


def segments_of(decoder: nn.Module) -> list[Segment]:
    out, factor = [], 1
    for layers in decoder.segments():
        up = isinstance(layers[0], Upsample)
        factor *= 2 if up else 1
        convs = [m for layer in layers for m in layer.modules() if isinstance(m, CausalConv3d)]
        channels = [c for conv in convs for c in (conv.conv.in_channels, conv.conv.out_channels)]
        out.append(Segment(layers, factor, 2 if up else 1, sum(c.pad_s for c in convs),
                           [m for layer in layers for m in layer.modules() if isinstance(m, GroupNormSiLU)], convs,
                           up and layers[0].temporal, convs[0].conv.in_channels, convs[-1].conv.out_channels,
                           max(channels)))
    return out


@dataclass
class Tile:
    rows: slice                    # input rows / columns to crop (the segment's input resolution)
    cols: slice
    region: tuple[int, int, int, int]  # oy, ox, th, tw: the tile's own pixels in its computed tensor
    at: tuple[int, int]            # where they go in the segment's output frame
    state: DecodeState = field(default_factory=DecodeState)


def make_tiles(seg: Segment, h: int, w: int, tile: tuple[int, int]) -> list[Tile]:
    """Tiles of tile = (th, tw) latent pixels over a latent frame h x w, at the segment's
    resolution, with their halos."""
    f, s, halo = seg.factor, seg.scale, seg.halo
    H, W = h * f, w * f
    tiles = []
    for y0 in range(0, h, tile[0]):
        for x0 in range(0, w, tile[1]):
            Y0, Y1, X0, X1 = y0 * f, min(y0 + tile[0], h) * f, x0 * f, min(x0 + tile[1], w) * f
            iy0, iy1 = max(0, Y0 - halo) // s, -(-min(H, Y1 + halo) // s)
            ix0, ix1 = max(0, X0 - halo) // s, -(-min(W, X1 + halo) // s)
            tiles.append(Tile(slice(iy0, iy1), slice(ix0, ix1), (Y0 - iy0 * s, X0 - ix0 * s, Y1 - Y0, X1 - X0),
                              (Y0, X0)))
    return tiles


def _layer_of(seg: Segment, norm: GroupNormSiLU) -> int:
    """Index of the segment's top-level layer that holds `norm`."""
    return next(i for i, layer in enumerate(seg.layers) if any(m is norm for m in layer.modules()))


def run_tiled(seg: Segment, x: torch.Tensor, tiles: list[Tile], first: bool, keep: bool = True) -> torch.Tensor:
    """The segment on x [B, C, F, h, w] (whole frames at its input resolution), tile by tile,
    with whole-frame GroupNorm statistics: equal to run_layers(seg.layers, x).

    keep: each tile keeps what the pass that just ran computed before its norm, and the next
    pass resumes there: the input of the norm's layer, and for a ResBlock's second norm also
    the block's conv1 output (the norm's input: the block then resumes with ResBlock.finish).
    Every convolution then runs once per tile, to its end, and stores its causal frames in that
    run, as in an untiled decode; a layer is otherwise only begun, up to the norm a pass
    collects (no update). The kept tensors are two activations of the frame (with halos) at
    the most (estimate_bytes counts them). Without keep, every pass recomputes the segment from
    its input (no update) and only the last pass updates: less memory, about 4x the
    convolutions on the tiny config (1152 runs against 300 for 3 chunks of 4 x 4 tiles)."""
    H, W = x.shape[3] * seg.scale, x.shape[4] * seg.scale
    norms = TileNorms()
    kept = [_Kept(0, x[..., t.rows, t.cols]) for t in tiles]
    for norm in seg.norms:              # statistics passes, in the order the norms run
        norms.target = norm
        target = _layer_of(seg, norm)
        layer = seg.layers[target]
        inside = keep and isinstance(layer, ResBlock) and norm is layer.norm2
        for i, t in enumerate(tiles):
            t.state.norms, norms.region = norms, t.region
            t.state.update = keep
            h = kept[i].run_to(seg, target, t.state, first)
            mid = layer.conv1(layer.norm1(h, t.state), t.state) if inside else None   # conv1's one full run
            if keep:
                kept[i] = _Kept(target, h, mid)
            t.state.update = False
            try:
                if inside:
                    layer.norm2(mid, t.state)
                else:
                    run_layers(seg.layers[target:target + 1], h, t.state, first)
            except StopPass:
                continue
            raise RuntimeError("tiled decode: a statistics pass did not reach its GroupNorm")
        norms.finish(norm, norm.weight.numel() // norm.groups * H * W)
    out = None
    for i, t in enumerate(tiles):       # the last pass: every norm's statistics known
        t.state.update, t.state.norms, norms.region = True, norms, t.region
        y = kept[i].run_to(seg, len(seg.layers), t.state, first)
        kept[i] = None
        oy, ox, th, tw = t.region
        if out is None:
            out = y.new_empty(*y.shape[:3], H, W)
        out[..., t.at[0]:t.at[0] + th, t.at[1]:t.at[1] + tw] = y[..., oy:oy + th, ox:ox + tw]
    return out


@dataclass
class _Kept:
    """Where a tile's next pass resumes: the input of layer `start`, and (mid) the conv1
    output of the ResBlock there when its second norm's statistics pass ran last."""
    start: int
    h: torch.Tensor
    mid: torch.Tensor | None = None

    def run_to(self, seg: Segment, end: int, state: DecodeState, first: bool) -> torch.Tensor:
        """The tile from here through layer end - 1."""
        start, h = self.start, self.h
        if self.mid is not None:
            h = seg.layers[start].finish(h, self.mid, state)
            start += 1
        return run_layers(seg.layers[start:end], h, state, first)


# -----------------------------------------------------------------------------
# Memory planning
# -----------------------------------------------------------------------------

# Live tensors of a segment's width while a ResBlock runs (input, normalised, the padded conv
# input, conv output, the skip, the sum), measured on CPU with the tiny config; a tiled
# statistics pass may add a copy of the tile's own pixels, counted as two (group_norm_moments:
# none with the C++ and Triton kernels, which read the view in place; float64 with the
# reference's).
ACTIVATION_COPIES = 6


@dataclass(frozen=True)
class DecodePlan:
    chunk_frames: int | None       # None: all latent frames at once
    tile: tuple[int, int] | None   # latent pixels; None: whole frames
    tiled: tuple[bool, ...] = ()   # per segment: runs in tiles
    estimate_bytes: int = 0
    keep_inputs: bool = True       # tiled segments keep layer inputs between statistics passes (run_tiled)


def _frames(segs: list[Segment], chunk: int) -> list[int]:
    """Frames each segment holds for a chunk of latent frames (an upper bound: later chunks)."""
    out, n = [], chunk
    for seg in segs:
        n *= 2 if seg.temporal else 1
        out.append(n)
    return out


def estimate_bytes(segs: list[Segment], shape: tuple[int, ...], chunk: int, tile: tuple[int, int] | None,
                   tiled: tuple[bool, ...], element_size: int, keep_output: bool, keep_inputs: bool = True) -> int:
    """Estimated peak bytes of decoding a latent of `shape` [B, C, t, h, w]."""
    B, _, t, h, w = shape
    frames = _frames(segs, chunk)
    total_frames = _frames(segs, t)[-1]
    out_frames = total_frames if keep_output else frames[-1]
    output = B * 3 * out_frames * h * w * segs[-1].factor ** 2 * element_size
    carried, peak_segment = 0, 0
    for seg, n, tiles_it in zip(segs, frames, tiled):
        H, W = h * seg.factor, w * seg.factor
        if tiles_it:
            th = min(H, tile[0] * seg.factor + 2 * seg.halo + seg.scale)
            tw = min(W, tile[1] * seg.factor + 2 * seg.halo + seg.scale)
            area = th * tw
            n_tiles = math.ceil(h / tile[0]) * math.ceil(w / tile[1])
            carried_area = n_tiles * area
            # the input and output frames, and run_tiled's kept tensors (a ResBlock's input and conv1 output)
            whole = (seg.in_channels * (n // (2 if seg.temporal else 1)) * H * W // seg.scale ** 2
                     + seg.out_channels * n * H * W
                     + (2 * seg.max_channels * n * carried_area if keep_inputs else 0))
            work = (ACTIVATION_COPIES + 2) * seg.max_channels * (n + 2) * area
        else:
            carried_area, whole = H * W, 0
            work = ACTIVATION_COPIES * seg.max_channels * (n + 2) * H * W
        carried += sum(conv.pad_t * conv.conv.in_channels for conv in seg.convs) * carried_area * B
        peak_segment = max(peak_segment, (work + whole) * B)
    return output + (carried + peak_segment) * element_size


def _tile_sides(n: int) -> list[int]:
    sides = {n} | {s for s in (64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if s < n}
    return sorted(sides, reverse=True)


def plan_decode(decoder: nn.Module, shape: tuple[int, ...], max_memory_gb: float | None, element_size: int,
                chunk_frames: int | None = None, tile: tuple[int, int] | None = None,
                keep_output: bool = True) -> DecodePlan:
    """The decode plan for a latent of `shape`: chunk_frames and tile as given; with a budget,
    those not given chosen so the estimated peak fits (largest chunk untiled, else the largest
    tile, tiling only the segments that need it, keeping layer inputs between statistics passes
    when that fits too). ValueError when nothing fits."""
    segs = segments_of(decoder)
    t, h, w = shape[2:]
    if max_memory_gb is None:
        if tile is None:
            return DecodePlan(chunk_frames, None, (False,) * len(segs))
        return DecodePlan(chunk_frames or 1, tile, (True,) * len(segs))
    budget = max_memory_gb * 2 ** 30
    chunks = [chunk_frames] if chunk_frames is not None else sorted({t} | {c for c in (16, 8, 4, 2, 1) if c < t},
                                                                    reverse=True)
    if tile is not None:
        tiles = [tile]
    else:
        tiles = [None] + [(th, tw) for th, tw in zip(_tile_sides(h), _tile_sides(w)) if (th, tw) != (h, w)]
    smallest = None
    for tl in tiles:
        for chunk in chunks:
            for keep in ((True,) if tl is None else (True, False)):
                if tl is None:
                    tiled = (False,) * len(segs)
                else:  # tile the segments, from the highest resolution down, until the estimate fits
                    tiled = [False] * len(segs)
                    for s in reversed(range(len(segs))):
                        if estimate_bytes(segs, shape, chunk, tl, tuple(tiled), element_size, keep_output,
                                          keep) <= budget:
                            break
                        tiled[s] = True
                    tiled = tuple(tiled)
                est = estimate_bytes(segs, shape, chunk, tl, tiled, element_size, keep_output, keep)
                if est <= budget:
                    whole = tl is None and chunk == t and chunk_frames is None
                    return DecodePlan(None if whole else chunk, tl, tiled, est, keep)
                smallest = min(smallest or (est, chunk, tl), (est, chunk, tl), key=lambda e: e[0])
    est, chunk, tl = smallest
    hint = " (decode keeps the whole output video; decode_stream yields it chunk by chunk)" if keep_output else ""
    raise ValueError(f"max_memory_gb: {max_memory_gb} GB is below the smallest estimated peak, "
                     f"{est / 2 ** 30:.3f} GB (chunk_frames={chunk}, tile={tl}) for a latent of shape "
                     f"{tuple(shape)}{hint}")
