"""group_norm_silu: per-frame GroupNorm, affine and SiLU of video activations [B, C, T, H, W]
in one pass, in the contiguous or the channels-last-3d layout.

Statistics are per (b, t, group), so no frame's output depends on another frame: what lets
the causal video decoder run in temporal chunks exactly (sora_model/vae.py).

Order: custom op and autograd -> checks -> backends -> public function. The C++ CPU kernels
are csrc/vae/group_norm_cpu.cpp (op `sora_kernels::group_norm`); Triton and CUDA kernels are
not written yet (they are part of issue 5).
"""
from __future__ import annotations

import math

import torch

from sora_kernels import backends as B
from sora_kernels.reference import vae_ops as ref

ACTS = ("silu", None)


# -----------------------------------------------------------------------------
# Compiled op (C++ CPU): fake and autograd
# -----------------------------------------------------------------------------

def _fake(x, weight, bias, num_groups, eps, silu):
    memory_format = torch.channels_last_3d if _channels_last(x) else torch.contiguous_format
    stats = x.new_empty((x.shape[0], x.shape[2], num_groups))
    return torch.empty_like(x, memory_format=memory_format), stats, torch.empty_like(stats)


def _backward_fake(dy, x, weight, bias, mean, rstd, num_groups, silu):
    memory_format = torch.channels_last_3d if _channels_last(x) else torch.contiguous_format
    C = x.shape[1]
    return (torch.empty_like(x, memory_format=memory_format), x.new_empty(C if weight is not None else 0),
            x.new_empty(C if bias is not None else 0))


def _setup(ctx, inputs, output):
    x, weight, bias, ctx.num_groups, _, ctx.silu = inputs
    _, mean, rstd = output
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.sora_kernels.group_norm_backward(dy, x, weight, bias, mean, rstd, ctx.num_groups,
                                                                    ctx.silu)
    return dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None, None, None


if B.compiled_has("group_norm", "CPU"):
    torch.library.register_fake("sora_kernels::group_norm")(_fake)
    torch.library.register_fake("sora_kernels::group_norm_backward")(_backward_fake)
    torch.library.register_autograd("sora_kernels::group_norm", _backward, setup_context=_setup)


# -----------------------------------------------------------------------------
# Checks
# -----------------------------------------------------------------------------

def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def check_args(x, num_groups, weight, bias, eps, act) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 5-dim tensor [B, C, T, H, W], got {got}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point dtype, got {x.dtype}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of C={C}, got {num_groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape ({C},), got {got}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: expected {x.dtype} on {x.device} like x, got {t.dtype} on {t.device}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    if act not in ACTS:
        raise ValueError(f"act: expected one of {ACTS}, got {act!r}")


# -----------------------------------------------------------------------------
# Backends
# -----------------------------------------------------------------------------

def _cpu_reasons(x, *rest) -> list[str]:
    reasons = B.device_reasons("cpu", x.device, "group_norm")
    if x.dtype != torch.float32:
        reasons.append(f"the C++ kernels run float32, got {x.dtype}")
    return reasons


GROUP_NORM_BACKENDS = (
    B.Backend("cpu", _cpu_reasons,
              lambda x, num_groups, weight, bias, eps, act:
              torch.ops.sora_kernels.group_norm(x, weight, bias, num_groups, eps, act == "silu")[0]),
    B.Backend("reference", lambda *args: [],
              lambda x, num_groups, weight, bias, eps, act: ref.group_norm_silu(x, num_groups, weight, bias, eps, act)),
)


# -----------------------------------------------------------------------------
# Public function
# -----------------------------------------------------------------------------

def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, *, eps: float = 1e-6, act: str | None = "silu",
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
        backend: "cpu" (C++, fp32) or "reference".

    Returns y like x (same shape, dtype and layout). Differentiable in x, weight and bias.
    Equivalent PyTorch (GroupNorm over each frame as an image)::

        y = F.group_norm(x.transpose(1, 2).flatten(0, 1), num_groups, weight, bias, eps)
        F.silu(y.unflatten(0, (B, T)).transpose(1, 2))
    """
    check_args(x, num_groups, weight, bias, eps, act)
    args = (x, num_groups, weight, bias, float(eps), act)
    return B.select("group_norm_silu", GROUP_NORM_BACKENDS, args, backend).run(*args)
