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

Planning. `estimate_bytes` bounds the peak bytes of a decode for a chunk size, a tile size
and the segments tiled, by replaying the decode's allocations layer by layer (the decoder's
weights, the output, the carried frames of every convolution, and the largest segment's
working set with each layer's temporaries; "Memory planning" below). `plan_decode` returns
the fastest plan whose estimate fits the budget: untiled with the largest chunk, else tiled,
fewest tiles first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import sora_kernels as sk

from sora_model.vae import CausalConv3d, DecodeState, GroupNormSiLU, ResBlock, Upsample, empty_like_layout, run_layers


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
                h = mid = None          # not held while the next tile runs
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
            out = empty_like_layout(y, (*y.shape[:3], H, W))
        out[..., t.at[0]:t.at[0] + th, t.at[1]:t.at[1] + tw] = y[..., oy:oy + th, ox:ox + tw]
        del y                           # not held while the next tile runs
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
#
# estimate_bytes replays the allocations of a decode layer by layer, in the order vae.py makes
# them, and keeps the largest total. What is alive at the peak:
#   weights   the decoder's parameters (resident: peak_bytes counts them; on CUDA as `resident`);
#   fixed     the de-normalised latent; the output video (decode), and the previous chunk, which
#             decode's loop (or decode_stream's caller) holds while the next one is decoded;
#   carried   each causal convolution's last input frames, per tile in a tiled segment;
#   segment   the largest segment's working set: its input (held while it runs), each layer's
#             input, output and temporaries, and in a tiled segment the whole frames in and out,
#             the tile's crop of the input and what the tiles keep between statistics passes.
# The temporaries, measured per layer on CPU (oneDNN; small config):
#   - a oneDNN convolution on contiguous tensors reorders its input, its weights and its output
#     to blocked layouts (one copy each; which of them depends on the channel counts) and writes
#     the plain output; on channels-last ones (CPU inference's, vae.inference_layout) it copies
#     the input and the weights (three copies, vae.conv3d's conversion included) and takes a
#     scratch that grows with the threads;
#   - CausalConv3d, first chunk (`_from_zeros`): the leading frames' convolutions, each with a
#     slice of the weights (copied to the conv layout), and the rest's, then torch.cat of their outputs; later
#     chunks: torch.cat of the carried frames and the input (the frames kept for the next chunk
#     then replace the carried ones, counted above);
#   - the sub-pixel up-sampling convolution (`_conv_upsampled`), per call: its phase kernels
#     (16/9 of the weights, built from slices' sums), reordered by oneDNN as above, the 4 C_out
#     phase outputs on an (h + 1) x (w + 1) grid, then the interleaved output;
#   - Upsample in time (`_forward_upsampled_t`): the output, allocated first; its kernels; each
#     sub-pixel convolution's phase kernels and phase outputs as above, written into the output;
#     a later chunk's cat of the carried frame and the input. A ResBlock: its input (held to
#     the skip), each norm's output, the 1 x 1 skip convolution (oneDNN as above); the sum is
#     added into conv2's output in place (without autograd: what a budget bounds);
#   - the norms of a tiled segment: a statistics pass may copy the tile's own pixels in float64
#     (group_norm_moments' reference backend; the C++ and Triton kernels read them in place).
# Measured against peak_bytes on CPU: docs/NOTES-vae.md, tests/test_vae_tiling.py.


@dataclass(frozen=True)
class DecodePlan:
    chunk_frames: int | None       # None: all latent frames at once
    tile: tuple[int, int] | None   # latent pixels; None: whole frames
    tiled: tuple[bool, ...] = ()   # per segment: runs in tiles
    estimate_bytes: int = 0
    keep_inputs: bool = True       # tiled segments keep layer inputs between statistics passes (run_tiled)


