"""A diffusion transformer over packed spacetime patches (Sora's denoiser).

Latents of any sizes [C, T_i, H_i, W_i] become one token sequence (patch_embed3d: no padding,
no crops); every block is segment-aware, so each video keeps its own timestep and text
conditioning and attends only to itself:

    x = patch_embed3d(latents)                                [N, D] + Packed (cu_seqlens, positions)
    c = t_embed(t) + text_pool(pooled)                         [n, D] one row per video
    block x depth:
        h = adaln_norm(x, shift1, scale1)                      modulated by c of the token's video
        x = x + gate1 * attn(h)                                varlen_attention over cu_seqlens, QK RMSNorm, 3D rope
        x, h = x + cross_attn(x, text), adaln_norm(.)          varlen_attention to the video's own text tokens
        x = x + gate2 * mlp(h)                                 gelu_tanh
    latents = final_layer_unpatchify(x, shift, scale)          list of [C, T_i, H_i, W_i]

adaLN-Zero: the modulation and output layers start at zero, so every block starts as the
identity and the model's first output is zero. Layout follows DiT's models.py: a dataclass
config with named sizes, shape comments, explicit init. Every hot op is a sora_kernels op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import sora_kernels as sk
from sora_kernels.packed import Packed


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 16                     # latent channels
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    text_dim: int = 768                       # width of the text encoder's token embeddings
    rope_theta: float = 10000.0
    eps: float = 1e-6
    grad_checkpointing: bool = False          # recompute each block in the backward (activation memory / depth)


SIZES = {
    "tiny": DiTConfig(hidden=64, depth=2, heads=4, text_dim=64),            # CPU tests and demos
    # the physics-world run on a CPU (sora_model/e2e.py): one token per latent pixel; on 2
    # cores its steps cost about what tiny's do (rendering and encoding the clips dominate)
    "mini": DiTConfig(patch_size=(1, 1, 1), hidden=128, depth=4, heads=4, text_dim=64),
    "S": DiTConfig(hidden=384, depth=12, heads=6),
    "B": DiTConfig(hidden=768, depth=12, heads=12),
    "L": DiTConfig(hidden=1024, depth=24, heads=16),
    "XL": DiTConfig(hidden=1152, depth=28, heads=16),
    # ~1.05B parameters; 12 heads of 128: the attention kernels pad a head to a power of two,
    # so 16 heads of 96 would waste a quarter of their matrix work, and attention is about
    # half of this size's FLOPs at 32k tokens (bench_dit_train's mixed-32k)
    "1B": DiTConfig(hidden=1536, depth=20, heads=12),
}


@dataclass
class TextBatch:
    """Text conditioning of n videos: token embeddings of all captions packed [M, text_dim]
    (caption i is tokens[cu_seqlens[i]:cu_seqlens[i + 1]]), and pooled [n, text_dim]."""
    tokens: torch.Tensor
    cu_seqlens: torch.Tensor                  # int32 [n + 1]
    max_seqlen: int
    pooled: torch.Tensor


torch.export.register_dataclass(TextBatch, serialized_type_name="sora_model.TextBatch")   # (as Packed)


# -----------------------------------------------------------------------------
# Embedders
# -----------------------------------------------------------------------------

TIMESTEP_FREQUENCIES = 256   # sinusoidal features of a timestep (cos and sin halves)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps in [0, 1] -> [n, D]: sinusoidal features of 1000 t, then an MLP (DiT)."""

    def __init__(self, hidden: int, frequencies: int = TIMESTEP_FREQUENCIES):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


# -----------------------------------------------------------------------------
# Block
# -----------------------------------------------------------------------------

