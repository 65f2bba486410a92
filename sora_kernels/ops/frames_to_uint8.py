"""frames_to_uint8: the video decoder's output epilogue in one pass: clamp to [-1, 1], map to
0..255, round half to even, and transpose [C, T, H, W] (planes) to uint8 [T, H, W, C] frames
(what a video encoder takes).

Order: Triton kernel -> launcher -> custom op -> compiled op's fake -> backends -> public
function. Backends: cuda (csrc/vae/epilogue_cuda.cu), triton, cpu (csrc/vae/epilogue_cpu.cpp,
float32), reference. Not differentiable (its output is bytes).
"""
from __future__ import annotations

import torch

from sora_kernels import backends as B

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

TILE_ELEMENTS = 4096   # positions x channels of one program (1024 RGB pixels); 8192 (1024
                       # positions of 8 channels) spilled 24 bytes on sm_90 (testing/aot.py)
MAX_CHANNELS = 16


def tile_config(channels: int) -> dict:
    """The kernel's compile-time tile for frames of `channels` channels."""
    block_c = max(2, 1 << (channels - 1).bit_length())
    return {"BLOCK_P": TILE_ELEMENTS // block_c, "BLOCK_C": block_c}


def config_space() -> list[dict]:
    """Every tile the launcher can produce (compiled ahead of time in the tests)."""
    return [tile_config(1 << p) for p in range(1, MAX_CHANNELS.bit_length())]

if B.TRITON_MISSING is None:

    @triton.jit
    def frames_to_uint8_kernel(x_ptr, out_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[p, c] = round((clamp(x[c, p], -1, 1) + 1) * 127.5) for BLOCK_P positions p of
        the flattened T * H * W (x: C planes of P positions; out: P rows of C bytes)."""
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, BLOCK_C)
        mask = (p < P)[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + c[None, :].to(tl.int64) * P + p[:, None], mask=mask, other=0.0).to(tl.float32)
        # Clamp after the multiply: the min/max between the product and the rounding add keeps
        # the compiler from contracting them into one fma (whose unrounded product rounds ties
        # differently from torch's rounded one; seen on an H200 in fp32).
        v = tl.minimum(tl.maximum((x + 1.0) * 127.5, 0.0), 255.0)
        v = (v + 12582912.0) - 12582912.0   # round half to even (1.5 * 2^23), as torch.round
        tl.store(out_ptr + p[:, None] * C + c[None, :], v.to(tl.uint8), mask=mask)


def launch(x: torch.Tensor) -> torch.Tensor:
    C, T, H, W = x.shape
    x = x.contiguous()
    out = torch.empty((T, H, W, C), dtype=torch.uint8, device=x.device)
    P = T * H * W
    if P:
        cfg = tile_config(C)
        frames_to_uint8_kernel[(triton.cdiv(P, cfg["BLOCK_P"]),)](x, out, P, C, **cfg)
    return out


@torch.library.custom_op("sora_kernels::frames_to_uint8_triton", mutates_args=())
def frames_to_uint8_triton(x: torch.Tensor) -> torch.Tensor:
    return launch(x)


@frames_to_uint8_triton.register_fake
def _(x):
    C, T, H, W = x.shape
    return x.new_empty((T, H, W, C), dtype=torch.uint8)


def reference(x: torch.Tensor) -> torch.Tensor:
    v = (x.float().clamp(-1, 1) + 1) * 127.5
    return v.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


if B.compiled_has("frames_to_uint8", "CPU"):
    @torch.library.register_fake("sora_kernels::frames_to_uint8")
    def _(x):
        C, T, H, W = x.shape
        return x.new_empty((T, H, W, C), dtype=torch.uint8)


def _compiled_reasons(name: str):
    def reasons(x) -> list[str]:
        out = B.device_reasons(name, x.device, "frames_to_uint8")
        if name == "cpu" and x.dtype != torch.float32:
            out.append(f"the C++ kernel runs float32, got {x.dtype}")
        return out
    return reasons


def _triton_reasons(x) -> list[str]:
    reasons = B.device_reasons("triton", x.device, "frames_to_uint8")
    if x.shape[0] > MAX_CHANNELS:
        reasons.append(f"compiled for at most {MAX_CHANNELS} channels, got {x.shape[0]}")
    return reasons


FRAMES_BACKENDS = (
    B.Backend("cuda", _compiled_reasons("cuda"), lambda x: torch.ops.sora_kernels.frames_to_uint8(x)),
    B.Backend("triton", _triton_reasons, frames_to_uint8_triton),
    B.Backend("cpu", _compiled_reasons("cpu"), lambda x: torch.ops.sora_kernels.frames_to_uint8(x)),
    B.Backend("reference", lambda x: [], reference),
)


def frames_to_uint8(video: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """video [C, T, H, W] (float, nominally in [-1, 1]) -> uint8 frames [T, H, W, C]: clamp,
    then round((v + 1) * 127.5) half to even, in one pass.

    Equivalent PyTorch::

        ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    """
    if not isinstance(video, torch.Tensor) or video.dim() != 4:
        got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video: expected a 4-dim tensor [C, T, H, W], got {got}")
    if video.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"video: expected float16, bfloat16 or float32, got {video.dtype}")
    return B.select("frames_to_uint8", FRAMES_BACKENDS, (video,), backend).run(video)
