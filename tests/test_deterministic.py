"""torch.use_deterministic_algorithms(True), as PyTorch's own ops honour it. The Triton
backwards of the adaLN family (adaln_norm, gated_residual_adaln, gated_residual, rms_norm's
weight, the final layer) add gradients with float atomics, whose order varies from run to run
on a GPU: in that mode a call that will differentiate those tensors goes to the next backend
(forced, the Triton backend is refused with the reason); with warn_only=True it runs after a
warning; inference and calls that differentiate only the token tensors (dx has no atomic
sums) are untouched. varlen_attention's "atomic" dq mode computes dq "separate" instead. And the mode's
NaN-filled torch.empty shows that no op reads memory it has not written."""
import pytest
import torch

import conftest
import sora_kernels as sk
from conftest import DEVICE, public_op_cases, require_backend
from sora_kernels.ops import adaln_norm as adaln_op
from sora_kernels.ops import varlen_attention as attention_op

ATOMIC_BACKWARDS = ["adaln_norm", "gated_residual_adaln", "gated_residual", "rms_norm", "final_layer_unpatchify"]
NEXT_BACKEND = "cpu" if DEVICE.type == "cpu" else "reference"     # after triton, for these fp32 cases


@pytest.fixture
def deterministic(monkeypatch):
    """Sets torch.use_deterministic_algorithms(True, warn_only=...) and restores the setting
    (with the cuBLAS workspace PyTorch asks for in that mode: the final layer's F.linear)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield lambda warn_only=False: torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _grads(f, leaves) -> list[torch.Tensor]:
    out = f(*leaves)
    out = out if isinstance(out, list) else [out]
    return torch.autograd.grad(sum((o.float() * o.float()).sum() for o in out), leaves)


@pytest.mark.parametrize("name", ATOMIC_BACKWARDS)
def test_triton_backend_refused_for_a_backward(name, deterministic, monkeypatch):
    f, leaves = public_op_cases()[name]
    require_backend(adaln_op.ADALN_BACKENDS, "triton", (leaves[0].detach(),))
    monkeypatch.setenv("SORA_KERNELS_BACKEND", "triton")
    deterministic()
    with pytest.raises(sk.NoBackendError, match=r"triton: .*float atomics.*torch.use_deterministic_algorithms\(True\)"):
        f(*leaves)
    with torch.no_grad():          # inference: the forward has no atomics
        f(*leaves)
    f(*(x.detach() for x in leaves))


@pytest.mark.parametrize("name", ATOMIC_BACKWARDS)
def test_next_backend_runs_it(name, deterministic):
    """Unforced, the call runs on the next backend: the gradients are that backend's, forced."""
    f, leaves = public_op_cases()[name]
    for backend in ("triton", NEXT_BACKEND):
        require_backend(adaln_op.ADALN_BACKENDS, backend, (leaves[0].detach(),))
    deterministic()
    got = _grads(f, leaves)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SORA_KERNELS_BACKEND", NEXT_BACKEND)
        expected = _grads(f, leaves)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("warn_only", [False, True])
def test_under_compile(warn_only, deterministic):
    """Under torch.compile(fullgraph=True) the mode is read while tracing (torch.compile guards
    on it); warn_only cannot be read there, so the next backend runs either way."""
    f, leaves = public_op_cases()["adaln_norm"]
    for backend in ("triton", NEXT_BACKEND):
        require_backend(adaln_op.ADALN_BACKENDS, backend, (leaves[0].detach(),))
    deterministic(warn_only=warn_only)
    torch._dynamo.reset()
    got = _grads(torch.compile(f, fullgraph=True, backend="aot_eager"), leaves)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SORA_KERNELS_BACKEND", NEXT_BACKEND)
        expected = _grads(f, leaves)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_token_gradients_alone_stay_on_triton(deterministic, monkeypatch):
    """Only the per-segment and weight gradients are summed with atomics: with those tensors
    frozen the Triton backend runs the backward."""
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(10, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    gate, shift, scale = (torch.randn(2, 16, generator=g).to(DEVICE) for _ in range(3))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=DEVICE)
    require_backend(adaln_op.ADALN_BACKENDS, "triton", (x.detach(),))
    monkeypatch.setenv("SORA_KERNELS_BACKEND", "triton")
    deterministic()
    h, z = sk.gated_residual_adaln(x, y, gate, shift, scale, cu)
    torch.autograd.grad((h.sum() + z.sum(), sk.rms_norm(x.view(10, 2, 8), torch.ones(8, device=DEVICE)).sum()),
                        (x, y))
    with pytest.raises(sk.NoBackendError, match="float atomics"):
        sk.rms_norm(x.view(10, 2, 8), torch.ones(8, device=DEVICE, requires_grad=True))


