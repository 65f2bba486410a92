"""Reference 3D rotary position embedding (pure PyTorch, fp32 math)."""
from __future__ import annotations

import functools

import torch


def default_sections(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) features per axis for `head_dim`: h and w get a third each rounded to an even
    count, t the rest (64 -> (20, 22, 22), 72 -> (24, 24, 24), 128 -> (44, 42, 42))."""
    side = 2 * round(head_dim / 6)
    return head_dim - 2 * side, side, side


def inverse_frequencies(head_dim: int, theta: float, sections) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv_freq fp32 [D/2], axis int64 [D/2]): pair i of the head dim rotates by
    positions[:, axis[i]] * inv_freq[i]. In a section of d features, pair j has
    inv_freq = theta ** (-2j / d). Cached per (head_dim, theta, sections): callers must not
    modify the tensors (0.2 ms a call to build on a 2-core CPU, 12 calls a tiny DiT step)."""
    if torch.compiler.is_compiling():   # traced once into the graph: the cache is for eager calls
        return _build_inverse_frequencies(head_dim, float(theta), tuple(sections))
    return _inverse_frequencies(head_dim, float(theta), tuple(sections))


def _build_inverse_frequencies(head_dim: int, theta: float, sections: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq, axis = [], []
    for a, d in enumerate(sections):
        j = torch.arange(d // 2, dtype=torch.float64)
        inv_freq.append(theta ** (-2.0 * j / d))
        axis.append(torch.full((d // 2,), a, dtype=torch.int64))
    return torch.cat(inv_freq).float(), torch.cat(axis)


_inverse_frequencies = functools.lru_cache(maxsize=64)(_build_inverse_frequencies)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, sections,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotation angle of each (token, pair): [N, D/2] in `dtype` from int positions [N, 3]."""
    inv_freq, axis = inverse_frequencies(head_dim, theta, sections)
    inv_freq, axis = inv_freq.to(positions.device, dtype), axis.to(positions.device)
    return positions.to(dtype)[:, axis] * inv_freq


def rope3d(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0, sections=None,
           inverse: bool = False) -> torch.Tensor:
    """Rotates each pair (x[..., 2i], x[..., 2i+1]) of x [N, H, D] by the angle of its token's
    (t, h, w) position; `inverse` rotates back. Math in fp32 (float64 for float64 x), result
    in x.dtype. Differentiable."""
    N, H, D = x.shape
    wide = torch.promote_types(x.dtype, torch.float32)
    sections = tuple(sections) if sections is not None else default_sections(D)
    angles = rope_angles(positions, D, theta, sections, wide)[:, None, :]  # [N, 1, D/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    if inverse:
        sin = -sin
    pairs = x.to(wide).reshape(N, H, D // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return out.reshape(N, H, D).to(x.dtype)
