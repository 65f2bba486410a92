"""patchify3d / unpatchify3d: a batch of equal-sized videos <-> tokens [B, L, D].

The kernels are those of pack_patchify (ops/pack_patchify.py): a batch is a packed list
of B videos of one size, so one launch moves it. This file holds the custom ops, their
autograd, the backends and the public functions.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sora_kernels import backends as B
from sora_kernels.ops.pack_patchify import (check_divisible, check_patch_size, check_token_width, kernel_reasons,
                                            launch_triton)
from sora_kernels.reference import patchify as ref

# -----------------------------------------------------------------------------
# Input checks (the public functions and the Triton ops)
# -----------------------------------------------------------------------------


def _check_batch(x, patch) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 5-dim tensor [B, C, T, H, W], got {got}")
    if x.shape[1] < 1:
        raise ValueError(f"x: expected C >= 1 channels, got C={x.shape[1]}")
    check_divisible("x", x.shape[2:], patch)


def _check_tokens(tokens, patch, grid) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens: expected a 3-dim tensor [B, L, D], got {got}")
    grid = tuple(grid)
    if len(grid) != 3 or any(not isinstance(g, int) or g <= 0 for g in grid):
        raise ValueError(f"grid: expected 3 positive ints (T/pt, H/ph, W/pw), got {grid!r}")
    if tokens.shape[1] != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"tokens: expected L={grid[0] * grid[1] * grid[2]} tokens for grid {grid}, "
                         f"got L={tokens.shape[1]}")
    check_token_width(tokens.shape[2], patch)


# -----------------------------------------------------------------------------
# Custom ops (Triton) and autograd
# -----------------------------------------------------------------------------


def _empty_tokens(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    Bn, C, T, H, W = x.shape
    pt, ph, pw = patch_size
    return x.new_empty(Bn, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def _empty_video(tokens: torch.Tensor, patch_size: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    pt, ph, pw = patch_size
    C = tokens.shape[2] // (pt * ph * pw)
    return tokens.new_empty(tokens.shape[0], C, grid[0] * pt, grid[1] * ph, grid[2] * pw)


@torch.library.custom_op("sora_kernels::patchify3d_triton", mutates_args=())
def patchify3d_triton(x: torch.Tensor, patch_size: list[int]) -> torch.Tensor:
    _check_batch(x, check_patch_size(patch_size))
    x = x.contiguous()
    tokens = _empty_tokens(x, patch_size)
    if x.shape[0] > 0:
        launch_triton(True, x.unbind(0), [x.shape[2:]] * x.shape[0], tokens.view(-1, tokens.shape[2]),
                      x.shape[1], patch_size, positions=None)
    return tokens


@torch.library.custom_op("sora_kernels::unpatchify3d_triton", mutates_args=())
def unpatchify3d_triton(tokens: torch.Tensor, patch_size: list[int], grid: list[int]) -> torch.Tensor:
    _check_tokens(tokens, check_patch_size(patch_size), grid)
    tokens = tokens.contiguous()
    x = _empty_video(tokens, patch_size, grid)
    if x.shape[0] > 0:
        launch_triton(False, x.unbind(0), [x.shape[2:]] * x.shape[0], tokens.view(-1, tokens.shape[2]),
                      x.shape[1], patch_size)
    return x


for _suffix in (("", "_triton") if B.COMPILED_MISSING is None else ("_triton",)):
    torch.library.register_fake(f"sora_kernels::patchify3d{_suffix}")(_empty_tokens)
    torch.library.register_fake(f"sora_kernels::unpatchify3d{_suffix}")(_empty_video)


def _register_autograd(patchify_name: str, unpatchify_name: str) -> None:
    """patchify3d and unpatchify3d are each other's backward, on the same backend."""
    patchify_op = getattr(torch.ops.sora_kernels, patchify_name)
    unpatchify_op = getattr(torch.ops.sora_kernels, unpatchify_name)

    def patchify_setup(ctx, inputs, output):
        x, ctx.patch_size = inputs
        ctx.grid = [s // p for s, p in zip(x.shape[2:], ctx.patch_size)]

    def unpatchify_setup(ctx, inputs, output):
        ctx.patch_size = inputs[1]

    torch.library.register_autograd(
        f"sora_kernels::{patchify_name}",
        lambda ctx, grad: (unpatchify_op(grad, ctx.patch_size, ctx.grid), None), setup_context=patchify_setup)
    torch.library.register_autograd(
        f"sora_kernels::{unpatchify_name}",
        lambda ctx, grad: (patchify_op(grad, ctx.patch_size), None, None), setup_context=unpatchify_setup)


if B.COMPILED_MISSING is None:
    _register_autograd("patchify3d", "unpatchify3d")
_register_autograd("patchify3d_triton", "unpatchify3d_triton")

# -----------------------------------------------------------------------------
# Backends
# -----------------------------------------------------------------------------


def _backend(name: str, op: str, run) -> B.Backend:
    def reasons(t: torch.Tensor, patch, *rest):
        dim = t.shape[2] if op == "unpatchify3d" else t.shape[1] * patch[0] * patch[1] * patch[2]
        return kernel_reasons(name, op, t.device, t.element_size(), dim, patch[2])
    return B.Backend(name, reasons, run)


PATCHIFY_BACKENDS = (
    _backend("cuda", "patchify3d", lambda x, patch: torch.ops.sora_kernels.patchify3d(x, list(patch))),
    _backend("triton", "patchify3d", lambda x, patch: torch.ops.sora_kernels.patchify3d_triton(x, list(patch))),
    _backend("cpu", "patchify3d", lambda x, patch: torch.ops.sora_kernels.patchify3d(x, list(patch))),
    _backend("reference", "patchify3d", ref.patchify3d),
)
UNPATCHIFY_BACKENDS = (
    _backend("cuda", "unpatchify3d",
             lambda t, patch, grid: torch.ops.sora_kernels.unpatchify3d(t, list(patch), list(grid))),
    _backend("triton", "unpatchify3d",
             lambda t, patch, grid: torch.ops.sora_kernels.unpatchify3d_triton(t, list(patch), list(grid))),
    _backend("cpu", "unpatchify3d",
             lambda t, patch, grid: torch.ops.sora_kernels.unpatchify3d(t, list(patch), list(grid))),
    _backend("reference", "unpatchify3d", ref.unpatchify3d),
)

# -----------------------------------------------------------------------------
# Public functions
# -----------------------------------------------------------------------------


def patchify3d(x: torch.Tensor, patch_size, *, backend: str | None = None) -> torch.Tensor:
    """Cuts a batch of videos into spacetime patches: x [B, C, T, H, W] -> tokens [B, L, D].

    L = (T/pt)(H/ph)(W/pw) tokens in raster (t, h, w) order; D = C*pt*ph*pw features in
    (C, pt, ph, pw) order, so ``tokens @ w.reshape(E, -1).T + b`` equals
    ``Conv3d(C, E, kernel_size=patch_size, stride=patch_size)`` rearranged to tokens.
    T, H and W must be divisible by the patch (nothing is cropped or padded).
    Equivalent PyTorch::

        x.reshape(B, C, T//pt, pt, H//ph, ph, W//pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, L, D)

    Args:
        x: [B, C, T, H, W].
        patch_size: (pt, ph, pw), or one int for all three.
        backend: force "cuda", "triton", "cpu" or "reference" (or set SORA_KERNELS_BACKEND).
    """
    patch = check_patch_size(patch_size)
    _check_batch(x, patch)
    return B.select("patchify3d", PATCHIFY_BACKENDS, (x, patch), backend).run(x, patch)


def unpatchify3d(tokens: torch.Tensor, patch_size, grid: Sequence[int], *,
                 backend: str | None = None) -> torch.Tensor:
    """The exact inverse of patchify3d: tokens [B, L, D] -> x [B, C, T, H, W].

    Args:
        tokens: [B, L, D] with L = prod(grid) and D a multiple of pt*ph*pw (C = D / (pt*ph*pw)).
        patch_size: (pt, ph, pw), or one int.
        grid: (T/pt, H/ph, W/pw).
        backend: as for patchify3d.
    """
    patch = check_patch_size(patch_size)
    grid = tuple(grid)
    _check_tokens(tokens, patch, grid)
    return B.select("unpatchify3d", UNPATCHIFY_BACKENDS, (tokens, patch, grid), backend).run(tokens, patch, grid)
