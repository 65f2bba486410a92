"""sora_kernels: kernels for video diffusion transformers.

Public ops (differentiable but group_norm_moments, torch.compile-friendly; each has a pure-PyTorch reference backend
and some of cuda / triton / cpu: the README's op table says which; sora_kernels.backends says
how one is picked):

    patchify3d, unpatchify3d             [B, C, T, H, W] <-> [B, L, C*pt*ph*pw]
    pack_patchify, unpack_unpatchify     list of [C, Ti, Hi, Wi] <-> one packed sequence (Packed)
    patch_embed3d                        pack_patchify fused with the patch projection (Conv3d per video)
    varlen_attention                     attention over packed segments (cu_seqlens), optional 3D rope
    rope3d                               3D rotary embedding of [N, H, D] from (t, h, w) positions
    adaln_norm, gated_residual,          segment-aware adaLN and gated residual on packed tokens
    gated_residual_adaln                 (the fused residual -> norm -> modulate)
    rms_norm                             RMSNorm of the last dim (QK-norm)
    gelu_tanh, swiglu                    fused MLP activations
    final_layer_unpatchify               DiT's final layer (modulated norm, linear) fused with unpack_unpatchify
    group_norm_silu                      per-frame GroupNorm + SiLU of video activations (the VAE's norm)
    group_norm_moments                   its per-frame statistics (mean, M2) of any view: a tiled decode's passes
    latent_denorm                        the decoder's input epilogue: per-channel de-normalisation and a
                                         count of NaN / Inf per frame
    frames_to_uint8                      the decoder's output epilogue: [C, T, H, W] -> uint8 frames [T, H, W, C]

`python -m sora_kernels.info` prints what is built and usable here.
"""
from sora_kernels.backends import NoBackendError
from sora_kernels.ops.activations import gelu_tanh, swiglu
from sora_kernels.ops.adaln_norm import adaln_norm, gated_residual_adaln
from sora_kernels.ops.final_layer_unpatchify import final_layer_unpatchify
from sora_kernels.ops.frames_to_uint8 import frames_to_uint8
from sora_kernels.ops.gated_residual import gated_residual
from sora_kernels.ops.group_norm_moments import group_norm_moments
from sora_kernels.ops.group_norm_silu import group_norm_silu
from sora_kernels.ops.latent_denorm import latent_denorm
from sora_kernels.ops.rms_norm import rms_norm
from sora_kernels.ops.pack_patchify import pack_patchify, unpack_unpatchify
from sora_kernels.ops.patch_embed3d import patch_embed3d
from sora_kernels.ops.patchify3d import patchify3d, unpatchify3d
from sora_kernels.ops.rope3d import rope3d
from sora_kernels.ops.varlen_attention import Rope3D, varlen_attention
from sora_kernels.packed import Packed

__version__ = "0.1.0"

__all__ = ["patchify3d", "unpatchify3d", "pack_patchify", "unpack_unpatchify", "patch_embed3d", "Packed",
           "varlen_attention", "Rope3D", "rope3d", "adaln_norm", "gated_residual", "gated_residual_adaln", "rms_norm",
           "gelu_tanh", "swiglu", "final_layer_unpatchify", "group_norm_silu", "group_norm_moments", "latent_denorm",
           "frames_to_uint8", "NoBackendError"]
