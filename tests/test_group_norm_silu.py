"""group_norm_silu equals the per-frame GroupNorm + SiLU reference, forward and backward, in
the contiguous and channels-last-3d layouts (fp32 tight against float64; 2x rule elsewhere).

The cuda backend's tests skip without a CUDA device; on one they run its kernels' every path:
16-byte and one-element accesses, frames cut into pieces, channels-last column blocks."""
import pytest
import torch

import sora_kernels as sk
from conftest import (DEVICE, assert_2x_rule, assert_bitwise_equal, assert_compiles_backward_exactly,
                      assert_compiles_exactly, require_backend)
from sora_kernels.ops.group_norm_silu import GROUP_NORM_BACKENDS
from sora_kernels.reference import vae_ops as ref

# (B, C, T, H, W, groups): a clip, an image (T=1), odd channels per group (40 / 8 = 5),
# one group, one channel per group, a 1x1 frame, a frame longer than the C++ kernels' block.
SHAPES = [(2, 32, 3, 6, 10, 8), (1, 40, 1, 7, 9, 8), (1, 12, 2, 5, 5, 1), (1, 6, 2, 3, 4, 6), (2, 8, 2, 1, 1, 4),
          (1, 16, 2, 24, 40, 4)]
# More for the CUDA kernels' paths (csrc/vae/group_norm_cuda_plan.h): C=96 in 32 groups with an
# odd frame (H*W = 63: one element per access); 1x1 frames, T=1; 16 groups of 1 channel; 4096
# positions (contiguous: pieces of a plane); 2048 channels (channels-last: two column blocks of
# 256 x 4 channels); 302 channels in 2 groups of 151 (one element per access, 302 columns);
# 512 channels in 32 groups; 90300 positions (more than one block sums: pieces in both layouts).
CUDA_SHAPES = [(2, 96, 3, 7, 9, 32), (1, 96, 1, 1, 1, 32), (2, 16, 1, 5, 5, 16), (1, 8, 2, 64, 64, 2),
               (1, 2048, 1, 3, 5, 32), (1, 302, 2, 5, 6, 2), (1, 512, 2, 9, 16, 32), (1, 4, 1, 300, 301, 2)]


def make(shape, dtype, channels_last, affine=True, seed=0):
    B, C, T, H, W, G = shape
    g = torch.Generator().manual_seed(seed)
    x = 1.5 + 2 * torch.randn(B, C, T, H, W, generator=g)   # a mean away from 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = (1 + 0.3 * torch.randn(C, generator=g)) if affine else None
    bias = 0.3 * torch.randn(C, generator=g) if affine else None
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, weight, bias) if t is not None]
    dy = torch.randn(B, C, T, H, W, generator=g).to(DEVICE)
    return leaves, G, dy


def _args(leaves, G, act, statistics=None) -> tuple:
    """The backends' arguments for leaves = [x] or [x, weight, bias]."""
    weight, bias = leaves[1:] if len(leaves) == 3 else (None, None)
    return (leaves[0], G, weight, bias, 1e-6, act, statistics)


def _run(fn, leaves, dy):
    y = fn(*leaves)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, dy.to(y.dtype)))


def _check_against_reference(backend, leaves, G, dy, act, what):
    """The 2x rule for y and every gradient; leaves = [x] or [x, weight, bias]."""
    dtype = leaves[0].dtype
    ours = _run(lambda x, *wb: sk.group_norm_silu(x, G, *wb, act=act, backend=backend), leaves, dy)
    if leaves[0].is_contiguous(memory_format=torch.channels_last_3d) and not leaves[0].is_contiguous():
        assert ours[0].is_contiguous(memory_format=torch.channels_last_3d) and ours[1].shape == leaves[0].shape

    def reference(x, weight=None, bias=None):
        return ref.group_norm_silu(x, G, weight, bias, 1e-6, act)
    plain = _run(reference, leaves, dy)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    exact = _run(reference, wide, dy.double())
    assert_2x_rule(ours, plain, exact, dtype, what)


