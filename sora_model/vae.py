"""A causal 3D convolutional video autoencoder, built so that decoding in temporal chunks is
exact.

Video [B, 3, T, H, W] with T = 1 + 4k <-> latent [B, 16, 1 + k, H/8, W/8] (by default). The
first frame is encoded on its own, so an image is a 1-frame video.

What makes chunked decoding exact (decode(latent, chunk_frames=n) equals decode(latent)):
  - every convolution is causal in time: zero padding of (kernel - 1) frames on the left,
    none on the right; in a chunked pass each one carries the last (kernel - 1) input frames
    of the previous chunk instead of the zeros;
  - normalisation statistics are per frame (sora_kernels.group_norm_silu);
  - temporal up-sampling maps each latent frame to its own output frames (frame 0 to one,
    every later frame to two), so it needs no neighbours;
  - there is no attention, temporal or spatial.
Peak memory of the chunked decode then depends on the chunk, not on T.

Layout follows DiT's models.py: a dataclass config with named sizes, shape comments,
explicit init.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

import sora_kernels as sk
from sora_model.checks import is_int, is_real


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 16
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)   # one stage each; a 2x spatial down-sample between stages
    temporal_down: tuple[bool, ...] = (True, True, False)  # which of those down-samples also halve time
    num_res_blocks: int = 2
    groups: int = 32
    eps: float = 1e-6
    # latent normalisation: z_model = (z - shift) * scale, undone before decoding
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temporal_down)


SIZES = {
    "tiny": VAEConfig(base_channels=16, channel_mults=(1, 2, 2, 2), num_res_blocks=1, groups=8),
    "small": VAEConfig(base_channels=64, channel_mults=(1, 2, 4, 4), num_res_blocks=1, groups=32),
    "base": VAEConfig(),
}


# -----------------------------------------------------------------------------
# Layers
# -----------------------------------------------------------------------------

@dataclass
class DecodeState:
    """What a chunked decode carries from chunk to chunk, passed down the decoder's forward.

    frames: each causal convolution's last (kernel - 1) input frames, by module id; for an
    up-sampling in time (CausalConv3d's upsample_t), its last input frame and whether that
    frame is the video's lone frame 0.
    update: whether this pass stores them (the statistics passes of a tiled decode only read).
    norms: a tiled decode's whole-frame GroupNorm statistics (vae_tiling.TileNorms); None:
    each norm computes the statistics of the frames it is given.
    """
    frames: dict = field(default_factory=dict)
    update: bool = True
    norms: object | None = None


class CausalConv3d(nn.Module):
    """Conv3d, causal in time (left zero padding of kernel_t - 1 frames), same in space.

    forward(x, state): with a DecodeState (chunked decoding) the left padding is the last
    kernel_t - 1 input frames of the previous chunk (zeros for the first), and the state
    keeps this chunk's last ones for the next.

    Where the left padding is zeros (a video's first chunk, or no state), the first
    kernel_t - 1 output frames are computed from the taps that see real frames only, instead
    of convolving zeros: an image (one frame) costs one tap instead of kernel_t, a 2-frame
    latent half its taps. Equal to the padded convolution up to the order of the additions.

    upsample: the convolution of x up-sampled 2x in space (nearest), computed from x without
    up-sampling it (a sub-pixel convolution, `_conv_upsampled`): 4 of the 3 x 3 kernel's 9
    spatial taps per output pixel. The carried frames are then x's, at its resolution.

    upsample_t (with upsample): x is also up-sampled 2x in time, as Upsample does (frame 0 of
    the video to one frame, every later frame to two), again without making the up-sampled
    frames (`_forward_upsampled_t`): each output frame reads two input frames, with the taps
    that read one frame summed, so 2 of the 3 temporal taps. The carried frame is x's last.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1,
                 upsample: bool = False, upsample_t: bool = False):
        super().__init__()
        if upsample and (kernel != 3 or stride != 1):
            raise ValueError(f"upsample: needs kernel 3 and stride 1, got kernel {kernel}, stride {stride}")
        if upsample_t and not upsample:
            raise ValueError("upsample_t: up-sampling in time needs upsample=True (in space too), got upsample=False")
        self.pad_t = kernel - 1
        self.stride = stride
        self.upsample = upsample
        self.upsample_t = upsample_t
        self.pad_s = kernel // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=(1, stride, stride),
                              padding=(0, self.pad_s, self.pad_s) if stride == 1 else 0)

    def forward(self, x: torch.Tensor, state: DecodeState | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W]
        if self.upsample_t:
            return self._forward_upsampled_t(x, state)
        if self.pad_t:
            left = state.frames.get(id(self)) if state is not None else None
            if left is None and self.stride == 1:
                if state is not None and state.update:
                    state.frames[id(self)] = self._last_frames(x)
                return self._from_zeros(x)
            if left is None:
                left = empty_like_layout(x, (x.shape[0], x.shape[1], self.pad_t, *x.shape[3:])).zero_()
            x = torch.cat([left, x], dim=2)
            del left                # the previous chunk's frames: freed when the state drops them below
            if state is not None and state.update:
                state.frames[id(self)] = x[:, :, -self.pad_t:].clone()
        if self.stride > 1:  # stride-2 down-sample: pad right / bottom only (as in LDM)
            x = F.pad(x, (0, 1, 0, 1))
        return self._conv(x, self.conv.weight)

    def _last_frames(self, x: torch.Tensor) -> torch.Tensor:
        """The last pad_t frames of x behind its zero padding: what the next chunk sees."""
        T = x.shape[2]
        if T >= self.pad_t:
            return x[:, :, T - self.pad_t:].clone()
        zeros = empty_like_layout(x, (x.shape[0], x.shape[1], self.pad_t - T, *x.shape[3:])).zero_()
        return torch.cat([zeros, x], dim=2)    # in x's layout: the next chunk's cat keeps it

    def _from_zeros(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of x behind pad_t zero frames, without the zeros: output frame
        t < pad_t from x[:t + 1] and the last t + 1 taps, the rest from x and every tap."""
        T, w = x.shape[2], self.conv.weight
        parts = [self._conv(x[:, :, :t + 1], w[:, :, self.pad_t - t:])
                 for t in range(min(self.pad_t, T))]
        if T > self.pad_t:
            parts.append(self._conv(x, w))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            return self._conv_upsampled(x, weight)
        return self._conv_valid_t(x, weight, self.conv.bias, self.conv.padding)

    def _conv_upsampled(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution (zero padding 1 in space) of x up-sampled 2x in space by nearest:
        [B, C, T, h, w] -> [B, C_out, T - kt + 1, 2h, 2w], without the up-sampled tensor.

        Output row 2i + a reads up-sampled rows 2i + a - 1 .. 2i + a + 1, which are input rows
        (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: two input rows, with the taps that
        share one summed (k0 | k1 + k2, or k0 + k1 | k2); the same for columns. So each of the
        four output phases (a, b) is a 2 x 2 convolution of x, and one convolution with the
        four phases' kernels as 4 C_out outputs and padding 1 gives them all on an (h + 1) x
        (w + 1) grid: phase (a, b)'s pixel (i, j) is at (i + a, j + b) there.

        bias: default self.conv.bias. out: where to write the result (a view, for example every
        other frame of a larger output); default a new tensor."""
        bias = self.conv.bias if bias is None else bias
        O, I, kt = weight.shape[:3]
        phases = torch.empty((4 * O, I, kt, 2, 2), dtype=weight.dtype, device=weight.device,  # in x's conv layout
                             memory_format=conv_layout(x)).unflatten(0, (2, 2, O))         # [a, b, O, I, kt, 2, 2]
        taps = (slice(0, 1), slice(1, 3)), (slice(0, 2), slice(2, 3))   # phase a's input row r: taps[a][r]
        for a in (0, 1):
            for b in (0, 1):
                for r in (0, 1):
                    for s in (0, 1):
                        phases[a, b, :, :, :, r, s] = weight[..., taps[a][r], taps[b][s]].sum((-2, -1))
        bias = bias.repeat(4) if bias is not None else None
        y = self._conv_valid_t(x, phases.flatten(0, 2), bias, (0, 1, 1))
        del phases
        B, _, T, h1, w1 = y.shape
        y = y.view(B, 2, 2, O, T, h1, w1)
        h, w = h1 - 1, w1 - 1
        if out is None:
            out = empty_like_layout(y, (B, O, T, 2 * h, 2 * w))
        view = out.unflatten(3, (h, 2)).unflatten(5, (w, 2))                             # [B, O, T, h, 2, w, 2]
        for a in (0, 1):
            for b in (0, 1):
                view[:, :, :, :, a, :, b] = y[:, a, b, :, :, a:a + h, b:b + w]
        return out

    def _forward_upsampled_t(self, x: torch.Tensor, state: DecodeState | None) -> torch.Tensor:
        """The convolution of x [B, C, n, h, w] up-sampled 2x in time (frame 0 of the video once,
        later frames twice: 2n - 1 frames for the video's first chunk, else 2n) and in space,
        causal in time: [B, C_out, 2n - 1 or 2n, 2h, 2w], from x's frames alone.

        With up-sampled frames u = (.., x[j-1], x[j-1], x[j], x[j], ..) and taps (k0, k1, k2) on
        (u[t-2], u[t-1], u[t]), the first copy of x[j] gives (k0 + k1) x[j-1] + k2 x[j] and the
        second k0 x[j-1] + (k1 + k2) x[j]: two 2-tap convolutions of the pairs (x[j-1], x[j]),
        each writing every other output frame. x[-1] is the carried frame, the previous chunk's
        last. Behind the video's zeros, frame 0 is k2 x[0] and the copy of x[1] after it
        k1 x[0] + k2 x[1] (u holds x[0] once): the state says whether its frame is that lone
        frame 0."""
        carried = state.frames.get(id(self)) if state is not None else None
        B, _, n, h, w = x.shape
        if state is not None and state.update:
            state.frames[id(self)] = (x[:, :, -1:].clone(), carried is None and n == 1)   # (frame, lone frame 0)
        k0, k1, k2 = self.conv.weight.unbind(2)
        out = empty_like_layout(x, (B, self.conv.out_channels, 2 * n - (carried is None), 2 * h, 2 * w))
        if carried is None:                 # the video's first chunk
            self._conv_upsampled(x[:, :, :1], k2.unsqueeze(2), out=out[:, :, :1])
            pairs, lone, o = x, True, 1
        else:
            pairs, lone, o = torch.cat([carried[0], x], dim=2), carried[1], 0
            del carried                     # the state holds this chunk's frame now
        if pairs.shape[2] < 2:
            return out
        self._conv_upsampled(pairs, torch.stack([k0, k1 + k2], 2), out=out[:, :, o + 1::2])     # second copies
        if lone:                            # the copy of x[1] after the lone frame 0
            self._conv_upsampled(pairs[:, :, :2], torch.stack([k1, k2], 2), out=out[:, :, o:o + 1])
            pairs, o = pairs[:, :, 1:], o + 2
        if pairs.shape[2] > 1:
            self._conv_upsampled(pairs, torch.stack([k0 + k1, k2], 2), out=out[:, :, o::2])      # first copies
        return out

    def _conv_valid_t(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      padding: tuple) -> torch.Tensor:
        """Conv3d of x (no temporal padding) with self.conv's stride."""
        return conv3d(x, weight, bias, self.conv.stride, padding)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1, 1),
           padding=(0, 0, 0)) -> torch.Tensor:
    """F.conv3d (dilation 1, one group); in CPU inference oneDNN's, in the layout
    CPU_CHANNELS_LAST picks. PyTorch's CPU conv3d takes its unblocked slow_conv3d path for
    inputs of at most 5 frames (a chunked decode's), about 10x slower per frame than oneDNN
    here (32 channels, 128 x 128: 75 ms vs 7 ms a frame); so oneDNN is called directly."""
    if _cpu_inference(x):
        layout = inference_layout(x.dtype, x.device)
        x, weight = x.contiguous(memory_format=layout), weight.contiguous(memory_format=layout)
        return torch.mkldnn_convolution(x, weight, bias, list(padding), list(stride), [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, stride, padding)


# CPU inference runs the convolutions on channels-last-3d tensors: oneDNN's NDHWC kernels
# take 0.5-0.7x the time of its NCDHW ones at this decoder's 16-32 channels (docs/NOTES-vae.md),
# and the layers keep that layout. False: contiguous throughout.
CPU_CHANNELS_LAST = True


def inference_layout(dtype: torch.dtype, device: torch.device) -> torch.memory_format:
    """The layout of the convolutions without autograd of tensors of that dtype on that device
    (what the memory planner models: a budget bounds such a decode)."""
    cl = CPU_CHANNELS_LAST and _onednn_dtype_device(dtype, device)
    return torch.channels_last_3d if cl else torch.contiguous_format


def conv_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout of x's convolutions' inputs and outputs (contiguous under autograd)."""
    return torch.contiguous_format if torch.is_grad_enabled() else inference_layout(x.dtype, x.device)


def empty_like_layout(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A new [B, C, T, H, W] tensor in the layout of x's convolutions' outputs."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=conv_layout(x))


def _cpu_inference(x: torch.Tensor) -> bool:
    """Whether conv3d calls oneDNN directly: CPU inference in eager mode (torch.compile cannot
    trace torch.mkldnn_convolution; compiled code takes F.conv3d)."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and _onednn_dtype_device(x.dtype, x.device))


_ONEDNN = torch.backends.mkldnn.is_available()   # read once: torch.compile cannot trace the call


def _onednn_dtype_device(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and _ONEDNN


class GroupNormSiLU(nn.Module):
    """Per-frame GroupNorm (statistics over each frame's H x W and the group's channels), then
    SiLU when act: sora_kernels.group_norm_silu. In a tiled decode (state.norms set) the
    statistics are the whole frame's, from the tiling's statistics passes."""

    def __init__(self, channels: int, groups: int, eps: float, act: bool = True):
        super().__init__()
        self.groups, self.eps, self.act = groups, eps, "silu" if act else None
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, state: DecodeState | None = None) -> torch.Tensor:
        if state is not None and state.norms is not None:
            return state.norms.run(self, x)
        return sk.group_norm_silu(x, self.groups, self.weight, self.bias, eps=self.eps, act=self.act)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = GroupNormSiLU(in_channels, cfg.groups, cfg.eps)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = GroupNormSiLU(out_channels, cfg.groups, cfg.eps)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, state: DecodeState | None = None) -> torch.Tensor:
        return self.finish(x, self.conv1(self.norm1(x, state), state), state)

    def finish(self, x: torch.Tensor, h: torch.Tensor, state: DecodeState | None = None) -> torch.Tensor:
        """The block from conv1's output h on (x: the block's input): where a tiled decode's
        pass resumes after the statistics pass of norm2 (vae_tiling.run_tiled)."""
        h = self.conv2(self.norm2(h, state), state)
        if isinstance(self.skip, nn.Conv3d):
            x = conv3d(x, self.skip.weight, self.skip.bias)
        if torch.is_grad_enabled():
            return x + h
        return h.add_(x)    # h: conv2's new output; in place, no fresh (page-faulting) tensor


