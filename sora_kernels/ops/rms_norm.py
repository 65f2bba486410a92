"""rms_norm: RMSNorm over the last dim, for QK-norm on [N, H, D] (or any [..., D]).

The Triton kernels are adaln_norm's (ops/adaln_norm.py) without the modulation: one program
normalises a [ROWS, BLOCK_D] tile of rows; the backward adds the weight gradient with one
fp32 atomic per column per program.
"""
from __future__ import annotations

import torch

from sora_kernels import backends as B
from sora_kernels.ops.adaln_norm import adaln_backward, adaln_forward, cpu_reasons, triton_reasons
from sora_kernels.reference import dit_ops as ref


@torch.library.custom_op("sora_kernels::rms_norm_triton", mutates_args=())
def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.reshape(-1, x.shape[-1])
    _, out, _, rstd = adaln_forward(rows, None, None, None, None, weight, None, eps, False)
    return out.view(x.shape), rstd


@torch.library.custom_op("sora_kernels::rms_norm_triton_backward", mutates_args=())
def rms_norm_triton_backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    dx, _, _, _, _, dw = adaln_backward(x.reshape(-1, D), dout.reshape(-1, D), None, None, None, None, weight, None,
                                        None, rstd, 0, False)
    return dx.view(x.shape), dw


@rms_norm_triton.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(x.numel() // x.shape[-1],
                                                                             dtype=torch.float32)


@rms_norm_triton_backward.register_fake
def _(dout, x, weight, rstd):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device))


def _setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_triton_backward(dout, x, weight, rstd)
    return dx, dw, None


rms_norm_triton.register_autograd(_backward, setup_context=_setup)

RMS_NORM_BACKENDS = (
    B.Backend("triton", lambda x, weight=None, *rest: triton_reasons(x, "rms_norm", (weight,)),
              lambda x, weight, eps: rms_norm_triton(x, weight, eps)[0]),
    B.Backend("cpu", lambda x, *rest: cpu_reasons(x),
              lambda x, weight, eps: torch.ops.sora_kernels.adaln(
                  x.reshape(-1, x.shape[-1]), None, None, None, None, weight, None, eps, False)[1].view(x.shape)),
    B.Backend("reference", lambda *args: [], ref.rms_norm),
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """RMSNorm of the last dim: x * rsqrt(mean(x^2) + eps) * weight.

    Args:
        x: [..., D], for example queries or keys [N, H, D] (QK-norm).
        weight: [D].
        eps: added to the mean square.
        backend: force "triton", "cpu" or "reference" (default: the first that can run).

    Returns x's shape and dtype (math in fp32). Differentiable in x and weight. With D = 0,
    an empty tensor of x's shape (as the equivalent PyTorch gives).
    Equivalent PyTorch: ``torch.nn.functional.rms_norm(x, (D,), weight, eps)``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a floating-point tensor [..., D], got {got}")
    D = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (D,):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected shape ({D},), got {got}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight: expected dtype {x.dtype} on {x.device} like x, "
                         f"got {weight.dtype} on {weight.device}")
    if not B.finite_number(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    args = (x, weight, float(eps))
    chosen = B.select("rms_norm", RMS_NORM_BACKENDS, args, backend)
    if D == 0:  # nothing to normalise (and the kernels' [-1, D] row views need D > 0): F.rms_norm's empty result
        return x * weight
    return chosen.run(*args)