@pytest.mark.parametrize("act", ["silu", None])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda", "cpu", "reference"])
def test_matches_reference(backend, dtype, shape, channels_last, act):
    leaves, G, dy = make(shape, dtype, channels_last)
    require_backend(GROUP_NORM_BACKENDS, backend, _args(leaves, G, act))
    _check_against_reference(backend, leaves, G, dy, act, f"group_norm_silu {shape} act={act}")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("act", ["silu", None])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_matches_reference(dtype, shape, channels_last, act, affine):
    leaves, G, dy = make(shape, dtype, channels_last, affine=affine)
    require_backend(GROUP_NORM_BACKENDS, "cuda", _args(leaves, G, act))
    _check_against_reference("cuda", leaves, G, dy, act, f"cuda {shape} act={act} affine={affine}")


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with t's strides, one element past an aligned address (no 16-byte accesses)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].as_strided(t.shape, t.stride())
    with torch.no_grad():
        out.copy_(t)
    return out


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_misaligned(dtype, channels_last):
    """x one element off a 16-byte boundary: the one-element kernels, in x's layout."""
    leaves, G, dy = make((2, 32, 2, 8, 12, 8), dtype, channels_last)
    x = _misaligned(leaves[0]).requires_grad_()
    assert x.data_ptr() % 16 != 0 and x.stride() == leaves[0].stride()
    require_backend(GROUP_NORM_BACKENDS, "cuda", _args([x] + leaves[1:], G, "silu"))
    _check_against_reference("cuda", [x, *leaves[1:]], G, dy, "silu", f"cuda misaligned {dtype}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_cuda_deterministic(channels_last):
    """Two runs give the same bits: y and every gradient (frames in pieces: no atomics)."""
    leaves, G, dy = make((1, 32, 2, 64, 96, 8), torch.bfloat16, channels_last)
    require_backend(GROUP_NORM_BACKENDS, "cuda", _args(leaves, G, "silu"))
    runs = [_run(lambda x, w, b: sk.group_norm_silu(x, G, w, b, backend="cuda"), leaves, dy) for _ in range(2)]
    for i, (a, b) in enumerate(zip(*runs)):
        assert_bitwise_equal(a, b, f"output/grad {i}")


@pytest.mark.parametrize("act", ["silu", None])
@pytest.mark.parametrize("shape", [(1, 32, 2, 64, 96, 8), (2, 96, 3, 8, 16, 32), (1, 8, 1, 256, 512, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_single_read_and_three_pass(dtype, shape, act, monkeypatch):
    """The contiguous forward's two CUDA paths, the single-read cluster kernel (sm_90, the
    default where a frame-group fits) and the three passes (SORA_KERNELS_GN_CLUSTER=0), each
    within the 2x rule; and the single-read path gives the same bits twice. The clusters of
    the first two shapes grow to 8 blocks (few frame-groups); the last has 524288 elements a
    group: 6 blocks of 200 KB in bf16, over the largest cluster in fp32 (three passes)."""
    leaves, G, dy = make(shape, dtype, False)
    require_backend(GROUP_NORM_BACKENDS, "cuda", _args(leaves, G, act))
    for flag in ("1", "0"):
        monkeypatch.setenv("SORA_KERNELS_GN_CLUSTER", flag)
        _check_against_reference("cuda", leaves, G, dy, act, f"cuda SORA_KERNELS_GN_CLUSTER={flag} {shape}")
    monkeypatch.setenv("SORA_KERNELS_GN_CLUSTER", "1")
    x, w, b = (t.detach() for t in leaves)
    first, second = (sk.group_norm_silu(x, G, w, b, act=act, backend="cuda") for _ in range(2))
    assert_bitwise_equal(first, second, "single-read output")


@pytest.mark.parametrize("frame", [(33, 47), (32, 48)], ids=["33x47", "32x48"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", ["cuda", "cpu"])
def test_saved_statistics(backend, channels_last, frame):
    """The compiled op's saved mean and rstd per (b, t, group) equal float64 statistics, also
    for fp32 values far from zero (300 + 0.5 * noise), where E[x^2] - E[x]^2 in fp32 loses the
    variance. 32 x 48 frames (a multiple of the vector) take the single-read forward on sm_90
    when contiguous; 33 x 47 the three passes."""
    B_, C, T, G = 2, 24, 3, 4
    H, W = frame
    g = torch.Generator().manual_seed(0)
    x = 300 + 0.5 * torch.randn(B_, C, T, H, W, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x = x.to(DEVICE)
    require_backend(GROUP_NORM_BACKENDS, backend, (x, G, None, None, 1e-6, "silu", None))
    y, mean, rstd = torch.ops.sora_kernels.group_norm(x, None, None, G, 1e-6, True)
    frames = x.double().reshape(B_, G, C // G, T, H * W).transpose(2, 3).reshape(B_, G, T, -1)
    want_mean = frames.mean(-1).transpose(1, 2)                                  # [B, T, G]
    want_rstd = torch.rsqrt(frames.var(-1, unbiased=False) + 1e-6).transpose(1, 2)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (B_, T, G)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-4, atol=0)
    # y from x * scale + shift (|x * scale| ~ 600): a few fp32 units of 600 off the reference
    torch.testing.assert_close(y, ref.group_norm_silu(x, G), rtol=1e-3, atol=1e-3)


def test_reference_is_group_norm_per_frame():
    """The reference equals F.group_norm applied to each frame as an image."""
    x = torch.randn(2, 8, 3, 4, 5, device=DEVICE)
    w, b = torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE)
    frames = torch.nn.functional.group_norm(x.transpose(1, 2).flatten(0, 1), 4, w, b, 1e-6)
    expected = torch.nn.functional.silu(frames.unflatten(0, (2, 3)).transpose(1, 2))
    torch.testing.assert_close(ref.group_norm_silu(x, 4, w, b), expected, rtol=1e-5, atol=1e-5)


def test_no_affine_and_other_layouts():
    """weight = bias = None; a non-dense input (a slice) goes through the contiguous path."""
    leaves, G, dy = make((1, 8, 4, 6, 6, 2), torch.float32, False, affine=False)
    x = leaves[0]
    backends = [b.name for b in GROUP_NORM_BACKENDS if not b.reasons(x, G, None, None, 1e-6, "silu", None)]
    for backend in backends:
        y = sk.group_norm_silu(x[:, :, ::2], G, backend=backend)
        torch.testing.assert_close(y, ref.group_norm_silu(x[:, :, ::2].detach(), G), rtol=1e-5, atol=1e-5)
        (dx,) = torch.autograd.grad(y, x, dy[:, :, ::2])
        assert dx[:, :, 1::2].abs().max() == 0


def test_torch_compile_fullgraph():
    leaves, G, _ = make((1, 8, 2, 4, 4, 2), torch.float32, True)
    args = [t.detach() for t in leaves]
    assert_compiles_exactly(lambda x, w, b: sk.group_norm_silu(x, G, w, b), *args)


# the reference backend is plain PyTorch, whose aten ops aot_eager decomposes into others
# (group_norm's backward into sums of products): the same to fp32 rounding, not bits
_DECOMPOSED = dict(out_tol=dict(rtol=1e-5, atol=1e-6), grad_tol=dict(rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("given", [False, True], ids=["statistics", "given_statistics"])
@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_torch_compile_fullgraph_backward(backend, given):
    """The backward under torch.compile: the Triton backend's went through its launcher on
    the traced tensors and failed (now the group_norm_triton_backward op, with a fake)."""
    leaves, G, _ = make((1, 8, 2, 4, 4, 2), torch.float32, True)
    stats = tuple(s.to(DEVICE) for s in _frame_statistics(leaves[0].detach() * 0.5, G)) if given else None
    require_backend(GROUP_NORM_BACKENDS, backend, _args([t.detach() for t in leaves], G, "silu", stats))
    assert_compiles_backward_exactly(lambda x, w, b: sk.group_norm_silu(x, G, w, b, statistics=stats,
                                                                        backend=backend), *leaves,
                                     **(_DECOMPOSED if backend == "reference" else {}))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_triton_backward_op_opcheck(channels_last):
    """The Triton backward's op (what a compiled graph's backward calls): its schema, fake
    (shapes, strides, dtypes) and dynamic-shape tracing, with and without the affine, with the
    statistics computed and given."""
    leaves, G, dy = make((1, 8, 2, 4, 4, 2), torch.float32, channels_last)
    x, w, b = (t.detach() for t in leaves)
    require_backend(GROUP_NORM_BACKENDS, "triton", _args([x, w, b], G, "silu"))
    _, mean, rstd = torch.ops.sora_kernels.group_norm_triton(x, w, b, G, 1e-6, True)
    dy = dy.contiguous(memory_format=torch.channels_last_3d) if channels_last else dy
    for weight, bias in ((w, b), (None, None)):
        for given in (False, True):
            torch.library.opcheck(torch.ops.sora_kernels.group_norm_triton_backward,
                                  (dy, x, weight, bias, mean, rstd, G, True, given))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_compile_fullgraph_cuda(dtype):
    """The cuda backend under torch.compile: the op's fake (shared with the CPU kernels) traces
    it, forward and backward (dweight / dbias come back in float32 and are cast)."""
    leaves, G, dy = make((1, 8, 2, 4, 4, 2), dtype, True)
    require_backend(GROUP_NORM_BACKENDS, "cuda", _args(leaves, G, "silu"))
    args = [t.detach() for t in leaves]
    assert_compiles_exactly(lambda x, w, b: sk.group_norm_silu(x, G, w, b, backend="cuda"), *args)

    def loss(x, w, b):
        return (sk.group_norm_silu(x, G, w, b, backend="cuda").float() * dy).sum()
    grads = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for a, b in zip(compiled, grads):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


ERRORS = [
    (dict(x=torch.zeros(2, 8, 4, 4)), r"x: expected a 5-dim tensor \[B, C, T, H, W\], got \(2, 8, 4, 4\)"),
    (dict(num_groups=3), "num_groups: expected a positive divisor of C=8, got 3"),
    (dict(num_groups=0), "num_groups: expected a positive divisor of C=8, got 0"),
    (dict(weight=torch.zeros(4)), r"weight: expected shape \(8,\), got \(4,\)"),
    (dict(bias=torch.zeros(8, dtype=torch.float64)), "bias: expected torch.float32"),
    (dict(eps=-1.0), "eps: expected a finite number >= 0"),
    (dict(act="gelu"), "act: expected one of"),
    (dict(weight=torch.ones(8, device="meta")),              # meta stands for another device
     "weight: expected torch.float32 on cpu like x, got torch.float32 on meta"),
]


@pytest.mark.parametrize("change, message", ERRORS, ids=[e[1][:30] for e in ERRORS])
def test_errors(change, message):
    args = dict(x=torch.zeros(1, 8, 2, 4, 4), num_groups=4, weight=torch.ones(8), bias=torch.zeros(8), eps=1e-6,
                act="silu")
    args.update(change)
    with pytest.raises(ValueError, match=message):
        sk.group_norm_silu(args.pop("x"), args.pop("num_groups"), **args)


def _frame_statistics(x, G, eps=1e-6):
    """mean, rstd float32 [B, T, G] of x (float64 sums), the statistics the op would find."""
    B_, C, T = x.shape[:3]
    g = x.detach().double().reshape(B_, G, C // G, T, -1)
    mean, var = g.mean((2, 4)), g.var((2, 4), unbiased=False)
    return mean.transpose(1, 2).float().contiguous(), torch.rsqrt(var + eps).transpose(1, 2).float().contiguous()


@pytest.mark.parametrize("act", ["silu", None])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_given_statistics(backend, dtype, channels_last, act):
    """statistics=(mean, rstd) from elsewhere (here another tensor's, as a tiled decode's
    whole-frame statistics are not the tile's): the 2x rule against the float64 reference for y
    and the gradients of x, weight and bias, with the statistics as constants."""
    shape = (2, 16, 3, 5, 7, 4)
    leaves, G, dy = make(shape, dtype, channels_last)
    other, _, _ = make(shape, torch.float32, False, seed=7)
    stats = tuple(s.to(DEVICE) for s in _frame_statistics(other[0], G))
    require_backend(GROUP_NORM_BACKENDS, backend, _args(leaves, G, act, stats))
    ours = _run(lambda x, w, b: sk.group_norm_silu(x, G, w, b, act=act, statistics=stats, backend=backend), leaves, dy)

    def reference(x, w, b):
        return ref.group_norm_silu_given(x, G, *stats, w, b, act)
    plain = _run(reference, leaves, dy)
    exact = _run(reference, [t.detach().double().requires_grad_() for t in leaves], dy.double())
    assert_2x_rule(ours, plain, exact, dtype, f"given statistics {backend}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_given_statistics_shapes(shape, channels_last):
    """The C++ apply and its backward on every shape (frames longer than its blocks, one group,
    one channel per group, 1x1 frames), against the float64 reference: the 2x rule."""
    leaves, G, dy = make(shape, torch.float32, channels_last)
    other, _, _ = make(shape, torch.float32, False, seed=7)
    stats = tuple(s.to(DEVICE) for s in _frame_statistics(other[0], G))
    require_backend(GROUP_NORM_BACKENDS, "cpu", _args(leaves, G, "silu", stats))
    ours = _run(lambda x, w, b: sk.group_norm_silu(x, G, w, b, statistics=stats, backend="cpu"), leaves, dy)
    if channels_last:
        assert ours[0].is_contiguous(memory_format=torch.channels_last_3d)

    def reference(x, w, b):
        return ref.group_norm_silu_given(x, G, *stats, w, b)
    plain = _run(reference, leaves, dy)
    exact = _run(reference, [t.detach().double().requires_grad_() for t in leaves], dy.double())
    assert_2x_rule(ours, plain, exact, torch.float32, f"cpu given statistics {shape}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_cpu_apply_opcheck(channels_last):
    """The C++ apply op's schema, fake and autograd registration (torch.library.opcheck)."""
    leaves, G, _ = make((2, 16, 3, 5, 7, 4), torch.float32, channels_last)
    stats = _frame_statistics(leaves[0] * 0.5, G)
    require_backend(GROUP_NORM_BACKENDS, "cpu", _args(leaves, G, "silu", stats))
    for silu in (True, False):
        torch.library.opcheck(torch.ops.sora_kernels.group_norm_apply.default, (*leaves, *stats, G, silu))


def test_given_own_statistics_equal_computed():
    """Given x's own statistics, the op's output is the one it computes without them."""
    leaves, G, _ = make((1, 8, 2, 6, 5, 2), torch.float64, False)
    x, w, b = (t.detach() for t in leaves)
    stats = tuple(s.double() for s in _frame_statistics(x, G))
    y = ref.group_norm_silu_given(x, G, *stats, w, b)
    torch.testing.assert_close(y, ref.group_norm_silu(x, G, w, b), rtol=1e-6, atol=1e-6)


def test_given_statistics_errors_and_reasons():
    leaves, G, _ = make((1, 8, 3, 4, 4, 2), torch.float32, False)
    x = leaves[0].detach()
    good = _frame_statistics(x, G)
    with pytest.raises(ValueError, match=r"statistics: expected mean float32 \[B, T, G\] = \(1, 3, 2\)"):
        sk.group_norm_silu(x, G, statistics=(good[0].transpose(1, 2), good[1]))
    with pytest.raises(ValueError, match=r"statistics: expected rstd float32"):
        sk.group_norm_silu(x, G, statistics=(good[0], good[1].double()))
    with pytest.raises(ValueError, match=r"statistics: expected None or \(mean, rstd\)"):
        sk.group_norm_silu(x, G, statistics=good[0])
    with pytest.raises(sk.NoBackendError, match=r"given statistics: the CUDA C\+\+ kernels compute their own"):
        sk.group_norm_silu(x, G, statistics=tuple(s.to(DEVICE) for s in good), backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_given_statistics_compile_fullgraph(backend):
    leaves, G, _ = make((1, 8, 3, 4, 4, 2), torch.float32, False)
    args = [t.detach() for t in leaves]
    stats = tuple(s.to(DEVICE) for s in _frame_statistics(args[0] * 0.5, G))
    require_backend(GROUP_NORM_BACKENDS, backend, _args(args, G, "silu", stats))
    assert_compiles_exactly(lambda x, w, b: sk.group_norm_silu(x, G, w, b, statistics=stats, backend=backend), *args)