class Downsample(nn.Module):
    """2x spatially (strided conv); in time (when temporal) frame 0 kept and later frames
    averaged in pairs: T = 1 + 2m -> 1 + m."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, channels, kernel=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal:
            first, rest = x[:, :, :1], x[:, :, 1:]
            rest = (rest[:, :, 0::2] + rest[:, :, 1::2]) * 0.5      # the pairs' means, in x's layout
            x = torch.cat([first, rest], dim=2)
        return self.conv(x)


class Upsample(nn.Module):
    """2x spatially (nearest, then a conv); in time (when temporal) frame 0 of the video to
    one frame and every later frame to two: T = 1 + m -> 1 + 2m. One sub-pixel convolution
    (CausalConv3d's upsample, and upsample_t when temporal) computes the conv of the
    up-sampled frames from the input's. `first`: the chunk holds frame 0 (a later chunk's
    state carries the previous chunk's last frame)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, channels, upsample=True, upsample_t=temporal)

    def forward(self, x: torch.Tensor, state: DecodeState | None = None, first: bool = True) -> torch.Tensor:
        if self.temporal and first == (state is not None and id(self.conv) in state.frames):
            raise RuntimeError(f"Upsample: first={first}, but the state {'holds' if first else 'lacks'} a previous "
                               f"chunk's frame")
        return self.conv(x, state)  # [B, C, T, 2H, 2W]


@dataclass
class DiagonalGaussian:
    """The posterior: mean and log-variance [B, latent, t, h, w]."""
    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to the standard normal, summed over latent elements, averaged over the batch."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(1).mean()


# -----------------------------------------------------------------------------
# Encoder / decoder
# -----------------------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0])
        self.blocks = nn.ModuleList()
        c = chans[0]
        for i, out in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResBlock(c, out, cfg))
                c = out
            if i < len(chans) - 1:
                self.blocks.append(Downsample(c, cfg.temporal_down[i]))
        self.mid = nn.ModuleList([ResBlock(c, c, cfg), ResBlock(c, c, cfg)])
        self.norm_out = GroupNormSiLU(c, cfg.groups, cfg.eps)
        self.conv_out = CausalConv3d(c, 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, T, H, W] -> [B, 2 * latent, 1 + (T - 1) / 4, H / 8, W / 8]
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(self.norm_out(h))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        c = chans[-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, c)
        self.mid = nn.ModuleList([ResBlock(c, c, cfg), ResBlock(c, c, cfg)])
        self.blocks = nn.ModuleList()
        for i in reversed(range(len(chans))):
            for _ in range(cfg.num_res_blocks + 1):
                self.blocks.append(ResBlock(c, chans[i], cfg))
                c = chans[i]
            if i > 0:
                self.blocks.append(Upsample(c, cfg.temporal_down[i - 1]))
        self.norm_out = GroupNormSiLU(c, cfg.groups, cfg.eps)
        self.conv_out = CausalConv3d(c, cfg.in_channels)

    def segments(self) -> list[list[nn.Module]]:
        """The layers in order, split before each Upsample: segment s runs at 2^s times the
        latent resolution. A tiled decode keeps whole frames only between segments, where
        they are smallest (before the up-sampling)."""
        out: list[list[nn.Module]] = [[]]
        for layer in [self.conv_in, *self.mid, *self.blocks, self.norm_out, self.conv_out]:
            if isinstance(layer, Upsample):
                out.append([])
            out[-1].append(layer)
        return out

    def forward(self, z: torch.Tensor, state: DecodeState | None = None, first: bool = True) -> torch.Tensor:
        # z: [B, latent, t, h, w] -> [B, 3, T, 8h, 8w] (T = 1 + 4(t - 1) when first, else 4t)
        h = z
        for layers in self.segments():
            h = run_layers(layers, h, state, first)
        return h


