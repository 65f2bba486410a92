"""group_norm_silu: per-frame GroupNorm, affine and SiLU of video activations [B, C, T, H, W]
in one pass, in the contiguous or the channels-last-3d layout.

Statistics are per (b, t, group), so no frame's output depends on another frame: what lets
the causal video decoder run in temporal chunks exactly (sora_model/vae.py).

The Triton kernels see x as [B, C, T, S] (S = H * W) through its strides, so one kernel serves
both layouts (Triton specialises unit strides: the contiguous axis is read vectorised). A
program takes a [BLOCK_C, BLOCK_S] tile of one (b, t, group): the group's channels x a chunk
of the frame's positions.
  forward:  stats kernel (count, mean, M2 per tile) -> Chan's merge over the chunks (PyTorch,
            [B, T, G, chunks]) -> apply kernel (normalise, affine, SiLU)
  backward: reduce kernel (per tile: sums of dz*w and dz*w*xhat per group, of dz and dz*xhat
            per channel) -> sums over the chunks -> apply kernel (dx)
The C++ kernels are one dispatcher op, `sora_kernels::group_norm` (+ `group_norm_backward`),
with the same schema, outputs and saved statistics on both devices:
  CPU   csrc/vae/group_norm_cpu.cpp (fp32, OpenMP); also, CPU only, `group_norm_apply` (+
        `group_norm_apply_backward`: the statistics as constants) for given statistics
  CUDA  csrc/vae/group_norm_cuda.cu (fp32, fp16, bf16; fp32 math): per-channel shifted sums per
        piece of a plane / frame -> a finalize kernel per (b, t, group) (double) -> apply; the
        backward likewise. No atomics: the same bits on every run. On sm_90 a contiguous forward
        whose frame-groups fit reads x once (one thread-block cluster per (frame, group);
        SORA_KERNELS_GN_CLUSTER=0 turns it off).
On CUDA the "cuda" backend comes first: on an H200 (2026-11-26, 1x256x9x180x320 bf16) it ran
the forward in 0.23 / 0.25 ms (contiguous / channels-last) against Triton's 0.28 / 0.74, and
forward + backward in 0.63 / 0.79 ms against 1.37 / 1.82 (benchmarks/results/cuda-nvidia-h200.json).

Order: Triton kernels -> launchers -> custom ops and autograd -> checks -> backends -> public
function.
"""
from __future__ import annotations

import torch

from sora_kernels import backends as B
from sora_kernels.reference import vae_ops as ref

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

ACTS = ("silu", None)
TILE_ELEMENTS = 4096     # BLOCK_C * BLOCK_S of one program
NUM_WARPS = 8            # 16 elements a thread: 4 warps (32, each with an int64 offset) spilled up
                         # to 104 bytes in the backward and 16 in the apply (testing/aot.py, Triton 3.8)
MAX_GROUP_CHANNELS = 128  # C / num_groups the Triton kernels are compiled for


# -----------------------------------------------------------------------------
# Triton kernels
# -----------------------------------------------------------------------------

