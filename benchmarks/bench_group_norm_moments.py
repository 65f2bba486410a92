"""Benchmarks of group_norm_moments (per-frame GroupNorm statistics of a view: what a tiled
decode's statistics passes take over each tile's own pixels).

Providers: `triton`, `cpu` (ours), `eager` (what the tiled decode did before: the region cast
to float64, squared, summed per group: sora_model/vae_tiling.py until 2026-12-06), `compile`
(torch.compile of that eager code).
Workload: one tile's own pixels at the decoder's top resolution, a view inside the tile with
its halo: the small VAE's 128 channels in 32 groups, 2 frames of a 368x648 tile (a quarter of
a 720p frame, with an 8-pixel halo) on GPU; the tiny VAE's 16 channels in 8 groups, 4 frames of
a 128x128 tile (with a 4-pixel halo) on CPU. Bytes moved: the view read once.
"""
import pytest
import torch

from benchmarks import harness
from sora_kernels.ops.group_norm_moments import MOMENTS_BACKENDS

PROVIDERS = ["triton", "cpu", "eager", "compile"]


def _eager(own, groups):
    B, C, T = own.shape[:3]
    g = own.double().reshape(B, groups, C // groups, T, -1)
    return g.sum((2, 4)), g.square().sum((2, 4))          # sums [B, G, T]: the statistics pass's


def workload(device: torch.device) -> tuple:
    """(tile [B, C, T, H, W] with its halo, groups, halo)."""
    if device.type == "cuda":
        return (1, 128, 2, 368, 648), 32, 8
    return (1, 16, 4, 136, 136), 8, 4


@pytest.mark.parametrize("provider", PROVIDERS)
def test_group_norm_moments(suite, benchmark, provider):
    shape, groups, halo = workload(suite.device)
    g = torch.Generator().manual_seed(0)
    tile = (1.0 + torch.randn(*shape, generator=g)).to(suite.device)
    own = tile[..., halo:-halo, halo:-halo]
    if provider in ("eager", "compile"):
        f = torch.compile(_eager) if provider == "compile" else _eager
        fn = lambda: f(own, groups)  # noqa: E731
    else:
        fn = harness.backend_runner(provider, MOMENTS_BACKENDS, (own, groups), suite.device)
    out = fn()
    s1, s2 = _eager(own, groups)
    if provider not in ("eager", "compile"):     # moments -> the same sums
        n = own.shape[1] // groups * own.shape[3] * own.shape[4]
        mean, m2 = (t.transpose(1, 2) for t in out)
        torch.testing.assert_close(mean * n, s1, rtol=1e-6, atol=1e-6 * n)
        torch.testing.assert_close(m2 + mean * mean * n, s2, rtol=1e-6, atol=0)
    workload_name = "x".join(map(str, own.shape)) + f"-g{groups}"
    suite.run("group_norm_moments", "fwd", provider, workload_name, fn, own.numel() * own.element_size(),
              own.dtype, benchmark, graph=True)