def run_layers(layers: list[nn.Module], x: torch.Tensor, state: DecodeState | None, first: bool) -> torch.Tensor:
    """x through a run of decoder layers (a segment, or a prefix of one)."""
    for layer in layers:
        x = layer(x, state, first) if isinstance(layer, Upsample) else layer(x, state)
    return x


# -----------------------------------------------------------------------------
# The autoencoder
# -----------------------------------------------------------------------------

class VideoAutoencoder(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        if len(cfg.temporal_down) != len(cfg.channel_mults) - 1:
            raise ValueError(f"temporal_down: expected {len(cfg.channel_mults) - 1} flags (one per down-sample), "
                             f"got {len(cfg.temporal_down)}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)
        # Residual branches start near zero: each block begins close to the identity.
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.normal_(m.conv2.conv.weight, std=1e-3)

    # ---- checks ----

    def check_video(self, video: torch.Tensor) -> None:
        cfg = self.cfg
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video: expected [B, {cfg.in_channels}, T, H, W], got {got}")
        B, C, T, H, W = video.shape
        if C != cfg.in_channels:
            raise ValueError(f"video: expected {cfg.in_channels} channels, got {C} (shape {tuple(video.shape)})")
        tc, sc = cfg.temporal_compression, cfg.spatial_compression
        if T < 1 or (T - 1) % tc:
            raise ValueError(f"video: expected T = 1 + {tc}k frames, got T={T}")
        if H < 1 or W < 1 or H % sc or W % sc:
            raise ValueError(f"video: expected H and W positive multiples of {sc}, got H={H}, W={W}")
        self._check_like_parameters("video", video)

    def check_latent(self, z: torch.Tensor) -> None:
        cfg = self.cfg
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != cfg.latent_channels:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latent: expected [B, {cfg.latent_channels}, t, h, w], got {got}")
        if min(z.shape[2:]) < 1:
            raise ValueError(f"latent: expected at least 1 frame and h, w >= 1, got {tuple(z.shape)}")
        self._check_like_parameters("latent", z)

    def _check_like_parameters(self, name: str, x: torch.Tensor) -> None:
        p = next(self.parameters())
        if x.dtype != p.dtype or x.device != p.device:
            raise ValueError(f"{name}: expected dtype {p.dtype} on {p.device}, like the autoencoder's parameters, "
                             f"got {x.dtype} on {x.device}")

    # ---- encode ----

    def encode(self, video: torch.Tensor) -> DiagonalGaussian:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> the posterior over latents
        [B, latent, 1 + k, H / 8, W / 8] (normalised: (z - shift_factor) * scaling_factor)."""
        self.check_video(video)
        moments = self.encoder(video)
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        cfg = self.cfg
        return DiagonalGaussian((mean - cfg.shift_factor) * cfg.scaling_factor,
                                logvar + 2 * math.log(cfg.scaling_factor))

    # ---- decode ----

    def _denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.cfg.scaling_factor + self.cfg.shift_factor

    def _denormalize_checked(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's input: z de-normalised and scanned for NaN and +-Inf in one pass
        (sora_kernels.latent_denorm); ValueError naming the latent frames that hold any."""
        out, nan = sk.latent_denorm(z, 1.0 / self.cfg.scaling_factor, self.cfg.shift_factor)
        if torch.compiler.is_compiling():   # tracing cannot read values
            if nan.device.type == "cpu":    # an assert in the graph: RuntimeError, without the frames
                torch._assert_async(~nan.any(), "latent: contains NaN or Inf")
            # on a GPU that assert would be a device-side one, which ends the process's CUDA
            # context, and a readable check needs a host sync the graph cannot hold: unchecked
            return out
        if bool(nan.any()):
            frames = nan.sum(0).nonzero().flatten().tolist()
            raise ValueError(f"latent: contains NaN or Inf ({int(nan.sum())} elements, in latent frames {frames[:8]}"
                             f"{'...' if len(frames) > 8 else ''})")
        return out

    def decode(self, z: torch.Tensor, chunk_frames: int | None = None, *, tile: tuple[int, int] | None = None,
               max_memory_gb: float | None = None) -> torch.Tensor:
        """latent [B, latent, t, h, w] -> video [B, 3, 1 + 4(t - 1), 8h, 8w].

        chunk_frames: decode that many latent frames at a time, carrying each causal
        convolution's last frames between chunks. None: all frames at once.
        tile: (th, tw) latent pixels: decode each frame in tiles of that size with halos equal
        to the receptive field and GroupNorm statistics of the whole frame (statistics passes
        first; sora_model/vae_tiling.py). Implies chunk_frames=1 unless given.
        max_memory_gb: choose chunk_frames and tile (those not given) so that the estimated
        peak, output included, fits; ValueError if no plan does.
        Every plan equals the full decode up to float reassociation (<= 1e-4 in fp32, tested)."""
        self.check_latent(z)
        plan = self.plan_decode(z, chunk_frames, tile, max_memory_gb, keep_output=True)
        z = self._denormalize_checked(z)
        if plan.chunk_frames is None and plan.tile is None:
            return self.decoder(z)
        B, _, t, h, w = z.shape
        sc = self.cfg.spatial_compression
        out = None
        for chunk in self._stream(z, plan):
            if out is None:
                out = empty_like_layout(chunk, (B, chunk.shape[1], 1 + self.cfg.temporal_compression * (t - 1),
                                                h * sc, w * sc))
                t0 = 0
            out[:, :, t0:t0 + chunk.shape[2]] = chunk
            t0 += chunk.shape[2]
        return out

    def decode_stream(self, z: torch.Tensor, chunk_frames: int | None | str = "auto", *,
                      tile: tuple[int, int] | None = None,
                      max_memory_gb: float | None = None) -> Iterator[torch.Tensor]:
        """Yields the decoded video in temporal chunks, [B, 3, frames, 8h, 8w] each (the
        first chunk 1 + 4(n - 1) frames, later ones 4n), as soon as each is decoded. tile and
        max_memory_gb as in decode (the budget counts one yielded chunk, not the video).
        chunk_frames: latent frames a chunk; "auto" (the default): 1, or with max_memory_gb the
        largest chunk the budget fits (as None does then; None without a budget: one chunk)."""
        if chunk_frames == "auto":
            chunk_frames = None if max_memory_gb is not None else 1
        elif chunk_frames is not None and (not is_int(chunk_frames) or chunk_frames < 1):
            raise ValueError(f"chunk_frames: expected a positive int, None or 'auto', got {chunk_frames!r}")
        self.check_latent(z)
        plan = self.plan_decode(z, chunk_frames, tile, max_memory_gb, keep_output=False)
        return self._stream(self._denormalize_checked(z), plan)

    def plan_decode(self, z: torch.Tensor, chunk_frames: int | None = None, tile: tuple[int, int] | None = None,
                    max_memory_gb: float | None = None, keep_output: bool = True):
        """The chunk and tile sizes decode / decode_stream use (vae_tiling.DecodePlan)."""
        from sora_model import vae_tiling
        if chunk_frames is not None and (not is_int(chunk_frames) or chunk_frames < 1):
            raise ValueError(f"chunk_frames: expected a positive int, got {chunk_frames!r}")
        if tile is not None:
            if (not isinstance(tile, (tuple, list)) or len(tile) != 2
                    or not all(is_int(v) and v > 0 for v in tile)):
                raise ValueError(f"tile: expected two positive ints (th, tw) in latent pixels, got {tile!r}")
            tile = (min(tile[0], z.shape[3]), min(tile[1], z.shape[4]))
        if max_memory_gb is not None and (not is_real(max_memory_gb) or not max_memory_gb > 0):
            raise ValueError(f"max_memory_gb: expected a positive number, got {max_memory_gb!r}")
        channels_last = inference_layout(z.dtype, next(self.decoder.parameters()).device) == torch.channels_last_3d
        return vae_tiling.plan_decode(self.decoder, tuple(z.shape), max_memory_gb, z.element_size(), chunk_frames,
                                      tile, keep_output, channels_last)

    def _stream(self, z: torch.Tensor, plan) -> Iterator[torch.Tensor]:
        """Decoded chunks of the de-normalised latent z, as the plan says."""
        from sora_model import vae_tiling
        chunk_frames = plan.chunk_frames or z.shape[2]
        last = (z.shape[2] - 1) // chunk_frames * chunk_frames      # the last chunk's first frame
        if plan.tile is None:
            state = DecodeState()
            for t0 in range(0, z.shape[2], chunk_frames):
                state.update = t0 < last      # the last chunk's frames would carry to no chunk: not copied
                yield self.decoder(z[:, :, t0:t0 + chunk_frames], state, first=t0 == 0)
            return
        segs = vae_tiling.segments_of(self.decoder)
        h, w = z.shape[3:]
        tiles = [vae_tiling.make_tiles(seg, h, w, plan.tile) if tiled else None for seg, tiled in zip(segs, plan.tiled)]
        states = [DecodeState() for _ in segs]       # the untiled segments' carried frames
        for t0 in range(0, z.shape[2], chunk_frames):
            x = z[:, :, t0:t0 + chunk_frames]
            for seg, seg_tiles, state in zip(segs, tiles, states):
                if seg_tiles is None:
                    state.update = t0 < last
                    x = run_layers(seg.layers, x, state, t0 == 0)
                else:
                    x = vae_tiling.run_tiled(seg, x, seg_tiles, t0 == 0, plan.keep_inputs)
            yield x

    def forward(self, video: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decoder(self._denormalize(z)), posterior


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """video [3, T, H, W] (or [1, 3, T, H, W]) in [-1, 1] -> uint8 frames [T, H, W, 3] for a
    video encoder: clamp, then round to 0..255, in one pass (sora_kernels.frames_to_uint8)."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"video: expected one video [1, 3, T, H, W], got {tuple(video.shape)}")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video: expected [3, T, H, W], got {tuple(video.shape)}")
    return sk.frames_to_uint8(video)


def vae_config(name: str, **overrides) -> VAEConfig:
    """A named size from SIZES, with fields overridden."""
    if name not in SIZES:
        raise ValueError(f"name: expected one of {sorted(SIZES)}, got {name!r}")
    return replace(SIZES[name], **overrides)


__all__ = ["VAEConfig", "SIZES", "vae_config", "VideoAutoencoder", "DiagonalGaussian", "CausalConv3d", "DecodeState",
           "to_uint8_frames"]
