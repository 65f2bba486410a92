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


def _backend_fn(provider, backends, args, device):
    if provider == "torch_loop":
        return None
    if provider == "triton" and device.type == "cpu":
        pytest.skip("triton on CPU runs only in the interpreter: not a timing")
    backend = next(b for b in backends if b.name == provider)
    reasons = backend.reasons(*args)
    if reasons:
        pytest.skip(f"{provider}: {'; '.join(reasons)}")
    return lambda: backend.run(*args)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_patchify3d(suite, benchmark, provider):
    x = _batch(suite.device)
    fn = _backend_fn(provider, PATCHIFY_BACKENDS, (x, PATCH), suite.device) or \
        (lambda: ref.patchify3d(x, PATCH).contiguous())
    assert torch.equal(fn(), ref.patchify3d(x, PATCH))
    suite.run("patchify3d", "kernel", provider, "x".join(map(str, x.shape)), fn, 2 * x.numel() * x.element_size(),
              x.dtype, benchmark)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_unpatchify3d(suite, benchmark, provider):
    x = _batch(suite.device)
    tokens = ref.patchify3d(x, PATCH).contiguous()
    grid = tuple(s // p for s, p in zip(x.shape[2:], PATCH))
    fn = _backend_fn(provider, UNPATCHIFY_BACKENDS, (tokens, PATCH, grid), suite.device) or \
        (lambda: ref.unpatchify3d(tokens, PATCH, grid).contiguous())
    assert torch.equal(fn(), x)
    suite.run("unpatchify3d", "kernel", provider, "x".join(map(str, x.shape)), fn,
              2 * x.numel() * x.element_size(), x.dtype, benchmark)
