"""Benchmarks of group_norm_silu (per-frame GroupNorm + affine + SiLU of video activations).

Providers: `triton`, `cuda` and `cpu` (ours: Triton and CUDA C++ on GPU, C++ on CPU; each is
skipped with its reasons where it cannot run), `eager` (what a causal video VAE writes: each
frame as an image through F.group_norm, then F.silu, with the transposes that takes),
`compile` (torch.compile of that eager code). Layouts: contiguous and channels-last-3d.

Bytes moved: x read and y written (fwd); fwd+bwd adds x and dy read, dx written (the
per-channel and per-group rows are negligible).
"""
import pytest
import torch

import sora_kernels as sk
from benchmarks import harness
from sora_kernels.ops.group_norm_silu import GROUP_NORM_BACKENDS

PROVIDERS = ["triton", "cuda", "cpu", "eager", "compile"]
MODES = ["fwd", "fwd+bwd"]
GROUPS = 32


def workload(device: torch.device):
    """(B, C, T, H, W), dtype: a decoder activation, at 256x256 output (/ 4 spatially) on CPU
    and at 720p (/ 4) on GPU."""
    if device.type == "cuda":
        return (1, 256, 9, 180, 320), torch.bfloat16
    return (1, 128, 5, 64, 64), torch.float32


def _eager(x, weight, bias):
    B, C, T, H, W = x.shape
    frames = x.transpose(1, 2).reshape(B * T, C, H, W)
    y = torch.nn.functional.silu(torch.nn.functional.group_norm(frames, GROUPS, weight, bias, 1e-6))
    return y.reshape(B, T, C, H, W).transpose(1, 2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_group_norm_silu(suite, benchmark, provider, mode, layout):
    _time(suite, benchmark, provider, mode, layout)


def test_cuda_three_pass(suite, benchmark, monkeypatch):
    """The CUDA C++ forward without its single-read cluster kernel (SORA_KERNELS_GN_CLUSTER=0:
    statistics, finalize, apply), as provider cuda:three-pass beside the default cuda row,
    which on sm_90 runs the cluster kernel where a frame-group fits (contiguous x)."""
    if suite.device.type != "cuda":
        pytest.skip("the cluster kernel is the CUDA backend's")
    monkeypatch.setenv("SORA_KERNELS_GN_CLUSTER", "0")
    _time(suite, benchmark, "cuda", "fwd", "contiguous", label="cuda:three-pass")


def _time(suite, benchmark, provider, mode, layout, label=None):
    shape, dtype = workload(suite.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(suite.device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = (1 + 0.1 * torch.randn(shape[1], generator=g)).to(suite.device, dtype)
    bias = (0.1 * torch.randn(shape[1], generator=g)).to(suite.device, dtype)
    if provider in ("eager", "compile"):
        fn = torch.compile(_eager) if provider == "compile" else _eager
    else:
        harness.backend_runner(provider, GROUP_NORM_BACKENDS, (x, GROUPS, weight, bias, 1e-6, "silu", None),
                               suite.device)
        fn = lambda x, w, b: sk.group_norm_silu(x, GROUPS, w, b, backend=provider)  # noqa: E731
    torch.testing.assert_close(fn(x, weight, bias).float(), _eager(x, weight, bias).float(), rtol=0.02, atol=0.02)
    rows = 2
    if mode == "fwd":
        run = lambda: fn(x, weight, bias)  # noqa: E731
    else:
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        dy = torch.randn_like(x)

        def run():
            torch.autograd.grad(fn(*leaves), leaves, dy)
        rows += 3
    suite.run("group_norm_silu", mode, label or provider, f"{'x'.join(map(str, shape))}-{layout}", run,
              rows * x.numel() * x.element_size(), dtype, benchmark, groups=GROUPS, graph=True)
