"""final_layer_unpatchify: DiT's final layer on packed tokens, then unpack_unpatchify.

Per segment s (one video): norm(x) * (1 + scale[s]) + shift[s], then the linear projection to
P = C*pt*ph*pw patch features, then the patches written back into the video [C, T, H, W].

The Triton kernel reads x once. The modulation folds into the weight: with W_s = W * (1 +
scale[s]) (rounded to x's dtype), u_s = sum_k W_s[:, k] and c_s = W @ shift[s] + bias,

    y = rstd * (x @ W_s^T - mean * u_s) + c_s,

which is (x - mean) * rstd @ W_s^T + c_s exactly in real arithmetic (u_s sums the rounded W_s).
So a program multiplies BLOCK_M raw tokens of one video with W_s (a grouped GEMM: the B matrix
is its video's), gathers the row statistics from the same tiles (merged chunk by chunk with
Chan's formula, no E[x^2] - E[x]^2), applies them in the epilogue and stores the patches
straight into the video (the mirror of patch_embed3d). Neither the modulated [N, D]
activations nor the [N, P] patch matrix is written. W_s, u_s and c_s ([n, P, D], [n, P],
[n, P]) are computed per call with a few small PyTorch ops.

Order: Triton kernel -> launcher -> custom op and autograd -> backends -> public function.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sora_kernels import backends as B
from sora_kernels.ops.adaln_norm import ADALN_BACKENDS, ATOMIC_SUMS, MAX_D, adaln_norm_triton, \
    adaln_norm_triton_backward, check_like, check_norm, check_tokens
from sora_kernels.ops.pack_patchify import check_patch_size, pack_patchify, unpack_unpatchify
from sora_kernels.packed import Packed, check_packed
from sora_kernels.reference import dit_ops as ref

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

    from sora_kernels.ops.pack_patchify import owner_slot

# BLOCK_M consecutive tokens of one video x BLOCK_P patch features; BLOCK_K of D per step.
# BLOCK_P is the patch width rounded up to a power of two (at least 16, tl.dot's minimum), at
# most MAX_BLOCK_P: wider patches take several consecutive programs per tile (they read the
# same x rows, from L2 for all but the first).
# num_stages=1: with Triton 3.6 on an H200 the software-pipelined loop (num_stages 2 or 3) gave
# launch-to-launch different, wrong results at bench scale (0 to 6,353 of 3M elements, fp16 and
# bf16; num_warps=8 worse), a compiler race (programs write disjoint outputs). Unpipelined,
# 24 launches were bitwise repeatable and right; BLOCK_K=128 then measured 0.48 ms for the
# kernel (bf16, D=1152, P=64, mixed batch x4; 0.61 ms for the op in the bench suite, against
# 0.55 ms for the old pipelined 64 x 64 x 64 and 1.23 ms for torch.compile)
# (benchmarks/results/cuda-nvidia-h200.final_layer_race.json). BLOCK_P=128 was also wrong on
# the H200 (P=160) under the pipelined config; it stays off until measured unpipelined.
# BLOCK_K is smaller where 128 spilled (testing/aot.py, Triton 3.8): fp32 ("ieee" products on
# the FMA units, both tiles in registers: 7 KB per thread on sm_80 at BLOCK_P=64) takes 32, and
# the 16-wide patch tile 64 (16 bytes on sm_80 with LayerNorm).
CONFIG = {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}
MAX_BLOCK_P = 64
FP32_BLOCK_K = 32
NARROW_BLOCK_K = 64

if B.TRITON_MISSING is None:

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["n_videos", "search_steps"])
    def final_layer_kernel(
        x_ptr,                 # [N, D] packed tokens
        wmod_ptr,              # [n, P, D] W * (1 + scale[s]) per video, P = C*pt*ph*pw in (c, i, j, k) order
        u_ptr, c_ptr,          # fp32 [n, P]: sum over D of wmod; W @ shift[s] + bias
        seg_ptr,               # int32 [N] video of each token
        slots_ptr,             # int64 [n, 6]: output address, T, H, W, first token, first tile
        n_videos, search_steps,
        D, P, pt, ph, pw, eps,
        LAYER: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """videos[BLOCK_M tokens, BLOCK_P patch features] = rstd * (x @ W_s^T - mean * u_s) + c_s,
        scattered into the tokens' video."""
        p_blocks = tl.cdiv(P, BLOCK_P)
        tile = (tl.program_id(0) // p_blocks).to(tl.int64)  # the P blocks of a tile run side by side
        p = (tl.program_id(0) % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        slot = owner_slot(slots_ptr, tile, n_videos, search_steps)
        video_ptr = tl.load(slot).to(tl.pointer_type(x_ptr.dtype.element_ty))
        T = tl.load(slot + 1)
        H = tl.load(slot + 2)
        W = tl.load(slot + 3)
        # Grid indices in int32 (a video's tokens fit): the GPU divides int64 in a called routine.
        Hg = H.to(tl.int32) // ph
        Wg = W.to(tl.int32) // pw
        local = (tile - tl.load(slot + 5)).to(tl.int32) * BLOCK_M  # first token of the tile inside its video
        tok0 = tl.load(slot + 4) + local
        m = tl.arange(0, BLOCK_M)
        m_mask = local + m < (T.to(tl.int32) // pt) * Hg * Wg
        seg = tl.load(seg_ptr + tok0).to(tl.int64)      # every token of the tile is in one video
        x_tile = x_ptr + tok0 * D                       # the tile's rows, at offsets m * D + k
        p_mask = p < P
        w_rows = wmod_ptr + seg * P * D + p[None, :] * D

        acc = tl.zeros([BLOCK_M, BLOCK_P], tl.float32)
        mean = tl.zeros([BLOCK_M], tl.float32)
        m2 = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_mask = kk < D
            mask = m_mask[:, None] & k_mask[None, :]
            x = tl.load(x_tile + m[:, None] * D + kk[None, :], mask=mask, other=0.0)          # [BLOCK_M, BLOCK_K]
            w = tl.load(w_rows + kk[:, None], mask=k_mask[:, None] & p_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_P]
            acc += tl.dot(x, w, input_precision=PRECISION)
            xf = x.to(tl.float32)
            if LAYER:  # Chan's merge of this chunk's (mean, M2) into the running ones
                nb = tl.minimum(D - k0, BLOCK_K) * 1.0   # elements of this chunk, as a float
                chunk_mean = tl.sum(xf, 1) / nb
                d = tl.where(mask, xf - chunk_mean[:, None], 0.0)
                na = k0 * 1.0                            # elements merged so far
                delta = chunk_mean - mean
                mean += delta * (nb / (na + nb))
                m2 += tl.sum(d * d, 1) + delta * delta * (na * nb / (na + nb))
            else:
                m2 += tl.sum(xf * xf, 1)
        rstd = 1.0 / tl.sqrt(m2 / D + eps)
        u = tl.load(u_ptr + seg * P + p, mask=p_mask, other=0.0)
        c = tl.load(c_ptr + seg * P + p, mask=p_mask, other=0.0)
        y = rstd[:, None] * (acc - mean[:, None] * u[None, :]) + c[None, :]

        # token (tt, hh, ww) of the video, patch feature (ch, i, j, k): element
        # [ch, tt*pt + i, hh*ph + j, ww*pw + k] of the video
        t_loc = local + m
        ww = t_loc % Wg
        hh = (t_loc // Wg) % Hg
        tt = t_loc // (Wg * Hg)
        token_off = ((tt * pt) * H + hh * ph) * W + ww * pw                                 # [BLOCK_M]
        ch = p // (pt * ph * pw)
        i = (p // (ph * pw)) % pt
        j = (p // pw) % ph
        k = p % pw
        feature_off = ((ch * T + i) * H + j) * W + k                                        # [BLOCK_P]
        tl.store(video_ptr + token_off[:, None] + feature_off[None, :], y.to(x_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & p_mask[None, :])


def block_p(P: int) -> int:
    return min(MAX_BLOCK_P, max(16, 1 << (P - 1).bit_length()))


def config(block_p: int, fp32: bool) -> dict:
    """The kernel's compile-time config for a BLOCK_P-wide patch tile of fp32 or 16-bit tokens."""
    block_k = FP32_BLOCK_K if fp32 else NARROW_BLOCK_K if block_p == 16 else CONFIG["BLOCK_K"]
    return dict(CONFIG, BLOCK_P=block_p, BLOCK_K=block_k)


def config_space(fp32: bool) -> list[dict]:
    """Every compile-time config the launcher can produce (compiled ahead of time in the tests)."""
    return [config(1 << p, fp32) for p in range(4, MAX_BLOCK_P.bit_length())]


def folded_weights(weight: torch.Tensor, bias: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor):
    """(W_s [n, P, D] in weight's dtype, u_s fp32 [n, P], c_s fp32 [n, P]): the modulation
    folded into the projection, per video."""
    wf = weight.float()
    wmod = (wf[None] * (1 + scale.float())[:, None, :]).to(weight.dtype)
    u = wmod.float().sum(-1)
    c = shift.float() @ wf.t()
    if bias is not None:
        c = c + bias.float()
    return wmod, u, c


def launch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None, seg: torch.Tensor, patch: Sequence[int], sizes: Sequence[Sequence[int]],
           eps: float, layer: bool) -> list[torch.Tensor]:
    """The videos [C, T, H, W] (sizes[v] = (T, H, W)) from contiguous tokens x [N, D], in one launch."""
    pt, ph, pw = patch
    P, D = weight.shape
    C = P // (pt * ph * pw)
    videos = [torch.empty((C, T, H, W), dtype=x.dtype, device=x.device) for T, H, W in sizes]
    bm = CONFIG["BLOCK_M"]
    rows, first_token, first_tile = [], 0, 0
    for v, (T, H, W) in zip(videos, sizes):
        rows.append([v.data_ptr(), T, H, W, first_token, first_tile])
        L = (T // pt) * (H // ph) * (W // pw)
        first_token += L
        first_tile += triton.cdiv(L, bm)
    if first_tile == 0:
        return videos
    slots = torch.tensor(rows, dtype=torch.int64).to(x.device, non_blocking=True)
    wmod, u, c = folded_weights(weight, bias, shift, scale)
    n = len(rows)
    fp32 = x.dtype == torch.float32
    cfg = config(block_p(P), fp32)
    final_layer_kernel[(first_tile * triton.cdiv(P, cfg["BLOCK_P"]),)](
        x, wmod, u, c, seg, slots, n, max(1, math.ceil(math.log2(n))) if n > 1 else 0,
        D, P, pt, ph, pw, eps, LAYER=layer, PRECISION="ieee" if fp32 else "tf32", **cfg)
    return videos


# -----------------------------------------------------------------------------
# Custom op and autograd
# -----------------------------------------------------------------------------

def _unflatten(flat: Sequence[int]) -> list[tuple[int, int, int]]:
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


@torch.library.custom_op("sora_kernels::final_layer_unpatchify_triton", mutates_args=())
def final_layer_unpatchify_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, segment_ids: torch.Tensor, patch_size: list[int],
                                  sizes: list[int], eps: float, layer: bool) -> list[torch.Tensor]:
    return launch(x.contiguous(), shift.contiguous(), scale.contiguous(), weight.contiguous(),
                  bias.contiguous() if bias is not None else None, segment_ids, patch_size, _unflatten(sizes),
                  eps, layer)


@final_layer_unpatchify_triton.register_fake
def _(x, shift, scale, weight, bias, segment_ids, patch_size, sizes, eps, layer):
    C = weight.shape[0] // (patch_size[0] * patch_size[1] * patch_size[2])
    return [x.new_empty((C, T, H, W)) for T, H, W in _unflatten(sizes)]


def _setup(ctx, inputs, output):
    x, shift, scale, weight, bias, seg, ctx.patch_size, _, ctx.eps, ctx.layer = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, shift, scale, weight, seg)


def _backward(ctx, grads):
    # The patch gradients are packed once (the copy kernel); the modulated norm is recomputed
    # (one read of x) for the weight gradient, and its backward is adaln_norm's kernel. Both
    # through adaln_norm's custom ops, not its launchers: under torch.compile AOTAutograd traces
    # this backward with fake tensors, which only an op with a fake implementation accepts.
    x, shift, scale, weight, seg = ctx.saved_tensors
    dpatches = pack_patchify(list(grads), ctx.patch_size).tokens                  # [N, P]
    normed, mean, rstd = adaln_norm_triton(x, shift, scale, None, seg, ctx.eps, ctx.layer)
    dweight = dpatches.t() @ normed if ctx.needs_input_grad[3] else None
    dbias = dpatches.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    dx, dshift, dscale = adaln_norm_triton_backward(dpatches @ weight, x, scale, None, seg, mean, rstd, ctx.layer)
    return dx, dshift, dscale, dweight, dbias, None, None, None, None, None


final_layer_unpatchify_triton.register_autograd(_backward, setup_context=_setup)


# -----------------------------------------------------------------------------
# Backends
# -----------------------------------------------------------------------------

def _triton_reasons(x, shift, scale, weight, bias, seg, patch, packed, eps, layer) -> list[str]:
    reasons = B.device_reasons("triton", x.device, "final_layer_unpatchify")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"runs fp16, bf16 and fp32, got {x.dtype}")
    if x.shape[1] > MAX_D:  # the backward runs adaln_norm's kernels
        reasons.append(f"compiled for rows of at most {MAX_D} elements, got D={x.shape[1]}")
    return reasons or B.deterministic_reasons((shift, scale), ATOMIC_SUMS["final_layer_unpatchify"])


def _unfused(backend: str):
    """adaln_norm on `backend`, the projection, then unpack_unpatchify (its best backend here)."""
    adaln = next(b for b in ADALN_BACKENDS if b.name == backend)

    def reasons(x, shift, scale, weight, bias, seg, patch, packed, eps, layer):
        return adaln.reasons(x, shift, scale, None, seg, eps, layer)

    def run(x, shift, scale, weight, bias, seg, patch, packed, eps, layer):
        if backend == "reference":
            return ref.final_layer_unpatchify(x, shift, scale, weight, bias, seg, patch, _sizes(packed, patch), eps,
                                              "layer" if layer else "rms")
        tokens = torch.nn.functional.linear(adaln.run(x, shift, scale, None, seg, eps, layer), weight, bias)
        return unpack_unpatchify(tokens, packed, patch)
    return B.Backend(backend, reasons, run)


def _sizes(packed: Packed, patch) -> list[tuple[int, int, int]]:
    """(T, H, W) of each video of `packed`."""
    return [(t * patch[0], h * patch[1], w * patch[2]) for t, h, w in packed.grids]


FINAL_LAYER_BACKENDS = (
    B.Backend("triton", _triton_reasons,
              lambda x, shift, scale, weight, bias, seg, patch, packed, eps, layer:
              final_layer_unpatchify_triton(x, shift, scale, weight, bias, seg, list(patch),
                                            [s for size in _sizes(packed, patch) for s in size], eps, layer)),
    _unfused("cpu"),
    _unfused("reference"),
)


# -----------------------------------------------------------------------------
# Public function
# -----------------------------------------------------------------------------

def final_layer_unpatchify(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None, packed: Packed, patch_size, *, eps: float = 1e-6,
                           norm: str = "layer", backend: str | None = None) -> list[torch.Tensor]:
    """DiT's final layer and unpatchify, fused: each video's latent from the packed tokens.

    Args:
        x: [N, D] packed tokens in the layout of `packed` (the last block's output).
        shift, scale: [n, D], one row per video (its adaLN modulation).
        weight: [C*pt*ph*pw, D] (an nn.Linear weight; output features in (C, pt, ph, pw)
            order, as pack_patchify's tokens).
        bias: [C*pt*ph*pw] or None.
        packed: the Packed record of the batch (pack_patchify / patch_embed3d): its grids give
            each video's size, its segment_ids each token's video.
        patch_size: (pt, ph, pw) or one int.
        eps, norm: as adaln_norm ("layer": LayerNorm without affine, as DiT; or "rms").
        backend: "triton" (one fused kernel), "cpu" (adaln_norm's C++ kernel, a matrix product,
            unpack_unpatchify) or "reference".

    Returns a list of [C, Ti, Hi, Wi] in x.dtype, one per video. Differentiable in x, shift,
    scale, weight and bias. Equivalent PyTorch::

        tokens = F.linear(adaln_norm(x, shift, scale, packed.cu_seqlens), weight, bias)
        unpack_unpatchify(tokens, packed, patch_size)
    """
    check_tokens("x", x)
    layer = check_norm(norm, eps)
    patch = check_patch_size(patch_size)
    check_packed(packed, patch)
    n, D = len(packed.grids), x.shape[1]
    n_tokens = sum(t * h * w for t, h, w in packed.grids)
    if x.shape[0] != n_tokens:
        raise ValueError(f"x: expected N={n_tokens} tokens (the sum of packed.grids), got N={x.shape[0]}")
    check_like("shift", shift, x, (n, D))
    check_like("scale", scale, x, (n, D))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != D \
            or weight.shape[0] == 0 or weight.shape[0] % (patch[0] * patch[1] * patch[2]):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected [C*pt*ph*pw, D] = [C*{patch[0] * patch[1] * patch[2]}, {D}], got {got}")
    check_like("weight", weight, x, tuple(weight.shape))
    if bias is not None:
        check_like("bias", bias, x, (weight.shape[0],))
    if packed.cu_seqlens.device != x.device:
        raise ValueError(f"packed: expected its cu_seqlens on x's device {x.device}, got {packed.cu_seqlens.device}")
    args = (x, shift, scale, weight, bias, packed.segment_ids, patch, packed, float(eps), layer)
    return B.select("final_layer_unpatchify", FINAL_LAYER_BACKENDS, args, backend).run(*args)
