"""latent_denorm: the video decoder's input epilogue in one pass over the latent: the
per-channel de-normalisation z * scale[c] + shift[c], and the number of non-finite values
(NaN or +-Inf) in each (batch, frame), so the decoder can say which latent frames are bad
without a second pass.

Order: Triton kernel -> launcher -> custom op and autograd -> compiled op's fake and autograd
-> backends -> public function. Backends: cuda (csrc/vae/epilogue_cuda.cu), triton, cpu
(csrc/vae/epilogue_cpu.cpp, float32), reference. Differentiable in z (dz = dy * scale);
scale and shift are constants (a VAE's latent statistics).
"""
from __future__ import annotations

import torch

from sora_kernels import backends as B

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

BLOCK = 1024

if B.TRITON_MISSING is None:

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["T", "blocks_per_plane"])
    def latent_denorm_kernel(z_ptr, out_ptr, scale_ptr, shift_ptr, nan_ptr, C, T, S, blocks_per_plane,
                             BLOCK: tl.constexpr):
        """BLOCK positions of one (b, c, t) plane of S = h * w positions (z contiguous
        [B, C, T, h, w]): out = z * scale[c] + shift[c]; NaN and +-Inf counted into nan[b, t]."""
        pid = tl.program_id(0)
        plane = pid // blocks_per_plane            # (b * C + c) * T + t
        offs = (pid % blocks_per_plane) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S
        t = plane % T
        c = (plane // T) % C
        b = plane // (C * T)
        base = plane.to(tl.int64) * S
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        y = z * tl.load(scale_ptr + c) + tl.load(shift_ptr + c)
        tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
        n = tl.sum((~(tl.abs(z) <= 3.4028234663852886e38)).to(tl.int32), 0)   # NaN or +-Inf
        if n > 0:
            tl.atomic_add(nan_ptr + b * T + t, n)


def launch(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.contiguous()
    Bn, C, T, h, w = z.shape
    out = torch.empty_like(z)
    nan = torch.zeros((Bn, T), dtype=torch.int32, device=z.device)
    S = h * w
    if z.numel():
        blocks = triton.cdiv(S, BLOCK)
        latent_denorm_kernel[(Bn * C * T * blocks,)](z, out, scale, shift, nan, C, T, S, blocks, BLOCK=BLOCK)
    return out, nan


@torch.library.custom_op("sora_kernels::latent_denorm_triton", mutates_args=())
def latent_denorm_triton(z: torch.Tensor, scale: torch.Tensor,
                         shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return launch(z, scale, shift)


def _fake(z, scale, shift):
    return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty((z.shape[0], z.shape[2]),
                                                                                   dtype=torch.int32)


latent_denorm_triton.register_fake(_fake)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the 16- and 32-bit dtypes, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _backward(ctx, dy, _dnan):
    (scale,) = ctx.saved_tensors
    acc = _compute_dtype(dy.dtype)
    return (dy.to(acc) * scale.to(acc).view(1, -1, 1, 1, 1)).to(dy.dtype), None, None


latent_denorm_triton.register_autograd(_backward, setup_context=_setup)

if B.compiled_has("latent_denorm", "CPU"):
    torch.library.register_fake("sora_kernels::latent_denorm")(_fake)
    torch.library.register_autograd("sora_kernels::latent_denorm", _backward, setup_context=_setup)


def reference(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    C, acc = z.shape[1], _compute_dtype(z.dtype)
    out = (z.to(acc) * scale.to(acc).view(1, C, 1, 1, 1) + shift.to(acc).view(1, C, 1, 1, 1)).to(z.dtype)
    return out, (~torch.isfinite(z)).sum((1, 3, 4), dtype=torch.int32)


def _kernel_reasons(name: str, dtypes: tuple[torch.dtype, ...], runs: str):
    """The reasons function of a kernel backend: its device, and the dtypes it runs."""
    def reasons(z, *rest) -> list[str]:
        out = B.device_reasons(name, z.device, "latent_denorm")
        if z.dtype not in dtypes:
            out.append(f"the {runs}, got {z.dtype}")
        return out
    return reasons


_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _compiled(z, scale, shift):
    return torch.ops.sora_kernels.latent_denorm(z, scale, shift)


# Triton before the CUDA C++ kernel: on an H200 (2026-11-26, 1x16x33x90x160 fp32) Triton took
# 0.051 ms (p20-p80 0.046-0.059) and CUDA C++ 0.064 (0.064-0.065).
LATENT_DENORM_BACKENDS = (
    B.Backend("triton", _kernel_reasons("triton", _GPU_DTYPES, "kernel runs float16, bfloat16 and float32"),
              latent_denorm_triton),
    B.Backend("cuda", _kernel_reasons("cuda", _GPU_DTYPES, "kernel runs float16, bfloat16 and float32"), _compiled),
    B.Backend("cpu", _kernel_reasons("cpu", (torch.float32,), "C++ kernel runs float32"), _compiled),
    B.Backend("reference", lambda *args: [], reference),
)


def _per_channel(name: str, value, C: int, z: torch.Tensor) -> torch.Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((C,), float(value), device=z.device, dtype=_compute_dtype(z.dtype))
    if not isinstance(value, torch.Tensor) or value.shape != (C,):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name}: expected a float or a tensor of shape ({C},) (one per latent channel), got {got}")
    if value.device != z.device:
        raise ValueError(f"{name}: expected it on z's device {z.device}, got {value.device}")
    return value.to(_compute_dtype(z.dtype)).contiguous()


def latent_denorm(z: torch.Tensor, scale, shift, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z [B, C, T, h, w] -> (z * scale[c] + shift[c] in z's dtype, the count of
    non-finite values (NaN, +-Inf) int32 [B, T]),
    in one pass. scale, shift: floats or tensors of shape [C]. float64 z runs on the reference
    backend, in float64 (the kernels run float16, bfloat16 and float32, in float32).

    Equivalent PyTorch::

        out = (z.float() * scale.view(1, C, 1, 1, 1) + shift.view(1, C, 1, 1, 1)).to(z.dtype)
        nan = (~torch.isfinite(z)).sum((1, 3, 4))
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 5:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z: expected a 5-dim tensor [B, C, T, h, w], got {got}")
    if z.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"z: expected float16, bfloat16, float32 or float64 (the reference backend), got {z.dtype}")
    C = z.shape[1]
    args = (z, _per_channel("scale", scale, C, z), _per_channel("shift", shift, C, z))
    return B.select("latent_denorm", LATENT_DENORM_BACKENDS, args, backend).run(*args)
