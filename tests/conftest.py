"""Shared test setup.

Without a CUDA device the Triton backend runs under Triton's interpreter on CPU tensors:
TRITON_INTERPRET must be set before sora_kernels (and its @triton.jit kernels) is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check results, not speed: attention kernels launch with their first config instead of
# compiling and timing every candidate.
os.environ.setdefault("SORA_KERNELS_AUTOTUNE", "0")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Float32 results are compared with float32 and float64 references: on CUDA, convolutions and
# matrix products run in full float32 too. cuDNN's default is TF32 (a 10-bit mantissa), under
# which the same convolution through two algorithms (a whole frame and a tile of it, say) differs
# by ~5e-3 (H200, 2026-11-26).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
KERNEL_BACKENDS = ["cuda", "triton", "cpu"]


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def native_kernels(monkeypatch):
    """Model tests on CPU select backends as a CPU user gets them (C++, else reference), not
    the Triton interpreter that TRITON_INTERPRET=1 puts first for the kernel tests: the
    backends read the variable at selection time."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def _traced_outputs(f, args) -> list:
    """The shapes, strides and dtypes torch.compile's graph of f gives its outputs (the custom
    ops' fake implementations' answers, never run for real): None for an output the graph
    passes through from its inputs or constants."""
    traced = []

    def backend(gm, example_inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        traced.extend(a.meta.get("example_value") if isinstance(a, torch.fx.Node) else None
                      for a in torch.utils._pytree.tree_leaves(out.args[0]))
        return gm.forward
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=backend)(*args)
    return traced


def assert_compiles_exactly(f, *args) -> None:
    """torch.compile(f, fullgraph=True) (aot_eager: the graph capture, not codegen) gives
    f's outputs bit for bit, and the traced graph (the fake implementations) the same shapes,
    strides and dtypes as the real outputs: aot_eager runs the real kernels, so a fake that
    gets a shape wrong would pass the comparison of values alone (and inductor asserts the
    fake's strides on the real tensors)."""
    expected = f(*args)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    expected, got = ((t,) if isinstance(t, torch.Tensor) else t for t in (expected, got))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    tensors = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    traced = _traced_outputs(f, args)
    assert len(traced) == len(tensors), f"the traced graph returns {len(traced)} outputs, f {len(tensors)}"
    for i, (fake, real) in enumerate(zip(traced, tensors)):
        if isinstance(fake, torch.Tensor):
            traced_as, computed = ((tuple(t.shape), t.stride(), t.dtype) for t in (fake, real))
            assert traced_as == computed, f"output {i}: traced as {traced_as}, computed {computed}"


def assert_compiles_backward_exactly(f, *args, backend: str = "aot_eager", out_tol: dict | None = None,
                                     grad_tol: dict | None = None) -> None:
    """torch.compile(f, fullgraph=True, backend=backend) gives f's outputs and its gradients,
    for the tensor args that require grad, bit for bit unless out_tol / grad_tol (rtol, atol)
    are given: the backward is traced too (with the fakes of the backward ops), so a backward
    that launches a kernel on the traced (fake) tensors fails here. f returns a tensor or a list
    of them; the gradient flows from those that require grad (a random dout for each)."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    assert leaves, "no argument requires grad"

    def run(fn):
        out = fn(*args)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        diff = [o for o in outs if o.requires_grad]
        grads = []
        if diff:
            g = torch.Generator().manual_seed(1)
            douts = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in diff]
            grads = list(torch.autograd.grad(diff, leaves, douts, allow_unused=True))
        return [o.detach() for o in outs], grads
    expected, expected_grads = run(f)
    torch._dynamo.reset()
    got, got_grads = run(torch.compile(f, fullgraph=True, backend=backend))
    assert len(got) == len(expected) and len(got_grads) == len(expected_grads)
    exact = dict(rtol=0, atol=0)
    pairs = [(a, b, out_tol or exact, f"output {i}") for i, (a, b) in enumerate(zip(got, expected))] + \
        [(a, b, grad_tol or exact, f"gradient {i}") for i, (a, b) in enumerate(zip(got_grads, expected_grads))]
    for a, b, tol, what in pairs:
        assert (a is None) == (b is None), what
        if a is not None:
            assert (a.shape, a.dtype) == (b.shape, b.dtype), f"{what}: {a.shape} {a.dtype}, {b.shape} {b.dtype}"
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


def require_backend(backends, name: str, args: tuple) -> None:
    """Skips the test, with the backend's own reasons, when `name` cannot run `args` here."""
    backend = next(b for b in backends if b.name == name)
    reasons = backend.reasons(*args)
    if reasons:
        pytest.skip(f"{name} cannot run here: {'; '.join(reasons)}")


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Exact equality (bit patterns), printing the first mismatching indices."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a, e = actual.contiguous().view(word), expected.contiguous().view(word)
    bad = (a != e).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.shape[0]} of {a.numel()} elements differ; first at "
                              f"{bad[:5].tolist()}: {actual[tuple(bad[0])].item()} vs {expected[tuple(bad[0])].item()}")


