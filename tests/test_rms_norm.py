"""rms_norm (QK-norm) against the reference, and gated_residual alone: the rules of
tests/test_adaln_norm.py (the 2x rule, gradcheck in fp64, torch.compile with fullgraph)."""
import pytest
import torch

import sora_kernels as sk
from conftest import DEVICE, assert_2x_rule, assert_compiles_exactly, require_backend
from sora_kernels.ops.gated_residual import GATED_RESIDUAL_BACKENDS
from sora_kernels.ops.rms_norm import RMS_NORM_BACKENDS


def _grads(fn, leaves, dout, **kw):
    out = fn(*leaves, **kw)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, dout.to(out.dtype)))


@pytest.mark.parametrize("shape", [(5, 4, 72), (3, 2, 128), (7, 1152), (2, 3080)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_rms_norm(backend, dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype).requires_grad_()
    require_backend(RMS_NORM_BACKENDS, backend, (x, w, 1e-6))
    dout = torch.randn(shape, generator=g).to(DEVICE)
    ours = _grads(sk.rms_norm, [x, w], dout, backend=backend)
    plain = _grads(sk.rms_norm, [x, w], dout, backend="reference")
    wide = [t.detach().double().requires_grad_() for t in (x, w)]
    exact = _grads(sk.rms_norm, wide, dout.double(), backend="reference")
    assert_2x_rule(ours, plain, exact, dtype, f"rms_norm {shape}")
    torch.testing.assert_close(ours[0].float(), torch.nn.functional.rms_norm(x.float(), (shape[-1],), w.float(),
                                                                             1e-6), rtol=2e-2, atol=2e-2)


def _segments(lengths, D, dtype):
    """Packed x, y [N, D], gate [n, D] (leaves) and cu_seqlens for segments of `lengths` tokens."""
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    x, y = (torch.randn(sum(lengths), D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    gate = torch.randn(len(lengths), D, generator=g).to(DEVICE, dtype).requires_grad_()
    return x, y, gate, cu


@pytest.mark.parametrize("D", [72, 3080])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_gated_residual(backend, dtype, D):
    x, y, gate, cu = _segments([1, 9, 1, 30], D, dtype)
    require_backend(GATED_RESIDUAL_BACKENDS, backend, (x,))
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = _grads(sk.gated_residual, [x, y, gate], dout, cu_seqlens=cu, backend=backend)
    plain = _grads(sk.gated_residual, [x, y, gate], dout, cu_seqlens=cu, backend="reference")
    wide = [t.detach().double().requires_grad_() for t in (x, y, gate)]
    exact = _grads(sk.gated_residual, wide, dout.double(), cu_seqlens=cu, backend="reference")
    assert_2x_rule(ours, plain, exact, dtype, "gated_residual")


def test_gated_residual_split_rows():
    """fp32 rows wider than FP32_BACKWARD_CHUNK: the Triton backward takes them in column chunks
    (a whole 16384-wide fp32 row spilled registers); 8292 columns, the last chunk mostly masked."""
    from sora_kernels.ops import gated_residual as gr
    assert gr.tile_config(8292, torch.float32, backward=True) == {"ROWS": 1, "BLOCK_D": gr.FP32_BACKWARD_CHUNK,
                                                                  "SPLIT": True}
    x, y, gate, cu = _segments([1, 3, 2], 8292, torch.float32)
    require_backend(GATED_RESIDUAL_BACKENDS, "triton", (x,))
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = _grads(sk.gated_residual, [x, y, gate], dout, cu_seqlens=cu, backend="triton")
    plain = _grads(sk.gated_residual, [x, y, gate], dout, cu_seqlens=cu, backend="reference")
    wide = [t.detach().double().requires_grad_() for t in (x, y, gate)]
    exact = _grads(sk.gated_residual, wide, dout.double(), cu_seqlens=cu, backend="reference")
    assert_2x_rule(ours, plain, exact, torch.float32, "gated_residual, split rows")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_gated_residual_empty_batch(backend):
    """No tokens (cu_seqlens [0, 0]): an empty result and zero gate gradients."""
    x, y, gate, cu = _segments([0], 16, torch.float32)
    require_backend(GATED_RESIDUAL_BACKENDS, backend, (x,))
    out = sk.gated_residual(x, y, gate, cu, backend=backend)
    assert out.shape == (0, 16)
    grads = torch.autograd.grad(out.sum(), [x, y, gate])
    assert [tuple(g.shape) for g in grads] == [(0, 16), (0, 16), (1, 16)] and not any(g.any() for g in grads)


# fp64 runs on the reference backend only (the kernels' reasons: fp16, bf16, fp32).
def test_rms_norm_gradcheck_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = (1 + 0.3 * torch.randn(8, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: sk.rms_norm(x, w, backend="reference"), (x, w))


def test_gated_residual_gradcheck_reference():
    x, y, gate, cu = _segments([1, 3, 2], 8, torch.float64)
    assert torch.autograd.gradcheck(lambda x, y, gate: sk.gated_residual(x, y, gate, cu, backend="reference"),
                                    (x, y, gate))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_rms_norm_torch_compile_fullgraph(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 24, generator=g).to(DEVICE).requires_grad_()
    w = (1 + 0.3 * torch.randn(24, generator=g)).to(DEVICE).requires_grad_()
    require_backend(RMS_NORM_BACKENDS, backend, (x, w, 1e-6))
    assert_compiles_exactly(lambda x, w: sk.rms_norm(x, w, backend=backend), x, w)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_gated_residual_torch_compile_fullgraph(backend):
    x, y, gate, cu = _segments([1, 9, 1, 3], 24, torch.float32)
    require_backend(GATED_RESIDUAL_BACKENDS, backend, (x,))
    assert_compiles_exactly(lambda x, y, gate: sk.gated_residual(x, y, gate, cu, backend=backend), x, y, gate)


@pytest.mark.parametrize("shape", [(4, 0), (2, 3, 0), (0, 3, 8)])
@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_rms_norm_empty(backend, shape):
    """No rows, or rows of D = 0 (nothing to normalise): an empty result of x's shape and dtype, as
    F.rms_norm gives, and empty gradients, on every backend (not an error from a [-1, 0] view)."""
    x = torch.randn(shape, device=DEVICE).requires_grad_()
    w = torch.ones(shape[-1], device=DEVICE).requires_grad_()
    require_backend(RMS_NORM_BACKENDS, backend, (x, w, 1e-6))
    out = sk.rms_norm(x, w, backend=backend)
    expected = torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-6)
    assert (out.shape, out.dtype) == (expected.shape, expected.dtype) == (shape, x.dtype)
    dx, dw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    assert (dx.shape, dw.shape) == (x.shape, w.shape)


def test_errors():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\), got \(4,\)"):
        sk.rms_norm(x, torch.ones(4, device=DEVICE))
    cu = torch.tensor([0, 1, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"gate: expected shape \(2, 8\), got \(3, 8\)"):
        sk.gated_residual(x, x, torch.ones(3, 8, device=DEVICE), cu)
    with pytest.raises(ValueError, match=r"y: expected shape \(4, 8\)"):
        sk.gated_residual(x, x[:3], torch.ones(2, 8, device=DEVICE), cu)
    # another device (meta stands for one on any machine)
    with pytest.raises(ValueError, match=f"weight: expected dtype torch.float32 on {DEVICE.type}.* got torch.float32 "
                                         f"on meta"):
        sk.rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match=f"gate: expected device {DEVICE.type}.* like x, got meta"):
        sk.gated_residual(x, x, torch.ones(2, 8, device="meta"), cu)