class _Size:
    """Elements as a function of the frame a segment runs on, h x w at its input resolution:
    c[0] h w + c[1] h + c[2] w + c[3]. A segment is replayed once with symbolic h and w, then
    evaluated for every frame or tile size."""
    __slots__ = ("c",)

    def __init__(self, c: tuple[int, int, int, int]):
        self.c = c

    def __add__(self, other):
        o = other.c if isinstance(other, _Size) else (0, 0, 0, other)
        return _Size(tuple(a + b for a, b in zip(self.c, o)))

    __radd__ = __add__

    def __neg__(self):
        return _Size(tuple(-a for a in self.c))

    def __sub__(self, other):
        return self + -other

    def __mul__(self, other):
        if not isinstance(other, _Size):
            return _Size(tuple(a * other for a in self.c))
        (a, b, c, d), (e, f, g, k) = self.c, other.c   # (b h + d)(g w + k), or (c w + d)(f h + k)
        if a or e or (b and f) or (c and g):
            raise ValueError("_Size: only (a h + b)(c w + d) products stay in h w, h, w, 1")
        return _Size((b * g + c * f, b * k + d * f, c * k + d * g, d * k))

    __rmul__ = __mul__

    def at(self, h: int, w: int) -> int:
        return self.c[0] * h * w + self.c[1] * h + self.c[2] * w + self.c[3]


_H, _W = _Size((0, 1, 0, 0)), _Size((0, 0, 1, 0))


class _Replay:
    """The elements alive during a replayed run (`now`), and every total an allocation reached
    (`tops`: the peak is the largest, for the frame size in question). B: the batch.
    channels_last: the convolutions run on channels-last-3d tensors (vae.CPU_CHANNELS_LAST)."""

    def __init__(self, batch: int, now, channels_last: bool = False):
        self.B, self.now, self.tops, self.channels_last = batch, now, [now], channels_last

    def alloc(self, *sizes) -> None:
        self.now = sum(sizes, self.now)
        self.tops.append(self.now)

    def free(self, *sizes) -> None:
        self.now = self.now - sum(sizes)

    def peaks(self) -> list[_Size]:
        """The totals that can be the peak: those no other total bounds term by term."""
        tops = sorted({top.c for top in self.tops}, reverse=True)
        kept: list[tuple] = []
        for c in tops:
            if not any(all(k >= x for k, x in zip(other, c)) for other in kept):
                kept.append(c)
        return [_Size(c) for c in kept]