if B.TRITON_MISSING is None:

    @triton.jit
    def gn_tile_ids(T, S, Cg, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """This program's (chunk, group, frame bt, b, t, channels [BLOCK_C], positions [BLOCK_S],
        mask [BLOCK_C, BLOCK_S]) on the grid (chunks, groups, B * T) (shared with
        group_norm_moments' kernel)."""
        chunk = tl.program_id(0)
        g = tl.program_id(1)
        bt = tl.program_id(2)
        c = g * Cg + tl.arange(0, BLOCK_C)
        s = chunk * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (tl.arange(0, BLOCK_C) < Cg)[:, None] & (s < S)[None, :]
        return chunk, g, bt, bt // T, bt % T, c, s, mask

    @triton.jit
    def _gn_tile(T, S, Cg, sb, sc, st, ss, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """This program's tile: (offsets [BLOCK_C, BLOCK_S] int64, mask, channels, bt, group, chunk)."""
        chunk, g, bt, b, t, c, s, mask = gn_tile_ids(T, S, Cg, BLOCK_C, BLOCK_S)
        base = b.to(tl.int64) * sb + t.to(tl.int64) * st
        offs = base + c.to(tl.int64)[:, None] * sc + s.to(tl.int64)[None, :] * ss
        return offs, mask, c, bt, g, chunk

    @triton.jit
    def _silu_and_grad(z):
        """(silu(z), d silu / dz) in fp32."""
        sig = 1.0 / (1.0 + tl.exp(tl.minimum(-z, 80.0)))   # no overflow warning (masked lanes)
        return z * sig, sig * (1.0 + z * (1.0 - sig))

    @triton.jit
    def _gn_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, Cg, bt, g, G, BLOCK_C: tl.constexpr):
        """(channel mask, the group's mean and rstd, the tile's weight and bias in fp32)."""
        c_mask = tl.arange(0, BLOCK_C) < Cg
        mean = tl.load(mean_ptr + bt * G + g)
        rstd = tl.load(rstd_ptr + bt * G + g)
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        return c_mask, mean, rstd, w, bias

    @triton.jit
    def _gn_xhat_dz(x_ptr, dy_ptr, offs, mask, mean, rstd, w, bias, SILU: tl.constexpr):
        """(xhat, dz) of the tile: the normalised input (0 off the mask) and the gradient of
        z = xhat * w + b (through the SiLU when SILU)."""
        xhat = tl.where(mask, (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
        dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            _, grad = _silu_and_grad(xhat * w[:, None] + bias[:, None])
            dz = dz * grad
        return xhat, dz

    @triton.jit
    def store_tile_moments(part_ptr, x, mask, bt, g, G, n_chunks, chunk):
        """part[bt, g, chunk] = (count, mean, M2) of the tile x's masked elements (fp32; shared
        with group_norm_moments' kernel)."""
        n = tl.sum(tl.sum(mask.to(tl.float32), 1), 0)
        mean = tl.sum(tl.sum(x, 1), 0) / n
        d = tl.where(mask, x - mean, 0.0)
        m2 = tl.sum(tl.sum(d * d, 1), 0)
        out = part_ptr + ((bt * G + g) * n_chunks + chunk) * 3
        tl.store(out, n)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["T", "n_chunks"])
    def gn_stats_kernel(x_ptr, part_ptr, C, T, S, Cg, G, n_chunks, sb, sc, st, ss,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """part[bt, g, chunk] = (count, mean, M2) of the tile (fp32)."""
        offs, mask, c, bt, g, chunk = _gn_tile(T, S, Cg, sb, sc, st, ss, BLOCK_C, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        store_tile_moments(part_ptr, x, mask, bt, g, G, n_chunks, chunk)

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["T"])
    def gn_apply_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, C, T, S, Cg, G, sb, sc, st, ss,
                        SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """y = act((x - mean) * rstd * w[c] + b[c]) for the tile (y with x's strides)."""
        offs, mask, c, bt, g, chunk = _gn_tile(T, S, Cg, sb, sc, st, ss, BLOCK_C, BLOCK_S)
        c_mask, mean, rstd, w, bias = _gn_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, Cg, bt, g, G, BLOCK_C)
        scale = rstd * w
        shift = bias - mean * scale
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = x * scale[:, None] + shift[:, None]
        if SILU:
            z, _ = _silu_and_grad(z)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["T", "n_chunks"])
    def gn_bwd_reduce_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, group_part_ptr, chan_part_ptr,
                             dx_ptr, C, T, S, Cg, G, n_chunks, sb, sc, st, ss,
                             SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """group_part[bt, g, chunk] = (sum dz*w, sum dz*w*xhat) over the tile;
        chan_part[bt, chunk, c] = (sum dz, sum dz*xhat) per channel (dz: gradient of z).
        With dx_ptr (given statistics: constants, so the group means drop out of dx) it writes
        dx = rstd * w * dz instead of group_part, and the backward is this one pass."""
        offs, mask, c, bt, g, chunk = _gn_tile(T, S, Cg, sb, sc, st, ss, BLOCK_C, BLOCK_S)
        c_mask, mean, rstd, w, bias = _gn_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, Cg, bt, g, G, BLOCK_C)
        xhat, dz = _gn_xhat_dz(x_ptr, dy_ptr, offs, mask, mean, rstd, w, bias, SILU)
        sum_dz = tl.sum(dz, 1)                  # [BLOCK_C]
        sum_dz_xhat = tl.sum(dz * xhat, 1)
        if dx_ptr is not None:
            tl.store(dx_ptr + offs, (rstd * (dz * w[:, None])).to(dx_ptr.dtype.element_ty), mask=mask)
        else:
            out = group_part_ptr + ((bt * G + g) * n_chunks + chunk) * 2
            tl.store(out, tl.sum(sum_dz * w, 0))
            tl.store(out + 1, tl.sum(sum_dz_xhat * w, 0))
        chan = chan_part_ptr + ((bt.to(tl.int64) * n_chunks + chunk) * C + c) * 2
        tl.store(chan, sum_dz, mask=c_mask)
        tl.store(chan + 1, sum_dz_xhat, mask=c_mask)

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["T"])
    def gn_bwd_apply_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, m1_ptr, m2_ptr,
                            C, T, S, Cg, G, sb, sc, st, ss,
                            SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """dx = rstd * (dz * w - m1 - xhat * m2), m1 / m2 the group means of dz*w and dz*w*xhat."""
        offs, mask, c, bt, g, chunk = _gn_tile(T, S, Cg, sb, sc, st, ss, BLOCK_C, BLOCK_S)
        c_mask, mean, rstd, w, bias = _gn_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, Cg, bt, g, G, BLOCK_C)
        m1 = tl.load(m1_ptr + bt * G + g)
        m2 = tl.load(m2_ptr + bt * G + g)
        xhat, dz = _gn_xhat_dz(x_ptr, dy_ptr, offs, mask, mean, rstd, w, bias, SILU)
        dx = rstd * (dz * w[:, None] - m1 - xhat * m2)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# -----------------------------------------------------------------------------
