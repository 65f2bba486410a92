"""Benchmarks of the fused MLP activations gelu_tanh (DiT's MLP) and swiglu (silu(gate) * up),
against what one would write instead.

Providers: `triton` and `cpu` (ours; each is skipped with its reasons where it cannot run),
`eager` (F.gelu(x, approximate="tanh"); F.silu(gate) * up), `compile` (torch.compile of that
eager code), `liger` (Liger-Kernel's SwiGLU, liger_swiglu, when liger-kernel is installed and on
CUDA, otherwise skipped with the reason; for gelu_tanh always skipped: Liger has no GELU alone,
its GeGLU is gelu_tanh(a) * b).

Workloads: the MLP's hidden activations of bench_adaln_norm's packed mixed batch, [N, 4 * 1152]
for gelu_tanh (DiT-XL, mlp_ratio 4) and [N, 3072] for swiglu (the 2/3 * 4 * 1152 hidden that
keeps a SwiGLU MLP's parameter count); on CPU a quarter of its tokens (see _tokens).

Bytes moved, the least each mode must read and write: gelu_tanh fwd reads x and writes y (2
tensors), its backward reads x and dy and writes dx (3 more); swiglu fwd reads gate and up and
writes the product (3), its backward reads gate, up and dout and writes both gradients (5 more).
"""
import pytest
import torch

import sora_kernels as sk
from benchmarks import harness
from benchmarks.bench_adaln_norm import D, _lengths  # the same packed batch as adaln_norm
from sora_kernels.ops.activations import GELU_BACKENDS, SWIGLU_BACKENDS

PROVIDERS = ["triton", "cpu", "eager", "compile", "liger"]
MODES = ["fwd", "fwd+bwd"]
HIDDEN = {"gelu_tanh": 4 * D, "swiglu": 2 * 4 * D // 3}
# tensors of the hidden's size read + written: (fwd, backward alone)
ROWS = {"gelu_tanh": (2, 3), "swiglu": (3, 5)}


def _eager_gelu_tanh(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


def _eager_swiglu(gate, up):
    return torch.nn.functional.silu(gate) * up


EAGER = {"gelu_tanh": _eager_gelu_tanh, "swiglu": _eager_swiglu}
OURS = {"gelu_tanh": (sk.gelu_tanh, GELU_BACKENDS), "swiglu": (sk.swiglu, SWIGLU_BACKENDS)}


def _tokens(device) -> int:
    """bench_adaln_norm's packed token count; on CPU a quarter of it, so that a [N, 4 * D] hidden
    tensor holds as many elements as adaln_norm's [N, D] there and a case stays a few seconds."""
    N = sum(_lengths(device))
    return N if device.type == "cuda" else N // 4


def _liger(kernel, device):
    if kernel == "gelu_tanh":
        pytest.skip("Liger-Kernel has no GELU alone (its GeGLU is gelu_tanh(a) * b)")
    return harness.liger("liger_kernel.transformers.functional", "liger_swiglu", device)


def _provider(kernel, provider, inputs, device):
    """A callable of the inputs, or a skip with the reason this provider cannot run here."""
    if provider == "liger":
        return _liger(kernel, device)
    if provider in ("eager", "compile"):
        return torch.compile(EAGER[kernel]) if provider == "compile" else EAGER[kernel]
    op, backends = OURS[kernel]
    # skips with the backend's reasons (Triton on CPU: only the interpreter, not a timing)
    harness.backend_runner(provider, backends, inputs, device)
    return lambda *a: op(*a, backend=provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kernel", ["gelu_tanh", "swiglu"])
def test_activations(suite, benchmark, kernel, provider, mode):
    N = _tokens(suite.device)
    dtype = torch.bfloat16 if suite.device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(N, HIDDEN[kernel], generator=g).to(suite.device, dtype)
                   for _ in range(1 if kernel == "gelu_tanh" else 2))
    fn = _provider(kernel, provider, inputs, suite.device)
    torch.testing.assert_close(fn(*inputs).float(), EAGER[kernel](*inputs).float(), rtol=0.05, atol=0.05)
    fwd_rows, bwd_rows = ROWS[kernel]
    if mode == "fwd":
        run = lambda: fn(*inputs)  # noqa: E731
        rows = fwd_rows
    else:
        leaves = [t.detach().requires_grad_() for t in inputs]
        dout = torch.randn_like(inputs[0])

        def run():
            torch.autograd.grad(fn(*leaves), leaves, dout)
        rows = fwd_rows + bwd_rows
    nbytes = rows * inputs[0].numel() * inputs[0].element_size()
    suite.run(kernel, mode, provider, f"mixed-{N}x{HIDDEN[kernel]}", run, nbytes, dtype, benchmark, tokens=N,
              graph=True)
