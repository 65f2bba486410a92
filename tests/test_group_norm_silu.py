"""group_norm_silu equals the per-frame GroupNorm + SiLU reference, forward and backward, in
the contiguous and channels-last-3d layouts (fp32 tight against float64; 2x rule elsewhere)."""
import pytest
import torch

import sora_kernels as sk
from conftest import DEVICE, assert_2x_rule, assert_compiles_exactly, require_backend
from sora_kernels.ops.group_norm_silu import GROUP_NORM_BACKENDS
from sora_kernels.reference import vae_ops as ref

# (B, C, T, H, W, groups): a clip, an image (T=1), odd channels per group (40 / 8 = 5),
# one group, one channel per group, a 1x1 frame, a frame longer than the C++ kernels' block.
SHAPES = [(2, 32, 3, 6, 10, 8), (1, 40, 1, 7, 9, 8), (1, 12, 2, 5, 5, 1), (1, 6, 2, 3, 4, 6), (2, 8, 2, 1, 1, 4),
          (1, 16, 2, 24, 40, 4)]


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


def _run(fn, leaves, dy):
    y = fn(*leaves)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, dy.to(y.dtype)))


@pytest.mark.parametrize("act", ["silu", None])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_matches_reference(backend, dtype, shape, channels_last, act):
    leaves, G, dy = make(shape, dtype, channels_last)
    require_backend(GROUP_NORM_BACKENDS, backend, (leaves[0], G, *leaves[1:], 1e-6, act))
    ours = _run(lambda x, w, b: sk.group_norm_silu(x, G, w, b, act=act, backend=backend), leaves, dy)
    if channels_last:
        assert ours[0].is_contiguous(memory_format=torch.channels_last_3d) and ours[1].shape == leaves[0].shape
    plain = _run(lambda x, w, b: ref.group_norm_silu(x, G, w, b, 1e-6, act), leaves, dy)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    exact = _run(lambda x, w, b: ref.group_norm_silu(x, G, w, b, 1e-6, act), wide, dy.double())
    assert_2x_rule(ours, plain, exact, dtype, f"group_norm_silu {shape} act={act}")


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
    backends = [b.name for b in GROUP_NORM_BACKENDS if not b.reasons(x, G, None, None, 1e-6, "silu")]
    for backend in backends:
        y = sk.group_norm_silu(x[:, :, ::2], G, backend=backend)
        torch.testing.assert_close(y, ref.group_norm_silu(x[:, :, ::2].detach(), G), rtol=1e-5, atol=1e-5)
        (dx,) = torch.autograd.grad(y, x, dy[:, :, ::2])
        assert dx[:, :, 1::2].abs().max() == 0


def test_torch_compile_fullgraph():
    leaves, G, _ = make((1, 8, 2, 4, 4, 2), torch.float32, True)
    args = [t.detach() for t in leaves]
    assert_compiles_exactly(lambda x, w, b: sk.group_norm_silu(x, G, w, b), *args)


ERRORS = [
    (dict(x=torch.zeros(2, 8, 4, 4)), r"x: expected a 5-dim tensor \[B, C, T, H, W\], got \(2, 8, 4, 4\)"),
    (dict(num_groups=3), "num_groups: expected a positive divisor of C=8, got 3"),
    (dict(num_groups=0), "num_groups: expected a positive divisor of C=8, got 0"),
    (dict(weight=torch.zeros(4)), r"weight: expected shape \(8,\), got \(4,\)"),
    (dict(bias=torch.zeros(8, dtype=torch.float64)), "bias: expected torch.float32"),
    (dict(eps=-1.0), "eps: expected a finite number >= 0"),
    (dict(act="gelu"), "act: expected one of"),
]


@pytest.mark.parametrize("change, message", ERRORS, ids=[e[1][:30] for e in ERRORS])
def test_errors(change, message):
    args = dict(x=torch.zeros(1, 8, 2, 4, 4), num_groups=4, weight=torch.ones(8), bias=torch.zeros(8), eps=1e-6,
                act="silu")
    args.update(change)
    with pytest.raises(ValueError, match=message):
        sk.group_norm_silu(args.pop("x"), args.pop("num_groups"), **args)
