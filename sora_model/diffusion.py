"""Rectified flow (flow matching) on packed batches of latents of different sizes: the
training objective and the Euler and Heun samplers with classifier-free guidance.

    x_t = (1 - t) x_0 + t eps       t in [0, 1], t = 1 pure noise
    v   = eps - x_0                 what the model predicts: dx_t / dt

Each video of a packed batch has its own timestep. Timesteps are drawn logit-normal
(t = sigmoid(N(mean, std))) and then shifted toward noise for videos with more tokens,
t' = s t / (1 + (s - 1) t) with s = sqrt(tokens / base_tokens): a bigger video (more frames or
pixels) keeps more of its signal at a given t, so it needs more noise to be as hard (SD3's
resolution shift, here in tokens, so duration counts as resolution does). Sampling walks the
same shifted schedule, per video, from t = 1 to 0.

Sampling at any size: the output size is the size of the noise. `sample` takes one latent
shape per video (any frames, height, width, aspect ratio) and denoises them all as one packed
batch; with guidance the conditional and unconditional branches are one batch too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sora_model.checks import is_int, is_real
from sora_model.dit import TextBatch


@dataclass(frozen=True)
class FlowConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    base_tokens: int = 256            # tokens of a video whose timesteps are not shifted (s = 1)


def token_counts(shapes: Sequence[Sequence[int]], patch_size: Sequence[int]) -> torch.Tensor:
    """Tokens of each latent [C, T, H, W] cut into patches (float [n])."""
    return torch.tensor([math.prod(s // p for s, p in zip(shape[1:], patch_size)) for shape in shapes],
                        dtype=torch.float32)


def time_shift(tokens: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    """s = sqrt(tokens / base_tokens), per video."""
    return (tokens / cfg.base_tokens).sqrt()


def shift_timesteps(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t): 0 and 1 stay, s > 1 moves t toward noise."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(tokens: torch.Tensor, cfg: FlowConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training timesteps, one per video: logit-normal, then shifted by the video's tokens."""
    u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(tokens.shape, generator=generator))
    return shift_timesteps(u, time_shift(tokens, cfg))


Model = Callable[[list, torch.Tensor, TextBatch], list]


def flow_error(model: Model, latents: Sequence[torch.Tensor], text: TextBatch, t: torch.Tensor,
               noise: Sequence[torch.Tensor]) -> torch.Tensor:
    """The summed squared error of the predicted velocity over every latent element, for
    given timesteps t [n] and noise (one tensor per latent)."""
    td = t.to(latents[0].device)
    noisy = [(1 - td[i]) * z + td[i] * e.to(z.device, z.dtype) for i, (z, e) in enumerate(zip(latents, noise))]
    pred = model(noisy, td, text)
    return sum(((p.float() - (e.to(z.device).float() - z.float())) ** 2).sum() for p, e, z in zip(pred, noise, latents))


def flow_loss(model: Model, latents: Sequence[torch.Tensor], text: TextBatch, patch_size: Sequence[int],
              cfg: FlowConfig = FlowConfig(), generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, t): the mean squared error of the predicted velocity over every latent element
    of the packed batch (each token weighs the same, whatever its video's size), and the
    timesteps drawn."""
    device = latents[0].device
    t = sample_timesteps(token_counts([z.shape for z in latents], patch_size), cfg, generator)
    noise = [torch.randn(z.shape, generator=generator).to(device, z.dtype) for z in latents]
    return flow_error(model, latents, text, t, noise) / sum(z.numel() for z in latents), t


# -----------------------------------------------------------------------------
# Sampling
# -----------------------------------------------------------------------------

def concat_text(a: TextBatch, b: TextBatch) -> TextBatch:
    """The captions of a, then those of b, as one TextBatch."""
    cu = torch.cat([a.cu_seqlens, b.cu_seqlens[1:] + a.cu_seqlens[-1]])
    return TextBatch(torch.cat([a.tokens, b.tokens]), cu, max(a.max_seqlen, b.max_seqlen),
                     torch.cat([a.pooled, b.pooled]))


def schedule(steps: int, shift: torch.Tensor) -> torch.Tensor:
    """[n, steps + 1] timesteps per video, from 1 to 0: uniform, then shifted by its tokens."""
    u = torch.linspace(1.0, 0.0, steps + 1)
    return shift_timesteps(u[None], shift[:, None])


@torch.no_grad()
def sample(model: Model, shapes: Sequence[Sequence[int]], text: TextBatch, patch_size: Sequence[int], *,
           null: TextBatch | None = None, guidance: float = 1.0, steps: int = 50, method: str = "euler",
           cfg: FlowConfig = FlowConfig(), generator: torch.Generator | None = None,
           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
           progress: bool = False) -> list[torch.Tensor]:
    """Latents [C, T_i, H_i, W_i] of the given shapes, denoised from Gaussian noise together.

    text: one caption per shape; null: the unconditional captions (CaptionConditioner.null),
    required when guidance != 1: v = v_null + guidance * (v_text - v_null).
    method: "euler" (one model call per step) or "heun" (two, second order; the last step is
    Euler)."""
    n = len(shapes)
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if method not in ("euler", "heun"):
        raise ValueError(f"method: expected 'euler' or 'heun', got {method!r}")
    if not is_real(guidance) or not math.isfinite(guidance):     # NaN or inf: every velocity NaN
        raise ValueError(f"guidance: expected a finite number, got {guidance!r}")
    if guidance != 1.0 and null is None:
        raise ValueError(f"null: guidance={guidance} needs the unconditional captions (CaptionConditioner.null(n))")
    if text.pooled.shape[0] != n:
        raise ValueError(f"text: expected {n} captions (one per shape), got {text.pooled.shape[0]}")
    if guidance != 1.0 and null.pooled.shape[0] != n:
        raise ValueError(f"null: expected {n} unconditional captions (one per shape), got {null.pooled.shape[0]}")
    device = torch.device(device) if device is not None else text.tokens.device
    both = concat_text(text, null) if guidance != 1.0 else text

    def velocity(x: list, t: torch.Tensor) -> list:
        if guidance == 1.0:
            return model(x, t.to(device), text)
        v = model(x + x, torch.cat([t, t]).to(device), both)
        return [u + guidance * (c - u) for c, u in zip(v[:n], v[n:])]

    x = [torch.randn(tuple(s), generator=generator).to(device, dtype) for s in shapes]
    ts = schedule(steps, time_shift(token_counts(shapes, patch_size), cfg))   # [n, steps + 1]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="sample", unit="step")
    for k in range(steps):
        t, t_next = ts[:, k], ts[:, k + 1]
        dt = (t_next - t).to(device, dtype)
        v1 = velocity(x, t)
        euler = [xi + dt[i] * v1[i] for i, xi in enumerate(x)]
        if method == "heun" and k < steps - 1:
            v2 = velocity(euler, t_next)
            x = [xi + dt[i] * 0.5 * (v1[i] + v2[i]) for i, xi in enumerate(x)]
        else:
            x = euler
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return x


__all__ = ["FlowConfig", "flow_loss", "flow_error", "sample", "sample_timesteps", "shift_timesteps", "time_shift",
           "token_counts", "schedule", "concat_text"]