class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D, H = cfg.hidden, cfg.heads
        self.heads, self.eps, self.theta = H, cfg.eps, cfg.rope_theta
        self.modulation = nn.Linear(D, 6 * D)              # shift, scale, gate for attention and MLP
        self.qkv = nn.Linear(D, 3 * D)
        self.q_norm = nn.Parameter(torch.ones(D // H))
        self.k_norm = nn.Parameter(torch.ones(D // H))
        self.proj = nn.Linear(D, D)
        self.cross_norm = nn.Parameter(torch.ones(D))
        self.cross_q = nn.Linear(D, D)
        self.cross_kv = nn.Linear(cfg.text_dim, 2 * D)
        self.cross_proj = nn.Linear(D, D)
        hidden_mlp = int(D * cfg.mlp_ratio)
        self.fc1 = nn.Linear(D, hidden_mlp)
        self.fc2 = nn.Linear(hidden_mlp, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, packed: Packed, text: TextBatch) -> torch.Tensor:
        # x: [N, D] packed tokens; c: [n, D] per video
        N, D = x.shape
        H, Dh = self.heads, D // self.heads
        cu, seg = packed.cu_seqlens, packed.segment_ids
        # Under autocast the linear layers return bf16 while the residual stream x keeps its
        # dtype: their outputs are cast to x's dtype (or q's) before the sora_kernels ops.
        dt = x.dtype
        mods = self.modulation(F.silu(c)).to(dt).chunk(6, dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods                                        # [n, D] each
        h = sk.adaln_norm(x, shift1, scale1, cu, eps=self.eps, segment_ids=seg)                   # [N, D]
        q, k, v = self.qkv(h).view(N, 3, H, Dh).unbind(1)                                        # [N, H, Dh]
        q = sk.rms_norm(q, self.q_norm.to(q.dtype), eps=self.eps)
        k = sk.rms_norm(k, self.k_norm.to(k.dtype), eps=self.eps)
        a = sk.varlen_attention(q, k, v, cu, cu, packed.max_seqlen, packed.max_seqlen,
                                rope=sk.Rope3D(packed.positions, theta=self.theta))                # [N, H, Dh]
        x = sk.gated_residual(x, self.proj(a.reshape(N, D)).to(dt), gate1, cu, segment_ids=seg)
        # cross-attention: each video's tokens to its own caption's tokens
        M = text.tokens.shape[0]
        qc = self.cross_q(sk.rms_norm(x, self.cross_norm.to(dt), eps=self.eps)).view(N, H, Dh)
        kc, vc = self.cross_kv(text.tokens).view(M, 2, H, Dh).unbind(1)                           # [M, H, Dh]
        ca = sk.varlen_attention(qc, kc.to(qc.dtype), vc.to(qc.dtype), cu, text.cu_seqlens, packed.max_seqlen,
                                 text.max_seqlen)
        ones = torch.ones_like(gate2)
        # residual, then MLP norm
        x, h = sk.gated_residual_adaln(x, self.cross_proj(ca.reshape(N, D)).to(dt), ones, shift2, scale2, cu,
                                       eps=self.eps, segment_ids=seg)
        m = self.fc2(sk.gelu_tanh(self.fc1(h)))                                                    # [N, D]
        return sk.gated_residual(x, m.to(dt), gate2, cu, segment_ids=seg)


# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------

class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig = DiTConfig()):
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"heads: expected a divisor of hidden={cfg.hidden}, got {cfg.heads}")
        if (cfg.hidden // cfg.heads) % 2:
            raise ValueError(f"heads: 3D RoPE rotates pairs of features, so hidden / heads must be even; got "
                             f"hidden={cfg.hidden}, heads={cfg.heads} (head dim {cfg.hidden // cfg.heads})")
        self.cfg = cfg
        D = cfg.hidden
        pt, ph, pw = cfg.patch_size
        self.patch_embed = nn.Parameter(torch.empty(D, cfg.in_channels, pt, ph, pw))   # a Conv3d weight
        self.patch_bias = nn.Parameter(torch.zeros(D))
        self.t_embed = TimestepEmbedder(D)
        self.text_pool = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_modulation = nn.Linear(D, 2 * D)
        self.final = nn.Linear(D, cfg.in_channels * pt * ph * pw)
        self.initialize_weights()

    def initialize_weights(self):
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(xavier)
        nn.init.xavier_uniform_(self.patch_embed.view(self.cfg.hidden, -1))
        nn.init.zeros_(self.patch_bias)
        for m in self.t_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
            nn.init.zeros_(block.cross_proj.weight)
            nn.init.zeros_(block.cross_proj.bias)
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def check_inputs(self, latents: Sequence[torch.Tensor], t: torch.Tensor, text: TextBatch) -> None:
        cfg = self.cfg
        if not isinstance(latents, (list, tuple)) or not latents:
            raise ValueError("latents: expected a non-empty list of [C, T, H, W] tensors, "
                             f"got {type(latents).__name__}")
        for i, z in enumerate(latents):
            if z.dim() != 4 or z.shape[0] != cfg.in_channels:
                raise ValueError(f"latents[{i}]: expected [{cfg.in_channels}, T, H, W], got {tuple(z.shape)}")
            if any(s % p for s, p in zip(z.shape[1:], cfg.patch_size)):
                raise ValueError(f"latents[{i}]: the patch {tuple(cfg.patch_size)} does not divide its grid "
                                 f"(T, H, W) = {tuple(z.shape[1:])}")
        n = len(latents)
        if t.shape != (n,):
            raise ValueError(f"t: expected one timestep per video, shape ({n},), got {tuple(t.shape)}")
        if text.pooled.shape != (n, cfg.text_dim) or text.cu_seqlens.shape != (n + 1,):
            raise ValueError(f"text: expected pooled [{n}, {cfg.text_dim}] and cu_seqlens [{n + 1}] (one caption per "
                             f"video), got {tuple(text.pooled.shape)} and {tuple(text.cu_seqlens.shape)}")
        if text.tokens.dim() != 2 or text.tokens.shape[1] != cfg.text_dim:
            raise ValueError(f"text: expected tokens [M, {cfg.text_dim}], got {tuple(text.tokens.shape)}")

    def forward(self, latents: Sequence[torch.Tensor], t: torch.Tensor, text: TextBatch) -> list[torch.Tensor]:
        """latents: list of n noisy latents [C, T_i, H_i, W_i]; t: [n] in [0, 1]; text: the
        videos' captions. Returns the predicted velocity of each, same shapes."""
        self.check_inputs(latents, t, text)
        packed = sk.patch_embed3d(list(latents), self.patch_embed, self.patch_bias, self.cfg.patch_size)
        x = packed.tokens.to(self.patch_embed.dtype)     # [N, D]; the residual stream keeps the weights' dtype
        c = self.t_embed(t) + self.text_pool(text.pooled.to(x.dtype))           # [n, D]
        if text.tokens.dtype != x.dtype:
            text = TextBatch(text.tokens.to(x.dtype), text.cu_seqlens, text.max_seqlen, text.pooled)
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, packed, text, use_reentrant=False)
            else:
                x = block(x, c, packed, text)
        shift, scale = self.final_modulation(F.silu(c)).to(x.dtype).chunk(2, dim=1)   # [n, D] each
        return sk.final_layer_unpatchify(x, shift, scale, self.final.weight, self.final.bias, packed,
                                         self.cfg.patch_size, eps=self.cfg.eps)


def dit_config(name: str, **overrides) -> DiTConfig:
    """A named size from SIZES, with fields overridden."""
    if name not in SIZES:
        raise ValueError(f"name: expected one of {sorted(SIZES)}, got {name!r}")
    return replace(SIZES[name], **overrides)


def parameter_count(cfg: DiTConfig) -> int:
    """Parameters of DiT(cfg), from the shapes (no allocation)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(cfg).parameters())


def forward_flops(cfg: DiTConfig, tokens: Sequence[int], text_tokens: Sequence[int]) -> int:
    """Floating-point operations of one DiT(cfg) forward (a multiply-add is 2) on videos of
    `tokens` patches each, captions of `text_tokens` tokens each: every matrix product of the
    model and both attentions (4 L_q L_k D each). A training step is 3x (MFU counts no
    recomputation). Norms, activations and RoPE are left out, as MFU leaves them out."""
    if len(tokens) != len(text_tokens):
        raise ValueError(f"text_tokens: expected one count per video ({len(tokens)}), got {len(text_tokens)}")
    D, Dm, Dt = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio), cfg.text_dim
    P = cfg.in_channels * math.prod(cfg.patch_size)
    n, N, M = len(tokens), sum(tokens), sum(text_tokens)
    # t_embed, text_pool, final mod.
    per_video = 2 * (TIMESTEP_FREQUENCIES * D + D * D) + 2 * (Dt * D + D * D) + 2 * D * 2 * D
    per_token = 2 * P * D + 2 * D * P                                                   # patch embedding, final layer
    block = (n * 2 * D * 6 * D                                                          # modulation
             + N * 2 * D * (3 * D + D + D + D + 2 * Dm)                                 # qkv, proj, cross q / proj, MLP
             + M * 2 * Dt * 2 * D                                                       # cross k, v from the captions
             + 4 * D * sum(L * L for L in tokens)                                       # self-attention
             + 4 * D * sum(L * m for L, m in zip(tokens, text_tokens)))                 # cross-attention
    return n * per_video + N * per_token + cfg.depth * block


__all__ = ["DiTConfig", "SIZES", "dit_config", "DiT", "DiTBlock", "TextBatch", "TimestepEmbedder", "parameter_count",
           "forward_flops"]
