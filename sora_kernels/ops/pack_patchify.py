"""pack_patchify / unpack_unpatchify: many videos of different sizes <-> one token sequence.

Order: Triton kernel -> launcher -> custom ops and autograd -> backends -> public functions.
The Triton kernel and launcher here also serve patchify3d / unpatchify3d (ops/patchify3d.py),
which are the same copy for a batch of equal-sized videos.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sora_kernels import backends as B
from sora_kernels.packed import Packed, check_packed, packed_metadata
from sora_kernels.reference import patchify as ref

if B.TRITON_MISSING is None:
    import triton
    import triton.language as tl

# -----------------------------------------------------------------------------
# Triton kernel
# -----------------------------------------------------------------------------

TILE_ELEMENTS = 4096  # elements moved by one program: at most TW * R_P2 * PW_P2
MAX_TILE_TOKENS = 256  # TW cap: keeps the positions tile [TW, 4] small when tokens are tiny
NUM_WARPS = 8        # 16 elements per thread: ~100 registers, no spills (see testing/aot.py)
MAX_PW = 16          # widest patch along W the Triton kernel is compiled for


if B.TRITON_MISSING is None:

    @triton.jit
    def owner_slot(slots_ptr, tile, n_videos, search_steps):
        """Pointer to the slot-table row (int64 [6]: data address, T, H, W, first token, first
        tile) of the video that owns `tile`: the last v with first_tile[v] <= tile (binary search)."""
        lo = tl.zeros((), dtype=tl.int32)
        hi = tl.zeros((), dtype=tl.int32) + n_videos
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            right = tl.load(slots_ptr + mid.to(tl.int64) * 6 + 5) <= tile
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        return slots_ptr + lo.to(tl.int64) * 6

    @triton.jit
    def tile_in_video(slot, tile, ph, pw, TW: tl.constexpr):
        """(T, H, W, Wg, tt, hh, w0, tok0) of `tile` in the video of `slot`: the video's size,
        its grid width, the grid row (tt, hh), the first grid column w0 of the tile's TW
        tokens, and the packed index of its first token."""
        T = tl.load(slot + 1)
        H = tl.load(slot + 2)
        W = tl.load(slot + 3)
        # Divisions in int32 (sizes and a video's tile count fit): the GPU divides int64 in a
        # called routine, whose saved registers were these kernels' only stack (spill) use.
        Wg = W.to(tl.int32) // pw
        Hg = H.to(tl.int32) // ph
        wtiles = tl.cdiv(Wg, TW)
        local = (tile - tl.load(slot + 5)).to(tl.int32)
        row = local // wtiles           # grid row (tt, hh) inside the video
        w0 = (local - row * wtiles) * TW
        return T, H, W, Wg, row // Hg, row % Hg, w0, tl.load(slot + 4) + row.to(tl.int64) * Wg + w0

    # not specialised on a value of 1: one variant for every value (docs/ARCHITECTURE.md, "Integer arguments")
    @triton.jit(do_not_specialize=["n_videos", "search_steps"])
    def patchify_tile_kernel(
        slots_ptr,     # int64 [n, 6]: data address, T, H, W, first token, first tile of each video
        tokens_ptr,    # [N, D] packed tokens (integer words): written when PACK, read otherwise
        positions_ptr,  # int32 [N, 3] (t, h, w) grid index of each token, written when PACK; or None
        n_videos,      # rows of slots
        search_steps,  # binary-search steps, >= log2(n_videos)
        C, pt, ph, pw,  # channels and patch size (D = C*pt*ph*pw)
        TW: tl.constexpr,     # tokens per tile: a run of one grid row of one video
        R_P2: tl.constexpr,   # next power of two >= C*pt*ph (runs per token)
        PW_P2: tl.constexpr,  # next power of two >= pw
        PACK: tl.constexpr,   # True: video -> tokens; False: tokens -> video
    ):
        """Moves one tile between a video and the tokens.

        A tile is TW tokens of grid row (tt, hh) of one video. In the video they are
        R = C*pt*ph rows of TW*pw contiguous elements; in the tokens, TW rows of D
        contiguous elements. The tile is loaded in one layout, permuted and stored in
        the other, so both sides are accessed along contiguous memory.
        """
        tile = tl.program_id(0).to(tl.int64)
        slot = owner_slot(slots_ptr, tile, n_videos, search_steps)
        video_ptr = tl.load(slot).to(tl.pointer_type(tokens_ptr.dtype.element_ty))
        T, H, W, Wg, tt, hh, w0, tok0 = tile_in_video(slot, tile, ph, pw, TW)
        tw = tl.minimum(Wg - w0, TW)    # tokens in this tile
        R = C * pt * ph
        D = R * pw

        r = tl.arange(0, R_P2)          # run = (c, i, j)
        t = tl.arange(0, TW)            # token in the tile
        k = tl.arange(0, PW_P2)         # element in the run
        c = r // (pt * ph)
        i = (r // ph) % pt
        j = r % ph
        row_off = ((c * T + tt * pt + i) * H + hh * ph + j) * W + w0 * pw        # [R_P2], int64
        v_off = row_off[:, None, None] + (t * pw)[None, :, None] + k[None, None, :]  # [R_P2, TW, PW_P2]
        v_mask = (r < R)[:, None, None] & (t < tw)[None, :, None] & (k < pw)[None, None, :]
        t_off = (tok0 + t)[:, None, None] * D + (r * pw)[None, :, None] + k[None, None, :]  # [TW, R_P2, PW_P2]
        t_mask = (t < tw)[:, None, None] & (r < R)[None, :, None] & (k < pw)[None, None, :]
        if PACK:
            x = tl.load(video_ptr + v_off, mask=v_mask)
            tl.store(tokens_ptr + t_off, tl.permute(x, (1, 0, 2)), mask=t_mask)
            if positions_ptr is not None:
                axis = tl.arange(0, 4)[None, :]  # 0: t, 1: h, 2: w (3: padding)
                pos = tl.where(axis == 0, tt, tl.where(axis == 1, hh, w0 + t[:, None])).to(tl.int32)
                tl.store(positions_ptr + (tok0 + t)[:, None] * 3 + axis, pos, mask=(t < tw)[:, None] & (axis < 3))
        else:
            y = tl.load(tokens_ptr + t_off, mask=t_mask)
            tl.store(video_ptr + v_off, tl.permute(y, (1, 0, 2)), mask=v_mask)


# -----------------------------------------------------------------------------
# Launcher
# -----------------------------------------------------------------------------

# The kernel moves bit patterns: elements travel as integer words of the same size.
WORDS = {2: torch.int16, 4: torch.int32}


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def tile_config(runs: int, pw: int) -> dict:
    """The kernel's compile-time config for tokens of `runs` runs of `pw` elements.
    Every config this returns for a supported call is compiled ahead of time in the tests."""
    r_p2, pw_p2 = _next_pow2(runs), _next_pow2(pw)
    return {"TW": max(1, min(MAX_TILE_TOKENS, TILE_ELEMENTS // (r_p2 * pw_p2))), "R_P2": r_p2, "PW_P2": pw_p2}


def config_space() -> list[dict]:
    """Every config tile_config can return for a call that triton_reasons accepts."""
    return [tile_config(1 << r, 1 << p) for p in range(MAX_PW.bit_length())
            for r in range(TILE_ELEMENTS.bit_length()) if (1 << r) * (1 << p) <= TILE_ELEMENTS]


def launch_triton(pack: bool, videos: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]],
                  tokens: torch.Tensor, channels: int, patch_size: Sequence[int],
                  positions: torch.Tensor | None = None) -> None:
    """Copies between contiguous `videos` ([C, T, H, W] each, sizes[v] = (T, H, W)) and
    contiguous `tokens` [N, D] in one launch. pack=True writes tokens (and, if given,
    positions int32 [N, 3]), else videos."""
    pt, ph, pw = patch_size
    word = WORDS[tokens.element_size()]
    cfg = tile_config(channels * pt * ph, pw)
    rows, first_token, first_tile = [], 0, 0
    for x, (T, H, W) in zip(videos, sizes):
        rows.append([x.view(word).data_ptr(), T, H, W, first_token, first_tile])
        grid = (T // pt, H // ph, W // pw)
        first_token += grid[0] * grid[1] * grid[2]
        first_tile += grid[0] * grid[1] * triton.cdiv(grid[2], cfg["TW"])
    if first_tile == 0:
        return
    slots = torch.tensor(rows, dtype=torch.int64).to(tokens.device, non_blocking=True)
    n = len(rows)
    patchify_tile_kernel[(first_tile,)](
        slots, tokens.view(word), positions, n, max(1, math.ceil(math.log2(n))) if n > 1 else 0,
        channels, pt, ph, pw, PACK=pack, num_warps=NUM_WARPS, **cfg)


def triton_reasons(itemsize: int, runs: int, pw: int) -> list[str]:
    """Why the Triton kernel cannot move tokens of `runs` runs of `pw` elements of `itemsize` bytes."""
    reasons = []
    if itemsize not in WORDS:
        reasons.append(f"moves 2- or 4-byte elements (fp16, bf16, fp32), got {itemsize}-byte elements")
    if pw > MAX_PW:
        reasons.append(f"compiled for patch widths pw <= {MAX_PW}, got pw={pw}")
    elif _next_pow2(runs) * _next_pow2(pw) > TILE_ELEMENTS:
        reasons.append(f"tokens of C*pt*ph={runs} runs of pw={pw} exceed the {TILE_ELEMENTS}-element tile")
    return reasons


def cuda_reasons(itemsize: int, dim: int) -> list[str]:
    """Why the CUDA kernel cannot move tokens of `dim` elements of `itemsize` bytes."""
    if dim * itemsize > 4096:
        return [f"tokens of D*itemsize={dim * itemsize} bytes exceed the 4096-byte shared-memory tile"]
    return []


# -----------------------------------------------------------------------------
# Custom ops (Triton) and autograd (Triton and compiled ops)
# -----------------------------------------------------------------------------

@torch.library.custom_op("sora_kernels::pack_patchify_triton", mutates_args=())
def pack_patchify_triton(videos: list[torch.Tensor], patch_size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    videos = [v.contiguous() for v in check_videos(videos, check_patch_size(patch_size))]
    _check_triton_dtype(videos[0])
    sizes = [tuple(v.shape[1:]) for v in videos]
    tokens, positions = _empty_tokens(videos, patch_size)
    launch_triton(True, videos, sizes, tokens, videos[0].shape[0], patch_size, positions)
    return tokens, positions


@torch.library.custom_op("sora_kernels::unpack_unpatchify_triton", mutates_args=())
def unpack_unpatchify_triton(tokens: torch.Tensor, patch_size: list[int], sizes: list[int]) -> list[torch.Tensor]:
    patch = check_patch_size(patch_size)
    if tokens.dim() != 2 or len(sizes) == 0 or len(sizes) % 3 != 0:
        raise ValueError(f"tokens, sizes: expected [N, D] tokens and (T, H, W) per video, got {tuple(tokens.shape)} "
                         f"and {len(sizes)} sizes")
    for v in range(len(sizes) // 3):
        check_divisible(f"sizes[{v}]", sizes[3 * v:3 * v + 3], patch)
    check_unpack_sizes(tokens, patch, [sizes[i:i + 3] for i in range(0, len(sizes), 3)])
    _check_triton_dtype(tokens)
    tokens = tokens.contiguous()
    videos = _empty_videos(tokens, patch_size, sizes)
    launch_triton(False, videos, [tuple(v.shape[1:]) for v in videos], tokens, videos[0].shape[0], patch_size)
    return videos


def _check_triton_dtype(t: torch.Tensor) -> None:
    if t.element_size() not in WORDS:
        raise ValueError(f"{'tokens' if t.dim() == 2 else 'videos'}: the triton backend moves 2- or 4-byte "
                         f"elements, got {t.dtype}")


def _empty_tokens(videos, patch_size):
    """(tokens [N, D], positions int32 [N, 3]) for packing `videos`."""
    pt, ph, pw = patch_size
    n = sum((v.shape[1] // pt) * (v.shape[2] // ph) * (v.shape[3] // pw) for v in videos)
    return (videos[0].new_empty(n, videos[0].shape[0] * pt * ph * pw),
            videos[0].new_empty(n, 3, dtype=torch.int32))


def _empty_videos(tokens, patch_size, sizes):
    C = tokens.shape[1] // (patch_size[0] * patch_size[1] * patch_size[2])
    return [tokens.new_empty(C, *sizes[i:i + 3]) for i in range(0, len(sizes), 3)]


# The compiled ops exist only when sora_kernels._C is built (the package imports without it).
_COMPILED_SUFFIXES = ("", "_triton") if B.COMPILED_MISSING is None else ("_triton",)
for _name in (f"pack_patchify{s}" for s in _COMPILED_SUFFIXES):  # -> (tokens, positions)
    torch.library.register_fake(f"sora_kernels::{_name}")(lambda videos, patch_size: _empty_tokens(videos, patch_size))
for _name in (f"unpack_unpatchify{s}" for s in _COMPILED_SUFFIXES):
    torch.library.register_fake(f"sora_kernels::{_name}")(
        lambda tokens, patch_size, sizes: _empty_videos(tokens, patch_size, sizes))


def _register_autograd(pack_name: str, unpack_name: str) -> None:
    """The two ops are each other's backward: d(pack) = unpack(grad) and vice versa,
    so the backward runs on the same backend as the forward."""
    pack_op = getattr(torch.ops.sora_kernels, pack_name)
    unpack_op = getattr(torch.ops.sora_kernels, unpack_name)

    def pack_setup(ctx, inputs, output):
        videos, ctx.patch_size = inputs
        ctx.sizes = [s for v in videos for s in v.shape[1:]]
        ctx.mark_non_differentiable(output[1])  # positions

    def pack_backward(ctx, grad, _grad_positions):
        return list(unpack_op(grad, ctx.patch_size, ctx.sizes)), None

    def unpack_setup(ctx, inputs, output):
        ctx.patch_size = inputs[1]

    def unpack_backward(ctx, grads):
        # Autograd materialises the gradients of unused outputs as zeros.
        return pack_op(list(grads), ctx.patch_size)[0], None, None

    torch.library.register_autograd(f"sora_kernels::{pack_name}", pack_backward, setup_context=pack_setup)
    torch.library.register_autograd(f"sora_kernels::{unpack_name}", unpack_backward, setup_context=unpack_setup)


if B.COMPILED_MISSING is None:
    _register_autograd("pack_patchify", "unpack_unpatchify")
_register_autograd("pack_patchify_triton", "unpack_unpatchify_triton")


# -----------------------------------------------------------------------------
# Input checks (shared with patchify3d)
# -----------------------------------------------------------------------------

def check_patch_size(patch_size) -> tuple[int, int, int]:
    """(pt, ph, pw) from an int or 3 ints; ValueError naming `patch_size` otherwise."""
    if isinstance(patch_size, int) and not isinstance(patch_size, bool):
        patch_size = (patch_size,) * 3
    patch = tuple(patch_size) if isinstance(patch_size, (tuple, list, torch.Size)) else ()
    if len(patch) != 3 or not all(isinstance(p, int) and not isinstance(p, bool) for p in patch):
        raise ValueError(f"patch_size: expected an int or 3 ints (pt, ph, pw), got {patch_size!r}")
    for a, p in enumerate(patch):
        if p <= 0:
            raise ValueError(f"patch_size[{a}]: expected a positive int, got {p}")
    return patch


def check_divisible(name: str, sizes: Sequence[int], patch: Sequence[int]) -> None:
    """ValueError naming `name` unless each of (T, H, W) is positive and divisible by the patch."""
    for axis, size, p in zip("THW", sizes, patch):
        if size <= 0:
            raise ValueError(f"{name}: expected {axis} > 0, got {axis}={size}")
        if size % p != 0:
            raise ValueError(f"{name}: {axis}={size} is not divisible by patch_size[{'THW'.index(axis)}]={p}; "
                             "nothing is cropped or padded, resize or pad the input first")


def _videos_ok(videos, first, patch: Sequence[int]) -> bool:
    """Whether every video passes check_videos' checks (no message: the slow path finds it)."""
    if not isinstance(first, torch.Tensor) or first.dim() != 4 or first.shape[0] < 1:
        return False
    C, dtype, device = first.shape[0], first.dtype, first.device
    pt, ph, pw = patch
    for v in videos:
        if not isinstance(v, torch.Tensor) or v.dtype != dtype or v.device != device:
            return False
        shape = v.shape
        if len(shape) != 4 or shape[0] != C:
            return False
        _, T, H, W = shape
        if T <= 0 or H <= 0 or W <= 0 or T % pt or H % ph or W % pw:
            return False
    return True