def _blocked(c: int) -> int:
    """Channels of a blocked layout: padded to a multiple of 16 (oneDNN's blocks: 8 with AVX2,
    16 with AVX-512; a 3-channel output is reordered as 8 here)."""
    return -(-c // 16) * 16


def _onednn_conv(r: _Replay, inp, weight: int, pixels, channels: int):
    """One convolution (torch.mkldnn_convolution; F.conv3d off CPU) of inp elements, with
    `weight` elements per output channel, into `channels` x `pixels` elements: blocked copies of
    all three, then the plain output, which it leaves allocated. (Measured: oneDNN copies the
    input and the weights, or makes a blocked output, or, at 3 output channels, all three.)
    Channels-last (measured, 16 to 256 channels): a copy of the input, three of the weights
    (vae.conv3d's conversion, the parameters being contiguous, then oneDNN's) and a scratch of
    about 4 KB a thread (12-13 KB at 2 threads, 57 KB more at 16), then the output; the replay
    takes 32 KB + 8 KB a thread (a tiny plan measured 22 KB over a 16 KB allowance at 2)."""
    if r.channels_last:
        scratch = (32768 + 8192 * torch.get_num_threads()) // 4     # elements (fp32 only: 4 bytes)
        r.alloc(inp, 3 * weight * channels + scratch, pixels * channels)
        r.free(inp, 3 * weight * channels + scratch)
        return pixels * channels
    blocked = _blocked(channels)
    r.alloc(inp, weight * blocked, pixels * blocked, pixels * channels)
    r.free(inp, weight * blocked, pixels * blocked)
    return pixels * channels


def _causal_conv(r: _Replay, conv: CausalConv3d, t: int, h, w, first: bool):
    """CausalConv3d.forward on [B, C_in, t, h, w] (held by the caller); leaves its output
    allocated. Returns it: (elements, height, width)."""
    ci, co, p, B = conv.conv.in_channels, conv.conv.out_channels, conv.pad_t, r.B
    up = conv.upsample
    oh, ow = (2 * h, 2 * w) if up else (h, w)
    tap = 9 * ci * co                                    # weights per temporal tap

    def one(t_in: int, kt: int, sliced: bool):           # a convolution of t_in frames with kt taps
        t_out = t_in - kt + 1
        if sliced:
            r.alloc(tap * kt)                            # weight[:, :, p - k:].contiguous()
        if up:
            y = _sub_pixel_conv(r, B * ci * t_in * h * w, ci, co, kt, B * t_out * (h + 1) * (w + 1))
            out = B * co * t_out * oh * ow
            r.alloc(out)
            r.free(y)
        else:
            out = _onednn_conv(r, B * ci * t_in * h * w, 9 * ci * kt, B * t_out * oh * ow, co)
        if sliced:
            r.free(tap * kt)
        return out

    if p == 0:
        return one(t, 1, False), oh, ow
    if not first:                                        # the carried frames, then this chunk's
        padded = B * ci * (t + p) * h * w                # (the frames kept for the next chunk replace
        r.alloc(padded)                                  # the carried ones before the convolution)
        out = one(t + p, p + 1, False)
        r.free(padded)
        return out, oh, ow
    parts = [one(k + 1, k + 1, True) for k in range(min(p, t))]   # the leading frames, behind zeros
    if t > p:
        parts.append(one(t, p + 1, False))
    out = sum(parts[1:], parts[0])
    if len(parts) > 1:                                   # torch.cat
        r.alloc(out)
        r.free(out)
    return out, oh, ow


def _conv_upsampled_t(r: _Replay, conv: CausalConv3d, t: int, h, w, first: bool):
    """CausalConv3d._forward_upsampled_t on [B, C_in, t, h, w] (held by the caller): the output
    allocated first, then each sub-pixel convolution writing into it (the video's frame 0 on its
    own; the pairs of frames, once per copy); a later chunk's pairs are the carried frame and
    the input, concatenated. Leaves the output allocated; returns (elements, 2h, 2w)."""
    ci, co, B = conv.conv.in_channels, conv.conv.out_channels, r.B
    out = B * co * (2 * t - 1 if first else 2 * t) * 2 * h * 2 * w
    r.alloc(out)

    def one(t_in: int, kt: int):                         # _conv_upsampled into a view of out
        taps = 9 * ci * co * kt if kt > 1 else 0         # the stacked temporal taps (one tap: a view)
        r.alloc(taps)
        y = _sub_pixel_conv(r, B * ci * t_in * h * w, ci, co, kt, B * (t_in - kt + 1) * (h + 1) * (w + 1))
        r.free(y, taps)

    if first:
        one(1, 1)
        if t > 1:
            one(t, 2)                                    # second copies
            one(2, 2)                                    # the copy of x[1] after frame 0
        if t > 2:
            one(t - 1, 2)                                # first copies
    else:                                                # (after a lone frame 0: one more call, no larger)
        pairs = B * ci * (t + 1) * h * w
        r.alloc(pairs)
        one(t + 1, 2)
        r.free(pairs)
    return out, 2 * h, 2 * w


def _sub_pixel_conv(r: _Replay, inp, ci: int, co: int, kt: int, grid):
    """CausalConv3d._conv_upsampled's convolution of inp elements on a `grid` of (h + 1) x
    (w + 1) pixels x output frames: the phase kernels (16 / 9 of the kt-tap weights, each
    entry the sum of a slice of at most 4 / 9 of them), then oneDNN (as above) with 4 C_out
    outputs. Leaves the phase outputs allocated (the caller frees them once interleaved):
    returns them."""
    k = ci * co * kt
    r.alloc(21 * k)
    r.free(5 * k)
    y = _onednn_conv(r, inp, 4 * ci * kt, grid, 4 * co)
    r.free(16 * k)
    return y


def _layer(r: _Replay, layer: nn.Module, c: int, t: int, h, w, first: bool, tiled: bool):
    """A decoder layer on [B, c, t, h, w] (held by the caller); leaves its output allocated and
    returns it: (elements, channels, frames, height, width)."""
    B = r.B
    if isinstance(layer, CausalConv3d):
        out, h, w = _causal_conv(r, layer, t, h, w, first)
        return out, layer.conv.out_channels, t, h, w
    if isinstance(layer, GroupNormSiLU):
        _norm(r, B * c * t * h * w, tiled)
        return B * c * t * h * w, c, t, h, w
    if isinstance(layer, Upsample):
        if layer.temporal:
            out, h, w = _conv_upsampled_t(r, layer.conv, t, h, w, first)
            return out, c, 2 * t - 1 if first else 2 * t, h, w
        out, h, w = _causal_conv(r, layer.conv, t, h, w, first)
        return out, c, t, h, w
    if isinstance(layer, ResBlock):
        co, a = layer.conv1.conv.out_channels, B * t * h * w
        _norm(r, c * a, tiled)
        h1, _, _ = _causal_conv(r, layer.conv1, t, h, w, first)
        r.free(c * a)
        _norm(r, co * a, tiled)
        h2, _, _ = _causal_conv(r, layer.conv2, t, h, w, first)
        r.free(co * a, h1)
        skip = _onednn_conv(r, c * a, c, a, co) if isinstance(layer.skip, nn.Conv3d) else 0
        r.free(skip)                                     # summed into h2 in place
        return h2, co, t, h, w
    raise TypeError(f"estimate_bytes: no memory model for {type(layer).__name__}")


def _norm(r: _Replay, x, tiled: bool) -> None:
    """A GroupNormSiLU's output, left allocated; in a tiled segment first the float64 copy a
    statistics pass may take."""
    if tiled:
        r.alloc(2 * x)
        r.free(2 * x)
    r.alloc(x)


def _replay_segment(seg: Segment, B: int, t: int, first: bool, tiled: bool, channels_last: bool) -> list[_Size]:
    """The segment's layers on its input [B, C_in, t, h, w] (held to the end: run_layers'
    caller keeps it), for symbolic h x w: the totals that can be its peak."""
    c, h, w = seg.in_channels, _H, _W
    x = B * c * t * h * w
    r = _Replay(B, x, channels_last)
    held = True
    for layer in seg.layers:
        out, c, t, h, w = _layer(r, layer, c, t, h, w, first, tiled)
        if not held:
            r.free(x)
        x, held = out, False
    return r.peaks()


def _chunk_frames(segs: list[Segment], t: int, chunk: int) -> list[list[tuple[int, bool]]]:
    """Per segment, the frames of its input (and whether the chunk is the first, which
    up-samples frame 0 to one frame and pads with zeros) in the first chunk and, when there are
    more, in the largest later chunk (the second); then the output's."""
    kinds, out = [(min(chunk, t), True)] + ([(min(chunk, t - chunk), False)] if t > chunk else []), []
    for seg in segs:
        out.append(kinds)
        if seg.temporal:
            kinds = [(2 * n - 1 if first else 2 * n, first) for n, first in kinds]
    return out + [kinds]


def _axis(n: int, side: int, seg: Segment) -> tuple[int, int]:
    """Largest and summed input extent (rows or columns at the segment's input resolution) of
    the tiles of `side` latent pixels along an axis of n (make_tiles' halos)."""
    f, s, N = seg.factor, seg.scale, n * seg.factor
    ext = [-(-min(N, min(y0 + side, n) * f + seg.halo) // s) - max(0, y0 * f - seg.halo) // s
           for y0 in range(0, n, side)]
    return max(ext), sum(ext)


def _kept_channels(layer: nn.Module) -> int:
    """Channels per pixel a tile keeps while its statistics passes stop inside `layer`
    (run_tiled): a ResBlock's input and conv1 output, a norm's input."""
    if isinstance(layer, ResBlock):
        return layer.conv1.conv.in_channels + layer.conv1.conv.out_channels
    return layer.weight.numel() if isinstance(layer, GroupNormSiLU) else 0


@dataclass(frozen=True)
class _SegmentCost:
    peak: tuple[int, int]          # elements of its working set: tiles keeping inputs, recomputing
    carried: int                   # elements of its convolutions' carried frames


class _Costs:
    """Estimates for one latent shape; plan_decode asks for many, so each segment is replayed
    once per (frames, first chunk, tiled) and evaluated per tile size."""

    def __init__(self, segs: list[Segment], shape: tuple[int, ...], element_size: int, keep_output: bool,
                 channels_last: bool = False):
        self.segs, self.shape, self.element_size, self.keep_output = segs, shape, element_size, keep_output
        self.channels_last = channels_last
        self.weights = sum(p.numel() * p.element_size() for seg in segs for layer in seg.layers
                           for p in layer.parameters())
        self._carried = [[(c.conv.in_channels * (1 if c.upsample_t else c.pad_t), c.upsample) for c in seg.convs]
                         for seg in segs]
        self._kept = [max(_kept_channels(layer) for layer in seg.layers) for seg in segs]
        self._replays: dict = {}
        self._axes: dict = {}
        self._costs: dict = {}
        self._chunks: dict = {}

    def _peak(self, s: int, t: int, first: bool, tiled: bool, h: int, w: int) -> int:
        key = (s, t, first, tiled)
        if key not in self._replays:
            self._replays[key] = [top.c for top in _replay_segment(self.segs[s], self.shape[0], t, first, tiled,
                                                                   self.channels_last)]
        return max(a * h * w + b * h + c * w + d for a, b, c, d in self._replays[key])

    def _frames(self, chunk: int) -> list[list[tuple[int, bool]]]:
        if chunk not in self._chunks:
            self._chunks[chunk] = _chunk_frames(self.segs, self.shape[2], chunk)
        return self._chunks[chunk]

    def _axis(self, s: int, n: int, side: int) -> tuple[int, int]:
        key = (s, n, side)
        if key not in self._axes:
            self._axes[key] = _axis(n, side, self.segs[s])
        return self._axes[key]

    def segment(self, s: int, chunk: int, tile: tuple[int, int] | None) -> _SegmentCost:
        """Segment s's cost, untiled (tile None) or tiled."""
        key = (s, chunk, tile)
        if key in self._costs:
            return self._costs[key]
        seg, (B, _, t, h, w) = self.segs[s], self.shape
        frames, sc = self._frames(chunk)[s], seg.scale
        H, W = h * seg.factor, w * seg.factor
        carried_of = self._carried[s]
        if tile is None:       # carried frames only when a next chunk takes them (_stream's update)
            peak = max(self._peak(s, n, first, False, H // sc, W // sc) for n, first in frames)
            carried = B * sum(k * (H // sc) * (W // sc) if up else k * H * W for k, up in carried_of) * (t > chunk)
            cost = _SegmentCost((peak, peak), carried)
        else:
            (eh, sh), (ew, sw) = self._axis(s, h, tile[0]), self._axis(s, w, tile[1])
            n_tiles = math.ceil(h / tile[0]) * math.ceil(w / tile[1])
            kept_channels, kept, recomputed = self._kept[s], 0, 0
            for n, first in frames:
                n_out = (2 * n - 1 if first else 2 * n) if seg.temporal else n
                whole = B * (seg.in_channels * n * (H // sc) * (W // sc) + seg.out_channels * n_out * H * W)
                work = whole + self._peak(s, n, first, True, eh, ew)     # the tile's crop is the replay's input
                keep = n_tiles * B * kept_channels * n_out * eh * sc * ew * sc
                kept, recomputed = max(kept, work + keep), max(recomputed, work)
            carried = B * sum(k * sh * sw if up else k * sh * sc * sw * sc for k, up in carried_of)
            cost = _SegmentCost((kept, recomputed), carried)
        self._costs[key] = cost
        return cost

    def fixed(self, chunk: int) -> int:
        """Elements alive throughout: the de-normalised latent and the output (above)."""
        B, C, t, h, w = self.shape
        seg = self.segs[-1]
        frame = B * seg.out_channels * h * seg.factor * w * seg.factor
        held = max(n for n, _ in self._frames(chunk)[-1]) if t > chunk else 0
        video = self._frames(t)[-1][0][0] if self.keep_output else 0
        return B * C * t * h * w + frame * (video + held)

    def bytes(self, chunk: int, tile: tuple[int, int] | None, tiled: tuple[bool, ...], keep_inputs: bool) -> int:
        costs = [self.segment(s, chunk, tile if tiled_s else None) for s, tiled_s in enumerate(tiled)]
        work = max(c.peak[0 if keep_inputs else 1] for c in costs)
        return self.weights + self.element_size * (self.fixed(chunk) + sum(c.carried for c in costs) + work)


def estimate_bytes(segs: list[Segment], shape: tuple[int, ...], chunk: int, tile: tuple[int, int] | None,
                   tiled: tuple[bool, ...], element_size: int, keep_output: bool, keep_inputs: bool = True,
                   channels_last: bool = False) -> int:
    """Estimated peak bytes of decoding a latent of `shape` [B, C, t, h, w] in chunks of
    `chunk` latent frames, the segments marked in `tiled` in tiles of `tile` latent pixels, the
    decoder's weights included: an upper bound of the measured peak (see above).
    channels_last: the convolutions run channels-last (vae.conv_layout)."""
    return _Costs(segs, shape, element_size, keep_output, channels_last).bytes(chunk, tile, tuple(tiled), keep_inputs)


def _tile_sides(n: int) -> list[int]:
    sides = {n} | {s for s in (64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if s < n}
    return sorted(sides, reverse=True)


def _tile_candidates(h: int, w: int) -> list[tuple[int, int]]:
    """Tile sizes to try, fastest first: the fewest tiles, then the largest (the least halo)."""
    tiles = [(th, tw) for th in _tile_sides(h) for tw in _tile_sides(w) if (th, tw) != (h, w)]
    return sorted(tiles, key=lambda tl: (math.ceil(h / tl[0]) * math.ceil(w / tl[1]), -tl[0] * tl[1]))


def _tilings(n: int) -> list[tuple[bool, ...]]:
    """Which of n segments to tile, fastest first: the fewest, then those at the highest
    resolution (the largest tiles in pixels: the least halo)."""
    masks = [tuple(bool(m >> s & 1) for s in range(n)) for m in range(2 ** n)]
    return sorted(masks, key=lambda m: (sum(m), [not x for x in reversed(m)]))


def plan_decode(decoder: nn.Module, shape: tuple[int, ...], max_memory_gb: float | None, element_size: int,
                chunk_frames: int | None = None, tile: tuple[int, int] | None = None,
                keep_output: bool = True, channels_last: bool = False) -> DecodePlan:
    """The decode plan for a latent of `shape`: chunk_frames and tile as given; with a budget,
    those not given chosen so the estimated peak fits, fastest first: the largest chunk
    untiled; else tiles, keeping layer inputs between statistics passes if any such plan fits
    (else recomputing them), the tile with the fewest (then largest) tiles, the largest chunk
    for it, and the fewest tiled segments (those at the highest resolution first). Every tiling
    of the segments is tried. ValueError, with the smallest estimate over all those plans, when
    none fits."""
    segs = segments_of(decoder)
    t, h, w = shape[2:]
    if max_memory_gb is None:
        if tile is None:
            return DecodePlan(chunk_frames, None, (False,) * len(segs))
        return DecodePlan(chunk_frames or 1, tile, (True,) * len(segs))
    budget = max_memory_gb * 2 ** 30
    chunks = [chunk_frames] if chunk_frames is not None else sorted({t} | {c for c in (16, 8, 4, 2, 1) if c < t},
                                                                    reverse=True)
    tiles = [tile] if tile is not None else _tile_candidates(h, w)
    costs = _Costs(segs, shape, element_size, keep_output, channels_last)
    tilings = _tilings(len(segs))
    smallest = None
    # untiled first; then tiled plans keeping layer inputs (each convolution once per tile),
    # then recomputing them (about 4x the convolutions of the tiled segments)
    for tl, keep in [(None, True)] * (tile is None) + [(tl, keep) for keep in (True, False) for tl in tiles]:
        for chunk in chunks:
            fixed = costs.weights + element_size * costs.fixed(chunk)
            untiled = [costs.segment(s, chunk, None) for s in range(len(segs))]
            by_tile = [costs.segment(s, chunk, tl) for s in range(len(segs))] if tl is not None else untiled
            options = [((u.carried, u.peak[0]), (c.carried, c.peak[0 if keep else 1]))
                       for u, c in zip(untiled, by_tile)]
            for tiled in (tilings[:1] if tl is None else tilings if tile is not None else tilings[1:]):
                chosen = [option[x] for option, x in zip(options, tiled)]
                est = fixed + element_size * (sum(c for c, _ in chosen) + max(p for _, p in chosen))
                if est <= budget:
                    whole = tl is None and chunk == t and chunk_frames is None
                    return DecodePlan(None if whole else chunk, tl, tiled, est, keep)
                if smallest is None or est < smallest[0]:
                    smallest = (est, chunk, tl, tiled)
    est, chunk, tl, tiled = smallest
    hint = " (decode keeps the whole output video; decode_stream yields it chunk by chunk)" if keep_output else ""
    raise ValueError(f"max_memory_gb: {max_memory_gb} GB is below the smallest estimated peak, "
                     f"{est / 2 ** 30:.3f} GB (chunk_frames={chunk}, tile={tl}, tiled segments {tiled}) for a "
                     f"latent of shape {tuple(shape)}{hint}")
