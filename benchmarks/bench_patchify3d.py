"""Benchmarks of patchify3d and unpatchify3d on a batch of equal-sized latents.

Providers: each backend, and `torch_loop`: reshape / permute / contiguous in PyTorch
(for a batch there is no loop; the name keeps one baseline column across the suite).
"""
import pytest
import torch

from benchmarks import harness
from sora_kernels.ops.patchify3d import PATCHIFY_BACKENDS, UNPATCHIFY_BACKENDS
from sora_kernels.reference import patchify as ref

PROVIDERS = ["cuda", "triton", "cpu", "reference", "torch_loop"]
PATCH = harness.PATCH
SHAPES = {"cpu": (2, 16, 13, 64, 112), "cuda": (8, 16, 13, 90, 160)}


def _batch(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(SHAPES[device.type], generator=g).to(device=device, dtype=torch.bfloat16)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_patchify3d(suite, benchmark, provider):
    x = _batch(suite.device)
    fn = harness.backend_runner(provider, PATCHIFY_BACKENDS, (x, PATCH), suite.device) or \
        (lambda: ref.patchify3d(x, PATCH).contiguous())
    assert torch.equal(fn(), ref.patchify3d(x, PATCH))
    suite.run("patchify3d", "kernel", provider, "x".join(map(str, x.shape)), fn, 2 * x.numel() * x.element_size(),
              x.dtype, benchmark, graph=True)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_unpatchify3d(suite, benchmark, provider):
    x = _batch(suite.device)
    tokens = ref.patchify3d(x, PATCH).contiguous()
    grid = tuple(s // p for s, p in zip(x.shape[2:], PATCH))
    fn = harness.backend_runner(provider, UNPATCHIFY_BACKENDS, (tokens, PATCH, grid), suite.device) or \
        (lambda: ref.unpatchify3d(tokens, PATCH, grid).contiguous())
    assert torch.equal(fn(), x)
    suite.run("unpatchify3d", "kernel", provider, "x".join(map(str, x.shape)), fn,
              2 * x.numel() * x.element_size(), x.dtype, benchmark, graph=True)
