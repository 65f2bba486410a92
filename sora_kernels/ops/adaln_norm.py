"""adaln_norm and gated_residual_adaln: segment-aware adaLN on packed tokens.

Order: Triton kernels -> launchers -> custom ops and autograd -> checks -> backends ->
public functions.

In a packed batch each segment (sample) has its own shift, scale and gate rows, so a token
reads row segment_ids[token] of each. One program normalises ROWS tokens (a [ROWS, BLOCK_D]
tile) in one pass: the fused variant first forms the residual h = x + gate * y, stores it,
and normalises it without reading it back. The backward runs a few programs per SM, each over
a contiguous run of tiles: it sums the per-segment gradients (shift, scale, gate) of tiles
that lie in one segment in registers and adds them to fp32 accumulators with one atomic add
per column each time the segment changes; a tile that mixes segments adds each segment's sums.
Rows of more than 4096 elements take a program each, in 4096-column chunks. Atomic adds land
in run-dependent order, so on CUDA those gradients (and the weights they flow into) differ
from run to run at float32 rounding: ~2e-5 at most in a tiny DiT's parameters on an H200 (2026-11-26).
"""
from __future__ import annotations

import functools

import torch

from sora_kernels import backends as B
from sora_kernels.ops.rope3d import block_d
from sora_kernels.packed import assert_offsets, check_cu_seqlens, check_offsets
from sora_kernels.reference import dit_ops as ref

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

MAX_D = 16384          # widest row the kernels are compiled for
# Elements of one program's tile (ROWS = TILE_ELEMENTS // BLOCK_D rows). Swept on an H200 (bf16,
# D=1152, mixed batch; benchmarks/results/cuda-nvidia-h200.adaln_tiles.json): forward fastest at
# 4096 elements and 4 warps. The backward then ran a program per tile, and its time halved with
# each halving of the tile count (fwd+bwd 1.37 -> 0.82 -> 0.67 ms at 2048, 4096, 8192 elements):
# bound by the per-segment atomics (two [D] rows per tile into a few segments' rows), not by
# memory. So (2026-12-06) a backward program sums a run of tiles in registers (adaln_bwd_kernel)
# and the grid is BACKWARD_PROGRAMS_PER_SM programs per SM (~66 tiles per program on that
# batch at 4096 elements): the tile no longer sets the atomics, and at 4096 elements the
# kernel needs no stack frame (8192 needs 472-664 bytes per thread; sm_90, ptxas with the
# JIT's alignment hints). Not yet timed on a GPU: bench_adaln_norm.py::test_backward_grid
# times both tiles at 4, 8 and 16 programs per SM.
TILE_ELEMENTS = 4096
TILE_ELEMENTS_BACKWARD = 4096
BACKWARD_PROGRAMS_PER_SM = 8
# Rows wider than this (D > 4096) take the backward's WIDE path: a program per row, two passes
# over chunks of WIDE_CHUNK columns (the row sums, then dx), so a thread holds a 4096-element
# chunk of each array instead of the whole row. Rows held whole spilled: a run's four [BLOCK_D]
# accumulators 2 KB per thread at 8192, and a program per row 104-752 bytes at 8192 / 16384
# (sm_80 / sm_90; testing/aot.py, Triton 3.8). The second pass reads x, dout and scale again.
WIDE_CHUNK = 4096
INTERPRETER_PROGRAMS = 3       # under the interpreter: runs of several tiles that cross segments
BACKWARD_PROGRAMS_LIMIT = None  # at most this many backward programs, if set (tests: runs on a GPU too)
NORMS = ("layer", "rms")

# -----------------------------------------------------------------------------
# Triton kernels
# -----------------------------------------------------------------------------

