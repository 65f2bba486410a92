"""varlen_attention against the per-segment reference.

Tolerance (FlashAttention's rule): each backend's error against a float64 oracle must be at
most twice the error of plain PyTorch in the same dtype (reference with upcast=False), plus
two units of rounding of the dtype at 0.3, for the output and for every gradient. The Triton
backend runs fp16 and bf16 (fp32 is the cpu and reference backends'). Under the Triton
interpreter (no GPU) its bf16 is left out: the interpreter computes tl.dot on bf16 operands
wrongly; on a GPU both run.
"""
import math

import pytest
import torch

import sora_kernels as sk
from sora_kernels.ops import varlen_attention as op
from sora_kernels.reference import attention as ref
from sora_kernels.reference import rope as ref_rope
from conftest import DEVICE, require_backend

BACKENDS = ["triton", "cpu"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ENGINES = ["kernel", "aten"]  # the cpu backend's two ways (op._use_kernel)


def use_engine(monkeypatch, backend, engine):
    """Makes the cpu backend run its C++ kernel ("kernel", its default when built) or aten's CPU
    flash attention ("aten", what runs without the kernel). Other backends run once, as
    "kernel"."""
    if engine != "kernel" and backend != "cpu":
        pytest.skip("the engines are the cpu backend's")
    if engine == "kernel" and backend == "cpu" and not op.KERNEL_BUILT:
        pytest.skip("sora_kernels._C has no CPU attention kernel")
    monkeypatch.setattr(op, "USE_KERNEL", engine == "kernel")


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("the Triton interpreter computes tl.dot on bf16 wrongly; bf16 is tested on a GPU")
    if backend == "triton" and dtype == torch.float32:
        pytest.skip("the triton backend runs fp16 and bf16 (test_backend_reasons checks it says so)")


def make_case(lens_q, lens_k=None, heads=4, kv_heads=None, head_dim=64, dtype=torch.float16, seed=0, rope=False):
    """Random packed q, k, v (leaves requiring grad), cu_seqlens and, with rope, positions."""
    lens_k = lens_q if lens_k is None else lens_k
    kv_heads = kv_heads or heads
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + list(lens_q)).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + list(lens_k)).cumsum(0).to(torch.int32)
    nq, nk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = (torch.randn(n, h, head_dim, generator=g).to(DEVICE, dtype).requires_grad_()
               for n, h in ((nq, heads), (nk, kv_heads), (nk, kv_heads)))
    case = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q.to(DEVICE), cu_seqlens_k=cu_k.to(DEVICE),
                max_seqlen_q=max(lens_q, default=0), max_seqlen_k=max(lens_k, default=0))
    if rope:
        pos_q = torch.randint(0, 64, (nq, 3), generator=g, dtype=torch.int32).to(DEVICE)
        pos_k = pos_q if lens_k == lens_q else torch.randint(0, 64, (nk, 3), generator=g, dtype=torch.int32).to(DEVICE)
        case["rope"] = sk.Rope3D(pos_q, pos_k)
    return case


def run(case, causal=False, backend=None, dout=None, **kw):
    """(out, lse, dq, dk, dv) of one backend on `case`."""
    out, lse = sk.varlen_attention(**case, causal=causal, return_lse=True, backend=backend, **kw)
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, (case["q"], case["k"], case["v"]), dout)
    return (out, lse, *grads), dout


def oracle(case, causal, dout, upcast_to=torch.float64):
    """(out, lse, dq, dk, dv) of the reference: in float64 (the oracle), or with upcast_to=None
    in the inputs' own dtype (plain PyTorch in low precision)."""
    leaves = [x.detach().to(upcast_to or x.dtype).requires_grad_() for x in (case["q"], case["k"], case["v"])]
    q, k, v = leaves
    rope = case.get("rope")
    if rope is not None:
        q = ref_rope.rope3d(q, rope.positions_q, rope.theta, rope.sections)
        k = ref_rope.rope3d(k, rope.positions_k if rope.positions_k is not None else rope.positions_q,
                            rope.theta, rope.sections)
    out, lse = ref.varlen_attention(q, k, v, case["cu_seqlens_q"], case["cu_seqlens_k"],
                                    1.0 / math.sqrt(q.shape[2]), causal, upcast=upcast_to is not None)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return (out, lse, *grads)


def assert_within_2x(ours, case, causal, dout, what=""):
    exact = oracle(case, causal, dout)
    plain = oracle(case, causal, dout, upcast_to=None)
    dtype = case["q"].dtype
    for name, a, e, p in zip(("out", "lse", "dq", "dk", "dv"), ours, exact, plain):
        assert a.shape == e.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{what} lse: -inf rows differ"
            a, e, p = (torch.where(torch.isinf(e), 0.0, x.double()) for x in (a, e, p))
        assert not torch.isnan(a).any(), f"{what} {name}: NaN"
        rounding = 2 * (e.to(dtype) + 0.3 - 0.3 - e.to(dtype)).abs().max().item() if e.numel() else 0.0
        err = (a.double() - e.double()).abs().max().item() if a.numel() else 0.0
        err_plain = (p.double() - e.double()).abs().max().item() if p.numel() else 0.0
        assert err <= 2 * err_plain + rounding, \
            f"{what} {name}: error {err:.3g} > 2 x PyTorch {dtype} error {err_plain:.3g} + {rounding:.3g}"


