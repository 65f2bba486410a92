"""adaln_norm and gated_residual_adaln against the reference: the 2x rule in fp16 / bf16 (the
error against a float64 reference at most twice that of the reference computed in the same
dtype, plus two units of rounding at 1), a tight tolerance in fp32, gradcheck in fp64."""
import pytest
import torch

import sora_kernels as sk
from conftest import DEVICE, assert_compiles_exactly, require_backend
from sora_kernels.ops import adaln_norm as op
from sora_kernels.reference import dit_ops as ref

BACKENDS = ["triton", "cpu"]
LENGTHS = [1, 7, 1, 40, 1]  # 1-token segments (images) next to longer ones


def make(lengths, D, dtype, seed=0, weight=True, residual=False):
    g = torch.Generator().manual_seed(seed)
    n, N = len(lengths), sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)

    def rnd(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g)).to(DEVICE, dtype).requires_grad_()
    args = dict(x=rnd(N, D), shift=rnd(n, D, s=0.5), scale=rnd(n, D, s=0.5), weight=rnd(D) if weight else None)
    if residual:
        args.update(y=rnd(N, D), gate=rnd(n, D, s=0.5))
    return args, cu


def _leaves(args):
    return [v for v in args.values() if isinstance(v, torch.Tensor)]


def _run(fn, args, cu, grads_out, **kw):
    out = fn(**args, cu_seqlens=cu, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * g).sum() for o, g in zip(outs, grads_out))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, _leaves(args)))


def _compare(fn, args, cu, dtype, what, backend, **kw):
    """Ours vs the reference in float64 (oracle) and in dtype (plain PyTorch)."""
    outs = fn(**args, cu_seqlens=cu, backend="reference", **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads_out = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE) for o in outs]
    ours = _run(fn, args, cu, grads_out, backend=backend, **kw)
    plain = _run(fn, args, cu, grads_out, backend="reference", **kw)
    wide = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    exact = _run(fn, wide, cu, [g.double() for g in grads_out], backend="reference", **kw)
    for i, (a, p, e) in enumerate(zip(ours, plain, exact)):
        err = (a.double() - e).abs().max().item()
        if dtype == torch.float32:
            bound = 1e-5 * max(1.0, e.abs().max().item())  # tight: fp32 math on both sides
        else:
            rounding = 2 * (e.to(dtype) + 1 - 1 - e.to(dtype)).abs().max().item()
            bound = 2 * (p.double() - e).abs().max().item() + rounding
        assert err <= bound, f"{what} output/grad {i}: error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("D", [72, 1152, 3080])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adaln_norm(backend, dtype, D, norm, weight):
    args, cu = make(LENGTHS, D, dtype, weight=weight)
    require_backend(op.ADALN_BACKENDS, backend, (args["x"],))  # cpu: float32 only
    _compare(sk.adaln_norm, args, cu, dtype, f"adaln_norm {norm}", backend, norm=norm)


@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("D", [72, 3080])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_residual_adaln(backend, dtype, D, norm, weight):
    args, cu = make(LENGTHS, D, dtype, weight=weight, residual=True)
    require_backend(op.FUSED_BACKENDS, backend, (args["x"],))
    _compare(sk.gated_residual_adaln, args, cu, dtype, f"gated_residual_adaln {norm}", backend, norm=norm)


