"""patch_embed3d: pack_patchify fused with the patch projection (Conv3d with kernel = stride
= patch, applied to each video of a list), as an implicit GEMM that reads the patches straight
from the latents: the [N, C*pt*ph*pw] patch matrix is never written.

Order: Triton kernel -> launcher -> custom op and autograd -> backends -> public function.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F

from sora_kernels import backends as B
from sora_kernels.ops.pack_patchify import check_patch_size, check_videos, pack_patchify
from sora_kernels.packed import Packed, check_packed, packed_metadata
from sora_kernels.reference import patchify as ref

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

    from sora_kernels.ops.pack_patchify import owner_slot, tile_in_video

# (BLOCK_M tokens of one grid row, BLOCK_N output features, BLOCK_K patch features, warps)
CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
# fp32 ("ieee" products on the FMA units, both tiles in registers): 64 output features per
# program spilled 64 bytes on sm_80 (testing/aot.py, Triton 3.8); 32 do not.
FP32_CONFIG = dict(CONFIG, BLOCK_N=32)


def config(fp32: bool) -> dict:
    """The kernel's compile-time config for fp32 or 16-bit videos (compiled ahead of time in the tests)."""
    return FP32_CONFIG if fp32 else CONFIG


if B.TRITON_MISSING is None:

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["n_videos", "search_steps"])
    def patch_embed_kernel(
        slots_ptr,     # int64 [n, 6]: data address, T, H, W, first token, first tile of each video
        weight_ptr,    # [E, K] projection, K = C*pt*ph*pw in (c, i, j, k) order
        bias_ptr,      # [E], or None
        out_ptr,       # [N, E] embedded tokens
        n_videos, search_steps,
        C, pt, ph, pw, E, K,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[tokens of one tile, BLOCK_N features] = patches @ weight^T + bias, the patches
        gathered from the video: a tile is BLOCK_M tokens of one grid row (tt, hh)."""
        tile = tl.program_id(0).to(tl.int64)
        slot = owner_slot(slots_ptr, tile, n_videos, search_steps)
        video_ptr = tl.load(slot).to(tl.pointer_type(weight_ptr.dtype.element_ty))
        T, H, W, Wg, tt, hh, w0, tok0 = tile_in_video(slot, tile, ph, pw, BLOCK_M)
        m = tl.arange(0, BLOCK_M)
        m_mask = w0 + m < Wg
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < E
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)        # patch feature (c, i, j, k)
            k_mask = kk < K
            c = kk // (pt * ph * pw)
            i = (kk // (ph * pw)) % pt
            j = (kk // pw) % ph
            x = kk % pw
            offs = ((c.to(tl.int64) * T + tt * pt + i) * H + hh * ph + j) * W + x    # [BLOCK_K]
            a = tl.load(video_ptr + offs[None, :] + ((w0 + m) * pw)[:, None],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)                # [BLOCK_M, BLOCK_K]
            b = tl.load(weight_ptr + n.to(tl.int64)[None, :] * K + kk[:, None],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)                # [BLOCK_K, BLOCK_N]
            acc += tl.dot(a, b, input_precision=PRECISION)
        if bias_ptr is not None:
            acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + (tok0 + m).to(tl.int64)[:, None] * E + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def launch(videos: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
           patch: Sequence[int]) -> torch.Tensor:
    """Embedded tokens [N, E] of contiguous videos in one launch."""
    pt, ph, pw = patch
    E, K = weight.shape
    rows, first_token, first_tile = [], 0, 0
    for v in videos:
        _, T, H, W = v.shape
        grid = (T // pt, H // ph, W // pw)
        rows.append([v.data_ptr(), T, H, W, first_token, first_tile])
        first_token += grid[0] * grid[1] * grid[2]
        first_tile += grid[0] * grid[1] * triton.cdiv(grid[2], CONFIG["BLOCK_M"])
    out = torch.empty((first_token, E), dtype=weight.dtype, device=weight.device)
    if first_tile == 0:
        return out
    slots = torch.tensor(rows, dtype=torch.int64).to(weight.device, non_blocking=True)
    n = len(rows)
    fp32 = weight.dtype == torch.float32
    cfg = config(fp32)
    patch_embed_kernel[(first_tile, triton.cdiv(E, cfg["BLOCK_N"]))](
        slots, weight, bias, out, n, max(1, math.ceil(math.log2(n))) if n > 1 else 0, videos[0].shape[0], pt, ph, pw,
        E, K, PRECISION="ieee" if fp32 else "tf32", **cfg)
    return out


# -----------------------------------------------------------------------------
# Custom op and autograd
# -----------------------------------------------------------------------------

@torch.library.custom_op("sora_kernels::patch_embed3d_triton", mutates_args=())
def patch_embed3d_triton(videos: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                         patch_size: list[int]) -> torch.Tensor:
    return launch([v.contiguous() for v in videos], weight.contiguous(), bias, patch_size)


@patch_embed3d_triton.register_fake
def _(videos, weight, bias, patch_size):
    pt, ph, pw = patch_size
    n = sum((v.shape[1] // pt) * (v.shape[2] // ph) * (v.shape[3] // pw) for v in videos)
    return weight.new_empty((n, weight.shape[0]))


def _setup(ctx, inputs, output):
    videos, weight, bias, ctx.patch_size = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(weight, *videos)


def _backward(ctx, grad):
    # The backward materialises the patches once (pack_patchify) for the weight gradient and
    # sends the token gradient back through unpack_unpatchify: both are the fast copy kernels.
    weight, *videos = ctx.saved_tensors
    patches = pack_patchify(list(videos), ctx.patch_size).tokens if ctx.needs_input_grad[1] else None
    dweight = grad.t().to(weight.dtype) @ patches if patches is not None else None
    dbias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    dvideos = None
    if ctx.needs_input_grad[0]:
        packed = _metadata(videos, ctx.patch_size)
        from sora_kernels.ops.pack_patchify import unpack_unpatchify
        dvideos = unpack_unpatchify(grad @ weight, packed, ctx.patch_size)
    return dvideos, dweight, dbias, None


def _metadata(videos, patch) -> Packed:
    """A Packed record (no tokens) for videos: what unpack_unpatchify needs."""
    pt, ph, pw = patch
    grids = tuple((v.shape[1] // pt, v.shape[2] // ph, v.shape[3] // pw) for v in videos)
    cu_seqlens, grid_sizes, max_seqlen = packed_metadata(grids, videos[0].device)
    n = sum(t * h * w for t, h, w in grids)
    return Packed(videos[0].new_empty((n, 0)), cu_seqlens, videos[0].new_empty((n, 3), dtype=torch.int32),
                  grid_sizes, max_seqlen, grids, tuple(patch))


patch_embed3d_triton.register_autograd(_backward, setup_context=_setup)


# -----------------------------------------------------------------------------
# Backends
# -----------------------------------------------------------------------------

def _reasons(name: str):
    def reasons(videos, weight, bias, patch):
        if name != "triton":
            return []
        out = B.device_reasons("triton", weight.device, "patch_embed3d")
        if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            out.append(f"runs fp16, bf16 and fp32, got {weight.dtype}")
        return out
    return reasons


def _unfused(videos, weight, bias, patch):
    """pack_patchify (the best copy backend here) followed by the projection."""
    return torch.nn.functional.linear(pack_patchify(videos, patch).tokens, weight, bias)


def _reference(videos, weight, bias, patch):
    return torch.nn.functional.linear(ref.pack_patchify(videos, patch), weight, bias)


PATCH_EMBED_BACKENDS = (
    B.Backend("triton", _reasons("triton"),
              lambda videos, weight, bias, patch: patch_embed3d_triton(list(videos), weight, bias, list(patch))),
    B.Backend("cpu", lambda videos, weight, bias, patch: B.device_reasons("cpu", weight.device, "pack_patchify"),
              _unfused),
    B.Backend("reference", _reasons("reference"), _reference),
)


def _check_projection(weight, bias, C: int, patch: tuple[int, int, int], like: torch.Tensor):
    """weight as [E, K] (K = C*pt*ph*pw) and bias, checked against the input `like`."""
    K = C * patch[0] * patch[1] * patch[2]
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 5) or weight.shape[1:].numel() != K:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected [E, {C}, {patch[0]}, {patch[1]}, {patch[2]}] or [E, {K}], got {got}")
    if weight.dtype != like.dtype or weight.device != like.device:
        raise ValueError(f"weight: expected dtype {like.dtype} on {like.device} like the videos, "
                         f"got {weight.dtype} on {weight.device}")
    weight = weight.reshape(weight.shape[0], K)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != weight.dtype or bias.device != weight.device):
        got = (tuple(bias.shape), bias.dtype) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias: expected [{weight.shape[0]}] of dtype {weight.dtype}, got {got}")
    return weight, bias


def patch_embed3d(videos: Sequence[torch.Tensor] | Packed, weight: torch.Tensor, bias: torch.Tensor | None,
                  patch_size, *, backend: str | None = None) -> Packed:
    """Cuts videos of different sizes into spacetime patches and projects them: the packed
    equivalent of Conv3d(kernel_size=stride=patch) on each video, one sequence, no padding.

    Args:
        videos: list of [C, Ti, Hi, Wi] (as pack_patchify; each size divisible by the patch),
            or the Packed record pack_patchify made of them (its tokens are then projected:
            one matrix product, the record's metadata kept).
        weight: [E, C, pt, ph, pw] (a Conv3d weight) or [E, C*pt*ph*pw]; the videos' dtype.
        bias: [E] or None.
        patch_size: (pt, ph, pw) or one int.
        backend: "triton" (the fused implicit GEMM), "cpu" (pack_patchify's C++ kernel, then a
            matrix product) or "reference" (for a Packed record: "reference" or None).

    Returns Packed(tokens [N, E], cu_seqlens, positions, grid_sizes, max_seqlen, grids, patch_size,
    embedded=True).
    Differentiable in the videos, weight and bias. Equivalent PyTorch, per video::

        F.conv3d(v[None], weight, bias, stride=patch).flatten(2).transpose(1, 2)[0]
    """
    patch = check_patch_size(patch_size)
    volume = patch[0] * patch[1] * patch[2]
    if isinstance(videos, Packed):
        check_packed(videos, patch)
        if videos.embedded:
            raise ValueError("videos: expected a Packed record of patch tokens (pack_patchify's), got one whose "
                             "tokens are already embedded (patch_embed3d's output)")
        like = videos.tokens
        if like.dim() != 2 or like.shape[1] == 0 or like.shape[1] % volume:
            raise ValueError(f"videos: expected a Packed record of patch tokens [N, C*{volume}] (pack_patchify's), "
                             f"got tokens {tuple(like.shape)}")
        C = like.shape[1] // volume
    else:
        videos = check_videos(videos, patch)
        like = videos[0]
        C = like.shape[0]
    weight, bias = _check_projection(weight, bias, C, patch, like)
    if isinstance(videos, Packed):
        if backend not in (None, "reference"):
            raise ValueError(f"backend: a Packed record's tokens are projected by one matrix product (the "
                             f"reference), got {backend!r}")
        return replace(videos, tokens=F.linear(videos.tokens, weight, bias), embedded=True)
    args = (videos, weight, bias, patch)
    tokens = B.select("patch_embed3d", PATCH_EMBED_BACKENDS, args, backend).run(*args)
    meta = _metadata(videos, patch)
    positions = ref.packed_positions(meta.grids, tokens.device)
    return Packed(tokens, meta.cu_seqlens, positions, meta.grid_sizes, meta.max_seqlen, meta.grids, meta.patch_size,
                  embedded=True)