CASES = {
    # name: make_case kwargs, causal. Sized so the Triton interpreter runs them in seconds;
    # test_long_segment has 1025 and 4099 tokens.
    "lengths-1-2-17-97": (dict(lens_q=[1, 2, 17, 97], heads=2, head_dim=64), False),
    "lengths-causal": (dict(lens_q=[1, 2, 17, 97], heads=2, head_dim=64), True),
    "d40-mqa": (dict(lens_q=[17, 97], heads=2, kv_heads=1, head_dim=40), False),
    "d72-gqa-causal": (dict(lens_q=[97, 33], heads=4, kv_heads=2, head_dim=72), True),
    "d128": (dict(lens_q=[130, 17], heads=2, head_dim=128), False),
    "d32-causal": (dict(lens_q=[17, 97], heads=2, head_dim=32), True),
    "d256": (dict(lens_q=[70, 17], heads=2, head_dim=256), False),
    "d96-causal": (dict(lens_q=[33, 70], heads=2, head_dim=96), True),      # padded to 128 columns
    "d136": (dict(lens_q=[17, 40], heads=2, head_dim=136), False),          # padded to 256 columns
    "image-and-clips": (dict(lens_q=[1, 300, 1, 1, 150, 1], heads=2, head_dim=64), False),
    "cross-attention": (dict(lens_q=[97, 1, 120, 40], lens_k=[0, 77, 200, 3], heads=2, kv_heads=1,
                             head_dim=64), False),
    "cross-causal": (dict(lens_q=[97, 5, 20], lens_k=[30, 64, 0], heads=2, head_dim=64), True),
    "zero-length-segments": (dict(lens_q=[0, 17, 0, 5, 0], lens_k=[3, 17, 0, 0, 0], heads=2, head_dim=32), False),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case_name, dtype, engine, monkeypatch):
    _skip_unsupported(backend, dtype)
    use_engine(monkeypatch, backend, engine)
    kw, causal = CASES[case_name]
    case = make_case(**kw, dtype=dtype)
    require_backend(op.ATTENTION_BACKENDS, backend, (case["q"], case["k"], case["v"]))
    ours, dout = run(case, causal, backend)
    assert_within_2x(ours, case, causal, dout, f"{backend} {case_name} {dtype}")


@pytest.mark.parametrize("dq_mode", [m for m in op.DQ_MODES if m != op.DQ_MODE])
@pytest.mark.parametrize("case_name", ["lengths-causal", "d72-gqa-causal", "image-and-clips", "cross-attention",
                                       "cross-causal", "zero-length-segments", "rope-gqa"])
def test_dq_modes(case_name, dq_mode, monkeypatch):
    """The Triton backward's other way to compute dq (DQ_MODE; the default runs in every other
    test) within the 2x rule, on the cases that test its edges: the causal diagonal, ragged
    blocks, GQA, keyless rows, empty segments, rope's rotation back."""
    if case_name == "rope-gqa":
        kw, causal = dict(lens_q=[17, 97, 1], heads=4, kv_heads=2, head_dim=72, rope=True), True
    else:
        kw, causal = CASES[case_name]
    case = make_case(**kw, dtype=torch.float16)
    require_backend(op.ATTENTION_BACKENDS, "triton", (case["q"], case["k"], case["v"]))
    monkeypatch.setattr(op, "DQ_MODE", dq_mode)
    ours, dout = run(case, causal, "triton")
    assert_within_2x(ours, case, causal, dout, f"DQ_MODE {dq_mode} {case_name}")


def _tma_or_skip(k, v):
    reasons = op.tma_reasons(k, v)
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("case_name", ["lengths-causal", "d72-gqa-causal", "d128", "image-and-clips",
                                       "cross-attention", "cross-causal", "zero-length-segments", "rope"])
def test_fwd_loads_tma(case_name, monkeypatch):
    """FWD_LOAD "tma" (key and value blocks through tensor descriptors) is within the 2x rule
    (and under the interpreter gives the pointer loads' output bit for bit) on the cases that test its edges: the
    head dim under its block (72 in 128: the next head's columns), the causal diagonal, ragged
    tails, GQA, empty segments, rope (keys rotated by rope3d before the descriptors see them)."""
    if case_name == "rope":
        kw, causal = dict(lens_q=[17, 97, 1], heads=4, kv_heads=2, head_dim=64, rope=True), True
    else:
        kw, causal = CASES[case_name]
    case = make_case(**kw, dtype=torch.float16)
    require_backend(op.ATTENTION_BACKENDS, "triton", (case["q"], case["k"], case["v"]))
    _tma_or_skip(case["k"], case["v"])
    monkeypatch.setattr(op, "FWD_LOAD", "pointers")
    pointers = sk.varlen_attention(**case, causal=causal, backend="triton")
    monkeypatch.setattr(op, "FWD_LOAD", "tma")
    ours, dout = run(case, causal, "triton")
    if DEVICE.type == "cpu":  # the interpreter: the same values in the same order (on a GPU the
        assert torch.equal(ours[0], pointers), "tma and pointer loads differ"  # MMA layouts may differ)
    assert_within_2x(ours, case, causal, dout, f"FWD_LOAD tma {case_name}")


