"""Reference DiT block ops on packed sequences (pure PyTorch, fp32 math, result in the
input dtype). Each token of segment s (rows cu_seqlens[s]:cu_seqlens[s+1]) uses row s of
the per-segment shift / scale / gate."""
from __future__ import annotations

import math

import torch


def segment_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """int32 [N]: the segment of each token, the last whose offset is at most the token's index
    (so empty segments get none). No device sync, and no slice of cu_seqlens: under torch.export
    a slice of a symbolic length specialises it to at least 2, refusing one-segment batches."""
    tokens = torch.arange(n_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, tokens, right=True, out_int32=True) - 1


def _wide(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def normalize(x: torch.Tensor, norm: str, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm (no bias) or RMSNorm over the last dim, in fp32 or wider."""
    x = x.to(_wide(x))
    if norm == "layer":
        x = x - x.mean(-1, keepdim=True)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight.to(y.dtype) if weight is not None else y


def adaln_norm(x, shift, scale, seg, eps=1e-6, norm="layer", weight=None):
    """y = norm(x) * (1 + scale[seg]) + shift[seg]; x [N, D], shift/scale [n, D], seg int [N]."""
    s = seg.long()
    xn = normalize(x, norm, eps, weight)
    return (xn * (1 + scale.to(xn.dtype)[s]) + shift.to(xn.dtype)[s]).to(x.dtype)


def gated_residual(x, y, gate, seg):
    """x + gate[seg] * y."""
    w = _wide(x)
    return (x.to(w) + gate.to(w)[seg.long()] * y.to(w)).to(x.dtype)


def gated_residual_adaln(x, y, gate, shift, scale, seg, eps=1e-6, norm="layer", weight=None):
    """(h, adaln_norm(h)) with h = x + gate[seg] * y: the residual stream and the next
    block's modulated norm of it. The norm reads h as rounded to x.dtype, as the two
    separate ops would."""
    h = gated_residual(x, y, gate, seg)
    return h, adaln_norm(h, shift, scale, seg, eps, norm, weight)


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last dim (QK-norm on [N, H, D]), weight [D]."""
    return normalize(x, "rms", eps, weight).to(x.dtype)


def gelu_tanh(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    w = x.to(_wide(x))
    return (0.5 * w * (1 + torch.tanh(math.sqrt(2 / math.pi) * (w + 0.044715 * w ** 3)))).to(x.dtype)


def swiglu(gate, up):
    """silu(gate) * up."""
    g = gate.to(_wide(gate))
    return (g * torch.sigmoid(g) * up.to(g.dtype)).to(gate.dtype)


def final_layer_unpatchify(x, shift, scale, weight, bias, seg, patch_size, sizes, eps=1e-6, norm="layer"):
    """DiT's final layer, then unpack_unpatchify: videos [C, Ti, Hi, Wi] from
    linear(adaln_norm(x), weight, bias) (the linear in x.dtype, as nn.Linear)."""
    from sora_kernels.reference.patchify import unpack_unpatchify
    tokens = torch.nn.functional.linear(adaln_norm(x, shift, scale, seg, eps, norm), weight, bias)
    return unpack_unpatchify(tokens, patch_size, sizes)
