"""Benchmarks of rope3d (3D rotary embedding of [N, H, D] from int32 (t, h, w) positions).

Providers: `triton` (ours, GPU), `cpu` (ours, C++: each axis's angles once per position value),
`reference` (sora_kernels.reference.rope: the angles of every token, cos / sin, four products
and a stack; what the cpu attention backend ran before the C++ kernel), `compile`
(torch.compile of the reference). Modes: fwd, and fwd+bwd (the backward is the opposite
rotation). Workloads: the queries of the benchmark DiT's mixed batch on the GPU (31,984 tokens,
16 heads of 128), on CPU those of the mini DiT's sampling batch with guidance (2208 tokens, 4
heads of 32) and of an XL-like one (5120 tokens, 12 heads of 64). Positions are grid indices
below 64. Bytes moved: x read, the result written (fwd), twice that for fwd+bwd.
"""
import pytest
import torch

import sora_kernels as sk
from benchmarks import harness
from sora_kernels.ops.rope3d import ROPE_BACKENDS
from sora_kernels.reference import rope as ref

PROVIDERS = ["triton", "cpu", "reference", "compile"]
MODES = ["fwd", "fwd+bwd"]


def workloads(device: torch.device) -> dict:
    """name -> (tokens, heads, head dim)."""
    if device.type == "cuda":
        return {"mixed-32k-h16-d128": (31984, 16, 128)}
    return {"mini-2208-h4-d32": (2208, 4, 32), "xl-5120-h12-d64": (5120, 12, 64)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", ["mixed-32k-h16-d128", "mini-2208-h4-d32", "xl-5120-h12-d64"])
def test_rope3d(suite, benchmark, workload, provider, mode):
    sizes = workloads(suite.device)
    if workload not in sizes:
        pytest.skip(f"workload {workload} is not run on {suite.device.type}")
    N, H, D = sizes[workload]
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if suite.device.type == "cuda" else torch.float32
    x = torch.randn(N, H, D, generator=g).to(suite.device, dtype)
    positions = torch.randint(0, 64, (N, 3), generator=g, dtype=torch.int32).to(suite.device)
    sections = ref.default_sections(D)
    if provider in ("reference", "compile"):
        f = torch.compile(ref.rope3d) if provider == "compile" else ref.rope3d
        fn = lambda x: f(x, positions, 10000.0, sections)  # noqa: E731
    else:  # backend_runner skips a backend that cannot run here; the timed call takes x (a leaf for fwd+bwd)
        harness.backend_runner(provider, ROPE_BACKENDS, (x, positions, 10000.0, sections), suite.device)
        fn = lambda x: sk.rope3d(x, positions, backend=provider)  # noqa: E731
    torch.testing.assert_close(fn(x).float(), ref.rope3d(x, positions, 10000.0, sections).float(), rtol=1e-2,
                               atol=1e-2)
    if mode == "fwd":
        timed = lambda: fn(x)  # noqa: E731
    else:
        leaf = x.detach().requires_grad_()
        dout = torch.randn_like(x)
        timed = lambda: torch.autograd.grad(fn(leaf), leaf, dout)  # noqa: E731
    nbytes = 2 * x.numel() * x.element_size() * (1 if mode == "fwd" else 2)
    suite.run("rope3d", mode, provider, workload, timed, nbytes, dtype, benchmark, tokens=N, heads=H, head_dim=D)
