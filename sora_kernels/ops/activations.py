"""gelu_tanh and swiglu: the DiT MLP activations, fused forward and backward.

Order: Triton kernel -> launcher -> custom ops and autograd -> backends -> public functions.
One elementwise kernel serves both (KIND), forward and backward: each is one pass reading
its inputs once and writing its outputs once, where eager PyTorch takes several.
"""
from __future__ import annotations

import torch

from sora_kernels import backends as B
from sora_kernels.reference import dit_ops as ref

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

BLOCK = 2048  # elements per program


def num_warps(dtype: torch.dtype) -> int:
    """4 warps (16 elements a thread); fp16 takes 8: at 4 its gelu_tanh backward spilled 24-32
    bytes at 72 registers (sm_90 with Triton 3.8, sm_80 and sm_90 with 3.6; testing/aot.py)."""
    return 8 if dtype == torch.float16 else 4


if B.TRITON_MISSING is None:

    @triton.jit
    def _tanh(z):
        # tanh through exp2: no tl.tanh in every Triton version; |z| clamped so exp2 stays finite.
        e = tl.exp2(-2.8853900817779268 * tl.abs(z))  # exp(-2|z|)
        t = (1.0 - e) / (1.0 + e)
        return tl.where(z < 0, -t, t)

    @triton.jit
    def activation_kernel(
        a_ptr,        # gelu: x; swiglu: gate
        b_ptr,        # swiglu: up, else None
        dout_ptr,     # backward: gradient of the output, else None
        out_ptr,      # forward: the activation; backward: gradient of a
        db_ptr,       # swiglu backward: gradient of b, else None
        n,
        KIND: tl.constexpr,      # 0: gelu_tanh, 1: swiglu
        BACKWARD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """BLOCK elements of gelu_tanh(a) or silu(a) * b, or of their gradients."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if KIND == 0:
            inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
            t = _tanh(inner)
            if BACKWARD:
                dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                dinner = 0.7978845608028654 * (1.0 + 3 * 0.044715 * a * a)
                grad = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * dinner
                tl.store(out_ptr + offs, (dout * grad).to(out_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(out_ptr + offs, (0.5 * a * (1.0 + t)).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp2(-1.4426950408889634 * a))
            silu = a * sig
            if BACKWARD:
                dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + offs, (dout * b * sig * (1.0 + a * (1.0 - sig))).to(out_ptr.dtype.element_ty),
                         mask=mask)
                tl.store(db_ptr + offs, (dout * silu).to(db_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(out_ptr + offs, (silu * b).to(out_ptr.dtype.element_ty), mask=mask)


def launch(kind: int, a, b=None, dout=None):
    """Forward: the activation. Backward (dout given): (grad of a, grad of b or None)."""
    a = a.contiguous()
    b = b.contiguous() if b is not None else None
    out = torch.empty_like(a)
    db = torch.empty_like(b) if (b is not None and dout is not None) else None
    if a.numel():
        activation_kernel[(triton.cdiv(a.numel(), BLOCK),)](
            a, b, dout.contiguous() if dout is not None else None, out, db,
            a.numel(), KIND=kind, BACKWARD=dout is not None, BLOCK=BLOCK, num_warps=num_warps(a.dtype))
    return out, db


@torch.library.custom_op("sora_kernels::gelu_tanh_triton", mutates_args=())
def gelu_tanh_triton(x: torch.Tensor) -> torch.Tensor:
    return launch(0, x)[0]


@torch.library.custom_op("sora_kernels::gelu_tanh_triton_backward", mutates_args=())
def gelu_tanh_triton_backward(dout: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return launch(0, x, dout=dout)[0]


@torch.library.custom_op("sora_kernels::swiglu_triton", mutates_args=())
def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return launch(1, gate, up)[0]


@torch.library.custom_op("sora_kernels::swiglu_triton_backward", mutates_args=())
def swiglu_triton_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    return launch(1, gate, up, dout)


def _empty(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor like x: the layout every kernel output has."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


gelu_tanh_triton.register_fake(lambda x: _empty(x))
gelu_tanh_triton_backward.register_fake(lambda dout, x: _empty(x))
swiglu_triton.register_fake(lambda gate, up: _empty(gate))
swiglu_triton_backward.register_fake(lambda dout, gate, up: (_empty(gate), _empty(up)))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


gelu_tanh_triton.register_autograd(
    lambda ctx, dout: gelu_tanh_triton_backward(dout, *ctx.saved_tensors), setup_context=_save_inputs)
swiglu_triton.register_autograd(
    lambda ctx, dout: swiglu_triton_backward(dout, *ctx.saved_tensors), setup_context=_save_inputs)


def _compiled_setup(ctx, inputs, output):
    ctx.kind, a, b = inputs
    ctx.save_for_backward(a, b)


def _compiled_backward(ctx, dout):  # the C++ CPU op (csrc/dit/gated_residual_cpu.cpp)
    a, b = ctx.saved_tensors
    da, db = torch.ops.sora_kernels.activation_backward(ctx.kind, dout, a, b)
    return None, da, db if b is not None else None


if B.compiled_has("activation", "CPU"):
    torch.library.register_fake("sora_kernels::activation")(lambda kind, a, b: _empty(a))
    torch.library.register_fake("sora_kernels::activation_backward")(
        lambda kind, dout, a, b: (_empty(a), a.new_empty(a.shape if b is not None else (0,))))
    torch.library.register_autograd("sora_kernels::activation", _compiled_backward, setup_context=_compiled_setup)


def _cpu_reasons(x: torch.Tensor) -> list[str]:
    reasons = B.device_reasons("cpu", x.device, "activation")
    if x.dtype != torch.float32:
        reasons.append(f"the C++ kernels run float32, got {x.dtype}")
    return reasons


def _reasons(x: torch.Tensor, op: str) -> list[str]:
    reasons = B.device_reasons("triton", x.device, op)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"runs fp16, bf16 and fp32, got {x.dtype}")
    return reasons


GELU_BACKENDS = (
    B.Backend("triton", lambda x: _reasons(x, "gelu_tanh"), gelu_tanh_triton),
    B.Backend("cpu", _cpu_reasons, lambda x: torch.ops.sora_kernels.activation(0, x, None)),
    B.Backend("reference", lambda x: [], ref.gelu_tanh),
)
SWIGLU_BACKENDS = (
    B.Backend("triton", lambda gate, up: _reasons(gate, "swiglu"), swiglu_triton),
    B.Backend("cpu", lambda gate, up: _cpu_reasons(gate),
              lambda gate, up: torch.ops.sora_kernels.activation(1, gate, up)),
    B.Backend("reference", lambda gate, up: [], ref.swiglu),
)


def _check_float(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a floating-point tensor, got {got}")


def gelu_tanh(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """GELU with the tanh approximation (DiT's MLP), math in fp32, result in x.dtype.
    Equivalent PyTorch: ``F.gelu(x, approximate="tanh")``. Differentiable."""
    _check_float("x", x)
    return B.select("gelu_tanh", GELU_BACKENDS, (x,), backend).run(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, math in fp32, result in gate.dtype. Equivalent PyTorch:
    ``F.silu(gate) * up``. Differentiable in both."""
    _check_float("gate", gate)
    _check_float("up", up)
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up: expected shape {tuple(gate.shape)}, dtype {gate.dtype} and device {gate.device} "
                         f"like gate, got {tuple(up.shape)}, {up.dtype}, {up.device}")
    return B.select("swiglu", SWIGLU_BACKENDS, (gate, up), backend).run(gate, up)