# Launchers
# -----------------------------------------------------------------------------

def tile_config(group_channels: int) -> dict:
    """The kernels' launch config (constexprs and num_warps) for groups of `group_channels`."""
    bc = 1 << (group_channels - 1).bit_length()
    return {"BLOCK_C": bc, "BLOCK_S": max(16, TILE_ELEMENTS // bc), "num_warps": NUM_WARPS}


def config_space() -> list[dict]:
    return [tile_config(1 << p) for p in range(MAX_GROUP_CHANNELS.bit_length())]


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x in one of the two layouts the kernels read fast: channels-last-3d if it is, else contiguous."""
    return x if _channels_last(x) else x.contiguous()


def _geometry(x: torch.Tensor, num_groups: int):
    B_, C, T, H, W = x.shape
    S = H * W
    cfg = tile_config(C // num_groups)
    n_chunks = triton.cdiv(S, cfg["BLOCK_S"])
    strides = (x.stride(0), x.stride(1), x.stride(2), x.stride(4))
    return (B_, C, T, S, C // num_groups, n_chunks, strides, cfg, (n_chunks, num_groups, B_ * T))


def _affine(x, weight, bias):
    C = x.shape[1]
    w = weight.contiguous() if weight is not None else torch.ones(C, device=x.device, dtype=torch.float32)
    b = bias.contiguous() if bias is not None else torch.zeros(C, device=x.device, dtype=torch.float32)
    return w, b


def triton_forward(x, weight, bias, num_groups: int, eps: float, silu: bool):
    """(y like x, mean fp32 [B, T, G], rstd fp32 [B, T, G])."""
    x = _dense(x)
    B_, C, T, S, Cg, n_chunks, strides, cfg, grid = _geometry(x, num_groups)
    if x.numel() == 0:
        stats = torch.zeros((B_, T, num_groups), device=x.device, dtype=torch.float32)
        return torch.empty_like(x), stats, stats.clone()
    part = torch.empty((B_ * T, num_groups, n_chunks, 3), device=x.device, dtype=torch.float32)
    gn_stats_kernel[grid](x, part, C, T, S, Cg, num_groups, n_chunks, *strides, **cfg)
    n, m, m2 = part.unbind(-1)
    count = n.sum(-1)
    mu = (n * m).sum(-1) / count                                       # Chan's merge over the chunks
    m2 = m2.sum(-1) + (n * (m - mu[..., None]) ** 2).sum(-1)
    mean = mu.view(B_, T, num_groups)
    rstd = torch.rsqrt(m2 / count + eps).view(B_, T, num_groups)
    return triton_apply(x, weight, bias, mean, rstd, num_groups, silu), mean, rstd


def triton_apply(x, weight, bias, mean, rstd, num_groups: int, silu: bool):
    """y like x from given statistics (fp32 [B, T, G]): the forward's apply kernel alone."""
    x = _dense(x)
    B_, C, T, S, Cg, n_chunks, strides, cfg, grid = _geometry(x, num_groups)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    w, b = _affine(x, weight, bias)
    gn_apply_kernel[grid](x, y, mean.contiguous(), rstd.contiguous(), w, b, C, T, S, Cg, num_groups, *strides,
                          SILU=silu, **cfg)
    return y


def triton_backward(dy, x, weight, bias, mean, rstd, num_groups: int, silu: bool, given: bool = False):
    """(dx like x, dweight fp32 [C], dbias fp32 [C]); given: mean and rstd were inputs, not
    functions of x, so dx = rstd * w * dz (the group means m1, m2 drop out)."""
    x = _dense(x)
    dy = dy.contiguous(memory_format=torch.channels_last_3d) if _channels_last(x) else dy.contiguous()
    B_, C, T, S, Cg, n_chunks, strides, cfg, grid = _geometry(x, num_groups)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        zeros = torch.zeros(C, device=x.device, dtype=torch.float32)
        return dx, zeros, zeros.clone()
    w, b = _affine(x, weight, bias)
    group_part = None if given else torch.empty((B_ * T, num_groups, n_chunks, 2), device=x.device,
                                                dtype=torch.float32)
    chan_part = torch.empty((B_ * T, n_chunks, C, 2), device=x.device, dtype=torch.float32)
    gn_bwd_reduce_kernel[grid](x, dy, mean, rstd, w, b, group_part, chan_part, dx if given else None, C, T, S, Cg,
                               num_groups, n_chunks, *strides, SILU=silu, **cfg)
    if not given:  # dx needs the group means of dz*w and dz*w*xhat: a second pass
        sums = group_part.sum(2) / (Cg * S)                              # [B*T, G, 2]
        m1, m2 = sums[..., 0].contiguous(), sums[..., 1].contiguous()
        gn_bwd_apply_kernel[grid](x, dy, dx, mean, rstd, w, b, m1, m2, C, T, S, Cg, num_groups, *strides,
                                  SILU=silu, **cfg)
    chan = chan_part.sum((0, 1))                                         # [C, 2]
    return dx, chan[:, 1], chan[:, 0]


# -----------------------------------------------------------------------------
# Custom op and autograd (Triton)
# -----------------------------------------------------------------------------

@torch.library.custom_op("sora_kernels::group_norm_triton", mutates_args=())
def group_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                      eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_forward(x, weight, bias, num_groups, eps, silu)


def _fake(x, weight, bias, num_groups, eps, silu):
    memory_format = torch.channels_last_3d if _channels_last(x) else torch.contiguous_format
    stats = x.new_empty((x.shape[0], x.shape[2], num_groups), dtype=torch.float32)
    return torch.empty_like(x, memory_format=memory_format), stats, torch.empty_like(stats)


def _apply_fake(x, weight, bias, mean, rstd, num_groups, silu):
    memory_format = torch.channels_last_3d if _channels_last(x) else torch.contiguous_format
    return torch.empty_like(x, memory_format=memory_format)


def _setup(ctx, inputs, output):
    x, weight, bias, ctx.num_groups, _, ctx.silu = inputs
    _, mean, rstd = output
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward_with(run):
    """The autograd backward of a forward op whose backward op is `run` (same arguments for
    the Triton launcher and the compiled op)."""
    def backward(ctx, dy, _dmean, _drstd):
        return _input_grads(ctx, run, dy) + (None, None, None)
    return backward


def _input_grads(ctx, run, dy, **kw) -> tuple:
    """(dx, dweight, dbias) from the saved (x, weight, bias, mean, rstd) through `run`, the
    parameter gradients cast to their dtypes (None for absent ones)."""
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = run(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu, **kw)
    return (dx, dweight.to(weight.dtype) if ctx.has_weight else None,
            dbias.to(bias.dtype) if ctx.has_bias else None)


@torch.library.custom_op("sora_kernels::group_norm_triton_backward", mutates_args=())
def group_norm_triton_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                               bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                               silu: bool, given: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """triton_backward as an op, so that a compiled graph's backward traces it with its fake
    (a launch on fake tensors fails); dweight / dbias are empty where weight / bias are None,
    as the compiled CPU op's (_backward_fake)."""
    dx, dweight, dbias = triton_backward(dy, x, weight, bias, mean, rstd, num_groups, silu, given)
    return (dx, dweight.contiguous() if weight is not None else dweight.new_empty(0),
            dbias.contiguous() if bias is not None else dbias.new_empty(0))


group_norm_triton_backward.register_fake(
    lambda dy, x, weight, bias, mean, rstd, num_groups, silu, given=False:
    _backward_fake(dy, x, weight, bias, mean, rstd, num_groups, silu))
group_norm_triton.register_fake(_fake)
group_norm_triton.register_autograd(_backward_with(group_norm_triton_backward), setup_context=_setup)


@torch.library.custom_op("sora_kernels::group_norm_apply_triton", mutates_args=())
def group_norm_apply_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, silu: bool) -> torch.Tensor:
    return triton_apply(x, weight, bias, mean, rstd, num_groups, silu)


group_norm_apply_triton.register_fake(_apply_fake)


def _apply_setup(ctx, inputs, output):
    x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu = inputs
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _apply_backward(ctx, dy):
    return _input_grads(ctx, group_norm_triton_backward, dy, given=True) + (None, None, None, None)


group_norm_apply_triton.register_autograd(_apply_backward, setup_context=_apply_setup)


# -----------------------------------------------------------------------------
# Compiled op (C++ CPU): fake and autograd
# -----------------------------------------------------------------------------

def _backward_fake(dy, x, weight, bias, mean, rstd, num_groups, silu):
    """dweight and dbias come back in float32 from both devices (the autograd casts them)."""
    memory_format = torch.channels_last_3d if _channels_last(x) else torch.contiguous_format
    C = x.shape[1]
    return (torch.empty_like(x, memory_format=memory_format),
            x.new_empty(C if weight is not None else 0, dtype=torch.float32),
            x.new_empty(C if bias is not None else 0, dtype=torch.float32))


# One fake and one autograd for the op, whichever device kernels (CPU, CUDA) implement it.
if B.compiled_has("group_norm", "CPU"):
    torch.library.register_fake("sora_kernels::group_norm")(_fake)
    torch.library.register_fake("sora_kernels::group_norm_backward")(_backward_fake)
    torch.library.register_autograd(
        "sora_kernels::group_norm",
        _backward_with(lambda *args: torch.ops.sora_kernels.group_norm_backward(*args)), setup_context=_setup)
# Given statistics (CPU kernels only): the apply, and a backward that takes them as constants.
APPLY_BUILT = B.compiled_has("group_norm_apply", "CPU") and B.compiled_has("group_norm_apply_backward", "CPU")
if APPLY_BUILT:
    torch.library.register_fake("sora_kernels::group_norm_apply")(_apply_fake)
    torch.library.register_fake("sora_kernels::group_norm_apply_backward")(_backward_fake)
    torch.library.register_autograd(
        "sora_kernels::group_norm_apply",
        lambda ctx, dy: _input_grads(ctx, lambda *args: torch.ops.sora_kernels.group_norm_apply_backward(*args), dy)
        + (None, None, None, None),
        setup_context=_apply_setup)


# -----------------------------------------------------------------------------
# Checks
# -----------------------------------------------------------------------------

def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def check_video(x, num_groups) -> None:
    """x a floating-point [B, C, T, H, W], num_groups a positive divisor of C (shared with
    group_norm_moments)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 5-dim tensor [B, C, T, H, W], got {got}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point dtype, got {x.dtype}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of C={C}, got {num_groups!r}")


def check_args(x, num_groups, weight, bias, eps, act) -> None:
    check_video(x, num_groups)
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape ({C},), got {got}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: expected {x.dtype} on {x.device} like x, got {t.dtype} on {t.device}")
    if not B.finite_number(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    if act not in ACTS:
        raise ValueError(f"act: expected one of {ACTS}, got {act!r}")


def check_statistics(x, num_groups, statistics) -> None:
    """statistics: None or (mean, rstd), each float32 [B, T, num_groups] on x's device."""
    if statistics is None:
        return
    shape = (x.shape[0], x.shape[2], num_groups)
    if not isinstance(statistics, (tuple, list)) or len(statistics) != 2:
        raise ValueError(f"statistics: expected None or (mean, rstd), got {type(statistics).__name__}")
    for name, t in zip(("mean", "rstd"), statistics):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32 \
                or t.device != x.device:
            got = (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"statistics: expected {name} float32 [B, T, G] = {shape} on {x.device}, got {got}")


# -----------------------------------------------------------------------------
# Backends
# -----------------------------------------------------------------------------

def _cpu_reasons(x, num_groups, weight, bias, eps, act, statistics) -> list[str]:
    reasons = B.device_reasons("cpu", x.device, "group_norm")
    if x.dtype != torch.float32:
        reasons.append(f"the C++ kernels run float32, got {x.dtype}")
    if statistics is not None and not reasons and not APPLY_BUILT:
        reasons.append("given statistics: sora_kernels._C was built before its group_norm_apply")
    return reasons


def _cuda_reasons(x, num_groups, weight, bias, eps, act, statistics) -> list[str]:
    reasons = B.device_reasons("cuda", x.device, "group_norm")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"runs fp16, bf16 and fp32, got {x.dtype}")
    if statistics is not None:
        reasons.append("given statistics: the CUDA C++ kernels compute their own (the triton, cpu and reference "
                       "backends take them)")
    return reasons