def assert_2x_rule(ours, plain, exact, dtype, what: str = "", fp32_rtol: float = 1e-5) -> None:
    """FlashAttention's rule, output by output: the error of `ours` against the float64 `exact`
    is at most twice that of `plain` (PyTorch in the same low precision) plus two units of
    rounding at 1 in that dtype; in fp32 (where PyTorch is the oracle's own precision) at most
    fp32_rtol times the largest magnitude."""
    for i, (a, p, e) in enumerate(zip(ours, plain, exact)):
        err = (a.double() - e.double()).abs().max().item()
        if dtype == torch.float32:
            bound = fp32_rtol * max(1.0, e.abs().max().item())
        else:
            rounding = 2 * (e.to(dtype) + 1 - 1 - e.to(dtype)).abs().max().item()
            bound = 2 * (p.double() - e.double()).abs().max().item() + rounding
        assert err <= bound, f"{what} output/grad {i}: error {err:.3g} > {bound:.3g}"


def train_losses(module: torch.nn.Module, loss_fn, steps: int, lr: float = 1e-3) -> list[float]:
    """Losses of `steps` Adam steps on loss_fn() (a closure over fixed inputs)."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_trains_like_reference(train, monkeypatch, rtol: float = 1e-4) -> None:
    """train() (a list of losses) falls, and gives the same losses within rtol with every op
    forced to its reference backend."""
    fused = train()
    monkeypatch.setenv("SORA_KERNELS_BACKEND", "reference")
    reference = train()
    assert fused[-1] < fused[0], "the model did not train"
    for step, (a, b) in enumerate(zip(fused, reference)):
        assert abs(a - b) <= rtol * abs(b), f"step {step}: loss {a} (fused) vs {b} (reference)"


OP_CASE_CU = [0, 3, 10]        # public_op_cases' two segments of 3 and 7 tokens


def public_op_cases() -> dict:
    """Every public op on small inputs (test_compile_inductor, test_export): name -> (f, leaves),
    f(*leaves) a tensor or a list of them, the leaves on DEVICE with requires_grad."""
    import sora_kernels as sk
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()
    cu = torch.tensor(OP_CASE_CU, dtype=torch.int32, device=DEVICE)
    pos = torch.randint(0, 4, (10, 3), generator=g, dtype=torch.int32).to(DEVICE)
    patch = (1, 2, 2)
    # the final layer's output layout: 4-channel latents of 2 x 4 x 4 and 1 x 2 x 4 (8 + 2 tokens)
    latent_layout = sk.pack_patchify([torch.zeros(4, 2, 4, 4, device=DEVICE), torch.zeros(4, 1, 2, 4, device=DEVICE)],
                                     patch)

    def pack(a, b):
        packed = sk.pack_patchify([a, b], patch)
        return sk.unpack_unpatchify(packed.tokens, packed, patch)
    return {
        "patchify3d": (lambda x: sk.unpatchify3d(sk.patchify3d(x, patch), patch, (2, 2, 3)), [leaf(2, 3, 2, 4, 6)]),
        "pack_patchify": (pack, [leaf(3, 2, 4, 6), leaf(3, 1, 2, 8)]),
        "varlen_attention": (lambda q, k, v: sk.varlen_attention(q, k, v, cu, cu, 7, 7, causal=True),
                             [leaf(10, 2, 16), leaf(10, 2, 16), leaf(10, 2, 16)]),
        "varlen_attention_rope": (lambda q, k, v: sk.varlen_attention(q, k, v, cu, cu, 7, 7, rope=pos),
                                  [leaf(10, 2, 16), leaf(10, 2, 16), leaf(10, 2, 16)]),
        "rope3d": (lambda x: sk.rope3d(x, pos), [leaf(10, 2, 16)]),
        "adaln_norm": (lambda x, shift, scale: sk.adaln_norm(x, shift, scale, cu), [leaf(10, 16), leaf(2, 16),
                                                                                     leaf(2, 16)]),
        "gated_residual_adaln": (lambda x, y, gate, shift, scale: list(sk.gated_residual_adaln(x, y, gate, shift, scale,
                                                                                               cu)),
                                 [leaf(10, 16), leaf(10, 16), leaf(2, 16), leaf(2, 16), leaf(2, 16)]),
        "rms_norm": (lambda x, w: sk.rms_norm(x, w), [leaf(5, 2, 24), leaf(24)]),
        "gated_residual": (lambda x, y, gate: sk.gated_residual(x, y, gate, cu), [leaf(10, 16), leaf(10, 16),
                                                                                   leaf(2, 16)]),
        "gelu_tanh": (sk.gelu_tanh, [leaf(7, 24)]),
        "swiglu": (sk.swiglu, [leaf(7, 24), leaf(7, 24)]),
        "group_norm_silu": (lambda x, w, b: sk.group_norm_silu(x, 2, w, b), [leaf(1, 8, 2, 4, 4), leaf(8), leaf(8)]),
        "patch_embed3d": (lambda a, w, b: sk.patch_embed3d([a], w, b, patch).tokens,
                          [leaf(4, 2, 2, 4), leaf(8, 4, 1, 2, 2), leaf(8)]),
        "final_layer_unpatchify": (lambda x, shift, scale, w, b: sk.final_layer_unpatchify(x, shift, scale, w, b,
                                                                                            latent_layout, patch),
                                   [leaf(10, 16), leaf(2, 16), leaf(2, 16), leaf(16, 16), leaf(16)]),
        "latent_denorm": (lambda z: list(sk.latent_denorm(z, 0.5, 0.1)), [leaf(1, 4, 2, 3, 5)]),
        # not differentiable: forward only
        "frames_to_uint8": (lambda v: sk.frames_to_uint8(v.detach()), [leaf(3, 2, 4, 4)]),
        "group_norm_moments": (lambda x: list(sk.group_norm_moments(x.detach(), 2)), [leaf(1, 8, 2, 4, 4)]),
    }
