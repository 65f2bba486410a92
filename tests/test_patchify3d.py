"""patchify3d / unpatchify3d: bitwise equal to the reference on every backend, equal to
Conv3d(kernel=stride=patch) after a linear map, differentiable, compilable, clear errors."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sora_kernels as sk
from conftest import DEVICE, KERNEL_BACKENDS, assert_bitwise_equal, require_backend
from sora_kernels.ops.patchify3d import PATCHIFY_BACKENDS
from sora_kernels.reference import patchify as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_batch(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)


def check_roundtrip(backend, x, patch):
    require_backend(PATCHIFY_BACKENDS, backend, (x, patch))
    tokens = sk.patchify3d(x, patch, backend=backend)
    assert_bitwise_equal(tokens, ref.patchify3d(x, patch), f"{backend} patchify3d")
    grid = tuple(s // p for s, p in zip(x.shape[2:], patch))
    assert_bitwise_equal(sk.unpatchify3d(tokens, patch, grid, backend=backend), x, f"{backend} unpatchify3d")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, patch", [
    ((2, 16, 3, 18, 32), (1, 2, 2)),
    ((1, 4, 1, 6, 10), (1, 2, 2)),      # an image
    ((3, 3, 4, 6, 9), (2, 3, 3)),
    ((1, 1, 1, 1, 1), (1, 1, 1)),       # one token of one feature
    ((2, 5, 2, 4, 14), (2, 2, 7)),
])
def test_matches_reference(backend, dtype, shape, patch):
    check_roundtrip(backend, make_batch(shape, dtype), patch)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), channels=st.integers(1, 6),
       grid=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7)),
       patch=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4)),
       dtype=st.sampled_from(DTYPES))
def test_random_shapes(backend, batch, channels, grid, patch, dtype):
    shape = (batch, channels, *(g * p for g, p in zip(grid, patch)))
    check_roundtrip(backend, make_batch(shape, dtype), patch)


def test_linear_on_tokens_equals_conv3d():
    """The feature order (C, pt, ph, pw) makes a linear layer on tokens a strided Conv3d."""
    patch, C, E = (1, 2, 2), 4, 8
    x = make_batch((2, C, 3, 6, 8), torch.float64)
    conv = torch.nn.Conv3d(C, E, kernel_size=patch, stride=patch).to(DEVICE, torch.float64)
    tokens = sk.patchify3d(x, patch)
    y = tokens @ conv.weight.reshape(E, -1).T + conv.bias
    expected = conv(x).flatten(2).transpose(1, 2)  # [B, L, E] in raster (t, h, w) order
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_backward(backend):
    patch = (1, 2, 2)
    base = make_batch((2, 3, 2, 4, 6))
    require_backend(PATCHIFY_BACKENDS, backend, (base, patch))
    x = base.clone().requires_grad_()
    w = torch.randn_like(ref.patchify3d(base, patch))
    (sk.patchify3d(x, patch, backend=backend) * w).sum().backward()
    assert_bitwise_equal(x.grad, ref.unpatchify3d(w, patch, (2, 2, 3)), f"{backend} patchify3d backward")
    tokens = ref.patchify3d(base, patch).clone().requires_grad_()
    (sk.unpatchify3d(tokens, patch, (2, 2, 3), backend=backend) * base).sum().backward()
    assert_bitwise_equal(tokens.grad, ref.patchify3d(base, patch), f"{backend} unpatchify3d backward")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_torch_compile_fullgraph(backend):
    patch = (1, 2, 2)
    base = make_batch((2, 3, 2, 4, 6))
    require_backend(PATCHIFY_BACKENDS, backend, (base, patch))
    x = base.clone().requires_grad_()
    fn = torch.compile(lambda x: sk.unpatchify3d(sk.patchify3d(x, patch, backend=backend) * 3, patch, (2, 2, 3),
                                                 backend=backend), fullgraph=True, backend="aot_eager")
    y = fn(x)
    y.sum().backward()
    assert torch.equal(y, base * 3)
    assert torch.equal(x.grad, torch.full_like(base, 3.0))


@pytest.mark.parametrize("call, message", [
    (lambda: sk.patchify3d(torch.zeros(3, 4, 4, 4), 2),
     r"x: expected a 5-dim tensor \[B, C, T, H, W\], got \(3, 4, 4, 4\)"),
    (lambda: sk.patchify3d(torch.zeros(1, 3, 3, 4, 4), 2), r"x: T=3 is not divisible by patch_size\[0\]=2"),
    (lambda: sk.patchify3d(torch.zeros(1, 3, 2, 4, 4), -1), r"patch_size\[0\]: expected a positive int, got -1"),
    (lambda: sk.unpatchify3d(torch.zeros(1, 5, 12), (1, 2, 2), (1, 2, 2)),
     r"tokens: expected L=4 tokens for grid \(1, 2, 2\), got L=5"),
    (lambda: sk.unpatchify3d(torch.zeros(1, 4, 10), (1, 2, 2), (1, 2, 2)),
     r"tokens: expected D a positive multiple of pt\*ph\*pw=4, got D=10"),
    (lambda: sk.unpatchify3d(torch.zeros(1, 4, 0), (1, 2, 2), (1, 2, 2)),
     r"tokens: expected D a positive multiple of pt\*ph\*pw=4, got D=0"),
    (lambda: sk.patchify3d(torch.zeros(1, 0, 2, 4, 4), 2), r"x: expected C >= 1 channels, got C=0"),
    (lambda: sk.unpatchify3d(torch.zeros(1, 4, 12), (1, 2, 2), (1, 2)), r"grid: expected 3 positive ints"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