def _compiled(x, num_groups, weight, bias, eps, act, statistics):
    """The dispatcher op (CPU or CUDA kernels by x's device; given statistics: CPU only)."""
    if statistics is not None:
        return torch.ops.sora_kernels.group_norm_apply(x, weight, bias, *statistics, num_groups, act == "silu")
    return torch.ops.sora_kernels.group_norm(x, weight, bias, num_groups, eps, act == "silu")[0]


def triton_reasons(x, num_groups, *rest, op: str = "group_norm_silu") -> list[str]:
    """Why the Triton kernels (group_norm_silu's, or op's built on them) cannot run on x."""
    reasons = B.device_reasons("triton", x.device, op)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"runs fp16, bf16 and fp32, got {x.dtype}")
    if x.shape[1] // num_groups > MAX_GROUP_CHANNELS:
        reasons.append(f"compiled for at most {MAX_GROUP_CHANNELS} channels per group, got {x.shape[1] // num_groups}")
    if x.shape[0] * x.shape[2] > 65535:
        reasons.append(f"B * T = {x.shape[0] * x.shape[2]} frames exceeds the grid's 65535")
    return reasons


# Priority: the CUDA C++ kernels before Triton's, faster in every row of the H200 benchmark
# (1.2x to 2.9x; the module docstring has the numbers).
def _triton(x, num_groups, weight, bias, eps, act, statistics):
    if statistics is not None:
        return group_norm_apply_triton(x, weight, bias, *statistics, num_groups, act == "silu")
    return group_norm_triton(x, weight, bias, num_groups, eps, act == "silu")[0]