def check_videos(videos, patch: Sequence[int]) -> list[torch.Tensor]:
    if not isinstance(videos, (list, tuple)):
        raise ValueError(f"videos: expected a list of [C, T, H, W] tensors, got {type(videos).__name__}")
    if len(videos) == 0:
        raise ValueError("videos: expected at least one video, got an empty list")
    first = videos[0]
    if _videos_ok(videos, first, patch):  # the common case, in one tight pass (a few us per 100 videos)
        return list(videos)
    for i, v in enumerate(videos):  # find the first bad video and say what is wrong with it
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"videos[{i}]: expected a 4-dim tensor [C, T, H, W], got {got}")
        if v.shape[0] < 1:
            raise ValueError(f"videos[{i}]: expected C >= 1 channels, got C={v.shape[0]}")
        if v.shape[0] != first.shape[0]:
            raise ValueError(f"videos[{i}]: expected C={first.shape[0]} channels like videos[0], got C={v.shape[0]}")
        if v.dtype != first.dtype:
            raise ValueError(f"videos[{i}]: expected dtype {first.dtype} like videos[0], got {v.dtype}")
        if v.device != first.device:
            raise ValueError(f"videos[{i}]: expected device {first.device} like videos[0], got {v.device}")
        check_divisible(f"videos[{i}]", v.shape[1:], patch)
    return list(videos)