def test_fwd_loads_tma_strided(monkeypatch):
    """Descriptors over views of one qkv projection (rows 3 H D apart): the pointer loads'
    output (bit for bit under the interpreter)."""
    g = torch.Generator().manual_seed(0)
    lengths, H, D = [17, 70, 1], 2, 64
    qkv = torch.randn(sum(lengths), 3, H, D, generator=g).to(DEVICE, torch.float16)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    require_backend(op.ATTENTION_BACKENDS, "triton", (q, k, v))
    _tma_or_skip(k, v)
    outs = []
    for mode in ("pointers", "tma"):
        monkeypatch.setattr(op, "FWD_LOAD", mode)
        outs.append(sk.varlen_attention(q, k, v, cu, cu, 70, 70, backend="triton"))
    if DEVICE.type == "cpu":
        assert torch.equal(*outs)
    else:
        torch.testing.assert_close(*outs, rtol=0, atol=2e-3)


def test_tma_reasons():
    """What keeps the forward on pointer loads is said, per operand."""
    x = torch.zeros(8, 2, 16, dtype=torch.float16, device=DEVICE)
    heads_apart = torch.zeros(8, 16, 2, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    assert any(r.startswith("k: heads not dense") for r in op.tma_reasons(heads_apart, x))
    odd_rows = torch.zeros(8, 2 * 16 + 1, dtype=torch.float16, device=DEVICE)[:, :32].view(8, 2, 16)
    assert any(r.startswith("v: rows not 16-byte aligned") for r in op.tma_reasons(x, odd_rows))


def test_dq_mode_checked(monkeypatch):
    case = make_case([5, 3], heads=2, head_dim=16)
    require_backend(op.ATTENTION_BACKENDS, "triton", (case["q"], case["k"], case["v"]))
    monkeypatch.setattr(op, "DQ_MODE", "atomics")
    out = sk.varlen_attention(**case, backend="triton")
    with pytest.raises(ValueError, match=r"DQ_MODE: expected one of \('separate', 'atomic'\), got 'atomics'"):
        out.sum().backward()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("length", [1025, 4099])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_segment(backend, causal, length, dtype, engine, monkeypatch):
    """1025 and 4099 tokens: many key blocks, a ragged last block, a short segment beside it.
    In float32 too: the cpu backend computes float16 in float32, where the 2x rule against
    PyTorch's float16 error cannot see float32 rounding that grows with the segment (sums over
    a segment's 4099 queries as one FMA chain gave dv 5.9x PyTorch's float32 error)."""
    use_engine(monkeypatch, backend, engine)
    if backend == "triton" and DEVICE.type == "cpu" and (length > 1025 or causal):
        pytest.skip("minutes under the Triton interpreter: 1025 non-causal runs here, every size on a GPU")
    case = make_case([length, 3], heads=2, head_dim=64, dtype=dtype)
    require_backend(op.ATTENTION_BACKENDS, backend, (case["q"], case["k"], case["v"]))
    ours, dout = run(case, causal, backend)
    assert_within_2x(ours, case, causal, dout, f"{backend} {length}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_fused_equals_unfused(backend, dtype, engine, monkeypatch):
    """rope= gives rope3d followed by attention (both within the 2x rule of the oracle, and
    within it of each other), forward and gradients: the gradients' rotation back happens in
    the backward kernels."""
    _skip_unsupported(backend, dtype)
    use_engine(monkeypatch, backend, engine)
    for causal, kw in ((False, dict(lens_q=[17, 97, 1], heads=4, kv_heads=2, head_dim=72)),
                       (True, dict(lens_q=[33, 130], heads=2, head_dim=64))):
        case = make_case(**kw, dtype=dtype, rope=True)
        require_backend(op.ATTENTION_BACKENDS, backend, (case["q"], case["k"], case["v"]))
        fused, dout = run(case, causal, backend)
        assert_within_2x(fused, case, causal, dout, f"{backend} fused rope")
        rope = case.pop("rope")
        q, k = case["q"], case["k"]
        case_unfused = dict(case, q=sk.rope3d(q, rope.positions_q), k=sk.rope3d(k, rope.positions_k))
        out, lse = sk.varlen_attention(**case_unfused, causal=causal, return_lse=True, backend=backend)
        unfused = (out, lse, *torch.autograd.grad(out, (q, k, case["v"]), dout))
        plain = oracle(dict(case, rope=rope), causal, dout, upcast_to=None)
        exact = oracle(dict(case, rope=rope), causal, dout)
        for name, a, b, p, e in zip(("out", "lse", "dq", "dk", "dv"), fused, unfused, plain, exact):
            if name == "lse":
                continue
            rounding = 2 * (e.to(dtype) + 0.3 - 0.3 - e.to(dtype)).abs().max().item()
            gap = (a.double() - b.double()).abs().max().item()
            err_plain = (p.double() - e.double()).abs().max().item()
            assert gap <= 2 * err_plain + rounding, f"{name}: fused vs unfused {gap:.3g} > {2 * err_plain:.3g}"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_rows_without_keys(backend, engine, monkeypatch):
    """Zero-length segments produce nothing; queries with no key output 0 and lse -inf, and
    send no gradient; causal with Lq > Lk leaves the first Lq - Lk queries without keys."""
    use_engine(monkeypatch, backend, engine)
    case = make_case([0, 4, 6, 3], [2, 0, 2, 0], heads=2, head_dim=32, dtype=torch.float16)
    require_backend(op.ATTENTION_BACKENDS, backend, (case["q"], case["k"], case["v"]))
    (out, lse, dq, dk, dv), _ = run(case, True, backend)
    no_keys = torch.tensor([1] * 4 + [1] * 4 + [0] * 2 + [1] * 3, dtype=torch.bool, device=DEVICE)
    assert torch.equal(out[no_keys], torch.zeros_like(out[no_keys]))
    assert torch.isneginf(lse[:, no_keys]).all() and torch.isfinite(lse[:, ~no_keys]).all()
    assert torch.equal(dq[no_keys], torch.zeros_like(dq[no_keys]))
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rope", [False, True])
def test_reference_backend_gradients(causal, rope):
    """The reference backend's backward (its formulas, inside a custom op) against autograd
    through the reference math, in float64: cross-attention with GQA, an empty query segment,
    an empty key segment, causal rows without keys, and rope on q and k."""
    case = make_case([5, 0, 7, 3], [3, 4, 9, 0], heads=4, kv_heads=2, head_dim=16, dtype=torch.float64, rope=rope)
    dout = torch.randn(15, 4, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    ours, _ = run(case, causal, backend="reference", dout=dout)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), ours, oracle(case, causal, dout)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("causal, pairs", [(False, 5 * 3 + 7 * 9), (True, (0 + 0 + 1 + 2 + 3) + sum(range(3, 10)))])
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_flop_counter(backend, causal, pairs):
    """torch.utils.flop_counter.FlopCounterMode counts the attention custom ops: 4 D per head
    per (query, visible key) pair forward (bottom-right causal), 2.5x that backward."""
    from torch.utils.flop_counter import FlopCounterMode
    case = make_case([5, 7], [3, 9], heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    require_backend(op.ATTENTION_BACKENDS, backend, (case["q"], case["k"], case["v"]))
    with FlopCounterMode(display=False) as counter:
        out = sk.varlen_attention(**case, causal=causal, backend=backend)
    assert counter.get_total_flops() == 4 * 4 * 16 * pairs
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 4 * 4 * 16 * pairs * 5 // 2


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_no_queries(backend):
    """Nq = 0 (every query segment empty): an empty output, and gradients (zeros for k and v)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(0, 2, 16, generator=g).to(DEVICE, torch.float16).requires_grad_()
    k, v = (torch.randn(5, 2, 16, generator=g).to(DEVICE, torch.float16).requires_grad_() for _ in range(2))
    require_backend(op.ATTENTION_BACKENDS, backend, (q, k, v))
    out = sk.varlen_attention(q, k, v, _cu(0, 0), _cu(0, 5), 0, 5, backend=backend)
    assert out.shape == (0, 2, 16)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


def test_default_backend_and_gradients_flow():
    case = make_case([5, 9], heads=2, head_dim=32, dtype=torch.float32)
    out = sk.varlen_attention(case["q"], case["k"], case["v"], case["cu_seqlens_q"], case["cu_seqlens_k"], 9, 9)
    out.sum().backward()
    assert case["q"].grad is not None and case["k"].grad is not None and case["v"].grad is not None


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])   # the reference: a float32 model on a GPU
def test_torch_compile_fullgraph(backend, engine, monkeypatch):
    use_engine(monkeypatch, backend, engine)
    case = make_case([17, 40], heads=2, kv_heads=1, head_dim=64, dtype=torch.float16, rope=True)
    require_backend(op.ATTENTION_BACKENDS, backend, (case["q"], case["k"], case["v"]))
    positions = case.pop("rope").positions_q

    def f(q, k, v, cu, positions):
        return sk.varlen_attention(q, k, v, cu, cu, 40, 40, causal=True, rope=positions, backend=backend)

    args = (case["q"], case["k"], case["v"], case["cu_seqlens_q"], positions)
    expected = f(*args)
    g_expected = torch.autograd.grad(expected.sum(), args[:3])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    g = torch.autograd.grad(compiled.sum(), args[:3])
    torch.testing.assert_close(compiled, expected, rtol=0, atol=0)
    for a, b in zip(g, g_expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backend_reasons():
    q = torch.zeros(4, 2, 300, dtype=torch.float64, device=DEVICE)
    reasons = op.ATTENTION_BACKENDS[0].reasons(q, q, q)
    assert any("head dims <= 256" in r for r in reasons) and any("float64" in r for r in reasons)
    q32 = torch.zeros(4, 2, 64, dtype=torch.float32, device=DEVICE)
    assert op.ATTENTION_BACKENDS[0].reasons(q32, q32, q32) == ["runs fp16 and bf16, got torch.float32"]
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(sk.NoBackendError, match="triton:.*head dims"):
        sk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="triton")


@pytest.mark.skipif(op.B.TRITON_MISSING is not None, reason="triton is not installed")
def test_launch_skips_configs_over_shared_memory():
    """Without autotuning the launcher takes the first candidate the GPU can launch: on an
    H200, D=256 with 3 stages asked for 256 KiB of shared memory (limit 227 KiB) and raised."""
    import triton
    launched = []

    def launch(c):
        if c.num_stages == 3:
            raise triton.runtime.errors.OutOfResources(262144, 232448, "shared memory")
        launched.append(c)

    candidates = [op.KernelConfig(128, 64, 8, 3), op.KernelConfig(64, 64, 4, 3), op.KernelConfig(64, 64, 8, 2)]
    chosen = op.launch_first_that_fits("fwd", ("key",), candidates, launch)
    assert launched == [chosen] and chosen == next(c for c in candidates if c.num_stages == 2)
    with pytest.raises(RuntimeError, match="no fwd config .* fits this GPU's resources"):
        op.launch_first_that_fits("fwd", ("key",), candidates[:1], launch)


# -----------------------------------------------------------------------------
# Errors
# -----------------------------------------------------------------------------

def _valid():
    q = torch.randn(6, 4, 16, device=DEVICE, dtype=torch.float16)
    kv = torch.randn(6, 2, 16, device=DEVICE, dtype=torch.float16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE)
    return dict(q=q, k=kv, v=kv.clone(), cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=4, max_seqlen_k=4)


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


ERRORS = [
    (dict(cu_seqlens_q=torch.tensor([0, 2, 6], device=DEVICE)), "cu_seqlens_q: expected dtype torch.int32"),
    (dict(cu_seqlens_k=_cu(1, 2, 6)), r"cu_seqlens_k: expected cu_seqlens\[0\] == 0, got 1"),
    (dict(cu_seqlens_q=_cu(0, 4, 2, 6), cu_seqlens_k=_cu(0, 2, 4, 6)),
     "cu_seqlens_q: expected non-decreasing offsets, got 4 then 2"),
    (dict(cu_seqlens_q=_cu(0, 2, 5)), "cu_seqlens_q: expected the last entry to equal the token count 6, got 5"),
    (dict(max_seqlen_q=3), "max_seqlen_q: expected at least the longest segment, 4, got 3"),
    (dict(max_seqlen_k=-1), "max_seqlen_k: expected a non-negative int"),
    (dict(max_seqlen_q=True), "max_seqlen_q: expected a non-negative int, got True"),
    (dict(cu_seqlens_k=_cu(0, 6)), "cu_seqlens_k: expected 3 entries like cu_seqlens_q"),
    (dict(k=torch.randn(6, 2, 8, device=DEVICE, dtype=torch.float16)), "k: expected head_dim 16 like q, got 8"),
    (dict(v=torch.randn(6, 2, 8, device=DEVICE, dtype=torch.float16)), "v: expected head_dim 16 like q, got 8"),
    (dict(k=torch.randn(6, 3, 16, device=DEVICE, dtype=torch.float16),
          v=torch.randn(6, 3, 16, device=DEVICE, dtype=torch.float16)),
     "k: expected kv heads dividing the 4 query heads, got 3"),
    (dict(v=torch.randn(6, 1, 16, device=DEVICE, dtype=torch.float16)), r"v: expected \[Nk, Hkv\] = \(6, 2\) like k"),
    (dict(k=torch.randn(6, 2, 16, device=DEVICE)), "k: expected dtype torch.float16 like q, got torch.float32"),
    (dict(q=torch.randn(6, 4, device=DEVICE, dtype=torch.float16)), "q: expected a 3-dim tensor"),
    (dict(q=torch.randn(6, 4, 0, device=DEVICE, dtype=torch.float16),
          k=torch.randn(6, 2, 0, device=DEVICE, dtype=torch.float16),
          v=torch.randn(6, 2, 0, device=DEVICE, dtype=torch.float16)), "q: expected a head_dim of at least 1, got 0"),
    (dict(rope=torch.zeros(5, 3, dtype=torch.int32, device=DEVICE)), r"rope.positions_q: expected shape \(6, 3\)"),
    (dict(rope=torch.zeros(6, 3, device=DEVICE)), "rope.positions_q: expected dtype torch.int32"),
    (dict(rope=sk.Rope3D(torch.zeros(6, 3, dtype=torch.int32, device=DEVICE), torch.zeros(6, 2, dtype=torch.int32,
                                                                                           device=DEVICE))),
     r"rope.positions_k: expected shape \(6, 3\)"),
    (dict(rope=sk.Rope3D(torch.zeros(6, 3, dtype=torch.int32, device=DEVICE), sections=(8, 4, 2))),
     r"sections: expected \(t, h, w\) summing to the head dim 16"),
    (dict(rope="positions"), "rope: expected None, an int32 positions tensor"),
    (dict(q=torch.randn(6, 4, 14, device=DEVICE, dtype=torch.float16),
          k=torch.randn(6, 2, 14, device=DEVICE, dtype=torch.float16),
          v=torch.randn(6, 2, 14, device=DEVICE, dtype=torch.float16),
          rope=sk.Rope3D(torch.zeros(6, 3, dtype=torch.int32, device=DEVICE), sections=(6, 4, 3))),
     "sections: expected 3 non-negative even ints"),
    (dict(q=torch.randn(6, 4, 15, device=DEVICE, dtype=torch.float16),
          k=torch.randn(6, 2, 15, device=DEVICE, dtype=torch.float16),
          v=torch.randn(6, 2, 15, device=DEVICE, dtype=torch.float16),
          rope=torch.zeros(6, 3, dtype=torch.int32, device=DEVICE)),
     "q: rope rotates pairs of features, expected an even head dim D, got D=15"),
    (dict(softmax_scale=float("nan")), "softmax_scale: expected a finite number"),
    (dict(dropout_p=0.1), r"dropout_p: expected 0.0 \(attention dropout is not implemented\), got 0.1"),
    (dict(window_size=(128, 0)), r"window_size: expected \(-1, -1\) \(no sliding window; .*got \(128, 0\)"),
    (dict(softcap=30.0), r"softcap: expected 0.0 \(soft-capping is not implemented\), got 30.0"),
    (dict(alibi_slopes=torch.ones(4)), r"alibi_slopes: expected None \(ALiBi is not implemented\), got Tensor"),
    (dict(deterministic="yes"), "deterministic: expected a bool, got 'yes'"),
    (dict(causal="no"), "causal: expected a bool, got 'no'"),
    (dict(block_table=torch.zeros(2, 4, dtype=torch.int32)), r"block_table: expected None \(a paged KV cache is not "
                                                              r"implemented; .*got Tensor"),
]
if DEVICE.type == "cuda":
    ERRORS.append((dict(k=torch.randn(6, 2, 16, dtype=torch.float16), v=torch.randn(6, 2, 16, dtype=torch.float16)),
                   "k: expected device"))
else:
    ERRORS.append((dict(cu_seqlens_q=torch.zeros(3, dtype=torch.int32, device="meta")),
                   "cu_seqlens_q: expected device"))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("change,message", ERRORS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(ERRORS)])
def test_errors(change, message, backend):
    valid = _valid()
    require_backend(op.ATTENTION_BACKENDS, backend, (valid["q"], valid["k"], valid["v"]))
    args = {**valid, **change}
    with pytest.raises(ValueError, match=message):
        sk.varlen_attention(**args, backend=backend)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("lengths", [[4, 4, 4], [3, 6, 1]], ids=["equal", "mixed"])
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_custom_op_opcheck(backend, lengths, engine, monkeypatch):
    """torch.library.opcheck of the backend's custom op (schema, fake outputs' shapes, dtypes and
    strides against the real ones, autograd registration): equal segments take the aten
    engine's one-batch path, whose outputs are aten's own tensors (an lse with transposed
    strides once failed inductor's stride assertion there)."""
    use_engine(monkeypatch, backend, engine)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=g).to(DEVICE, torch.float16).requires_grad_()
               for _ in range(3))
    require_backend(op.ATTENTION_BACKENDS, backend, (q, k, v))
    cu = _cu(*[sum(lengths[:i]) for i in range(len(lengths) + 1)])
    custom = getattr(torch.ops.sora_kernels, f"varlen_attention_{backend}")
    torch.library.opcheck(custom, (q, k, v, cu, cu, max(lengths), max(lengths), 0.25, False, None, None, 10000.0,
                                   [4, 2, 2]))


def test_flash_attn_varlen_positional_call(monkeypatch):
    """flash_attn_varlen_func's calls run unchanged: its arguments in its order, positional
    (dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
    return_attn_probs, block_table), their defaults accepted, and return_attn_probs giving
    (out, lse, None)."""
    valid = _valid()
    args = [valid[k] for k in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    out = sk.varlen_attention(*args, 0.0, softmax_scale=0.3, causal=True, backend="reference")
    assert torch.equal(out, sk.varlen_attention(*args, softmax_scale=0.3, causal=True, backend="reference"))
    assert torch.equal(out, sk.varlen_attention(*args, 0.0, 0.3, True, backend="reference"))
    out3, lse, probs = sk.varlen_attention(*args, 0.0, 0.3, True, (-1, -1), 0.0, None, True, True, None,
                                           backend="reference")
    _, lse2 = sk.varlen_attention(*args, softmax_scale=0.3, causal=True, return_lse=True, backend="reference")
    assert torch.equal(out3, out) and torch.equal(lse, lse2) and probs is None
    monkeypatch.setattr(op, "DQ_MODE", "atomic")
    with pytest.raises(ValueError, match="deterministic: True needs DQ_MODE 'separate'"):
        sk.varlen_attention(*args, deterministic=True, backend="reference")


def test_seqlens_read_once_per_version(monkeypatch):
    """check_seqlens_values copies each cu_seqlens tensor to the host once per version (a DiT
    passes the same ones to every layer), and again after an in-place change, which it then
    catches. Inference tensors have no version: they are read every time."""
    cu_q, cu_k = _cu(0, 2, 6), _cu(0, 2, 6)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or tolist(t))
    for _ in range(3):
        op.check_seqlens_values(cu_q, cu_k, 6, 6, 4, 4)
    assert len(reads) == 2
    with torch.no_grad():
        cu_q[1] = 5  # segments of 5 and 1 tokens: over max_seqlen_q = 4
    with pytest.raises(ValueError, match="max_seqlen_q: expected at least the longest segment, 5, got 4"):
        op.check_seqlens_values(cu_q, cu_k, 6, 6, 4, 4)
    assert len(reads) == 3
    with torch.inference_mode():
        cu = _cu(0, 2, 6)
    for _ in range(2):
        op.check_seqlens_values(cu, cu, 6, 6, 4, 4)
    assert len(reads) == 7


class _CountingReads(op.WeakIdKeyDictionary):
    def __init__(self):
        super().__init__()
        self.stores = 0

    def __setitem__(self, key, value):
        self.stores += 1
        super().__setitem__(key, value)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_seqlens_read_once_through_the_op(backend, monkeypatch):
    """Through the public op (custom ops and autograd included) the same cu_seqlens objects
    reach the check: three forwards and a backward read each tensor once."""
    valid = _valid()
    require_backend(op.ATTENTION_BACKENDS, backend, (valid["q"], valid["k"], valid["v"]))
    cache = _CountingReads()
    monkeypatch.setattr(op, "_SEQLENS_READ", cache)
    q = valid["q"].requires_grad_()
    for _ in range(3):
        out = sk.varlen_attention(**valid, backend=backend)
    out.float().sum().backward()
    assert cache.stores == 2  # cu_seqlens_q and cu_seqlens_k (a clone): once each


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_with_rope(backend):
    """q, k, v as views of one packed qkv projection ([N, 3, H, D] unbound, the layout a model
    makes), with rope: the kernels read the strides of what they are given (the backward too,
    where rope3d's rotated copies are contiguous and the other operand is not)."""
    lengths = [17, 40, 1]
    g = torch.Generator().manual_seed(0)
    N, H, D = sum(lengths), 2, 64
    qkv = torch.randn(N, 3, H, D, generator=g).to(DEVICE, torch.float16).requires_grad_()
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    positions = torch.randint(0, 30, (N, 3), generator=g, dtype=torch.int32).to(DEVICE)
    require_backend(op.ATTENTION_BACKENDS, backend, (q, k, v))
    out = sk.varlen_attention(q, k, v, cu, cu, 40, 40, rope=positions, backend=backend)
    dout = torch.randn(out.shape, generator=g).to(out)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    case = dict(q=q.detach().contiguous().requires_grad_(), k=k.detach().contiguous().requires_grad_(),
                v=v.detach().contiguous().requires_grad_(), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=40,
                max_seqlen_k=40, rope=sk.Rope3D(positions))
    ours = (out, None, *grad.unbind(1))
    exact = oracle(case, False, dout)
    plain = oracle(case, False, dout, upcast_to=None)
    for name, a, e, p in zip(("out", "lse", "dq", "dk", "dv"), ours, exact, plain):
        if a is None:
            continue
        rounding = 2 * (e.to(a.dtype) + 0.3 - 0.3 - e.to(a.dtype)).abs().max().item()
        err, err_plain = (a.double() - e.double()).abs().max().item(), (p.double() - e.double()).abs().max().item()
        assert err <= 2 * err_plain + rounding, f"{name}: {err:.3g} > 2 x {err_plain:.3g} + {rounding:.3g}"


def test_short_key_candidates():
    """Key segments up to SHORT_KEYS long try key blocks of at most 64 first; long ones keep
    the default order (the 128 x 128 forward first)."""
    long = op.launch_candidates("fwd", 128, False)
    short = op.launch_candidates("fwd", 128, True)
    assert long[0].BLOCK_N == 128
    assert all(c.BLOCK_N <= op.SHORT_KEY_BLOCK_N for c in short)
    assert all(c.BLOCK_N <= op.SHORT_KEY_BLOCK_N for c in op.launch_candidates("dkdv", 128, True))


def test_cpu_engine_choice(monkeypatch):
    """The cpu backend runs float32 (and half precision, in float32) on its C++ kernel when it is
    built, whatever the sizes, and float64 on aten's."""
    if not op.KERNEL_BUILT:
        pytest.skip("sora_kernels._C has no CPU attention kernel")
    q = torch.randn(3, 2, 16)
    assert op._use_kernel(q) and not op._use_kernel(q.double())
    calls = []
    monkeypatch.setattr(op, "_aten_forward", lambda *a: calls.append("aten"))
    qkv = [torch.randn(813, 2, 64) for _ in range(3)]
    cu = torch.tensor([0, 512, 513, 813], dtype=torch.int32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # not aten: the kernel (two engines)
        sk.varlen_attention(*(x.to(dtype) for x in qkv), cu, cu, 512, 512, backend="cpu")
    assert calls == []
    with pytest.raises(TypeError):  # the patched aten engine returns None: float64 reached it
        sk.varlen_attention(*(x.double() for x in qkv), cu, cu, 512, 512, backend="cpu")
    assert calls == ["aten"]


@pytest.mark.parametrize("head_dim", [3, 20])
def test_cpu_small_head_dims(head_dim, monkeypatch):
    """The C++ engine at head dims below one vector tile and past a multiple of 8 (it packs keys
    in 8 x 8 blocks, then the remaining dims one by one), segments across a key tile (16 keys).
    (aten's engine, the fallback without the compiled kernel, misses the 2x rule here: dq 3.5x
    PyTorch's float32 error at D = 3, causal.)"""
    if DEVICE.type != "cpu":
        pytest.skip("the cpu backend's C++ engine")
    use_engine(monkeypatch, "cpu", "kernel")
    for causal in (False, True):
        case = make_case([49, 17, 1, 130], [131, 16, 15, 129], heads=3, head_dim=head_dim, dtype=torch.float32)
        ours, dout = run(case, causal, "cpu")
        assert_within_2x(ours, case, causal, dout, f"cpu D={head_dim} causal={causal}")


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_kernel_batch_invariant(causal):
    """On the cpu backend (float32: the C++ kernel) a segment's out, lse and gradients are the
    same bits whether it runs alone or packed with others of any sizes: each (segment, head) is
    computed by the same blocks in the same order, whichever thread takes them, and the engine
    no longer depends on the batch (it did when aten took batches of few, large shapes)."""
    if not op.KERNEL_BUILT:
        pytest.skip("sora_kernels._C has no CPU attention kernel")
    lens_q, lens_k = [97, 1, 300, 17, 1025], [90, 3, 300, 17, 700]
    case = make_case(lens_q, lens_k, heads=4, kv_heads=2, head_dim=72, dtype=torch.float32, seed=3)
    q, k, v, cu_q, cu_k = (case[n].detach().cpu() for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = sk.varlen_attention(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_lse=True,
                                   backend="cpu")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in (0, 2, 4):
        sq, sk_ = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        alone = [x[s].clone().requires_grad_() for x, s in zip((q, k, v), (sq, sk_, sk_))]
        one_q, one_k = (torch.tensor([0, n], dtype=torch.int32) for n in (lens_q[b], lens_k[b]))
        out_b, lse_b = sk.varlen_attention(*alone, one_q, one_k, lens_q[b], lens_k[b], causal=causal,
                                           return_lse=True, backend="cpu")
        grads_b = torch.autograd.grad(out_b, alone, dout[sq])
        assert torch.equal(out_b, out[sq]) and torch.equal(lse_b, lse[:, sq]), f"segment {b}"
        for name, g_b, g, s in zip("qkv", grads_b, grads, (sq, sk_, sk_)):
            assert torch.equal(g_b, g[s]), f"segment {b}: d{name}"


def _kernel_args(**change):
    q, k = torch.randn(7, 4, 16), torch.randn(5, 2, 16)
    args = dict(q=q, k=k, v=torch.randn_like(k), cu_seqlens_q=_cu(0, 3, 7).cpu(), cu_seqlens_k=_cu(0, 4, 5).cpu(),
                scale=0.25, causal=False)
    return {**args, **change}


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.randn(7, 4, 16, dtype=torch.float64)), "q: the cpu kernels run float32"),
    (dict(k=torch.randn(5, 3, 16), v=torch.randn(5, 3, 16)), "k: expected kv heads dividing the 4 query heads"),
    (dict(v=torch.randn(5, 2, 8)), "v: expected the shape of k"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 3], dtype=torch.int32)), "cu_seqlens_k: expected non-decreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 6], dtype=torch.int32)), "cu_seqlens_k: expected its last entry"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)), "cu_seqlens_q: expected to start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32)), r"cu_seqlens_k: expected 3 entries"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 7])), "cu_seqlens_q: expected an int32 CPU vector"),
    (dict(q=torch.randn(7, 4, 0), k=torch.randn(5, 2, 0), v=torch.randn(5, 2, 0)),
     "q: expected a head dim of at least 1"),
])
def test_cpu_kernel_checks(change, message):
    """The C++ ops check what they index with (the public function checks first, with its own
    messages; these guard direct callers of torch.ops.sora_kernels.varlen_attention_*)."""
    if not op.KERNEL_BUILT:
        pytest.skip("sora_kernels._C has no CPU attention kernel")
    args = _kernel_args(**change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sora_kernels.varlen_attention_forward(*args.values())
    q, k, v, cq, ck, scale, causal = args.values()
    dout = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.zeros(q.shape[1], q.shape[0])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sora_kernels.varlen_attention_backward(dout, q, k, v, dout, lse, cq, ck, scale, causal)


def test_cpu_kernel_backward_checks():
    if not op.KERNEL_BUILT:
        pytest.skip("sora_kernels._C has no CPU attention kernel")
    q, k, v, cq, ck, scale, causal = _kernel_args().values()
    out, lse = torch.ops.sora_kernels.varlen_attention_forward(q, k, v, cq, ck, scale, causal)
    with pytest.raises(RuntimeError, match=r"lse: expected \[4, 7\]"):
        torch.ops.sora_kernels.varlen_attention_backward(out, q, k, v, out, lse.t(), cq, ck, scale, causal)
    with pytest.raises(RuntimeError, match="dout: expected the shape of q"):
        torch.ops.sora_kernels.varlen_attention_backward(out[:3], q, k, v, out, lse, cq, ck, scale, causal)
