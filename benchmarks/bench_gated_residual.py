"""Benchmarks of gated_residual (x + gate[segment] * y, the DiT block's gated skip) on a packed
batch, against what one would write instead.

Providers: `triton` and `cpu` (ours; each is skipped with its reasons where it cannot run),
`eager` (the PyTorch a DiT writes: the per-token gate rows gathered by segment, a multiply and
an add), `compile` (torch.compile of that eager code), `liger` (always skipped: Liger-Kernel has
no gated residual). Workload: bench_adaln_norm's packed mixed batch at DiT-XL's width.

Bytes moved, the least each mode must read and write: fwd reads x and y and writes the sum
(3 [N, D] tensors); the backward passes dout through as dx (no copy), reads dout and y and
writes dy (3 more). The per-segment gate (and in the backward its gradient), [n, D] with n the
segment count, is counted once each way.
"""
import pytest
import torch

import sora_kernels as sk
from benchmarks import harness
from benchmarks.bench_adaln_norm import D, _lengths  # the same packed batch as adaln_norm
from sora_kernels.ops.gated_residual import GATED_RESIDUAL_BACKENDS
from sora_kernels.reference import dit_ops as ref

PROVIDERS = ["triton", "cpu", "eager", "compile", "liger"]
MODES = ["fwd", "fwd+bwd"]


def _eager(x, y, gate, seg):
    return x + gate[seg] * y


def _inputs(device):
    lengths = _lengths(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    n, N = len(lengths), sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(device)
    t = {"x": torch.randn(N, D, generator=g), "y": torch.randn(N, D, generator=g),
         "gate": 0.5 * torch.randn(n, D, generator=g)}
    return {k: v.to(device, dtype) for k, v in t.items()}, cu, ref.segment_ids(cu, N)


def _provider(provider, args, cu, seg, device):
    """A callable of the inputs dict, or a skip with the reason this provider cannot run here."""
    if provider == "liger":
        pytest.skip("Liger-Kernel has no gated residual")
    if provider in ("eager", "compile"):
        f = torch.compile(_eager) if provider == "compile" else _eager
        seg_long = seg.long()
        return lambda a: f(**a, seg=seg_long)
    # skips with the backend's reasons (Triton on CPU: only the interpreter, not a timing)
    harness.backend_runner(provider, GATED_RESIDUAL_BACKENDS, (args["x"], args["y"], args["gate"], seg), device)
    return lambda a: sk.gated_residual(**a, cu_seqlens=cu, segment_ids=seg, backend=provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_residual(suite, benchmark, provider, mode):
    args, cu, seg = _inputs(suite.device)
    fn = _provider(provider, args, cu, seg, suite.device)
    torch.testing.assert_close(fn(args).float(), _eager(**args, seg=seg.long()).float(), rtol=0.05, atol=0.05)
    (N, _), n, itemsize = args["x"].shape, args["gate"].shape[0], args["x"].element_size()
    rows = 3 * N + n  # reads x, y, gate; writes out
    if mode == "fwd":
        run = lambda: fn(args)  # noqa: E731
    else:
        leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
        leaf_list = list(leaves.values())
        dout = torch.randn_like(args["x"])

        def run():
            torch.autograd.grad(fn(leaves), leaf_list, dout)
        rows += 3 * N + n  # backward: reads dout, y; writes dy, dgate (dx is dout itself)
    suite.run("gated_residual", mode, provider, f"mixed-{N}x{D}", run, rows * D * itemsize, args["x"].dtype,
              benchmark, tokens=N, segments=n, graph=True)
