"""Every public op under torch.compile(fullgraph=True) with the default backend, inductor (the
other tests compile with aot_eager: the graph capture without codegen): inductor checks the
fakes' strides against the real outputs and generates the code around the ops. Forward and
backward, equal to eager bit for bit (the graphs hold the ops alone, so no glue is re-fused;
on a GPU the gradients to fp32 rounding: below)."""
import pytest
import torch

import sora_kernels as sk
from conftest import DEVICE, assert_compiles_backward_exactly

CU = [0, 3, 10]        # two segments of 3 and 7 tokens


def _cases():
    """name -> (f, leaves, frozen): f(*leaves) returns a tensor or a list of them."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()
    cu = torch.tensor(CU, dtype=torch.int32, device=DEVICE)
    pos = torch.randint(0, 4, (10, 3), generator=g, dtype=torch.int32).to(DEVICE)
    patch = (1, 2, 2)

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
        "latent_denorm": (lambda z: list(sk.latent_denorm(z, 0.5, 0.1)), [leaf(1, 4, 2, 3, 5)]),
        # not differentiable: forward only
        "frames_to_uint8": (lambda v: sk.frames_to_uint8(v.detach()), [leaf(3, 2, 4, 4)]),
        "group_norm_moments": (lambda x: list(sk.group_norm_moments(x.detach(), 2)), [leaf(1, 8, 2, 4, 4)]),
    }


NAMES = list(_cases())


@pytest.mark.parametrize("native", [False, True], ids=["default", "native"])
@pytest.mark.parametrize("name", NAMES)
def test_inductor_fullgraph_forward_backward(name, native, request):
    """default: the backends the tests select (on CPU the Triton interpreter first); native:
    those a CPU user gets (the C++ kernels, else the reference)."""
    if native:
        if DEVICE.type != "cpu":
            pytest.skip("the native case is the CPU user's backends; on a GPU it repeats the default one")
        request.getfixturevalue("native_kernels")
    f, leaves = _cases()[name]
    # on a GPU the adaLN backward adds segment sums with float atomics, in an order that varies
    # from run to run: gradients there are compared to fp32 rounding, not bits
    grad_tol = None if DEVICE.type == "cpu" else dict(rtol=1e-5, atol=1e-6)
    assert_compiles_backward_exactly(f, *leaves, backend="inductor", grad_tol=grad_tol)