@pytest.mark.parametrize("wide", [False, True], ids=["runs", "wide_rows"])
@pytest.mark.parametrize("residual", [False, True])
def test_backward_runs_of_tiles(residual, wide, monkeypatch):
    """The Triton backward's programs sum a segment's gradients over a run of tiles: segments
    that begin on a tile boundary (one uniform tile after another of a different segment),
    tiles that mix segments (rows 16-19: segments 3, 5 and 6 around the empty segment 4),
    runs that cross programs. D = 1152 with 8192-element backward tiles gives 4-row tiles;
    3 programs give runs of 3 tiles over these 32 tokens, on any device. With WIDE_CHUNK at
    512 the rows take the wide-row path instead (what rows over 4096 elements take): a row per
    program in chunks of 512, 512 and 128 columns."""
    require_backend(op.ADALN_BACKENDS, "triton", (torch.empty(0, device=DEVICE),))
    monkeypatch.setattr(op, "BACKWARD_PROGRAMS_LIMIT", 3)
    monkeypatch.setattr(op, "TILE_ELEMENTS_BACKWARD", 8192)
    if wide:
        monkeypatch.setattr(op, "WIDE_CHUNK", 512)
    cfg = op.tile_config(1152, backward=True)
    assert cfg == ({"ROWS": 1, "BLOCK_D": 512, "WIDE": True} if wide else {"ROWS": 4, "BLOCK_D": 2048, "WIDE": False})
    args, cu = make([4, 8, 4, 1, 0, 1, 2, 12], 1152, torch.float32, residual=residual)
    fn = sk.gated_residual_adaln if residual else sk.adaln_norm
    _compare(fn, args, cu, torch.float32, "runs of tiles", "triton")


