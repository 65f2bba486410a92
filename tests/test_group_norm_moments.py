"""group_norm_moments equals float64 statistics per (b, t, group) on contiguous, channels-last
and strided views (a tile's own pixels, read in place), and its pieces merge into the whole
frame's: what the tiled decode relies on (sora_model/vae_tiling.py)."""
import pytest
import torch

import sora_kernels as sk
from conftest import DEVICE, assert_compiles_exactly, require_backend
from sora_kernels.ops.group_norm_moments import MOMENTS_BACKENDS
from sora_kernels.reference import vae_ops as ref

BACKENDS = ["triton", "cpu", "reference"]
# (B, C, T, H, W, groups): a clip, an image, 5 channels per group, one group, a 1x1 frame, rows
# longer than the C++ kernel's block of 256
SHAPES = [(2, 32, 3, 6, 10, 8), (1, 40, 1, 7, 9, 8), (1, 12, 2, 5, 5, 1), (2, 8, 2, 1, 1, 4), (1, 4, 2, 3, 300, 2)]


def _exact(x, G):
    """mean and M2 from float64 sums over each (b, t, group): the oracle."""
    B, C, T = x.shape[:3]
    g = x.double().permute(0, 2, 1, 3, 4).reshape(B, T, G, -1)
    mean = g.sum(-1) / g.shape[-1]
    return mean, ((g - mean[..., None]) ** 2).sum(-1)


def _views(shape, dtype):
    """The layouts a caller passes: contiguous, channels-last-3d, and regions of a larger
    tensor in either layout (strided in H and W, as a tile's own pixels), all with a mean away
    from zero."""
    B, C, T, H, W, _ = shape
    g = torch.Generator().manual_seed(0)
    big = (4.0 + 2 * torch.randn(B, C, T, H + 3, W + 5, generator=g)).to(DEVICE, dtype)
    x = big[..., 1:H + 1, 2:W + 2].contiguous()
    last = big.contiguous(memory_format=torch.channels_last_3d)
    return {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last_3d),
            "region": big[..., 1:H + 1, 2:W + 2], "channels_last_region": last[..., 1:H + 1, 2:W + 2]}


def _check(backend, x, G, rtol):
    require_backend(MOMENTS_BACKENDS, backend, (x, G))
    mean, m2 = sk.group_norm_moments(x, G, backend=backend)
    want_mean, want_m2 = _exact(x, G)
    assert mean.dtype == m2.dtype == torch.float64 and mean.shape == (x.shape[0], x.shape[2], G)
    torch.testing.assert_close(mean, want_mean, rtol=rtol, atol=rtol)
    torch.testing.assert_close(m2, want_m2, rtol=rtol, atol=rtol * want_m2.abs().max().item())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "region", "channels_last_region"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_against_float64(backend, shape, layout):
    """fp32 input: mean and M2 to 1e-6 relative (float sums within blocks, double across)."""
    _check(backend, _views(shape, torch.float32)[layout], shape[-1], 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_half_precision_input(backend, dtype):
    """Half-precision input is read as it is: statistics of its values, in fp32 or wider."""
    _check(backend, _views(SHAPES[0], dtype)["region"], SHAPES[0][-1], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pieces_merge_into_the_frame(backend):
    """Moments of the four quarters of a frame, merged pairwise (the docstring's formula), are
    the whole frame's; the resulting statistics normalise as the frame's own."""
    B, C, T, H, W, G = 1, 16, 2, 12, 20, 4
    x = _views((B, C, T, H, W, G), torch.float32)["contiguous"]
    require_backend(MOMENTS_BACKENDS, backend, (x, G))
    n, mean, m2 = 0, None, None
    for rows in (slice(0, 5), slice(5, H)):
        for cols in (slice(0, 7), slice(7, W)):
            piece = x[..., rows, cols]
            nb = C // G * piece.shape[3] * piece.shape[4]
            mb, m2b = sk.group_norm_moments(piece, G, backend=backend)
            if mean is None:
                n, mean, m2 = nb, mb, m2b
                continue
            d, total = mb - mean, n + nb
            mean, m2, n = mean + d * nb / total, m2 + m2b + d * d * n * nb / total, total
    want_mean, want_m2 = _exact(x, G)
    torch.testing.assert_close(mean, want_mean, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(m2, want_m2, rtol=1e-6, atol=0)
    stats = (mean.float(), torch.rsqrt(m2 / n + 1e-6).float())
    torch.testing.assert_close(sk.group_norm_silu(x, G, statistics=stats, backend="reference"),
                               sk.group_norm_silu(x, G, eps=1e-6, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_frames(backend):
    """Frames with no positions have zero moments (and no NaN); no frames, empty outputs."""
    for shape in ((1, 8, 2, 0, 5), (1, 8, 0, 3, 3)):
        x = torch.zeros(shape, device=DEVICE)
        require_backend(MOMENTS_BACKENDS, backend, (x, 2))
        mean, m2 = sk.group_norm_moments(x, 2, backend=backend)
        assert mean.shape == m2.shape == (1, shape[2], 2)
        assert not mean.any() and not m2.any()


def test_not_differentiable_and_errors():
    x = torch.randn(1, 8, 2, 3, 3, device=DEVICE, requires_grad=True)
    mean, m2 = sk.group_norm_moments(x, 2)
    assert not mean.requires_grad and not m2.requires_grad
    with pytest.raises(ValueError, match=r"x: expected a 5-dim tensor \[B, C, T, H, W\], got \(8, 3, 3\)"):
        sk.group_norm_moments(x[0, :, 0], 2)
    with pytest.raises(ValueError, match=r"x: expected a floating-point dtype, got torch.int64"):
        sk.group_norm_moments(torch.zeros(1, 8, 1, 2, 2, dtype=torch.long, device=DEVICE), 2)
    with pytest.raises(ValueError, match=r"num_groups: expected a positive divisor of C=8, got 3"):
        sk.group_norm_moments(x, 3)
    with pytest.raises(sk.NoBackendError, match=r"cpu: .*the C\+\+ kernel reads float32, got torch.float64"):
        sk.group_norm_moments(x.double().cpu(), 2, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    x = _views(SHAPES[0], torch.float32)["region"]
    require_backend(MOMENTS_BACKENDS, backend, (x, SHAPES[0][-1]))
    assert_compiles_exactly(lambda x: sk.group_norm_moments(x, SHAPES[0][-1], backend=backend), x)


def test_cpu_kernel_opcheck():
    """The C++ op's schema and fake registration (torch.library.opcheck), on a strided view."""
    x = _views(SHAPES[0], torch.float32)["region"].cpu()
    require_backend(MOMENTS_BACKENDS, "cpu", (x, 8))
    torch.library.opcheck(torch.ops.sora_kernels.group_norm_moments.default, (x, 8))


def test_reference_matches_oracle():
    """The reference's two passes and the oracle agree in float64 (the oracle divides a sum)."""
    x = _views(SHAPES[1], torch.float32)["region"]
    for a, b in zip(ref.group_norm_moments(x, 8), _exact(x, 8)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
