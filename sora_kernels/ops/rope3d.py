"""rope3d: 3D rotary position embedding of [N, H, D] from (t, h, w) token positions.

Order: Triton helpers and kernel -> launcher -> custom op and autograd -> checks ->
backends -> public function. `rotate_tile` is also the rotation that varlen_attention
fuses into its loads (ops/varlen_attention.py).
"""
from __future__ import annotations

import torch

from sora_kernels import backends as B
from sora_kernels.reference import rope as ref

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

# A program rotates TILE_ELEMENTS // BLOCK_D (token, head) rows: 32 fp32 values a thread at 4
# warps, at every head dim. (32 rows at any head dim gave head dim 64 16 values a thread, where
# ptxas kept the accurate sin / cos's values in 80 registers and spilled 8 bytes on sm_90.)
TILE_ELEMENTS = 4096




def block_rows(BLOCK_D: int) -> int:
    return TILE_ELEMENTS // BLOCK_D


MAX_HEAD_DIM = 256

# -----------------------------------------------------------------------------
# Triton
# -----------------------------------------------------------------------------

if B.TRITON_MISSING is None:

    @triton.jit
    def _sincos(angle, FAST: tl.constexpr):
        """(sin, cos) of fp32 angles. FAST: reduce to [-pi, pi] (2*pi split in two constants,
        exact for |angle| < 2**16 turns) and use the approximate hardware instructions (absolute
        error ~1e-6); else the accurate library functions."""
        if FAST:
            turns = tl.floor(angle * 0.15915494309189535 + 0.5)
            r = angle - turns * 6.28125 - turns * 0.0019353071795864769
            sin = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True,
                                            pack=1)
            cos = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True,
                                            pack=1)
        else:
            sin = tl.sin(angle)
            cos = tl.cos(angle)
        return sin, cos

    @triton.jit
    def rotate_tile(x, pos_ptr, tokens, token_mask, freq_ptr, INVERSE: tl.constexpr, FAST: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        """Rotates the pairs (x[:, 2i], x[:, 2i+1]) of an fp32 tile x [R, BLOCK_D] whose row r
        belongs to token tokens[r] (int64 [R]; rows with token_mask False stay zeros).
        freq_ptr: fp32 [2, BLOCK_D/2], the inverse frequency of each pair (0 past the head
        dim) and the position axis (0 t, 1 h, 2 w) it turns with (rope_table)."""
        R: tl.constexpr = x.shape[0]
        pair = tl.arange(0, BLOCK_D // 2)
        inv_freq = tl.load(freq_ptr + pair)
        axis = tl.load(freq_ptr + BLOCK_D // 2 + pair)[None, :]
        p_t = tl.load(pos_ptr + tokens * 3 + 0, mask=token_mask, other=0).to(tl.float32)
        p_h = tl.load(pos_ptr + tokens * 3 + 1, mask=token_mask, other=0).to(tl.float32)
        p_w = tl.load(pos_ptr + tokens * 3 + 2, mask=token_mask, other=0).to(tl.float32)
        pos = tl.where(axis == 0.0, p_t[:, None], tl.where(axis == 1.0, p_h[:, None], p_w[:, None]))
        sin, cos = _sincos(pos * inv_freq[None, :], FAST)                        # [R, BLOCK_D/2]
        if INVERSE:
            sin = -sin
        even, odd = tl.split(tl.reshape(x, (R, BLOCK_D // 2, 2)))
        return tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (R, BLOCK_D))

    @triton.jit
    def aligned(x, ALIGN: tl.constexpr):
        """x as the compiler may take it, a multiple of ALIGN, which the launcher checked for the
        head dim and the strides (alignment; rope3d and the attention kernels). The JIT marks
        only multiples of 16 (ALIGN 16: the compiler knows already), so at head dims of 72 or 96
        (DiT-XL's 72) the rows' loads and stores were 2-byte scalars; known to be multiples of 8
        (ALIGN 8), they move 16-byte vectors."""
        if ALIGN == 8:
            return x // 8 * 8
        return x

    @triton.jit
    def rope3d_kernel(
        x_ptr,        # [N, H, D] input, rows of D contiguous (strides in elements below)
        out_ptr,      # [N, H, D] output, contiguous
        pos_ptr,      # int32 [N, 3] (t, h, w), contiguous
        freq_ptr,     # fp32 [2, BLOCK_D/2] (rope_table)
        n_rows,       # N * H
        heads,        # H
        stride_xn, stride_xh,
        head_dim,
        INVERSE: tl.constexpr,
        FAST: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ALIGN: tl.constexpr,  # the head dim and x's strides are multiples of it (16, 8, 1)
    ):
        """Rotates BLOCK_ROWS (token, head) rows: out = R(positions) x (or R^T x when INVERSE)."""
        stride_xn, stride_xh, head_dim = aligned(stride_xn, ALIGN), aligned(stride_xh, ALIGN), aligned(head_dim, ALIGN)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        tokens = rows // heads
        d = tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < head_dim)[None, :]
        x = tl.load(x_ptr + tokens[:, None] * stride_xn + (rows % heads)[:, None] * stride_xh + d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        y = rotate_tile(x, pos_ptr, tokens, row_mask, freq_ptr, INVERSE, FAST, BLOCK_D)
        tl.store(out_ptr + rows[:, None] * head_dim + d[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def block_d(head_dim: int) -> int:
    """The padded head dim the kernels work on: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


_TABLES: dict = {}


def rope_table(head_dim: int, theta: float, sections, device: torch.device) -> torch.Tensor:
    """fp32 [2, BLOCK_D/2]: each pair's inverse frequency (the reference's fp32 values, so the
    angles match it bit for bit; 0 past the head dim) and its axis (0 t, 1 h, 2 w). Cached."""
    key = (head_dim, float(theta), tuple(sections), device)
    if key not in _TABLES:
        half = block_d(head_dim) // 2
        inv_freq, axis = ref.inverse_frequencies(head_dim, theta, sections)
        table = torch.zeros(2, half, dtype=torch.float32)
        table[0, :head_dim // 2] = inv_freq
        table[1, :head_dim // 2] = axis.float()
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def fast_trig(dtype: torch.dtype, device: torch.device) -> bool:
    """Approximate sin/cos (hardware instructions) for half-precision inputs on a GPU, where
    their ~1e-6 error is far below the rounding of the result; accurate ones otherwise."""
    return device.type == "cuda" and torch.version.hip is None and dtype != torch.float32  # PTX: NVIDIA only


def launch_rope3d(x: torch.Tensor, positions: torch.Tensor, theta: float, sections, inverse: bool) -> torch.Tensor:
    N, H, D = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    out = torch.empty((N, H, D), dtype=x.dtype, device=x.device)
    if N * H == 0:
        return out
    BLOCK_D = block_d(D)
    BLOCK_ROWS = block_rows(BLOCK_D)
    rope3d_kernel[(triton.cdiv(N * H, BLOCK_ROWS),)](
        x, out, positions.contiguous(), rope_table(D, theta, sections, x.device), N * H, H, x.stride(0), x.stride(1),
        D, INVERSE=inverse, FAST=fast_trig(x.dtype, x.device), BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=BLOCK_D,
        ALIGN=alignment(D, x), num_warps=4)
    return out


def alignment(head_dim: int, *tensors: torch.Tensor) -> int:
    """The kernels' ALIGN (aligned): the largest of 16, 8 and 1 that divides the head dim and
    the row and head strides of `tensors` (the other tensors the kernels touch are contiguous
    [N, heads, head_dim])."""
    values = [head_dim] + [s for t in tensors for s in t.stride()[:2]]
    return next(a for a in (16, 8, 1) if all(v % a == 0 for v in values))


# -----------------------------------------------------------------------------
# Custom op and autograd
# -----------------------------------------------------------------------------

@torch.library.custom_op("sora_kernels::rope3d_triton", mutates_args=())
def rope3d_triton(x: torch.Tensor, positions: torch.Tensor, theta: float, sections: list[int],
                  inverse: bool) -> torch.Tensor:
    return launch_rope3d(x, positions, theta, sections, inverse)


@rope3d_triton.register_fake
def _(x, positions, theta, sections, inverse):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _rope_backward(ctx, grad):
    # The rotation is orthogonal: its backward is the opposite rotation.
    (positions,) = ctx.saved_tensors
    return rope3d_triton(grad, positions, ctx.theta, ctx.sections, not ctx.inverse), None, None, None, None


def _rope_setup(ctx, inputs, output):
    _, positions, ctx.theta, ctx.sections, ctx.inverse = inputs
    ctx.save_for_backward(positions)


rope3d_triton.register_autograd(_rope_backward, setup_context=_rope_setup)


# The C++ CPU kernel (csrc/attention/rope3d_cpu.cpp): float32, the angles of each axis's
# position values tabulated once per call. Half precision runs in float32 (cast in and out).
def _cpu_backward(ctx, grad):
    positions, inv_freq = ctx.saved_tensors
    dx = torch.ops.sora_kernels.rope3d(grad, positions, inv_freq, ctx.sections, not ctx.inverse)
    return dx, None, None, None, None


def _cpu_setup(ctx, inputs, output):
    _, positions, inv_freq, ctx.sections, ctx.inverse = inputs
    ctx.save_for_backward(positions, inv_freq)


CPU_KERNEL_BUILT = B.compiled_has("rope3d", "CPU")
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if CPU_KERNEL_BUILT:
    torch.library.register_fake("sora_kernels::rope3d")(lambda x, *rest: torch.empty(x.shape, dtype=x.dtype,
                                                                                       device=x.device))
    torch.library.register_autograd("sora_kernels::rope3d", _cpu_backward, setup_context=_cpu_setup)


def rope3d_cpu(x: torch.Tensor, positions: torch.Tensor, theta: float, sections, inverse: bool = False):
    """rope3d of CPU tensors (the cpu backend's, and the cpu attention backend's rotation of q,
    k and of their gradients): the C++ kernel in float32 (16-bit dtypes cast there and back),
    or the reference where it cannot run (float64, or a build without it)."""
    if not CPU_KERNEL_BUILT or x.dtype not in CPU_DTYPES:
        return ref.rope3d(x, positions, theta, sections, inverse)
    inv_freq, _ = ref.inverse_frequencies(x.shape[2], theta, sections)
    out = torch.ops.sora_kernels.rope3d(x.float(), positions, inv_freq, list(sections), inverse)
    return out.to(x.dtype)


# -----------------------------------------------------------------------------
# Checks (shared with varlen_attention)
# -----------------------------------------------------------------------------

def check_sections(head_dim: int, sections, name: str = "x") -> tuple[int, int, int]:
    """(t, h, w) features per axis: the default thirds, or `sections` checked against head_dim
    (the last dim of the tensor called `name`)."""
    if head_dim % 2 != 0:
        raise ValueError(f"{name}: rope rotates pairs of features, expected an even head dim D, got D={head_dim}")
    if sections is None:
        return ref.default_sections(head_dim)
    s = tuple(sections) if isinstance(sections, (list, tuple)) else ()
    if len(s) != 3 or not all(isinstance(n, int) and n >= 0 and n % 2 == 0 for n in s):
        raise ValueError(f"sections: expected 3 non-negative even ints (t, h, w), got {sections!r}")
    if sum(s) != head_dim:
        raise ValueError(f"sections: expected (t, h, w) summing to the head dim {head_dim}, got {s} (sum {sum(s)})")
    return s


def check_positions(name: str, positions, n_tokens: int, device: torch.device) -> None:
    if not isinstance(positions, torch.Tensor):
        raise ValueError(f"{name}: expected an int32 tensor [N, 3], got {type(positions).__name__}")
    if positions.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32, got {positions.dtype}")
    if tuple(positions.shape) != (n_tokens, 3):
        raise ValueError(f"{name}: expected shape ({n_tokens}, 3) (one (t, h, w) per token), "
                         f"got {tuple(positions.shape)}")
    if positions.device != device:
        raise ValueError(f"{name}: expected device {device} like the tokens, got {positions.device}")


def check_theta(theta) -> float:
    if not B.finite_number(theta) or theta <= 1:
        raise ValueError(f"theta: expected a finite number > 1, got {theta!r}")
    return float(theta)


# -----------------------------------------------------------------------------
# Backends
# -----------------------------------------------------------------------------

def _reasons(name: str):
    def reasons(x, positions, theta, sections):
        out = B.device_reasons(name, x.device, "rope3d") if name in ("triton", "cpu") else []
        if name == "cpu" and x.dtype not in CPU_DTYPES:
            out.append(f"runs fp16, bf16 and fp32 (in fp32), got {x.dtype}")
        if name == "triton" and x.shape[2] > MAX_HEAD_DIM:
            out.append(f"compiled for head dims <= {MAX_HEAD_DIM}, got D={x.shape[2]}")
        if name == "triton" and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            out.append(f"runs fp16, bf16 and fp32, got {x.dtype}")
        return out
    return reasons


ROPE_BACKENDS = (
    B.Backend("triton", _reasons("triton"),
              lambda x, positions, theta, sections: rope3d_triton(x, positions, theta, list(sections), False)),
    B.Backend("cpu", _reasons("cpu"), rope3d_cpu),
    B.Backend("reference", _reasons("reference"),
              lambda x, positions, theta, sections: ref.rope3d(x, positions, theta, sections)),
)


# -----------------------------------------------------------------------------
# Public function
# -----------------------------------------------------------------------------

def rope3d(x: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0, sections=None,
           backend: str | None = None) -> torch.Tensor:
    """3D rotary position embedding.

    Args:
        x: [N, H, D] (D even), for example the queries or keys of packed videos.
        positions: int32 [N, 3], the (t, h, w) grid index of each token (Packed.positions).
        theta: base of the frequencies.
        sections: features per axis (t, h, w), even, summing to D. Default: h and w a third
            of D each rounded to even, t the rest (reference.rope.default_sections).
        backend: force "triton", "cpu" or "reference" (default: the first that can run).

    Returns [N, H, D] in x.dtype (math in fp32). Differentiable. Equivalent PyTorch::

        angle = positions[:, axis].float() * inv_freq      # [N, D/2], pair i of section a
        even, odd = x.float().unflatten(-1, (D // 2, 2)).unbind(-1)   # turns by theta**(-2j/d_a)
        out = stack((even * cos - odd * sin, odd * cos + even * sin), -1).flatten(-2)
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 3-dim tensor [N, H, D], got {got}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor (a rotation of integers would be rounded), "
                         f"got {x.dtype}")
    sections = check_sections(x.shape[2], sections)
    check_positions("positions", positions, x.shape[0], x.device)
    theta = check_theta(theta)
    args = (x, positions, theta, sections)
    return B.select("rope3d", ROPE_BACKENDS, args, backend).run(*args)