def test_warn_only_runs_the_triton_backend(deterministic, monkeypatch):
    """warn_only=True: the Triton backend runs after a warning that points at the caller's
    line; none when the Triton backend could not run anyway (float64 here)."""
    f, leaves = public_op_cases()["adaln_norm"]
    require_backend(adaln_op.ADALN_BACKENDS, "triton", (leaves[0].detach(),))
    deterministic(warn_only=True)
    with monkeypatch.context() as m:
        m.setenv("SORA_KERNELS_BACKEND", "triton")
        with pytest.warns(UserWarning, match="triton backend runs although its backward adds .* float atomics") as w:
            _grads(f, leaves)
    # the line that called sk.adaln_norm (in public_op_cases), not one inside sora_kernels
    ours = [r for r in w if "triton backend runs although" in str(r.message)]
    assert {r.filename for r in ours} == {conftest.__file__}, [(r.filename, r.lineno) for r in ours]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _grads(f, [x.detach().double().requires_grad_() for x in leaves])


def test_attention_atomic_dq_mode_computes_dq_separately(deterministic, monkeypatch):
    """DQ_MODE "atomic" adds dq with atomics in the dk/dv kernel; in the deterministic mode the
    backward launches the dq kernel instead, and gives DQ_MODE "separate"'s bits."""
    f, leaves = public_op_cases()["varlen_attention"]
    leaves = [x.detach().half().requires_grad_() for x in leaves]    # the Triton kernels' dtypes
    require_backend(attention_op.ATTENTION_BACKENDS, "triton", tuple(x.detach() for x in leaves))
    monkeypatch.setenv("SORA_KERNELS_BACKEND", "triton")
    launched, launch = [], attention_op._launch
    monkeypatch.setattr(attention_op, "_launch", lambda kind, *args, **kw: launched.append(kind) or launch(kind, *args,
                                                                                                       **kw))
    monkeypatch.setattr(attention_op, "DQ_MODE", "separate")
    expected = _grads(f, leaves)
    monkeypatch.setattr(attention_op, "DQ_MODE", "atomic")
    launched.clear()
    _grads(f, leaves)
    assert "dkdv_dq" in launched and "dq" not in launched
    deterministic()
    launched.clear()
    got = _grads(f, leaves)
    assert "dkdv_dq" not in launched and "dq" in launched, launched
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("native", [False, True], ids=["default", "native"])
@pytest.mark.parametrize("name", list(public_op_cases()))
def test_no_op_reads_memory_it_did_not_write(name, native, deterministic, request):
    """In the deterministic mode torch.empty fills new tensors with NaN (torch.utils.
    deterministic.fill_uninitialized_memory): every public op, forward and backward, on the
    tests' backends and a CPU user's (warn_only, so the Triton backwards run too) gives the
    results it gives without it, so none reads an output or workspace before writing it."""
    if native:
        if DEVICE.type != "cpu":
            pytest.skip("the native case is the CPU user's backends; on a GPU it repeats the default one")
        request.getfixturevalue("native_kernels")
    f, leaves = public_op_cases()[name]

    def results():
        out = f(*leaves)
        outs = out if isinstance(out, list) else [out]
        diff = [o for o in outs if o.requires_grad]
        grads = torch.autograd.grad(sum((o.float() ** 2).sum() for o in diff), leaves) if diff else ()
        return [o.detach() for o in outs] + list(grads)
    expected = results()
    deterministic(warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the atomic backwards' warn_only warning
        got = results()
    for a, b in zip(got, expected, strict=True):
        if DEVICE.type == "cpu":
            assert torch.equal(a, b), name
        else:   # the float atomics' order varies from run to run: fp32 rounding, but no NaN
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
