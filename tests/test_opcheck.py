"""torch.library.opcheck on every sora_kernels custom op that the public ops call, forward and
backward, on the backends the tests select, a CPU user's (the C++ kernels) and the reference:
the schema (no undeclared aliasing or mutation), the fake implementation against the real
outputs, the autograd registration, and the op under AOTAutograd with dynamic shapes. The
calls are recorded while public_op_cases (and a few other paths) run, so each op is checked
with the arguments the library really passes it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import sora_kernels as sk
from conftest import DEVICE, public_op_cases


class RecordOps(TorchDispatchMode):
    """Keeps the first call of each sora_kernels op: the op and copies of its arguments."""

    def __init__(self, calls: dict):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("sora_kernels::") and name not in self.calls:
            # a backward op is not differentiable itself: its arguments are checked without grad
            keep_grad = not name.endswith("_backward")

            def copy(a):
                if not isinstance(a, torch.Tensor):
                    return a
                return a.detach().clone().requires_grad_(a.requires_grad and keep_grad)
            self.calls[name] = (func, tree_map(copy, args), tree_map(copy, kwargs))
        return func(*args, **kwargs)


def _run_everything():
    """Every public op forward and backward, group_norm_silu from given statistics and
    attention in fp16 (the Triton kernels' dtype)."""
    cases = public_op_cases()
    x = torch.randn(1, 8, 2, 4, 4, device=DEVICE, requires_grad=True)
    stats = sk.group_norm_moments(x.detach(), 2)
    rstd = torch.rsqrt(stats[1] / 16 + 1e-6).float()
    cases["group_norm_given"] = (lambda x: sk.group_norm_silu(x, 2, statistics=(stats[0].float(), rstd)), [x])
    f, leaves = cases["varlen_attention_rope"]
    cases["varlen_attention_fp16"] = (f, [t.detach().half().requires_grad_() for t in leaves])
    for f, leaves in cases.values():
        out = f(*leaves)
        outs = [o for o in (out if isinstance(out, list) else [out]) if o.requires_grad]
        if outs:
            torch.autograd.grad(sum((o.float() ** 2).sum() for o in outs), leaves, allow_unused=True)


def test_every_custom_op_passes_opcheck(monkeypatch):
    calls: dict = {}
    for backends in ("tests", "native", "reference"):
        with monkeypatch.context() as m:
            if backends == "native" and DEVICE.type == "cpu":
                m.setenv("TRITON_INTERPRET", "0")
            if backends == "reference":
                m.setenv("SORA_KERNELS_BACKEND", "reference")
            with RecordOps(calls):
                _run_everything()
    # the C++ ops and the Triton ones (on CPU under the interpreter), forward and backward
    assert len(calls) >= 40, sorted(calls)
    assert any(n.endswith("_triton") for n in calls) and any(n.endswith("_reference") for n in calls), sorted(calls)
    failures = []
    for name, (op, args, kwargs) in sorted(calls.items()):
        try:
            torch.library.opcheck(op, args, kwargs)
        except Exception as e:    # report every op, not the first
            failures.append(f"{name}: {str(e).splitlines()[0]}")
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ CPU op")
def test_group_norm_backward_outputs_do_not_alias():
    """The C++ backward's weight and bias gradients were two rows of one tensor: outputs that
    alias each other, which its schema does not declare."""
    x = torch.randn(1, 4, 1, 2, 2)
    y, mean, rstd = torch.ops.sora_kernels.group_norm(x, torch.ones(4), torch.zeros(4), 2, 1e-6, True)
    _, dweight, dbias = torch.ops.sora_kernels.group_norm_backward(torch.ones_like(y), x, torch.ones(4),
                                                                   torch.zeros(4), mean, rstd, 2, True)
    assert dweight.untyped_storage().data_ptr() != dbias.untyped_storage().data_ptr()
