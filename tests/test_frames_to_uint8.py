"""frames_to_uint8 equals clamp -> (v + 1) * 127.5 -> round half to even -> uint8, transposed to
[T, H, W, C], bit for bit, eager and under torch.compile with fullgraph."""
import pytest
import torch

import sora_kernels as sk
from conftest import DEVICE, assert_bitwise_equal, assert_compiles_exactly, require_backend
from sora_kernels.ops.frames_to_uint8 import FRAMES_BACKENDS, reference


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 16, 24), (3, 1, 7, 9), (1, 2, 3, 3), (4, 3, 40, 36)])
@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu", "reference"])
def test_matches_reference(backend, shape, dtype, layout):
    """Layouts: contiguous; channels_last, [C, T, H, W] with the strides of [T, H, W, C] (a
    channels-last decode's frames, which the cpu kernel reads in place); strided, every other
    column of a wider tensor."""
    g = torch.Generator().manual_seed(0)
    x = (1.3 * torch.randn(*shape, generator=g)).to(DEVICE, dtype)
    # exact ties of (v + 1) * 127.5: v = (2k + 1) / 255 - 1 round half to even
    ties = (torch.arange(x.numel()) % 256 * 2 + 1).float() / 255 - 1
    x.view(-1)[::7] = ties[::7].to(x.device, dtype)
    if layout == "channels_last":
        x = x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
        assert x.stride(0) == 1 or shape[0] == 1
    elif layout == "strided":
        x = torch.stack([x, -x], dim=-1).flatten(-2)[..., ::2]
        assert not x.is_contiguous()
    require_backend(FRAMES_BACKENDS, backend, (x,))
    out = sk.frames_to_uint8(x, backend=backend)
    assert out.shape == (shape[1], shape[2], shape[3], shape[0])
    assert_bitwise_equal(out, reference(x), "frames_to_uint8")


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu", "reference"])
def test_values(backend):
    x = torch.tensor([-3.0, -1.0, 0.0, 1 / 255, 1.0, 7.0], device=DEVICE).view(1, 6, 1, 1)
    require_backend(FRAMES_BACKENDS, backend, (x,))
    # 127.5 -> 128 and 128.0 -> 128 (ties to even); out of range clamps
    assert sk.frames_to_uint8(x, backend=backend).flatten().tolist() == [0, 0, 128, 128, 255, 255]


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu"])
def test_torch_compile_fullgraph(backend):
    x = (1.3 * torch.randn(3, 2, 3, 5, generator=torch.Generator().manual_seed(0))).to(DEVICE)
    require_backend(FRAMES_BACKENDS, backend, (x,))
    assert_compiles_exactly(lambda x: sk.frames_to_uint8(x, backend=backend), x)


def test_errors():
    with pytest.raises(ValueError, match=r"video: expected a 4-dim tensor \[C, T, H, W\], got \(3, 4\)"):
        sk.frames_to_uint8(torch.zeros(3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="video: expected float16, bfloat16 or float32, got torch.int32"):
        sk.frames_to_uint8(torch.zeros(3, 1, 2, 2, dtype=torch.int32, device=DEVICE))
