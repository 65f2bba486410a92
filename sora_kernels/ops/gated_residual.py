"""gated_residual: x + gate[segment] * y on packed tokens (the DiT block's gated skip).

Order: Triton kernels -> launchers -> custom ops and autograd -> backends -> public function.
The fused variant that also normalises the result is gated_residual_adaln (ops/adaln_norm.py).
"""
from __future__ import annotations

import torch

from sora_kernels import backends as B
from sora_kernels.ops import adaln_norm
from sora_kernels.ops.adaln_norm import (MAX_D, backward_programs, check_like, check_segments, check_tokens,
                                         cpu_reasons, triton_reasons)
from sora_kernels.reference import dit_ops as ref

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

    from sora_kernels.ops.adaln_norm import _program_run, _row_tile, _run_add, _run_end, _run_tile, _tile_segments

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["tiles_per_program"])
    def gated_residual_kernel(
        x_ptr, y_ptr,      # [N, D]; in the backward x_ptr is the output gradient
        gate_ptr,          # [n, D] per segment
        seg_ptr,           # int32 [N]
        out_ptr,           # [N, D]: x + gate * y (forward), dy = dout * gate (backward)
        dgate_ptr,         # backward: fp32 [n, D] accumulator of dout * y, else None
        N, D,
        tiles_per_program,  # backward: this program's tiles of ROWS tokens, [pid, pid + 1) * tiles_per_program
        BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr,  # backward: rows wider than BLOCK_D, BLOCK_D columns per program (axis 1)
    ):
        """The gated residual of one tile of ROWS tokens (forward), or its gradients over a run
        of tiles (backward: dgate summed in registers while the run stays in one segment, as
        adaln_bwd_kernel does; of columns [pid1, pid1 + 1) * BLOCK_D when SPLIT)."""
        if BACKWARD:
            cols = tl.arange(0, BLOCK_D)
            if SPLIT:
                cols += tl.program_id(1) * BLOCK_D
            col_mask = cols < D
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            cur = tl.program_id(0) * 0 - 1        # the segment acc holds, -1: none
            first_tile, end_tile = _program_run(N, tiles_per_program, ROWS)
            for tile in range(first_tile, end_tile):
                rows, row_mask, mask, offs = _run_tile(tile, N, D, cols, col_mask, ROWS)
                seg = tl.load(seg_ptr + rows, mask=row_mask, other=0)
                gate = tl.load(gate_ptr + seg.to(tl.int64)[:, None] * D + cols[None, :], mask=mask,
                               other=0.0).to(tl.float32)
                dout = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + offs, (dout * gate).to(out_ptr.dtype.element_ty), mask=mask)
                first, last = _tile_segments(seg, row_mask)
                acc = _run_add(dgate_ptr, acc, cur, first, last, seg, cols, col_mask, dout * y, D)
                cur = last
            _run_end(dgate_ptr, acc, cur, cols, col_mask, D)
        else:
            rows, cols, row_mask, col_mask, mask, offs = _row_tile(N, D, ROWS, BLOCK_D)
            seg = tl.load(seg_ptr + rows, mask=row_mask, other=0)
            gate = tl.load(gate_ptr + seg.to(tl.int64)[:, None] * D + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


# The fp32 backward's rows wider than this run in column chunks of this many (a second grid
# axis; the columns of a gated residual are independent, so a chunk needs nothing from the
# others): a whole 16384-element row held 32 elements of gate, dout, y and the dgate
# accumulator per thread at 16 warps and spilled 32 bytes on sm_80, 200 on sm_90 (testing/aot.py,
# Triton 3.8; 24-32 at 32 warps). bf16 and fp16 rows stay whole: they do not spill.
FP32_BACKWARD_CHUNK = 8192


def tile_config(D: int, dtype: torch.dtype, backward: bool) -> dict:
    """The tile for rows of D elements: adaln_norm's forward tile, but the fp32 backward's rows
    wider than FP32_BACKWARD_CHUNK are split into chunks of that many columns."""
    cfg = adaln_norm.tile_config(D)
    if backward and dtype == torch.float32 and cfg["BLOCK_D"] > FP32_BACKWARD_CHUNK:
        return {"ROWS": 1, "BLOCK_D": FP32_BACKWARD_CHUNK, "SPLIT": True}
    return dict(cfg, SPLIT=False)


def config_space(dtype: torch.dtype, backward: bool) -> list[dict]:
    """Every tile tile_config returns for rows of `dtype` (compiled ahead of time in the tests)."""
    configs = [tile_config(1 << p, dtype, backward) for p in range(4, MAX_D.bit_length())]
    return [c for i, c in enumerate(configs) if c not in configs[:i]]


def num_warps(block_d: int, dtype: torch.dtype = torch.bfloat16, backward: bool = False) -> int:
    """8 warps (16 elements a thread of a 4096-element tile), 16 for the widest rows: at 4 the
    forward spilled 32 bytes (BLOCK_D=1024, sm_90) and the backward 2.4-3 KB (16384), at 8 the
    16384-wide bf16 backward needed 244 registers (testing/aot.py, Triton 3.8). The fp16 and
    fp32 backward take 16 at every width: at 8 the fp32 one spilled 8 bytes at BLOCK_D=2048
    (sm_80, Triton 3.8) and the fp16 one 8 at 256 (sm_80, Triton 3.6); at 16 neither spills
    at any width, in either version. bf16 keeps its choice."""
    if backward and dtype != torch.bfloat16:
        return 16
    return max(8, adaln_norm.num_warps(block_d))


def launch(x, y, gate, seg, backward: bool):
    """Forward: x + gate[seg] * y. Backward (x = dout): (dout * gate[seg], fp32 sum of dout * y
    per segment). The forward runs a program per tile, the backward adaln_norm's grid of
    programs over runs of tiles (times the column chunks of a split row)."""
    N, D = x.shape
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(y if backward else x)
    dgate = torch.zeros(gate.shape, dtype=torch.float32, device=x.device) if backward else None
    if N > 0:
        cfg = tile_config(D, x.dtype, backward)
        tiles = triton.cdiv(N, cfg["ROWS"])
        per_program = triton.cdiv(tiles, backward_programs(tiles, x.device)) if backward else 1
        grid = (triton.cdiv(tiles, per_program), triton.cdiv(D, cfg["BLOCK_D"]) if backward else 1)
        gated_residual_kernel[grid](x, y, gate.contiguous(), seg, out, dgate, N, D, per_program, BACKWARD=backward,
                                    num_warps=num_warps(cfg["BLOCK_D"], x.dtype, backward), **cfg)
    return out, dgate


@torch.library.custom_op("sora_kernels::gated_residual_triton", mutates_args=())
def gated_residual_triton(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, segment_ids: torch.Tensor
                          ) -> torch.Tensor:
    return launch(x, y, gate, segment_ids, False)[0]


@torch.library.custom_op("sora_kernels::gated_residual_triton_backward", mutates_args=())
def gated_residual_triton_backward(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                                   segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy, dgate = launch(dout, y, gate, segment_ids, True)
    return dy, dgate.to(gate.dtype) if gate.dtype != torch.float32 else dgate


@gated_residual_triton.register_fake
def _(x, y, gate, segment_ids):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@gated_residual_triton_backward.register_fake
def _(dout, y, gate, segment_ids):
    return (torch.empty(y.shape, dtype=y.dtype, device=y.device),
            torch.empty(gate.shape, dtype=gate.dtype, device=gate.device))


def _setup(ctx, inputs, output):
    _, y, gate, seg = inputs
    ctx.save_for_backward(y, gate, seg)


def _backward(ctx, dout):
    y, gate, seg = ctx.saved_tensors
    dy, dgate = gated_residual_triton_backward(dout, y, gate, seg)
    return dout, dy, dgate, None


gated_residual_triton.register_autograd(_backward, setup_context=_setup)


def _compiled_backward(ctx, dout):  # the C++ CPU op (csrc/dit/gated_residual_cpu.cpp)
    y, gate, seg = ctx.saved_tensors
    dy, dgate = torch.ops.sora_kernels.gated_residual_backward(dout, y, gate, seg)
    return dout, dy, dgate, None


if B.compiled_has("gated_residual", "CPU"):
    torch.library.register_fake("sora_kernels::gated_residual")(
        lambda x, y, gate, segment_ids: torch.empty(x.shape, dtype=x.dtype, device=x.device))
    torch.library.register_fake("sora_kernels::gated_residual_backward")(
        lambda dout, y, gate, segment_ids: (torch.empty(y.shape, dtype=y.dtype, device=y.device),
                                            torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)))
    torch.library.register_autograd("sora_kernels::gated_residual", _compiled_backward, setup_context=_setup)

GATED_RESIDUAL_BACKENDS = (
    B.Backend("triton", lambda x, y=None, gate=None, *rest: triton_reasons(x, "gated_residual", (gate,)),
              gated_residual_triton),
    B.Backend("cpu", lambda x, *rest: cpu_reasons(x, "gated_residual"),
              lambda x, y, gate, seg: torch.ops.sora_kernels.gated_residual(x, y, gate, seg)),
    B.Backend("reference", lambda *args: [], ref.gated_residual),
)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, cu_seqlens: torch.Tensor, *,
                   segment_ids: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """x + gate[segment] * y for packed tokens x, y [N, D] and per-segment gates [n, D].

    Args as adaln_norm (cu_seqlens, segment_ids, backend). Returns [N, D] in x.dtype (math in
    fp32). Differentiable in x, y and gate. Equivalent PyTorch: ``x + gate[seg] * y``.
    """
    check_tokens("x", x)
    n, seg = check_segments(x, cu_seqlens, segment_ids)
    check_like("y", y, x, tuple(x.shape))
    check_like("gate", gate, x, (n, x.shape[1]))
    args = (x, y, gate, seg)
    return B.select("gated_residual", GATED_RESIDUAL_BACKENDS, args, backend).run(*args)
