"""rope3d against the reference (2x rule of tests/test_varlen_attention.py), its backward,
default sections and errors."""
import pytest
import torch

import sora_kernels as sk
from conftest import DEVICE, require_backend
from sora_kernels.ops.rope3d import CPU_KERNEL_BUILT, ROPE_BACKENDS
from sora_kernels.reference import rope as ref

BACKENDS = ["triton", "cpu", "reference"]


def _case(n, heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, heads, head_dim, generator=g).to(DEVICE, dtype).requires_grad_()
    positions = torch.randint(0, 90, (n, 3), generator=g, dtype=torch.int32).to(DEVICE)
    return x, positions


@pytest.mark.parametrize("sections", [None, (16, 24, 24), (0, 32, 32)])
@pytest.mark.parametrize("head_dim", [40, 64, 72, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, head_dim, sections):
    if sections is not None and sum(sections) != head_dim:
        pytest.skip("sections for head dim 64")
    x, positions = _case(37, 3, head_dim, dtype)
    require_backend(ROPE_BACKENDS, backend, (x, positions, 10000.0, sections))
    out = sk.rope3d(x, positions, sections=sections, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    exact = ref.rope3d(x.detach().double(), positions, sections=sections)
    plain = ref.rope3d(x.detach(), positions, sections=sections)  # fp32 math, rounded to dtype
    rounding = 2 * (exact.to(dtype) + 0.3 - 0.3 - exact.to(dtype)).abs().max().item()
    err = (out.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    assert err <= 2 * err_plain + rounding, f"out error {err:.3g} > 2 x {err_plain:.3g} + {rounding:.3g}"
    exact_grad = ref.rope3d(grad_out.double(), positions, sections=sections, inverse=True)
    err = (grad.double() - exact_grad).abs().max().item()
    assert err <= 2 * err_plain + rounding, f"grad error {err:.3g}"


def test_rotation_is_per_axis():
    """Moving a token along one axis changes only that axis's section of features."""
    x = torch.randn(2, 1, 64, device=DEVICE)
    positions = torch.tensor([[3, 5, 7], [3, 9, 7]], dtype=torch.int32, device=DEVICE)
    out = sk.rope3d(x[[0, 0]], positions)
    t, h, w = ref.default_sections(64)
    assert torch.equal(out[0, :, :t], out[1, :, :t]) and torch.equal(out[0, :, t + h:], out[1, :, t + h:])
    assert not torch.allclose(out[0, :, t:t + h], out[1, :, t:t + h])
    zero = sk.rope3d(x, torch.zeros(2, 3, dtype=torch.int32, device=DEVICE))
    torch.testing.assert_close(zero, x, rtol=0, atol=1e-6)


def test_default_sections():
    assert ref.default_sections(64) == (20, 22, 22)
    assert ref.default_sections(72) == (24, 24, 24)
    assert ref.default_sections(128) == (44, 42, 42)
    assert ref.default_sections(40) == (12, 14, 14)
    assert all(sum(ref.default_sections(d)) == d and all(s % 2 == 0 for s in ref.default_sections(d))
               for d in range(2, 258, 2))


def test_torch_compile_fullgraph():
    x, positions = _case(10, 2, 64, torch.float32)
    f = lambda x, p: sk.rope3d(x, p) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x, positions), f(x, positions),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(x=torch.zeros(4, 2, 7)), "x: rope rotates pairs of features, expected an even head dim D, got D=7"),
    (dict(x=torch.zeros(4, 16)), r"x: expected a 3-dim tensor \[N, H, D\], got \(4, 16\)"),
    (dict(x=torch.zeros(4, 2, 16, dtype=torch.int32)), "x: expected a floating-point tensor .*, got torch.int32"),
    (dict(positions=torch.zeros(4, 2, dtype=torch.int32)), r"positions: expected shape \(4, 3\)"),
    (dict(positions=torch.zeros(4, 3, dtype=torch.int64)), "positions: expected dtype torch.int32, got torch.int64"),
    (dict(sections=(8, 8, 2)), r"sections: expected \(t, h, w\) summing to the head dim 16, got \(8, 8, 2\)"),
    (dict(sections=(7, 7, 2)), "sections: expected 3 non-negative even ints"),
    (dict(sections=16), "sections: expected 3 non-negative even ints .*, got 16"),
    (dict(theta=0.5), "theta: expected a finite number > 1, got 0.5"),
])
def test_errors(kwargs, message):
    args = dict(x=torch.zeros(4, 2, 16), positions=torch.zeros(4, 3, dtype=torch.int32))
    args.update(kwargs)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        sk.rope3d(args.pop("x"), args.pop("positions"), **args)


