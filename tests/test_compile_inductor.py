"""Every public op under torch.compile(fullgraph=True) with the default backend, inductor (the
other tests compile with aot_eager: the graph capture without codegen): inductor checks the
fakes' strides against the real outputs and generates the code around the ops. Forward and
backward, equal to eager bit for bit (the graphs hold the ops alone, so no glue is re-fused;
on a GPU, and for the final layer's F.linear, the gradients to fp32 rounding: below)."""
import pytest
import torch

from conftest import DEVICE, assert_compiles_backward_exactly, public_op_cases

NAMES = list(public_op_cases())


@pytest.mark.parametrize("native", [False, True], ids=["default", "native"])
@pytest.mark.parametrize("name", NAMES)
def test_inductor_fullgraph_forward_backward(name, native, request):
    """default: the backends the tests select (on CPU the Triton interpreter first); native:
    those a CPU user gets (the C++ kernels, else the reference)."""
    if native:
        if DEVICE.type != "cpu":
            pytest.skip("the native case is the CPU user's backends; on a GPU it repeats the default one")
        request.getfixturevalue("native_kernels")
    f, leaves = public_op_cases()[name]
    # on a GPU the adaLN backward adds segment sums with float atomics, in an order that varies
    # from run to run: gradients there are compared to fp32 rounding, not bits; so are the final
    # layer's everywhere: its projection is F.linear, whose bias gradient (a sum over tokens)
    # inductor generates in its own order
    grad_tol = None if DEVICE.type == "cpu" and name != "final_layer_unpatchify" else dict(rtol=1e-5, atol=1e-6)
    assert_compiles_backward_exactly(f, *leaves, backend="inductor", grad_tol=grad_tol)
