"""latent_denorm equals z * scale[c] + shift[c] with a count of NaN and +-Inf per (batch, frame); its
gradient is dy * scale."""
import pytest
import torch

import sora_kernels as sk
from conftest import DEVICE, assert_compiles_exactly, require_backend
from sora_kernels.backends import NoBackendError
from sora_kernels.ops.latent_denorm import LATENT_DENORM_BACKENDS, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
# (1, 2, 1, 130, 130): more positions per frame than the CUDA grid has threads per plane
@pytest.mark.parametrize("shape", [(2, 16, 3, 5, 7), (1, 4, 1, 1, 1), (1, 16, 2, 40, 36), (1, 2, 1, 130, 130)])
@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu", "reference"])
def test_matches_reference(backend, shape, dtype):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    flat = z.view(-1)
    flat[::13] = float("nan")   # NaN in several frames and channels; counted, and passed through
    flat[1::29] = float("inf")  # so are +-Inf
    flat[2::31] = float("-inf")
    scale = (0.5 + torch.rand(shape[1], generator=g)).to(DEVICE)
    shift = torch.randn(shape[1], generator=g).to(DEVICE)
    require_backend(LATENT_DENORM_BACKENDS, backend, (z, scale, shift))
    out, nan = sk.latent_denorm(z, scale, shift, backend=backend)
    ref_out, ref_nan = reference(z, scale, shift)
    assert nan.shape == (shape[0], shape[2]) and nan.dtype == torch.int32
    assert torch.equal(nan, ref_nan) and nan.sum().item() == (~torch.isfinite(z)).sum().item() > 0
    assert (~torch.isfinite(z)).sum().item() > torch.isnan(z).sum().item()   # Inf counted too
    # fp32: one rounding apart at most (a fused multiply-add against PyTorch's two roundings)
    torch.testing.assert_close(out, ref_out, equal_nan=True, rtol=2e-7 if dtype == torch.float32 else None,
                               atol=1e-6 if dtype == torch.float32 else None)


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu", "reference"])
def test_scalars_and_gradient(backend):
    z = torch.randn(1, 3, 2, 4, 4, device=DEVICE, requires_grad=True)
    require_backend(LATENT_DENORM_BACKENDS, backend, (z.detach(), None, None))
    out, nan = sk.latent_denorm(z, 1 / 0.7, 0.25, backend=backend)
    torch.testing.assert_close(out, z / 0.7 + 0.25)
    assert nan.sum().item() == 0
    dy = torch.randn_like(out)
    (dz,) = torch.autograd.grad(out, z, dy)
    torch.testing.assert_close(dz, dy / 0.7)


def test_float64_runs_in_float64():
    """float64 latents (a float64 VAE's) de-normalise in float64 on the reference backend, the
    kernels saying why they cannot; a float32 computation would be off in the last 29 bits."""
    z = torch.randn(1, 3, 2, 4, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    out, nan = sk.latent_denorm(z, 1 / 0.7, 0.1)
    assert out.dtype == torch.float64 and nan.sum().item() == 0
    assert torch.equal(out, z * (1 / 0.7) + 0.1)
    dy = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, z, dy)[0], dy * (1 / 0.7))
    for name in ("cuda", "triton", "cpu"):
        with pytest.raises(NoBackendError, match=f"{name}: .*float32, got torch.float64"):
            sk.latent_denorm(z.detach(), 1.0, 0.0, backend=name)


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu"])
def test_torch_compile_fullgraph(backend):
    z = torch.randn(1, 4, 2, 3, 5, device=DEVICE)
    scale, shift = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE)
    require_backend(LATENT_DENORM_BACKENDS, backend, (z, scale, shift))
    assert_compiles_exactly(lambda a: sk.latent_denorm(a, scale, shift, backend=backend), z)


def test_errors():
    z = torch.zeros(1, 4, 2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"z: expected a 5-dim tensor \[B, C, T, h, w\], got \(4, 2, 3, 3\)"):
        sk.latent_denorm(z[0], 1.0, 0.0)
    with pytest.raises(ValueError, match=r"scale: expected a float or a tensor of shape \(4,\) \(one per latent "
                                         r"channel\), got \(3,\)"):
        sk.latent_denorm(z, torch.ones(3, device=DEVICE), 0.0)
    with pytest.raises(ValueError, match="shift: expected a float or a tensor of shape"):
        sk.latent_denorm(z, 1.0, "0")
    with pytest.raises(ValueError, match=f"scale: expected it on z's device {DEVICE.type}.*, got meta"):
        sk.latent_denorm(z, torch.ones(4, device="meta"), 0.0)     # meta stands for another device
    with pytest.raises(ValueError, match=r"z: expected float16, bfloat16, float32 or float64 \(the reference "
                                         r"backend\), got torch.int64"):
        sk.latent_denorm(z.long(), 1.0, 0.0)