if B.TRITON_MISSING is None:

    @triton.jit
    def _row_tile(N, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's tile of packed rows: (rows int64, cols, row_mask, col_mask, mask, offsets)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_mask = rows < N
        col_mask = cols < D
        return rows, cols, row_mask, col_mask, row_mask[:, None] & col_mask[None, :], rows[:, None] * D + cols[None, :]

    @triton.jit
    def _program_run(N, tiles_per_program, ROWS: tl.constexpr):
        """[first, end) tiles of ROWS rows of this program's run; each has at least one row."""
        first = tl.program_id(0).to(tl.int64) * tiles_per_program
        return first, tl.minimum(first + tiles_per_program, tl.cdiv(N, ROWS))

    @triton.jit
    def _run_tile(tile, N, D, cols, col_mask, ROWS: tl.constexpr):
        """(rows int64, row_mask, mask, offsets) of tile `tile` of a run (an int64 index)."""
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < N
        return rows, row_mask, row_mask[:, None] & col_mask[None, :], rows[:, None] * D + cols[None, :]

    @triton.jit
    def _tile_segments(seg, row_mask):
        """(first, last) segment of a tile's rows (a tile has at least one row)."""
        return tl.min(tl.where(row_mask, seg, 2147483647)), tl.max(tl.where(row_mask, seg, -1))

    @triton.jit
    def _segment_rows_sum(seg, s, contrib):
        """Column sums of the rows of contrib in segment s (rows past N contribute zeros)."""
        return tl.sum(tl.where((seg == s)[:, None], contrib, 0.0), 0)

    @triton.jit
    def _run_add(acc_ptr, acc, cur, first, last, seg, cols, col_mask, contrib, D):
        """One tile of a program's run of tiles (see adaln_bwd_kernel). acc holds the column
        sums of segment cur (-1: none) since the run entered it. A tile that does not continue
        cur sends acc to acc_ptr[cur, :] (fp32 atomics, one per column). A tile in one segment
        adds its sums to acc; a tile that mixes segments sends each segment's but its last's,
        and acc restarts with the last one's. The caller then sets cur = last. Returns acc."""
        if (cur >= 0) & (first != cur):
            tl.atomic_add(acc_ptr + cur.to(tl.int64) * D + cols, acc, mask=col_mask)
            acc = tl.zeros_like(acc)
        if first == last:
            acc += tl.sum(contrib, 0)
        else:
            acc += _segment_rows_sum(seg, first, contrib)
            first_row = acc_ptr + first.to(tl.int64) * D + cols
            tl.atomic_add(first_row, acc, mask=col_mask)
            for s in range(first + 1, last):  # segments shorter than a tile, inside it
                tl.atomic_add(first_row + (s - first) * D, _segment_rows_sum(seg, s, contrib), mask=col_mask)
            acc = _segment_rows_sum(seg, last, contrib)
        return acc

    @triton.jit
    def _run_end(acc_ptr, acc, cur, cols, col_mask, D):
        """The end of a program's run: acc_ptr[cur, :] += acc."""
        if cur >= 0:
            tl.atomic_add(acc_ptr + cur.to(tl.int64) * D + cols, acc, mask=col_mask)

    @triton.jit
    def adaln_fwd_kernel(
        x_ptr,                 # [N, D] input (the residual stream when RESIDUAL)
        y_ptr, gate_ptr,       # RESIDUAL: [N, D] branch output and [n, D] gates, else None
        h_ptr,                 # RESIDUAL: [N, D] output h = x + gate[seg] * y, else None
        shift_ptr, scale_ptr,  # [n, D] per segment, or None (no modulation: rms_norm)
        w_ptr,                 # [D] norm weight, or None
        seg_ptr,               # int32 [N] segment of each token, or None without modulation
        out_ptr,               # [N, D] norm(h or x) * (1 + scale) + shift
        mean_ptr, rstd_ptr,    # fp32 [N] saved for the backward (mean only for LAYER)
        N, D, eps,
        RESIDUAL: tl.constexpr, LAYER: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Modulated LayerNorm / RMSNorm of ROWS tokens, after the gated residual if RESIDUAL."""
        rows, cols, row_mask, col_mask, mask, offs = _row_tile(N, D, ROWS, BLOCK_D)
        seg_offs = offs
        if seg_ptr is not None:
            seg = tl.load(seg_ptr + rows, mask=row_mask, other=0).to(tl.int64)
            seg_offs = seg[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(gate_ptr + seg_offs, mask=mask, other=0.0).to(tl.float32)
            h = (x + g * y).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + offs, h, mask=mask)
            x = h.to(tl.float32)  # normalise h as stored, as the unfused ops would
        if LAYER:
            mean = tl.sum(x, 1) / D
            x = tl.where(mask, x - mean[:, None], 0.0)
            tl.store(mean_ptr + rows, mean, mask=row_mask)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        xhat = x * rstd[:, None]
        if w_ptr is not None:
            xhat = xhat * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if scale_ptr is not None:
            shift = tl.load(shift_ptr + seg_offs, mask=mask, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + seg_offs, mask=mask, other=0.0).to(tl.float32)
            xhat = xhat * (1.0 + scale) + shift
        tl.store(out_ptr + offs, xhat.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_dx(g, xhat, mean_g, mean_gx, rstd, mask, LAYER: tl.constexpr):
        """The gradient of a norm's input, zero where masked: rstd * (g - mean(g) - xhat *
        mean(g * xhat)), g the gradient of xhat; RMS (not LAYER) has no mean(g) term. The means
        are per row: [ROWS, 1] tiles, or scalars for a row in chunks."""
        if LAYER:
            dx = g - mean_g - xhat * mean_gx
        else:
            dx = g - xhat * mean_gx
        return tl.where(mask, dx * rstd, 0.0)

    @triton.jit
    def _residual_grads(dx, dh_ptr, y_ptr, gate_ptr, dy_ptr, offs, gate_offs, mask):
        """h = x + gate * y feeds the norm: the gradient of h adds dh (its other uses), dy =
        dh * gate is stored; returns that gradient and the dgate terms dh * y, to be summed per
        segment."""
        dx += tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + gate_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dy_ptr + offs, (dx * gate).to(dy_ptr.dtype.element_ty), mask=mask)
        return dx, dx * tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _adaln_bwd_tile(tile, x_ptr, dout_ptr, dh_ptr, y_ptr, gate_ptr, scale_ptr, w_ptr, seg_ptr, mean_ptr, rstd_ptr,
                        dx_ptr, dy_ptr, dgate_ptr, dshift_ptr, dscale_ptr, N, D, cols, col_mask, w,
                        acc_w, acc_shift, acc_scale, acc_gate, cur,
                        RESIDUAL: tl.constexpr, LAYER: tl.constexpr, ROWS: tl.constexpr):
        """adaln_bwd_kernel's work on tile `tile` (int64): stores dx (and dy), adds the tile's
        per-segment sums to the run's accumulators (_run_add), returns them and the segment
        they now hold."""
        rows, row_mask, mask, offs = _run_tile(tile, N, D, cols, col_mask, ROWS)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if LAYER:
            x = tl.where(mask, x - tl.load(mean_ptr + rows, mask=row_mask, other=0.0)[:, None], 0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = dout                                     # gradient of the weighted xhat
        if scale_ptr is not None:
            seg = tl.load(seg_ptr + rows, mask=row_mask, other=0)
            seg_offs = seg.to(tl.int64)[:, None] * D + cols[None, :]
            g = dout * (1.0 + tl.load(scale_ptr + seg_offs, mask=mask, other=0.0).to(tl.float32))
            # the per-segment sums first, so dout's tile is dead before dx's is formed
            first, last = _tile_segments(seg, row_mask)
            acc_shift = _run_add(dshift_ptr, acc_shift, cur, first, last, seg, cols, col_mask, dout, D)
            acc_scale = _run_add(dscale_ptr, acc_scale, cur, first, last, seg, cols, col_mask, dout * xhat * w, D)
        if w_ptr is not None:
            acc_w += tl.sum(g * xhat, 0)
            g = g * w
        mean_g = 0.0
        if LAYER:
            mean_g = (tl.sum(g, 1) / D)[:, None]
        dx = _norm_dx(g, xhat, mean_g, (tl.sum(g * xhat, 1) / D)[:, None], rstd[:, None], mask, LAYER)
        if RESIDUAL:
            dx, dgate = _residual_grads(dx, dh_ptr, y_ptr, gate_ptr, dy_ptr, offs, seg_offs, mask)
            acc_gate = _run_add(dgate_ptr, acc_gate, cur, first, last, seg, cols, col_mask, dgate, D)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if scale_ptr is not None:
            cur = last
        return acc_w, acc_shift, acc_scale, acc_gate, cur

    @triton.jit
    def _wide_chunk(row, cols, col_mask, x_ptr, dout_ptr, scale_ptr, seg_row, mean, rstd, D):
        """(xhat, dout, g) of one chunk of a row: g the gradient of the weighted xhat, before
        the weight (dout * (1 + scale[seg]), or dout without modulation)."""
        offs = row * D + cols
        xhat = tl.where(col_mask, (tl.load(x_ptr + offs, mask=col_mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
        dout = tl.load(dout_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)
        g = dout
        if scale_ptr is not None:
            g = dout * (1.0 + tl.load(scale_ptr + seg_row + cols, mask=col_mask, other=0.0).to(tl.float32))
        return xhat, dout, g

    @triton.jit
    def _adaln_bwd_wide_row(row, x_ptr, dout_ptr, dh_ptr, y_ptr, gate_ptr, scale_ptr, w_ptr, seg_ptr, mean_ptr,
                            rstd_ptr, dx_ptr, dy_ptr, dgate_ptr, dshift_ptr, dscale_ptr, dw_ptr, D,
                            RESIDUAL: tl.constexpr, LAYER: tl.constexpr, BLOCK_D: tl.constexpr):
        """adaln_bwd_kernel's work on one row wider than BLOCK_D: a first pass over its chunks
        sums g*w and g*w*xhat and adds the per-column gradients (shift, scale, weight) with
        atomics; a second pass recomputes each chunk and stores dx (and dy, adding dgate)."""
        mean = 0.0
        if LAYER:
            mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        seg_row = row * 0
        if scale_ptr is not None:
            seg_row = tl.load(seg_ptr + row).to(tl.int64) * D
        sum_g = 0.0
        sum_gx = 0.0
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            xhat, dout, g = _wide_chunk(row, cols, col_mask, x_ptr, dout_ptr, scale_ptr, seg_row, mean, rstd, D)
            w = 1.0
            if w_ptr is not None:
                w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                tl.atomic_add(dw_ptr + cols, g * xhat, mask=col_mask)
            if scale_ptr is not None:
                tl.atomic_add(dshift_ptr + seg_row + cols, dout, mask=col_mask)
                tl.atomic_add(dscale_ptr + seg_row + cols, dout * xhat * w, mask=col_mask)
            sum_g += tl.sum(g * w, 0)
            sum_gx += tl.sum(g * w * xhat, 0)
        c1 = sum_g / D
        c2 = sum_gx / D
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            xhat, dout, g = _wide_chunk(row, cols, col_mask, x_ptr, dout_ptr, scale_ptr, seg_row, mean, rstd, D)
            if w_ptr is not None:
                g = g * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            dx = _norm_dx(g, xhat, c1, c2, rstd, col_mask, LAYER)
            offs = row * D + cols
            if RESIDUAL:
                dx, dgate = _residual_grads(dx, dh_ptr, y_ptr, gate_ptr, dy_ptr, offs, seg_row + cols, col_mask)
                tl.atomic_add(dgate_ptr + seg_row + cols, dgate, mask=col_mask)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=col_mask)

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["tiles_per_program"])
    def adaln_bwd_kernel(
        x_ptr,                 # [N, D] what was normalised (h when RESIDUAL)
        dout_ptr,              # [N, D] gradient of the modulated norm
        dh_ptr,                # RESIDUAL: [N, D] gradient of h from its other uses, else None
        y_ptr, gate_ptr,       # RESIDUAL: as in the forward, else None
        scale_ptr, w_ptr, seg_ptr,  # scale and seg None without modulation (rms_norm)
        mean_ptr, rstd_ptr,
        dx_ptr,                # [N, D] gradient of x (of the residual input when RESIDUAL)
        dy_ptr,                # RESIDUAL: [N, D] gradient of y, else None
        dgate_ptr,             # RESIDUAL: fp32 [n, D] accumulator, else None
        dshift_ptr, dscale_ptr,  # fp32 [n, D] accumulators, or None without modulation
        dw_ptr,                # fp32 [D] accumulator, or None
        N, D,
        tiles_per_program,     # this program's tiles, [pid, pid + 1) * tiles_per_program (not WIDE)
        RESIDUAL: tl.constexpr, LAYER: tl.constexpr, WIDE: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Gradients of a contiguous run of ROWS-token tiles; WIDE: of row pid, BLOCK_D
        columns at a time (_adaln_bwd_wide_row). The per-segment gradients of the tiles that
        lie in one segment are summed in registers while the segment lasts, and added to the
        fp32 accumulators when it changes (and at the end); a tile that mixes segments adds each
        segment's sums. The weight gradient is summed over the whole run."""
        if WIDE:
            _adaln_bwd_wide_row(tl.program_id(0).to(tl.int64), x_ptr, dout_ptr, dh_ptr, y_ptr, gate_ptr, scale_ptr,
                                w_ptr, seg_ptr, mean_ptr, rstd_ptr, dx_ptr, dy_ptr, dgate_ptr, dshift_ptr, dscale_ptr,
                                dw_ptr, D, RESIDUAL, LAYER, BLOCK_D)
            return
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < D
        w = 1.0
        if w_ptr is not None:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
        cur = tl.program_id(0) * 0 - 1        # the segment the accumulators hold, -1: none
        first_tile, end_tile = _program_run(N, tiles_per_program, ROWS)
        for tile in range(first_tile, end_tile):
            acc_w, acc_shift, acc_scale, acc_gate, cur = _adaln_bwd_tile(
                tile, x_ptr, dout_ptr, dh_ptr, y_ptr, gate_ptr, scale_ptr, w_ptr, seg_ptr, mean_ptr, rstd_ptr,
                dx_ptr, dy_ptr, dgate_ptr, dshift_ptr, dscale_ptr, N, D, cols, col_mask, w,
                acc_w, acc_shift, acc_scale, acc_gate, cur, RESIDUAL, LAYER, ROWS)
        if scale_ptr is not None:
            _run_end(dshift_ptr, acc_shift, cur, cols, col_mask, D)
            _run_end(dscale_ptr, acc_scale, cur, cols, col_mask, D)
            if RESIDUAL:
                _run_end(dgate_ptr, acc_gate, cur, cols, col_mask, D)
        if w_ptr is not None:
            tl.atomic_add(dw_ptr + cols, acc_w, mask=col_mask)


# -----------------------------------------------------------------------------
# Launchers
# -----------------------------------------------------------------------------

def tile_config(D: int, backward: bool = False) -> dict:
    """Compile-time tile for rows of D elements: every config this returns is compiled ahead of
    time in the tests (config_space). The backward's rows wider than WIDE_CHUNK go a row per
    program, WIDE_CHUNK columns at a time."""
    bd = block_d(D)
    if not backward:
        return {"ROWS": max(1, TILE_ELEMENTS // bd), "BLOCK_D": bd}
    if bd > WIDE_CHUNK:
        return {"ROWS": 1, "BLOCK_D": WIDE_CHUNK, "WIDE": True}
    return {"ROWS": max(1, TILE_ELEMENTS_BACKWARD // bd), "BLOCK_D": bd, "WIDE": False}


def config_space(backward: bool = False) -> list[dict]:
    configs = [tile_config(1 << p, backward) for p in range(4, MAX_D.bit_length())]
    return [c for i, c in enumerate(configs) if c not in configs[:i]]


def backward_programs(tiles: int, device: torch.device) -> int:
    """Programs of the backward: BACKWARD_PROGRAMS_PER_SM per SM on CUDA (INTERPRETER_PROGRAMS
    under the interpreter; at most BACKWARD_PROGRAMS_LIMIT if set), each taking a contiguous run
    of tiles, so its per-segment sums reach memory once per segment it meets instead of once per
    tile."""
    programs = (BACKWARD_PROGRAMS_PER_SM * _sm_count(device.index) if device.type == "cuda"
                else INTERPRETER_PROGRAMS)
    if BACKWARD_PROGRAMS_LIMIT is not None:
        programs = min(programs, BACKWARD_PROGRAMS_LIMIT)
    return max(1, min(tiles, programs))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def num_warps(bd: int, backward: bool = False, residual: bool = False, dtype: torch.dtype = torch.bfloat16) -> int:
    """Warps of the adaln kernels for rows of BLOCK_D elements of `dtype`. The backward's
    2048-wide runs take 8: at 4 the fused op's run (four [BLOCK_D] accumulators besides the
    tile) needed 255 registers and spilled 64-72 bytes on sm_80; so does the fused residual
    forward at rows of 128 or fewer, which spilled 16 bytes at 80 registers on sm_80
    (testing/aot.py, Triton 3.8). Other dtypes where bf16's choice spilled (testing/aot.py,
    sm_80 / sm_90): the fp32 fused backward takes 8 below 2048 too (at 4 it used 255 registers
    and spilled 8-24 bytes at BLOCK_D 64 and 256 on sm_80, Triton 3.8; the unfused one at 8 gets
    128 registers and spills 8-24 bytes, so it keeps 4); fp16's unfused backward takes 16 at
    2048 (at 8 it spilled 8-16 bytes under Triton 3.6, as bf16's does there: bf16 keeps 8)."""
    if backward and not residual and bd == 2048 and dtype == torch.float16:
        return 16
    if (backward and (bd == 2048 or (residual and bd < 2048 and dtype == torch.float32))) or \
            (residual and not backward and bd <= 128):
        return 8
    return 4 if bd <= 2048 else 8 if bd <= 8192 else 16


def adaln_forward(x, y, gate, shift, scale, weight, seg, eps: float, layer: bool):
    """(h or None, out, mean [N] or empty, rstd [N]); shift, scale and seg None: a plain norm."""
    N, D = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    h = torch.empty_like(x) if y is not None else None
    mean = torch.empty(N if layer else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N > 0:
        cfg = tile_config(D)
        adaln_fwd_kernel[(triton.cdiv(N, cfg["ROWS"]),)](
            x, y.contiguous() if y is not None else None, gate.contiguous() if gate is not None else None, h,
            _contiguous(shift), _contiguous(scale), _contiguous(weight), seg, out, mean if layer else None, rstd, N, D,
            eps,
            RESIDUAL=y is not None, LAYER=layer, num_warps=num_warps(cfg["BLOCK_D"], False, y is not None, x.dtype),
            **cfg)
    return h, out, mean, rstd


def _contiguous(t):
    return t.contiguous() if t is not None else None


def adaln_backward(x, dout, dh, y, gate, scale, weight, seg, mean, rstd, n_segments: int, layer: bool):
    """(dx, dy or None, dgate or None, dshift, dscale, dweight or None): x is what was
    normalised (h for the fused op), dh the gradient of h from its other uses; scale and seg
    None for a plain norm (dshift, dscale None then)."""
    N, D = x.shape
    x, dout = x.contiguous(), dout.contiguous()
    y = y.contiguous() if y is not None else None
    residual = y is not None
    modulated = scale is not None
    # Separate fp32 accumulators (returned as they are for fp32 parameters: they must not alias).
    acc = [torch.zeros((n_segments, D), dtype=torch.float32, device=x.device)
           for _ in range((2 if modulated else 0) + residual)]
    acc += [None] * (3 - len(acc))
    dw = torch.zeros(D, dtype=torch.float32, device=x.device) if weight is not None else None
    dx = torch.empty_like(x)
    dy = torch.empty_like(y) if residual else None
    if N > 0:
        cfg = tile_config(D, backward=True)
        tiles = triton.cdiv(N, cfg["ROWS"])
        per_program = 1 if cfg["WIDE"] else triton.cdiv(tiles, backward_programs(tiles, x.device))
        adaln_bwd_kernel[(triton.cdiv(tiles, per_program),)](
            x.contiguous(), dout.contiguous(), dh.contiguous() if residual else None,
            y.contiguous() if residual else None, gate.contiguous() if residual else None, _contiguous(scale),
            _contiguous(weight), seg, mean if layer else None, rstd, dx, dy, acc[2] if residual else None, acc[0],
            acc[1], dw, N, D, per_program,
            RESIDUAL=residual, LAYER=layer, num_warps=num_warps(cfg["BLOCK_D"], True, residual, x.dtype), **cfg)
    dshift, dscale = (acc[0].to(scale.dtype), acc[1].to(scale.dtype)) if modulated else (None, None)
    dgate = acc[2].to(gate.dtype) if residual else None
    return dx, dy, dgate, dshift, dscale, dw.to(weight.dtype) if dw is not None else None


# -----------------------------------------------------------------------------
# Custom ops and autograd
# -----------------------------------------------------------------------------

@torch.library.custom_op("sora_kernels::adaln_norm_triton", mutates_args=())
def adaln_norm_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None,
                      segment_ids: torch.Tensor, eps: float, layer: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, out, mean, rstd = adaln_forward(x, None, None, shift, scale, weight, segment_ids, eps, layer)
    return out, mean, rstd


@torch.library.custom_op("sora_kernels::adaln_norm_triton_backward", mutates_args=())
def adaln_norm_triton_backward(dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                               weight: torch.Tensor | None, segment_ids: torch.Tensor, mean: torch.Tensor,
                               rstd: torch.Tensor, layer: bool) -> list[torch.Tensor]:
    dx, _, _, dshift, dscale, dw = adaln_backward(x, dout, None, None, None, scale, weight, segment_ids, mean, rstd,
                                                  scale.shape[0], layer)
    return [dx, dshift, dscale] + ([dw] if dw is not None else [])


@torch.library.custom_op("sora_kernels::gated_residual_adaln_triton", mutates_args=())
def gated_residual_adaln_triton(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                scale: torch.Tensor, weight: torch.Tensor | None, segment_ids: torch.Tensor,
                                eps: float, layer: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, out, mean, rstd = adaln_forward(x, y, gate, shift, scale, weight, segment_ids, eps, layer)
    return h, out, mean, rstd


@torch.library.custom_op("sora_kernels::gated_residual_adaln_triton_backward", mutates_args=())
def gated_residual_adaln_triton_backward(dh: torch.Tensor, dout: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
                                         gate: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None,
                                         segment_ids: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                         layer: bool) -> list[torch.Tensor]:
    dx, dy, dgate, dshift, dscale, dw = adaln_backward(h, dout, dh, y, gate, scale, weight, segment_ids, mean, rstd,
                                                       scale.shape[0], layer)
    return [dx, dy, dgate, dshift, dscale] + ([dw] if dw is not None else [])


def _empty(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor like x: the layout every kernel output has."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@adaln_norm_triton.register_fake
def _(x, shift, scale, weight, segment_ids, eps, layer):
    return (_empty(x), x.new_empty(x.shape[0] if layer else 0, dtype=torch.float32),
            x.new_empty(x.shape[0], dtype=torch.float32))


@adaln_norm_triton_backward.register_fake
def _(dout, x, scale, weight, segment_ids, mean, rstd, layer):
    return [_empty(x), _empty(scale), _empty(scale)] + ([_empty(weight)] if weight is not None else [])


@gated_residual_adaln_triton.register_fake
def _(x, y, gate, shift, scale, weight, segment_ids, eps, layer):
    return (_empty(x), _empty(x), x.new_empty(x.shape[0] if layer else 0, dtype=torch.float32),
            x.new_empty(x.shape[0], dtype=torch.float32))


@gated_residual_adaln_triton_backward.register_fake
def _(dh, dout, h, y, gate, scale, weight, segment_ids, mean, rstd, layer):
    return [_empty(h), _empty(y), _empty(gate), _empty(scale), _empty(scale)] + \
        ([_empty(weight)] if weight is not None else [])


def _adaln_setup(ctx, inputs, output):
    x, shift, scale, weight, seg, eps, ctx.layer = inputs
    _, mean, rstd = output
    ctx.has_weight = weight is not None
    ctx.save_for_backward(x, scale, weight, seg, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _adaln_backward(ctx, dout, _dmean, _drstd):
    x, scale, weight, seg, mean, rstd = ctx.saved_tensors
    grads = adaln_norm_triton_backward(dout, x, scale, weight, seg, mean, rstd, ctx.layer)
    dx, dshift, dscale = grads[:3]
    return dx, dshift, dscale, grads[3] if ctx.has_weight else None, None, None, None


def _fused_setup(ctx, inputs, output):
    x, y, gate, shift, scale, weight, seg, eps, ctx.layer = inputs
    h, _, mean, rstd = output
    ctx.has_weight = weight is not None
    ctx.save_for_backward(h, y, gate, scale, weight, seg, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _fused_backward(ctx, dh, dout, _dmean, _drstd):
    h, y, gate, scale, weight, seg, mean, rstd = ctx.saved_tensors
    grads = gated_residual_adaln_triton_backward(dh, dout, h, y, gate, scale, weight, seg, mean, rstd, ctx.layer)
    dx, dy, dgate, dshift, dscale = grads[:5]
    return dx, dy, dgate, dshift, dscale, grads[5] if ctx.has_weight else None, None, None, None


adaln_norm_triton.register_autograd(_adaln_backward, setup_context=_adaln_setup)
gated_residual_adaln_triton.register_autograd(_fused_backward, setup_context=_fused_setup)


# The C++ CPU kernels (csrc/dit/adaln_cpu.cpp): one compiled op "sora_kernels::adaln" covers
# adaln_norm, gated_residual_adaln and rms_norm (optional residual, modulation and weight).

def _compiled_fake(x, y, gate, shift, scale, weight, segment_ids, eps, layer):
    N, D = x.shape
    return (x.new_empty((N if y is not None else 0, D)), x.new_empty((N, D)), x.new_empty(N if layer else 0),
            x.new_empty(N))


def _compiled_backward_fake(x, dout, dh, y, gate, shift, scale, weight, segment_ids, mean, rstd, layer):
    N, D = x.shape
    n = scale.shape[0] if scale is not None else 0
    r = y is not None
    return [x.new_empty((N, D)), x.new_empty((N if r else 0, D)), x.new_empty((n if r else 0, D)),
            x.new_empty((n, D)), x.new_empty((n, D)), x.new_empty(D if weight is not None else 0)]


def _compiled_setup(ctx, inputs, output):
    x, y, gate, shift, scale, weight, seg, _, ctx.layer = inputs
    h, _, mean, rstd = output
    ctx.present = tuple(t is not None for t in (y, gate, shift, scale, weight))
    ctx.save_for_backward(h if y is not None else x, y, gate, shift, scale, weight, seg, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _compiled_backward(ctx, dh, dout, _dmean, _drstd):
    normed, y, gate, shift, scale, weight, seg, mean, rstd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(normed)
    if y is not None and dh is None:
        dh = torch.zeros_like(normed)
    dx, dy, dgate, dshift, dscale, dw = torch.ops.sora_kernels.adaln_backward(
        normed, dout, dh if y is not None else None, y, gate, shift, scale, weight, seg, mean, rstd, ctx.layer)
    grads = [g if present else None for g, present in zip((dy, dgate, dshift, dscale, dw), ctx.present)]
    return (dx, *grads, None, None, None)


if B.compiled_has("adaln", "CPU"):
    torch.library.register_fake("sora_kernels::adaln")(_compiled_fake)
    torch.library.register_fake("sora_kernels::adaln_backward")(_compiled_backward_fake)
    torch.library.register_autograd("sora_kernels::adaln", _compiled_backward, setup_context=_compiled_setup)


# -----------------------------------------------------------------------------
# Checks (shared with gated_residual)
# -----------------------------------------------------------------------------

def check_tokens(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a 2-dim tensor [N, D] of packed tokens, got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype, got {x.dtype}")


def check_like(name: str, t, x: torch.Tensor, shape: tuple) -> None:
    """ValueError naming `name` unless t is a tensor of `shape` with x's dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name}: expected dtype {x.dtype} like x, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} like x, got {t.device}")


def check_segments(x: torch.Tensor, cu_seqlens, segment_ids) -> tuple[int, torch.Tensor]:
    """(segments, int32 segment id per token) from cu_seqlens, checked against x. Their values
    are checked on CPU tensors only (on a GPU reading them would cost a device sync): the
    offsets start at 0, never decrease and end at the token count; given segment ids lie in
    [0, segments) (a backend indexes shift / scale / gate rows with them). In eager mode the
    host reads them (ValueError); under torch.compile, where tracing cannot read values, asserts
    in the graph check the same when it runs (RuntimeError, the message without the values or
    the counts)."""
    check_cu_seqlens("cu_seqlens", cu_seqlens, x.device, min_entries=2)
    on_cpu = cu_seqlens.device.type == "cpu"
    traced = torch.compiler.is_compiling()
    if on_cpu and not traced:
        check_offsets("cu_seqlens", cu_seqlens.tolist(), x.shape[0])
    elif on_cpu:
        assert_offsets("cu_seqlens", cu_seqlens, x.shape[0])
    n = cu_seqlens.shape[0] - 1
    if segment_ids is None:
        return n, ref.segment_ids(cu_seqlens, x.shape[0])
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype != torch.int32 or \
            tuple(segment_ids.shape) != (x.shape[0],) or segment_ids.device != x.device:
        got = (tuple(segment_ids.shape), segment_ids.dtype, str(segment_ids.device)) \
            if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
        raise ValueError(f"segment_ids: expected int32 [{x.shape[0]}] on {x.device}, got {got}")
    if on_cpu and not traced and segment_ids.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(segment_ids))
        if low < 0 or high >= n:
            raise ValueError(f"segment_ids: expected ids in [0, {n}) (cu_seqlens has {n} segments), got ids from "
                             f"{low} to {high}")
    elif on_cpu and traced:     # (n not in the message: it would specialise a dynamic segment count)
        torch._assert_async(((segment_ids >= 0) & (segment_ids < n)).all(),
                            "segment_ids: expected ids in [0, the segment count of cu_seqlens)")
    return n, segment_ids


def check_norm(norm, eps) -> bool:
    """True for LayerNorm, False for RMSNorm."""
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    if not B.finite_number(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    return norm == "layer"


def check_adaln_args(x, shift, scale, weight, n: int) -> None:
    D = x.shape[1]
    check_like("shift", shift, x, (n, D))
    check_like("scale", scale, x, (n, D))
    if weight is not None:
        check_like("weight", weight, x, (D,))


# -----------------------------------------------------------------------------
# Backends
# -----------------------------------------------------------------------------

# What the Triton backwards of the adaLN family add with float atomics
ATOMIC_SUMS = {"adaln_norm": "the per-segment shift and scale gradients (and the weight's)",
               "gated_residual_adaln": "the per-segment gate, shift and scale gradients (and the weight's)",
               "gated_residual": "the per-segment gate gradients", "rms_norm": "the weight's gradient",
               "final_layer_unpatchify": "the per-segment shift and scale gradients"}


def triton_reasons(x: torch.Tensor, op: str, summed: tuple = ()) -> list[str]:
    """Why the Triton kernels cannot run op `op` (summed: the tensors whose gradients its
    backward adds with float atomics, ATOMIC_SUMS, for the deterministic mode's check)."""
    reasons = B.device_reasons("triton", x.device, op)
    if x.shape[-1] > MAX_D:
        reasons.append(f"compiled for rows of at most {MAX_D} elements, got D={x.shape[-1]}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"runs fp16, bf16 and fp32, got {x.dtype}")
    return reasons or B.deterministic_reasons(summed, ATOMIC_SUMS[op])


def cpu_reasons(x: torch.Tensor, compiled_op: str = "adaln") -> list[str]:
    """Why the C++ CPU kernels (sora_kernels._C op `compiled_op`) cannot run on x."""
    reasons = B.device_reasons("cpu", x.device, compiled_op)
    if x.dtype != torch.float32:
        reasons.append(f"the C++ kernels run float32, got {x.dtype}")
    return reasons


ADALN_BACKENDS = (
    B.Backend("triton", lambda x, shift=None, scale=None, weight=None, *rest:
              triton_reasons(x, "adaln_norm", (shift, scale, weight)),
              lambda x, shift, scale, weight, seg, eps, layer:
              adaln_norm_triton(x, shift, scale, weight, seg, eps, layer)[0]),
    B.Backend("cpu", lambda x, *rest: cpu_reasons(x),
              lambda x, shift, scale, weight, seg, eps, layer:
              torch.ops.sora_kernels.adaln(x, None, None, shift, scale, weight, seg, eps, layer)[1]),
    B.Backend("reference", lambda *args: [],
              lambda x, shift, scale, weight, seg, eps, layer:
              ref.adaln_norm(x, shift, scale, seg, eps, "layer" if layer else "rms", weight)),
)
FUSED_BACKENDS = (
    B.Backend("triton", lambda x, y=None, gate=None, shift=None, scale=None, weight=None, *rest:
              triton_reasons(x, "gated_residual_adaln", (gate, shift, scale, weight)),
              lambda x, y, gate, shift, scale, weight, seg, eps, layer:
              gated_residual_adaln_triton(x, y, gate, shift, scale, weight, seg, eps, layer)[:2]),
    B.Backend("cpu", lambda x, *rest: cpu_reasons(x),
              lambda x, y, gate, shift, scale, weight, seg, eps, layer:
              torch.ops.sora_kernels.adaln(x, y, gate, shift, scale, weight, seg, eps, layer)[:2]),
    B.Backend("reference", lambda *args: [],
              lambda x, y, gate, shift, scale, weight, seg, eps, layer:
              ref.gated_residual_adaln(x, y, gate, shift, scale, seg, eps, "layer" if layer else "rms", weight)),
)


# -----------------------------------------------------------------------------
# Public functions
# -----------------------------------------------------------------------------

def adaln_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, cu_seqlens: torch.Tensor, *,
               eps: float = 1e-6, norm: str = "layer", weight: torch.Tensor | None = None,
               segment_ids: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Segment-aware adaLN: y = norm(x) * (1 + scale[segment]) + shift[segment].

    Args:
        x: [N, D] packed tokens; segment s is rows cu_seqlens[s]:cu_seqlens[s+1].
        shift, scale: [n, D], one row per segment (each sample's own conditioning).
        cu_seqlens: int32 [n+1] (Packed.cu_seqlens), ending at N: checked when cu_seqlens is on
            the CPU (ValueError; under torch.compile by asserts in the graph, RuntimeError); on
            a GPU the check would cost a device sync, so there it is the caller's contract
            (Packed records always satisfy it).
        eps: added to the variance (mean square for "rms").
        norm: "layer" (LayerNorm without bias) or "rms" (RMSNorm).
        weight: optional [D] norm weight (applied before the modulation).
        segment_ids: optional int32 [N] segment of each token (Packed.segment_ids, computed
            once per batch); by default derived from cu_seqlens. Its ids lie in [0, n): checked
            on CPU tensors as cu_seqlens is, and by the C++ kernels. It must agree with cu_seqlens,
            so it never decreases (not checked: that would cost a device sync); the Triton
            backward loops over the ids between a tile's first and last.
        backend: force "triton", "cpu" or "reference" (default: the first that can run).

    Returns [N, D] in x.dtype (math in fp32). Differentiable in x, shift, scale and weight.
    Equivalent PyTorch::

        seg = torch.repeat_interleave(torch.arange(n), cu_seqlens.diff())
        F.layer_norm(x, (D,), weight, eps=eps) * (1 + scale[seg]) + shift[seg]
    """
    check_tokens("x", x)
    layer = check_norm(norm, eps)
    n, seg = check_segments(x, cu_seqlens, segment_ids)
    check_adaln_args(x, shift, scale, weight, n)
    args = (x, shift, scale, weight, seg, float(eps), layer)
    return B.select("adaln_norm", ADALN_BACKENDS, args, backend).run(*args)


def gated_residual_adaln(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                         scale: torch.Tensor, cu_seqlens: torch.Tensor, *, eps: float = 1e-6, norm: str = "layer",
                         weight: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT pattern residual -> norm -> modulate in one pass:
    h = x + gate[segment] * y, then adaln_norm(h, shift, scale).

    Args as adaln_norm, plus y [N, D] (the branch output: attention or MLP) and gate [n, D].
    Returns (h, adaln_norm(h)), both [N, D] in x.dtype; the norm reads h as rounded to
    x.dtype, exactly as gated_residual followed by adaln_norm. Differentiable in x, y, gate,
    shift, scale and weight (h may feed later layers too: its gradients add up).
    """
    check_tokens("x", x)
    layer = check_norm(norm, eps)
    n, seg = check_segments(x, cu_seqlens, segment_ids)
    check_like("y", y, x, tuple(x.shape))
    check_like("gate", gate, x, (n, x.shape[1]))
    check_adaln_args(x, shift, scale, weight, n)
    args = (x, y, gate, shift, scale, weight, seg, float(eps), layer)
    h, out = B.select("gated_residual_adaln", FUSED_BACKENDS, args, backend).run(*args)
    return h, out
