"""group_norm_moments: per-frame GroupNorm statistics of any strided view of video activations
[B, C, T, H, W], as mean and M2 (the sum of squared deviations), which merge exactly across
pieces of a frame (Chan et al.'s pairwise formula). What a tiled decode's statistics passes
compute over each tile's own pixels (sora_model/vae_tiling.py), before group_norm_silu
normalises every tile with the whole frame's statistics (its `statistics=` argument).

Backends:
  triton     group_norm_silu's statistics kernel reading the view through all five strides (no
             copy): count, mean and M2 per tile of a (b, t, group) in fp32, merged over the
             tiles in float64
  cpu        sora_kernels::group_norm_moments (csrc/vae/group_norm_cpu.cpp, fp32 input): reads
             the view in place (no copy); per (b, t, group) shifted sums, float within rows'
             blocks of 256 and double across
  reference  float64, two passes

Order: Triton kernel -> launcher -> custom op -> checks -> backends -> public function.
"""
from __future__ import annotations

import torch

from sora_kernels import backends as B
from sora_kernels.ops.group_norm_silu import check_video, tile_config, triton_reasons
from sora_kernels.reference import vae_ops as ref

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

    from sora_kernels.ops.group_norm_silu import gn_tile_ids, store_tile_moments

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["T", "n_chunks"])
    def gn_moments_kernel(x_ptr, part_ptr, T, W, S, Cg, G, n_chunks, sb, sc, st, sh, sw,
                          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """part[bt, g, chunk] = (count, mean, M2) of a [BLOCK_C, BLOCK_S] tile of (frame bt,
        group g): the group's channels x positions s = h * W + w of the frame, read through all
        five strides of x (any view, as a tile's own pixels: no copy). group_norm_silu's stats
        kernel with the frame's rows strided apart."""
        chunk, g, bt, b, t, c, s, mask = gn_tile_ids(T, S, Cg, BLOCK_C, BLOCK_S)
        h = s // W
        w = s - h * W
        offs = (b.to(tl.int64) * sb + t.to(tl.int64) * st + c.to(tl.int64)[:, None] * sc
                + (h.to(tl.int64) * sh + w.to(tl.int64) * sw)[None, :])
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        store_tile_moments(part_ptr, x, mask, bt, g, G, n_chunks, chunk)


# -----------------------------------------------------------------------------
# Launcher and custom op (Triton)
# -----------------------------------------------------------------------------

def triton_moments(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, m2) float64 [B, T, G]: the kernel's (count, mean, M2) per tile, merged."""
    B_, C, T, H, W = x.shape
    if x.numel() == 0:
        zeros = torch.zeros((B_, T, num_groups), device=x.device, dtype=torch.float64)
        return zeros, zeros.clone()
    cfg = tile_config(C // num_groups)
    S = H * W
    n_chunks = triton.cdiv(S, cfg["BLOCK_S"])
    part = torch.empty((B_ * T, num_groups, n_chunks, 3), device=x.device, dtype=torch.float32)
    gn_moments_kernel[(n_chunks, num_groups, B_ * T)](x, part, T, W, S, C // num_groups, num_groups, n_chunks,
                                                       *x.stride(), **cfg)
    n, m, m2 = part.double().unbind(-1)
    mean = (n * m).sum(-1) / n.sum(-1)
    m2 = m2.sum(-1) + (n * (m - mean[..., None]).square()).sum(-1)
    return mean.view(B_, T, num_groups), m2.view(B_, T, num_groups)


@torch.library.custom_op("sora_kernels::group_norm_moments_triton", mutates_args=())
def group_norm_moments_triton(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_moments(x, num_groups)


def _fake(x, num_groups):
    mean = x.new_empty((x.shape[0], x.shape[2], num_groups), dtype=torch.float64)
    return mean, torch.empty_like(mean)


group_norm_moments_triton.register_fake(_fake)
if B.compiled_has("group_norm_moments", "CPU"):
    torch.library.register_fake("sora_kernels::group_norm_moments")(_fake)


# -----------------------------------------------------------------------------
# Checks and backends
# -----------------------------------------------------------------------------

def _cpu_reasons(x, num_groups) -> list[str]:
    reasons = B.device_reasons("cpu", x.device, "group_norm_moments")
    if x.dtype != torch.float32:
        reasons.append(f"the C++ kernel reads float32, got {x.dtype}")
    return reasons


MOMENTS_BACKENDS = (
    B.Backend("triton", lambda x, G: triton_reasons(x, G, op="group_norm_moments"),
              lambda x, G: group_norm_moments_triton(x, G)),
    B.Backend("cpu", _cpu_reasons, lambda x, G: torch.ops.sora_kernels.group_norm_moments(x, G)),
    B.Backend("reference", lambda *args: [], ref.group_norm_moments),
)


# -----------------------------------------------------------------------------
# Public function
# -----------------------------------------------------------------------------

def group_norm_moments(x: torch.Tensor, num_groups: int, *,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, t, group) mean and M2 of x: the statistics group_norm_silu would normalise a
    frame with, in a form that merges across pieces of the frame.

    Args:
        x: [B, C, T, H, W], any strides (for example a tile's own pixels, a slice of a larger
            tensor: the cpu kernel reads it in place).
        num_groups: any divisor of C.
        backend: "triton", "cpu" (C++, fp32) or "reference"; by default the first that can run.

    Returns (mean, m2), float64 [B, T, num_groups]: the mean over the group's C / num_groups
    channels and H x W positions, and the sum of squared deviations from it (zeros for an
    empty frame). Not differentiable: statistics for given-statistics norms, read from x
    detached. Two pieces with counts n_a, n_b merge as (Chan et al.)::

        n = n_a + n_b;  d = mean_b - mean_a
        mean = mean_a + d * n_b / n;  m2 = m2_a + m2_b + d * d * n_a * n_b / n

    and the frame's variance is m2 / n. Equivalent PyTorch::

        g = x.double().transpose(1, 2).reshape(B, T, num_groups, -1)
        mean = g.mean(-1);  m2 = (g - mean[..., None]).square().sum(-1)
    """
    check_video(x, num_groups)
    args = (x.detach(), num_groups)
    return B.select("group_norm_moments", MOMENTS_BACKENDS, args, backend).run(*args)
