"""Benchmarks of rms_norm: the DiT's QK-norm of queries / keys [N, heads, head_dim] and the
RMSNorm of the cross-attention's input [N, D], against what one would write instead.

Providers: `triton` and `cpu` (ours; each is skipped with its reasons where it cannot run),
`eager` (F.rms_norm, the equivalent PyTorch of the docstring), `compile` (torch.compile of it),
`liger` (Liger-Kernel's functional RMSNorm in fp32 ("gemma" casting, as ours computes) and
out of place, when liger-kernel is installed and on CUDA; otherwise skipped with the reason).

Workloads, on the token count of bench_adaln_norm's packed mixed batch: `qk-<N>x12x64` (the B
size's 12 heads of 64), `qk-<N>x12x128` (the 1B size's 12 heads of 128), `mixed-<N>x1152`
(DiT-XL's width: the cross-attention's query norm).

Bytes moved, the least each mode must read and write: fwd reads x and writes the output (2
tensors of x's size); the backward reads x and dout and writes dx (3 more; the per-row rstd
can be recomputed from x, so it is not counted). The weight [D] (and its gradient) is counted
once each way.
"""
import pytest
import torch

import sora_kernels as sk
from benchmarks import harness
from benchmarks.bench_adaln_norm import D, _lengths  # the same packed batch as adaln_norm
from sora_kernels.ops.rms_norm import RMS_NORM_BACKENDS

PROVIDERS = ["triton", "cpu", "eager", "compile", "liger"]
MODES = ["fwd", "fwd+bwd"]
EPS = 1e-6
# workload name -> the trailing shape of x: (heads, head_dim) for QK-norm, (width,) for rows
SHAPES = {"qk-12x64": (12, 64), "qk-12x128": (12, 128), "mixed": (D,)}


def _eager(x, weight):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, EPS)


def _liger(device):
    liger_rms_norm = harness.liger("liger_kernel.transformers.functional", "liger_rms_norm", device)
    return lambda x, weight: liger_rms_norm(x, weight, EPS, offset=0.0, casting_mode="gemma", in_place=False)


def _provider(provider, x, weight, device):
    """A callable of (x, weight), or a skip with the reason this provider cannot run here."""
    if provider == "liger":
        return _liger(device)
    if provider in ("eager", "compile"):
        # dynamic=False: each workload gets kernels specialised to its shape, as a model of fixed sizes would
        return torch.compile(_eager, dynamic=False) if provider == "compile" else _eager
    # skips with the backend's reasons (Triton on CPU: only the interpreter, not a timing)
    harness.backend_runner(provider, RMS_NORM_BACKENDS, (x, weight, EPS), device)
    return lambda x, weight: sk.rms_norm(x, weight, eps=EPS, backend=provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", list(SHAPES))
def test_rms_norm(suite, benchmark, workload, provider, mode):
    N = sum(_lengths(suite.device))
    dtype = torch.bfloat16 if suite.device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, *SHAPES[workload], generator=g).to(suite.device, dtype)
    weight = (1 + 0.1 * torch.randn(x.shape[-1], generator=g)).to(suite.device, dtype)
    fn = _provider(provider, x, weight, suite.device)
    torch.testing.assert_close(fn(x, weight).float(), _eager(x, weight).float(), rtol=0.05, atol=0.05)
    nbytes = 2 * x.numel() + weight.numel()  # reads x, weight; writes out
    if mode == "fwd":
        run = lambda: fn(x, weight)  # noqa: E731
    else:
        leaves = [x.detach().requires_grad_(), weight.detach().requires_grad_()]
        dout = torch.randn_like(x)

        def run():
            torch.autograd.grad(fn(*leaves), leaves, dout)
        nbytes += 3 * x.numel() + weight.numel()  # backward: reads x, dout; writes dx, dweight
    name = "x".join(map(str, (N, *SHAPES[workload])))
    suite.run("rms_norm", mode, provider, f"{workload.split('-')[0]}-{name}", run, nbytes * x.element_size(), dtype,
              benchmark, tokens=N, graph=True)
