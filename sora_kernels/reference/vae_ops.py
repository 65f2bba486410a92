"""Reference video-autoencoder ops (pure PyTorch, math in fp32 or wider, result in the input
dtype)."""
from __future__ import annotations

import torch


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-6, act="silu"):
    """Per-frame GroupNorm of x [B, C, T, H, W]: statistics per (b, t, group) over the group's
    channels and the frame's H x W positions; then weight / bias per channel; then SiLU
    when act == "silu"."""
    B, C, T, H, W = x.shape
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    g = wide.reshape(B, num_groups, C // num_groups, T, H * W)
    mean = g.mean(dim=(2, 4), keepdim=True)
    var = (g - mean).pow(2).mean(dim=(2, 4), keepdim=True)
    y = ((g - mean) * torch.rsqrt(var + eps)).reshape(B, C, T, H, W)
    if weight is not None:
        y = y * weight.to(y.dtype).view(1, C, 1, 1, 1)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, C, 1, 1, 1)
    if act == "silu":
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype)


def group_norm_silu_given(x, num_groups, mean, rstd, weight=None, bias=None, act="silu"):
    """group_norm_silu with given statistics mean, rstd [B, T, G] (constants: detached), in
    fp32 or wider. The statistics and the affine fold into one scale and shift per (b, c, t):
    one multiply-add pass and a SiLU (the unfolded form takes six passes)."""
    B, C, T, H, W = x.shape
    wide = torch.promote_types(x.dtype, torch.float32)
    mean, rstd = (s.detach().to(wide).transpose(1, 2).repeat_interleave(C // num_groups, dim=1) for s in (mean, rstd))
    scale = rstd if weight is None else rstd * weight.to(wide).view(1, C, 1)        # [B, C, T]
    shift = -mean * scale if bias is None else bias.to(wide).view(1, C, 1) - mean * scale
    y = torch.addcmul(shift[..., None, None], x.to(wide), scale[..., None, None])
    if act == "silu":
        y = torch.nn.functional.silu(y, inplace=not y.requires_grad)  # in place when no backward reads y
    return y.to(x.dtype)


def group_norm_moments(x, num_groups):
    """(mean, m2) float64 [B, T, G]: per (b, t, group) of x [B, C, T, H, W] (any strides), the
    mean over the group's channels and the frame's positions and M2, the sum of squared
    deviations from it (two passes in float64; zeros where a group has no elements)."""
    B, C, T, H, W = x.shape
    g = x.detach().double().transpose(1, 2).reshape(B, T, num_groups, C // num_groups * H * W)
    if g.shape[-1] == 0:
        zeros = g.new_zeros((B, T, num_groups))
        return zeros, zeros.clone()
    mean = g.mean(-1)
    return mean, (g - mean[..., None]).square().sum(-1)
