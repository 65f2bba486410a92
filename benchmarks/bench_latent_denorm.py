"""Benchmarks of latent_denorm (the decoder's input epilogue: per-channel de-normalisation and
a count of NaN and Inf per frame, one pass).

Providers: `cuda`, `triton` (ours, GPU), `cpu` (ours, C++), `eager` (what a VAE does before decoding: an isfinite pass
to report bad latents, then z / scaling + shift), `compile` (torch.compile of that eager code).
Workload: the latent of a 129-frame 720p video ([1, 16, 33, 90, 160]) on GPU, of a 17-frame
256x256 one on CPU. Bytes moved: z read, the de-normalised latent written (once each).
"""
import pytest
import torch

from benchmarks import harness
from sora_kernels.ops.latent_denorm import LATENT_DENORM_BACKENDS

PROVIDERS = ["cuda", "triton", "cpu", "eager", "compile"]


def _eager(z, scale, shift):
    nan = (~torch.isfinite(z)).sum((1, 3, 4))
    C = z.shape[1]
    return z * scale.view(1, C, 1, 1, 1) + shift.view(1, C, 1, 1, 1), nan


@pytest.mark.parametrize("provider", PROVIDERS)
def test_latent_denorm(suite, benchmark, provider):
    shape = (1, 16, 33, 90, 160) if suite.device.type == "cuda" else (1, 16, 5, 32, 32)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, generator=g).to(suite.device)
    scale = (0.5 + torch.rand(shape[1], generator=g)).to(suite.device)
    shift = torch.randn(shape[1], generator=g).to(suite.device)
    if provider in ("eager", "compile"):
        f = torch.compile(_eager) if provider == "compile" else _eager
        fn = lambda: f(z, scale, shift)  # noqa: E731
    else:
        fn = harness.backend_runner(provider, LATENT_DENORM_BACKENDS, (z, scale, shift), suite.device)
    out, nan = fn()
    torch.testing.assert_close(out, _eager(z, scale, shift)[0])
    assert int(nan.sum()) == 0
    suite.run("latent_denorm", "fwd", provider, "x".join(map(str, shape)), fn, 2 * z.numel() * z.element_size(),
              z.dtype, benchmark, graph=True)
