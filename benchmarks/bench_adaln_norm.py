"""Benchmarks of adaln_norm and gated_residual_adaln (the fused residual -> norm -> modulate)
on a packed batch, against what one would write instead.

Providers: `triton` and `cpu` (ours), `eager` (the PyTorch a DiT writes: F.layer_norm, then modulate
with per-token rows gathered by segment; for the fused op the gated residual before it),
`compile` (torch.compile of that eager code), `liger` (Liger-Kernel's LayerNorm, then the
same modulation, when liger-kernel is installed). Bytes moved: each [N, D] input read once
and each [N, D] output written once (per-segment rows are negligible); fwd+bwd counts the
backward's reads and writes too.
"""
import pytest
import torch

import sora_kernels as sk
from benchmarks import harness
from sora_kernels.ops import adaln_norm as op
from sora_kernels.reference import dit_ops as ref

PROVIDERS = ["triton", "cpu", "eager", "compile", "liger"]
MODES = ["fwd", "fwd+bwd"]
D = 1152  # DiT-XL width


def _lengths(device):
    """Tokens per segment: the GPU mixed batch of bench_varlen_attention, a smaller one on CPU."""
    if device.type == "cuda":
        return [16 * 45 * 40] + [16 * 16 * 16] * 8 + [16 * 16, 8 * 32, 32 * 8, 12 * 20] * 8
    return [2048] + [256] * 8 + [64] * 16


def _eager_adaln(x, shift, scale, seg):
    return torch.nn.functional.layer_norm(x, (x.shape[1],), eps=1e-6) * (1 + scale[seg]) + shift[seg]


def _eager_fused(x, y, gate, shift, scale, seg):
    h = x + gate[seg] * y
    return h, _eager_adaln(h, shift, scale, seg)


def _liger_adaln(device):
    LigerLayerNormFunction = harness.liger("liger_kernel.ops.layer_norm", "LigerLayerNormFunction", device)

    def fn(x, shift, scale, seg):
        ones = torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
        zeros = torch.zeros_like(ones)
        return LigerLayerNormFunction.apply(x, ones, zeros, 1e-6) * (1 + scale[seg]) + shift[seg]
    return fn


def _inputs(device, fused: bool):
    lengths = _lengths(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    n, N = len(lengths), sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(device)
    t = {"x": torch.randn(N, D, generator=g), "shift": 0.5 * torch.randn(n, D, generator=g),
         "scale": 0.5 * torch.randn(n, D, generator=g)}
    if fused:
        t.update(y=torch.randn(N, D, generator=g), gate=0.5 * torch.randn(n, D, generator=g))
    return {k: v.to(device, dtype) for k, v in t.items()}, cu, ref.segment_ids(cu, N)


def _provider(provider, fused, cu, seg, device):
    if provider == "triton":
        if device.type != "cuda":
            pytest.skip("triton on CPU runs only in the interpreter: not a timing")
        if fused:
            return lambda a: sk.gated_residual_adaln(**a, cu_seqlens=cu, segment_ids=seg, backend="triton")
        return lambda a: sk.adaln_norm(**a, cu_seqlens=cu, segment_ids=seg, backend="triton")
    if provider == "cpu":
        x = torch.empty(0, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        reasons = op.cpu_reasons(x)
        if reasons:
            pytest.skip("cpu: " + "; ".join(reasons))
        if fused:
            return lambda a: sk.gated_residual_adaln(**a, cu_seqlens=cu, segment_ids=seg, backend="cpu")
        return lambda a: sk.adaln_norm(**a, cu_seqlens=cu, segment_ids=seg, backend="cpu")
    if provider == "liger":
        if fused:
            pytest.skip("Liger-Kernel has no fused gated residual + adaLN")
        f = _liger_adaln(device)
        return lambda a: f(**a, seg=seg.long())
    eager = _eager_fused if fused else _eager_adaln
    if provider == "compile":
        eager = torch.compile(eager)
    return lambda a: eager(**a, seg=seg.long())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kernel", ["adaln_norm", "gated_residual_adaln"])
def test_adaln_norm(suite, benchmark, kernel, provider, mode):
    _time(suite, benchmark, kernel, provider, mode)


# (TILE_ELEMENTS_BACKWARD, BACKWARD_PROGRAMS_PER_SM): the backward's tile and grid, around the defaults
BACKWARD_GRIDS = [(4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16)]


@pytest.mark.parametrize("grid", BACKWARD_GRIDS, ids=lambda g: f"tile{g[0]}-per_sm{g[1]}")
@pytest.mark.parametrize("kernel", ["adaln_norm", "gated_residual_adaln"])
def test_backward_grid(suite, benchmark, kernel, grid, monkeypatch):
    """fwd+bwd of the Triton backend with each backward tile size and programs per SM
    (adaln_norm.TILE_ELEMENTS_BACKWARD, BACKWARD_PROGRAMS_PER_SM), as provider
    triton:tile<T>-per_sm<P>."""
    if suite.device.type != "cuda":
        pytest.skip("the backward's grid is the Triton launcher's; the Triton backend is timed on CUDA only")
    monkeypatch.setattr(op, "TILE_ELEMENTS_BACKWARD", grid[0])
    monkeypatch.setattr(op, "BACKWARD_PROGRAMS_PER_SM", grid[1])
    _time(suite, benchmark, kernel, "triton", "fwd+bwd", label=f"triton:tile{grid[0]}-per_sm{grid[1]}")


def _time(suite, benchmark, kernel, provider, mode, label=None):
    fused = kernel == "gated_residual_adaln"
    args, cu, seg = _inputs(suite.device, fused)
    fn = _provider(provider, fused, cu, seg, suite.device)
    out = fn(args)
    outs = out if isinstance(out, tuple) else (out,)
    expected = _eager_fused(**args, seg=seg.long()) if fused else (_eager_adaln(**args, seg=seg.long()),)
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    N, itemsize = args["x"].shape[0], args["x"].element_size()
    rows_fwd = (3 if fused else 1) + (2 if fused else 1)  # reads x[, y] + writes [h,] out
    if mode == "fwd":
        run = lambda: fn(args)  # noqa: E731
        rows = rows_fwd
    else:
        leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
        grads = [torch.randn_like(o) for o in outs]

        def run():
            o = fn(leaves)
            torch.autograd.grad(o if isinstance(o, tuple) else (o,), list(leaves.values()), grads)
        rows = rows_fwd + (6 if fused else 3)  # backward: reads x (h), dout[, dh, y], writes dx[, dy]
    suite.run(kernel, mode, label or provider, f"mixed-{N}x{D}", run, rows * N * D * itemsize, args["x"].dtype,
              benchmark, tokens=N, segments=len(_lengths(suite.device)), graph=True)