def test_positions_on_another_device():
    """A meta tensor stands for another device on any machine."""
    with pytest.raises(ValueError, match=f"positions: expected device {DEVICE.type}.* like the tokens, got meta"):
        sk.rope3d(torch.zeros(4, 2, 16, device=DEVICE), torch.zeros(4, 3, dtype=torch.int32, device="meta"))


def _cpu_kernel():
    if not CPU_KERNEL_BUILT:
        pytest.skip("sora_kernels._C has no CPU rope3d kernel")
    return torch.ops.sora_kernels.rope3d


@pytest.mark.parametrize("inverse", [False, True])
def test_cpu_kernel_opcheck(inverse):
    """The C++ op's schema, fake and autograd registration (torch.library.opcheck)."""
    op = _cpu_kernel()
    x = torch.randn(9, 2, 40, requires_grad=True)
    positions = torch.randint(0, 20, (9, 3), dtype=torch.int32)
    inv_freq, _ = ref.inverse_frequencies(40, 10000.0, (12, 14, 14))
    torch.library.opcheck(op, (x, positions, inv_freq, [12, 14, 14], inverse))


@pytest.mark.parametrize("spread", [90, 10 ** 6])
def test_cpu_kernel_positions(spread):
    """Positions of any range, negative too: a few dozen values per axis (tabulated angles) or
    spread over millions (angles per token) give the reference's rotation, and an
    out-of-place call leaves x as it was."""
    op = _cpu_kernel()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 2, 64, generator=g)
    positions = torch.randint(-spread, spread, (300, 3), generator=g, dtype=torch.int32)
    positions[:, 0] = 7  # one value on an axis
    x0 = x.clone()
    for inverse in (False, True):
        inv_freq, _ = ref.inverse_frequencies(64, 10000.0, (20, 22, 22))
        out = op(x, positions, inv_freq, [20, 22, 22], inverse)
        exact = ref.rope3d(x.double(), positions, inverse=inverse)
        plain = ref.rope3d(x, positions, inverse=inverse)
        err, err_plain = ((o.double() - exact).abs().max().item() for o in (out, plain))
        assert err <= 2 * err_plain + 1e-6, f"error {err:.3g} > 2 x {err_plain:.3g}"
    assert torch.equal(x, x0)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.zeros(4, 2, 16, dtype=torch.float64)), "x: the cpu kernel runs float32 CPU tensors"),
    (dict(positions=torch.zeros(4, 2, dtype=torch.int32)), r"positions: expected int32 \[4, 3\]"),
    (dict(inv_freq=torch.zeros(7)), r"inv_freq: expected float32 \[8\]"),
    (dict(sections=[8, 8, 2]), "sections: expected .t, h, w. summing to the head dim 16"),
    (dict(sections=[7, 7, 2]), "sections: expected non-negative even counts"),
])
def test_cpu_kernel_checks(change, message):
    """The C++ op checks what it indexes with (rope3d checks first, with its own messages;
    these guard direct callers of torch.ops.sora_kernels.rope3d)."""
    op = _cpu_kernel()
    args = dict(x=torch.zeros(4, 2, 16), positions=torch.zeros(4, 3, dtype=torch.int32), inv_freq=torch.zeros(8),
                sections=[4, 6, 6], inverse=False)
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        op(*args.values())
