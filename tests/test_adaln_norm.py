"""adaln_norm and gated_residual_adaln against the reference: the 2x rule in fp16 / bf16 (the
error against a float64 reference at most twice that of the reference computed in the same
dtype, plus two units of rounding at 1), a tight tolerance in fp32, gradcheck in fp64."""
import os
import re
import subprocess
import sys

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


def test_segment_ids_of_packed_built_under_compile():
    """A Packed record made and read inside a compiled function: its segment_ids must trace
    (functools.cached_property took an RLock that Dynamo refuses), and the function's eager
    run must not have filled the cache for it (the record is new on each call)."""
    g = torch.Generator().manual_seed(0)
    videos = [torch.randn(4, *s, generator=g).to(DEVICE) for s in [(1, 4, 4), (2, 2, 6)]]
    args, _ = make([4, 6], 16, torch.float32)
    args = {k: v.detach() for k, v in args.items() if k in ("x", "shift", "scale")}

    def f(v0, v1, x, shift, scale):
        packed = sk.pack_patchify([v0, v1], (1, 2, 2))
        ids = packed.segment_ids
        return sk.adaln_norm(x, shift, scale, packed.cu_seqlens, segment_ids=ids), ids, ids is packed.segment_ids
    torch._dynamo.reset()
    y, ids, once = torch.compile(f, fullgraph=True, backend="aot_eager")(*videos, **args)
    assert once  # computed once per record
    assert ids.tolist() == [0] * 4 + [1] * 6
    torch.testing.assert_close(y, f(*videos, **args)[0], rtol=0, atol=0)


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


def test_tensors_on_another_device():
    """A meta tensor stands for another device on any machine."""
    args, cu = make(LENGTHS, 16, torch.float32)
    x, shift, scale = (args[k].detach() for k in ("x", "shift", "scale"))
    with pytest.raises(ValueError, match=f"shift: expected device {DEVICE.type}.* like x, got meta"):
        sk.adaln_norm(x, shift.to("meta"), scale, cu)
    with pytest.raises(ValueError, match=f"gate: expected device {DEVICE.type}.* like x, got meta"):
        sk.gated_residual_adaln(x, x, torch.zeros_like(shift, device="meta"), shift, scale, cu)


HOST_ERRORS = [e for e in ERRORS if any(m in e[1] for m in HOST_CHECKED)]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("change,message", HOST_ERRORS, ids=[str(i) for i in range(len(HOST_ERRORS))])
def test_errors_under_compile(change, message, backend):
    """The value checks of CPU tensors hold under torch.compile too, where tracing cannot read
    the values: asserts in the graph raise RuntimeError with the message, without the values
    or the counts, which would fix a dynamic size (before them a wrong last offset failed
    inside repeat_interleave, or not at all with inductor, and ids out of range crashed the
    cpu backend)."""
    if DEVICE.type == "cuda":
        pytest.skip("values are checked on CPU tensors only (no device sync)")
    args, cu = make(LENGTHS, 16, torch.float32)
    args = {k: v.detach() for k, v in args.items() if k in ("x", "shift", "scale")}
    args["cu_seqlens"] = cu
    args.update(change)
    require_backend(op.ADALN_BACKENDS, backend, (args["x"],))
    segment_ids = args.pop("segment_ids", None)

    def f(x, shift, scale, cu_seqlens):
        return sk.adaln_norm(x, shift, scale, cu_seqlens, segment_ids=segment_ids, backend=backend)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=re.split(r",? got | \d", message)[0]):
        torch.compile(f, fullgraph=True, backend="aot_eager")(**args)


def test_cpu_ops_check_segment_ids():
    """The C++ ops refuse segment ids outside [0, n) (one scan of the ids, naming the first bad
    one) instead of reading and writing outside the per-segment rows; called directly and
    under torch.compile (the audit's repro, which segfaulted); no tokens and no segments is
    valid (the scan once read the null pointer of the empty ids). In a subprocess: without the
    check it crashes."""
    if not op.B.compiled_has("adaln", "CPU"):
        pytest.skip("the C++ CPU kernels are not built")
    code = """if True:
        import torch, sora_kernels as sk
        ops = torch.ops.sora_kernels
        x, rows = torch.randn(10, 16), torch.randn(2, 16)
        mean, rstd = torch.zeros(10), torch.ones(10)
        for bad in (1000000, 2, -1):
            seg = torch.tensor([0, 0, 1, bad, 1, 1, bad, 1, 1, 1], dtype=torch.int32)
            calls = [lambda: ops.adaln(x, None, None, rows, rows, None, seg, 1e-6, True),
                     lambda: ops.adaln(x, x, rows, rows, rows, None, seg, 1e-6, True),
                     lambda: ops.adaln_backward(x, x, x, x, rows, rows, rows, None, seg, mean, rstd, True),
                     lambda: ops.gated_residual(x, x, rows, seg),
                     lambda: ops.gated_residual_backward(x, x, rows, seg)]
            for call in calls:
                try:
                    call()
                    print("no error")
                except RuntimeError as e:
                    print(str(e).splitlines()[0])
        seg = torch.full((10,), 1000000, dtype=torch.int32)
        for f in (lambda x, rows, seg: ops.gated_residual(x, x, rows, seg),
                  lambda x, rows, seg: ops.adaln(x, None, None, rows, rows, None, seg, 1e-6, True)):
            try:
                torch.compile(f, fullgraph=True)(x, rows, seg)
                print("no error")
            except RuntimeError as e:
                print("compiled:", str(e).splitlines()[-1])
        x0, rows0, seg0 = torch.randn(0, 16), torch.randn(0, 16), torch.zeros(0, dtype=torch.int32)
        out = [ops.gated_residual(x0, x0, rows0, seg0),
               ops.adaln(x0, None, None, rows0, rows0, None, seg0, 1e-6, True)[1],
               ops.adaln(x0, x0, rows0, rows0, rows0, None, seg0, 1e-6, True)[1]]
        print("empty:", [tuple(o.shape) for o in out])
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    expected = [f"segment_ids: expected ids in [0, 2) (rows of the per-segment [2, D] tensors), got {bad} at token 3"
                for bad in (1000000, 2, -1) for _ in range(5)]
    assert lines[:15] == expected
    for line in lines[15:17]:     # the C++ check's words: no Python check runs before a direct op call
        assert line.startswith("compiled: ") and "expected ids in [0, 2) (rows of the per-segment" in line, line
    assert lines[17] == "empty: [(0, 16), (0, 16), (0, 16)]", lines[17:]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_empty_batch(backend):
    """N = 0 tokens (cu_seqlens [0, 0]): empty outputs, zero per-segment gradients. The C++
    glue once took an empty tensor's null data pointer for missing segment ids."""
    args, cu = make([0], 16, torch.float32, residual=True)
    require_backend(op.ADALN_BACKENDS, backend, (args["x"],))
    out = sk.adaln_norm(args["x"], args["shift"], args["scale"], cu, weight=args["weight"], backend=backend)
    h, normed = sk.gated_residual_adaln(**args, cu_seqlens=cu, backend=backend)
    assert out.shape == h.shape == normed.shape == (0, 16)
    leaves = _leaves(args)
    grads = torch.autograd.grad(out.sum() + h.sum() + normed.sum(), leaves)
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape and not grad.any()


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