def check_token_width(dim: int, patch: Sequence[int]) -> None:
    """ValueError naming `tokens` unless D is a positive multiple of pt*ph*pw."""
    per_channel = patch[0] * patch[1] * patch[2]
    if dim < 1 or dim % per_channel != 0:
        raise ValueError(f"tokens: expected D a positive multiple of pt*ph*pw={per_channel}, got D={dim}")


def check_unpack_sizes(tokens: torch.Tensor, patch: Sequence[int], sizes: Sequence[Sequence[int]]) -> None:
    """ValueError naming `tokens` unless it holds exactly the tokens of videos of `sizes`."""
    check_token_width(tokens.shape[-1], patch)
    n_tokens = sum((t // patch[0]) * (h // patch[1]) * (w // patch[2]) for t, h, w in sizes)
    if tokens.shape[0] != n_tokens:
        raise ValueError(f"tokens: expected N={n_tokens} tokens for the given sizes, got N={tokens.shape[0]}")


# -----------------------------------------------------------------------------
# Backends
# -----------------------------------------------------------------------------

def kernel_reasons(name: str, op: str, device: torch.device, itemsize: int, dim: int, pw: int) -> list[str]:
    """Why backend `name` cannot move tokens of `dim` elements (runs of `pw`) of `itemsize` bytes."""
    reasons = B.device_reasons(name, device, op)
    if name == "cuda":
        reasons += cuda_reasons(itemsize, dim)
    elif name == "triton":
        reasons += triton_reasons(itemsize, dim // pw, pw)
    return reasons


def _pack_backend(name: str, run) -> B.Backend:
    def reasons(videos, patch):
        dim = videos[0].shape[0] * patch[0] * patch[1] * patch[2]
        return kernel_reasons(name, "pack_patchify", videos[0].device, videos[0].element_size(), dim, patch[2])
    return B.Backend(name, reasons, run)


def _unpack_backend(name: str, run) -> B.Backend:
    def reasons(tokens, patch, sizes):
        return kernel_reasons(name, "unpack_unpatchify", tokens.device, tokens.element_size(), tokens.shape[1],
                              patch[2])
    return B.Backend(name, reasons, run)


def _pack_reference(videos, patch):
    grids = [tuple(s // p for s, p in zip(v.shape[1:], patch)) for v in videos]
    return ref.pack_patchify(videos, patch), ref.packed_positions(grids, videos[0].device)


# Each backend's run returns (tokens [N, D], positions int32 [N, 3]).
PACK_BACKENDS = (
    _pack_backend("cuda", lambda videos, patch: torch.ops.sora_kernels.pack_patchify(videos, list(patch))),
    _pack_backend("triton", lambda videos, patch: torch.ops.sora_kernels.pack_patchify_triton(videos, list(patch))),
    _pack_backend("cpu", lambda videos, patch: torch.ops.sora_kernels.pack_patchify(videos, list(patch))),
    _pack_backend("reference", _pack_reference),
)
UNPACK_BACKENDS = (
    _unpack_backend("cuda", lambda tokens, patch, sizes: list(
        torch.ops.sora_kernels.unpack_unpatchify(tokens, list(patch), [s for t in sizes for s in t]))),
    _unpack_backend("triton", lambda tokens, patch, sizes: list(
        torch.ops.sora_kernels.unpack_unpatchify_triton(tokens, list(patch), [s for t in sizes for s in t]))),
    _unpack_backend("cpu", lambda tokens, patch, sizes: list(
        torch.ops.sora_kernels.unpack_unpatchify(tokens, list(patch), [s for t in sizes for s in t]))),
    _unpack_backend("reference", ref.unpack_unpatchify),
)


# -----------------------------------------------------------------------------
# Public functions
# -----------------------------------------------------------------------------

def pack_patchify(videos: Sequence[torch.Tensor], patch_size, *, backend: str | None = None) -> Packed:
    """Cuts videos of different sizes into spacetime patches and packs them into one sequence.

    Args:
        videos: list of [C, Ti, Hi, Wi] tensors (an image is Ti = 1), same C, dtype and device;
            each Ti, Hi, Wi divisible by the patch. Nothing is cropped or padded.
        patch_size: (pt, ph, pw), or one int for all three.
        backend: force "cuda", "triton", "cpu" or "reference" (default: the first that can run;
            SORA_KERNELS_BACKEND sets it too).

    Returns:
        Packed(tokens [N, D], cu_seqlens int32 [n+1], positions int32 [N, 3], grid_sizes int32 [n, 3],
        max_seqlen, grids, patch_size), with D = C*pt*ph*pw, tokens in raster (t, h, w) order and features in
        (C, pt, ph, pw) order. Differentiable with respect to the videos. Equivalent PyTorch::

            torch.cat([v.reshape(C, T//pt, pt, H//ph, ph, W//pw, pw)
                        .permute(1, 3, 5, 0, 2, 4, 6).reshape(-1, D) for v in videos])

        On the GPU backends this is one kernel launch for the whole list (tokens and
        positions), plus two small host-to-device copies (the kernel's table of videos,
        and cu_seqlens with grid_sizes).
    """
    patch = check_patch_size(patch_size)
    videos = check_videos(videos, patch)
    tokens, positions = B.select("pack_patchify", PACK_BACKENDS, (videos, patch), backend).run(videos, patch)
    pt, ph, pw = patch
    grids = tuple([(T // pt, H // ph, W // pw) for _, T, H, W in [v.shape for v in videos]])
    cu_seqlens, grid_sizes, max_seqlen = packed_metadata(grids, tokens.device)
    return Packed(tokens, cu_seqlens, positions, grid_sizes, max_seqlen, grids, patch)


def unpack_unpatchify(tokens: torch.Tensor, packed: Packed, patch_size, *,
                      backend: str | None = None) -> list[torch.Tensor]:
    """The exact inverse of pack_patchify: tokens [N, D] -> list of [C, Ti, Hi, Wi].

    Args:
        tokens: [N, D] in the layout of `packed` (for example the model's output for it).
        packed: the Packed record that gives each video's grid.
        patch_size: (pt, ph, pw), or one int: the patch `packed` was cut with (checked when
            the record knows it); D must be a multiple of pt*ph*pw.
        backend: as for pack_patchify.
    """
    patch = check_patch_size(patch_size)
    check_packed(packed, patch)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens: expected a 2-dim tensor [N, D], got {got}")
    n_tokens = sum(t * h * w for t, h, w in packed.grids)
    if tokens.shape[0] != n_tokens:
        raise ValueError(f"tokens: expected N={n_tokens} tokens to match packed.cu_seqlens[-1], "
                         f"got N={tokens.shape[0]}")
    check_token_width(tokens.shape[1], patch)
    sizes = [(t * patch[0], h * patch[1], w * patch[2]) for t, h, w in packed.grids]
    return B.select("unpack_unpatchify", UNPACK_BACKENDS, (tokens, patch, sizes), backend).run(tokens, patch, sizes)