def _reference(x, num_groups, weight, bias, eps, act, statistics):
    if statistics is not None:
        return ref.group_norm_silu_given(x, num_groups, *statistics, weight, bias, act)
    return ref.group_norm_silu(x, num_groups, weight, bias, eps, act)


GROUP_NORM_BACKENDS = (
    B.Backend("cuda", _cuda_reasons, _compiled),
    B.Backend("triton", triton_reasons, _triton),
    B.Backend("cpu", _cpu_reasons, _compiled),
    B.Backend("reference", lambda *args: [], _reference),
)


# -----------------------------------------------------------------------------
# Public function
# -----------------------------------------------------------------------------

def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, *, eps: float = 1e-6, act: str | None = "silu",
                    statistics: tuple[torch.Tensor, torch.Tensor] | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Per-frame GroupNorm, then weight / bias per channel, then SiLU (act="silu") or nothing
    (act=None), in one pass.

    Args:
        x: [B, C, T, H, W], contiguous or channels-last-3d (other layouts are copied to the
            contiguous one); statistics per (b, t, group) over C / num_groups channels and H x W.
        num_groups: any divisor of C.
        weight, bias: [C] or None.
        eps: added to the variance.
        act: "silu" or None.
        statistics: None, or (mean, rstd) float32 [B, T, num_groups] to normalise with instead
            of x's own (a tiled decode's whole-frame statistics). They are constants: no
            gradient flows to them (like running statistics in an evaluating BatchNorm), and
            eps is not used. Runs on the triton, cpu and reference backends.
        backend: "cuda" (C++), "triton", "cpu" (C++, fp32) or "reference"; by default the
            first that can run in that order.

    Returns y like x (same shape, dtype and layout). Differentiable in x, weight and bias.
    Equivalent PyTorch (GroupNorm over each frame as an image)::

        y = F.group_norm(x.transpose(1, 2).flatten(0, 1), num_groups, weight, bias, eps)
        F.silu(y.unflatten(0, (B, T)).transpose(1, 2))
    """
    check_args(x, num_groups, weight, bias, eps, act)
    check_statistics(x, num_groups, statistics)
    args = (x, num_groups, weight, bias, float(eps), act, None if statistics is None else tuple(statistics))
    return B.select("group_norm_silu", GROUP_NORM_BACKENDS, args, backend).run(*args)
