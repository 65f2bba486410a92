"""gelu_tanh and swiglu against the reference (the 2x rule in fp16 / bf16, tight in fp32) and
against torch's own functions; gradcheck in fp64; torch.compile with fullgraph."""
import pytest
import torch
import torch.nn.functional as F

import sora_kernels as sk
from conftest import DEVICE, assert_2x_rule, assert_compiles_exactly, require_backend
from sora_kernels.ops.activations import GELU_BACKENDS, SWIGLU_BACKENDS


def _grads(fn, leaves, dout, **kw):
    out = fn(*leaves, **kw)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def _check(fn, leaves, dtype, backend):
    dout = torch.randn(leaves[0].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ours = _grads(fn, leaves, dout, backend=backend)
    plain = _grads(fn, leaves, dout, backend="reference")
    exact = _grads(fn, [t.detach().double().requires_grad_() for t in leaves], dout.double(), backend="reference")
    assert_2x_rule(ours, plain, exact, dtype, fp32_rtol=2e-6)


@pytest.mark.parametrize("shape", [(37, 72), (5, 3080)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_gelu_tanh(backend, dtype, shape):
    x = (3 * torch.randn(*shape, generator=torch.Generator().manual_seed(0))).to(DEVICE, dtype).requires_grad_()
    require_backend(GELU_BACKENDS, backend, (x,))
    _check(sk.gelu_tanh, [x], dtype, backend)
    torch.testing.assert_close(sk.gelu_tanh(x, backend=backend).float(),
                               torch.nn.functional.gelu(x.float(), approximate="tanh"),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [(37, 72), (5, 3080)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_swiglu(backend, dtype, shape):
    g = torch.Generator().manual_seed(0)
    gate, up = ((3 * torch.randn(*shape, generator=g)).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    require_backend(SWIGLU_BACKENDS, backend, (gate, up))
    _check(sk.swiglu, [gate, up], dtype, backend)


# fp64 runs on the reference backend only (the kernels' reasons: fp16, bf16, fp32).
def test_gelu_tanh_gradcheck_reference():
    x = (3 * torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).to(DEVICE)
    assert torch.autograd.gradcheck(lambda x: sk.gelu_tanh(x, backend="reference"), (x.requires_grad_(),))


def test_swiglu_gradcheck_reference():
    g = torch.Generator().manual_seed(0)
    gate, up = ((3 * torch.randn(3, 5, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_()
                for _ in range(2))
    assert torch.autograd.gradcheck(lambda gate, up: sk.swiglu(gate, up, backend="reference"), (gate, up))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_gelu_tanh_torch_compile_fullgraph(backend):
    x = (3 * torch.randn(7, 24, generator=torch.Generator().manual_seed(0))).to(DEVICE).requires_grad_()
    require_backend(GELU_BACKENDS, backend, (x,))
    assert_compiles_exactly(lambda x: sk.gelu_tanh(x, backend=backend), x)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_swiglu_torch_compile_fullgraph(backend):
    g = torch.Generator().manual_seed(0)
    gate, up = ((3 * torch.randn(7, 24, generator=g)).to(DEVICE).requires_grad_() for _ in range(2))
    require_backend(SWIGLU_BACKENDS, backend, (gate, up))
    assert_compiles_exactly(lambda gate, up: sk.swiglu(gate, up, backend=backend), gate, up)


EXTREMES = [-1e19, -1e12, -1e6, -100.0, -20.0, -1e-30, 0.0, 20.0, 1e6, 1e19, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_extreme_inputs_match_torch(backend):
    """Huge, infinite and NaN inputs give torch's values and gradients: 0 far below zero (the
    CPU kernels' exp clamps at -88, where sigmoid must still reach 0: a gelu derivative of
    -1e19 came out as -1.3e18), NaN where torch gives NaN."""
    x = torch.tensor(EXTREMES, device=DEVICE).repeat(8).requires_grad_()
    require_backend(GELU_BACKENDS, backend, (x,))
    for ours, eager in ((lambda t: sk.gelu_tanh(t, backend=backend), lambda t: F.gelu(t, approximate="tanh")),
                        (lambda t: sk.swiglu(t, torch.ones_like(t), backend=backend), F.silu)):
        got, want = _grads(ours, [x], torch.ones_like(x)), _grads(eager, [x], torch.ones_like(x))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-30, equal_nan=True)


def test_errors():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="up: expected shape"):
        sk.swiglu(x, x[:2])
    with pytest.raises(ValueError, match=r"up: expected shape \(4, 8\), dtype torch.float32 and device .* got "
                                         r"\(4, 8\), torch.float32, meta"):
        sk.swiglu(x, x.to("meta"))          # meta stands for another device on any machine
    with pytest.raises(ValueError, match="x: expected a floating-point tensor"):
        sk.gelu_tanh(torch.zeros(3, dtype=torch.int32))


def test_permuted_inputs():
    """A transposed up gets its gradient in its own layout (the kernel writes row-major)."""
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(8, 16, generator=g).to(DEVICE).requires_grad_()
    up = torch.randn(16, 8, generator=g).to(DEVICE).t().requires_grad_()
    dout = torch.randn(8, 16, generator=g).to(DEVICE)
    grads = torch.autograd.grad(sk.swiglu(gate, up), (gate, up), dout)
    expected = torch.autograd.grad(sk.swiglu(gate, up, backend="reference"), (gate, up), dout)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