def test_fused_equals_unfused():
    """gated_residual_adaln == gated_residual then adaln_norm, bit for bit in the residual."""
    args, cu = make(LENGTHS, 72, torch.bfloat16, residual=True)
    h, out = sk.gated_residual_adaln(**args, cu_seqlens=cu)
    h2 = sk.gated_residual(args["x"], args["y"], args["gate"], cu)
    assert torch.equal(h, h2)
    out2 = sk.adaln_norm(h2, args["shift"], args["scale"], cu, weight=args["weight"])
    torch.testing.assert_close(out, out2, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_gradcheck_reference(norm):
    args, cu = make([1, 3, 2], 8, torch.float64, residual=True)
    seg = ref.segment_ids(cu, 6)
    fn = lambda x, y, gate, shift, scale, weight: ref.gated_residual_adaln(  # noqa: E731
        x, y, gate, shift, scale, seg, 1e-6, norm, weight)
    assert torch.autograd.gradcheck(fn, tuple(args[k] for k in ("x", "y", "gate", "shift", "scale", "weight")))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_norm_gradcheck_reference(norm):
    """fp64 runs on the reference backend only (the kernels' reasons: fp16, bf16, fp32)."""
    args, cu = make([1, 3, 2], 8, torch.float64)
    fn = lambda x, shift, scale, weight: sk.adaln_norm(  # noqa: E731
        x, shift, scale, cu, norm=norm, weight=weight, backend="reference")
    assert torch.autograd.gradcheck(fn, tuple(args[k] for k in ("x", "shift", "scale", "weight")))


def test_segment_ids_cached_on_packed():
    videos = [torch.randn(4, 1, 4, 4, device=DEVICE), torch.randn(4, 2, 2, 2, device=DEVICE)]
    packed = sk.pack_patchify(videos, (1, 2, 2))
    ids = packed.segment_ids
    assert ids is packed.segment_ids  # computed once
    assert ids.tolist() == [0, 0, 0, 0, 1, 1]
    args, _ = make([4, 2], 16, torch.float32)
    y = sk.adaln_norm(args["x"], args["shift"], args["scale"], packed.cu_seqlens, segment_ids=ids)
    torch.testing.assert_close(y, sk.adaln_norm(args["x"], args["shift"], args["scale"], packed.cu_seqlens))


def test_torch_compile_fullgraph():
    args, cu = make(LENGTHS, 72, torch.float32, residual=True)
    assert_compiles_exactly(lambda a: sk.gated_residual_adaln(**a, cu_seqlens=cu), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaln_norm_torch_compile_fullgraph(backend):
    args, cu = make(LENGTHS, 72, torch.float32)
    require_backend(op.ADALN_BACKENDS, backend, (args["x"],))
    assert_compiles_exactly(lambda a: sk.adaln_norm(**a, cu_seqlens=cu, backend=backend), args)


ERRORS = [
    (dict(shift=torch.zeros(4, 16)), r"shift: expected shape \(5, 16\), got \(4, 16\)"),
    (dict(scale=torch.zeros(5, 8)), r"scale: expected shape \(5, 16\)"),
    (dict(weight=torch.zeros(8)), r"weight: expected shape \(16,\)"),
    (dict(shift=torch.zeros(5, 16, dtype=torch.float64)), "shift: expected dtype torch.float32 like x"),
    (dict(cu_seqlens=torch.tensor([0, 1, 8, 9, 49, 51], dtype=torch.int32)),
     "cu_seqlens: expected the last entry to equal the token count 50, got 51"),
    (dict(cu_seqlens=torch.tensor([0, 1, 8, 9, 49, 50])), "cu_seqlens: expected dtype torch.int32"),
    (dict(norm="batch"), "norm: expected one of"),
    (dict(eps=-1.0), "eps: expected a finite number >= 0"),
    (dict(x=torch.zeros(50)), r"x: expected a 2-dim tensor \[N, D\]"),
    (dict(segment_ids=torch.zeros(49, dtype=torch.int32)), r"segment_ids: expected int32 \[50\]"),
    # values: checked on CPU tensors only (no device sync)
    (dict(cu_seqlens=torch.tensor([1, 1, 8, 9, 49, 50], dtype=torch.int32)),
     r"cu_seqlens: expected cu_seqlens\[0\] == 0, got 1"),
    (dict(cu_seqlens=torch.tensor([0, 8, 1, 9, 49, 50], dtype=torch.int32)),
     "cu_seqlens: expected non-decreasing offsets, got 8 then 1 at index 1"),
    (dict(segment_ids=torch.full((50,), 5, dtype=torch.int32)),
     r"segment_ids: expected ids in \[0, 5\) \(cu_seqlens has 5 segments\), got ids from 5 to 5"),
    (dict(segment_ids=torch.arange(-1, 49, dtype=torch.int32) // 10),
     r"segment_ids: expected ids in \[0, 5\) .* got ids from -1 to 4"),
]
HOST_CHECKED = ("last entry", "cu_seqlens\\[0\\]", "non-decreasing", "ids in")


@pytest.mark.parametrize("change,message", ERRORS)
def test_errors(change, message):
    args, cu = make(LENGTHS, 16, torch.float32)
    args = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    args["cu_seqlens"] = cu
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) and k != "cu_seqlens" else v
                 for k, v in change.items()})
    if "cu_seqlens" in change:
        args["cu_seqlens"] = change["cu_seqlens"].to(DEVICE)
    if DEVICE.type == "cuda" and any(m in message for m in HOST_CHECKED):
        pytest.skip("values are checked on CPU tensors only (no device sync)")
    x, shift, scale, cu_seqlens = (args.pop(k) for k in ("x", "shift", "scale", "cu_seqlens"))
    with pytest.raises(ValueError, match=message):
        sk.adaln_norm(x, shift, scale, cu_seqlens, **args)


def test_permuted_inputs():
    """A transposed (dense but permuted) x gets gradients in x's own shape and values."""
    args, cu = make(LENGTHS, 72, torch.float32, residual=True)
    xt = args["x"].detach().t().contiguous().t().requires_grad_()  # same values, column-major
    assert not xt.is_contiguous()
    args_t = dict(args, x=xt)
    dout = torch.randn(xt.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    for fn in (lambda a: sk.adaln_norm(a["x"], a["shift"], a["scale"], cu, weight=a["weight"]),
               lambda a: sk.gated_residual_adaln(**a, cu_seqlens=cu)[1]):
        (g,) = torch.autograd.grad(fn(args_t), xt, dout)
        (g_ref,) = torch.autograd.grad(fn(args), args["x"], dout)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
