"""patch_embed3d equals Conv3d(kernel = stride = patch) on each video, packed; gradients too
(2x rule in fp16 / bf16 against float64, tight in fp32); torch.compile with fullgraph."""
import pytest
import torch

import sora_kernels as sk
from conftest import DEVICE, assert_2x_rule, assert_compiles_exactly, require_backend
from sora_kernels.ops.patch_embed3d import PATCH_EMBED_BACKENDS

SIZES = [(3, 8, 12), (1, 6, 4), (1, 2, 2), (2, 10, 70)]  # clips, images, a 1-token image, a wide row


def _conv(videos, weight, bias, patch):
    return torch.cat([torch.nn.functional.conv3d(v[None], weight, bias, stride=patch).flatten(2).transpose(1, 2)[0]
                      for v in videos])


def _run(fn, leaves, n_videos, dout):
    out = fn(leaves[:n_videos], *leaves[n_videos:])
    return [out.detach()] + list(torch.autograd.grad(out, leaves, dout.to(out.dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_matches_conv3d(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("the Triton interpreter computes tl.dot on bf16 wrongly; bf16 is tested on a GPU")
    g = torch.Generator().manual_seed(0)
    patch = (1, 2, 2)
    videos = [torch.randn(4, *s, generator=g).to(DEVICE, dtype).requires_grad_() for s in SIZES]
    weight = (0.2 * torch.randn(40, 4, *patch, generator=g)).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(40, generator=g).to(DEVICE, dtype).requires_grad_()
    require_backend(PATCH_EMBED_BACKENDS, backend, (videos, weight.reshape(40, -1), bias, patch))
    leaves = videos + [weight, bias]
    n_tokens = sum(t * (h // 2) * (w // 2) for t, h, w in SIZES)
    dout = torch.randn(n_tokens, 40, generator=g).to(DEVICE)
    ours = _run(lambda v, w, b: sk.patch_embed3d(v, w, b, patch, backend=backend).tokens, leaves, len(videos), dout)
    plain = _run(lambda v, w, b: _conv(v, w, b, patch), leaves, len(videos), dout)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    exact = _run(lambda v, w, b: _conv(v, w, b, patch), wide, len(videos), dout.double())
    assert_2x_rule(ours, plain, exact, dtype, "patch_embed3d")


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_no_output_features(backend):
    """A projection to E = 0 features gives [N, 0] tokens and zero-size gradients, as Conv3d
    does (the weight check once indexed the weight's first row, an IndexError)."""
    patch = (1, 2, 2)
    videos = [torch.randn(4, *s, device=DEVICE, requires_grad=True) for s in SIZES[:2]]
    weight = torch.zeros(0, 4, *patch, device=DEVICE, requires_grad=True)
    bias = torch.zeros(0, device=DEVICE, requires_grad=True)
    require_backend(PATCH_EMBED_BACKENDS, backend, (videos, weight.reshape(0, 16), bias, patch))
    tokens = sk.patch_embed3d(videos, weight, bias, patch, backend=backend).tokens
    assert tokens.shape == (3 * 4 * 6 + 3 * 2, 0)
    grads = torch.autograd.grad(tokens.sum(), videos + [weight, bias], allow_unused=True)
    assert [None if g is None else tuple(g.shape) for g in grads[-2:]] == [(0, 4, *patch), (0,)]
    assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_torch_compile_fullgraph(backend):
    g = torch.Generator().manual_seed(0)
    patch = (1, 2, 2)
    videos = [torch.randn(4, *s, generator=g).to(DEVICE).requires_grad_() for s in [(1, 2, 4), (2, 2, 2)]]
    weight = (0.2 * torch.randn(8, 4, *patch, generator=g)).to(DEVICE).requires_grad_()
    bias = torch.randn(8, generator=g).to(DEVICE).requires_grad_()
    require_backend(PATCH_EMBED_BACKENDS, backend, (videos, weight.reshape(8, -1), bias, patch))

    def embed(videos, weight, bias):
        p = sk.patch_embed3d(videos, weight, bias, patch, backend=backend)
        return p.tokens, p.cu_seqlens, p.positions, p.grid_sizes
    assert_compiles_exactly(embed, videos, weight, bias)


def test_packed_metadata_and_errors():
    videos = [torch.randn(4, 1, 4, 4, device=DEVICE), torch.randn(4, 2, 2, 2, device=DEVICE)]
    weight = torch.randn(8, 16, device=DEVICE)
    p = sk.patch_embed3d(videos, weight, None, (1, 2, 2))
    q = sk.pack_patchify(videos, (1, 2, 2))
    assert p.tokens.shape == (6, 8) and p.grids == q.grids
    assert torch.equal(p.cu_seqlens, q.cu_seqlens) and torch.equal(p.positions, q.positions)
    with pytest.raises(ValueError, match=r"weight: expected \[E, 4, 1, 2, 2\] or \[E, 16\], got \(8, 15\)"):
        sk.patch_embed3d(videos, torch.randn(8, 15, device=DEVICE), None, (1, 2, 2))
    with pytest.raises(ValueError, match=r"bias: expected \[8\]"):
        sk.patch_embed3d(videos, weight, torch.randn(7, device=DEVICE), (1, 2, 2))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        sk.patch_embed3d([torch.randn(4, 1, 3, 4, device=DEVICE)], weight, None, (1, 2, 2))


def test_packed_record_input():
    """A Packed record of patch tokens (pack_patchify's) is projected as its videos would be,
    its metadata kept; gradients reach the tokens, weight and bias."""
    g = torch.Generator().manual_seed(0)
    videos = [torch.randn(3, *s, generator=g).to(DEVICE) for s in SIZES[:3]]
    weight, bias = (torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in ((16, 3, 1, 2, 2), (16,)))
    packed = sk.pack_patchify([v.requires_grad_() for v in videos], (1, 2, 2))
    got = sk.patch_embed3d(packed, weight, bias, (1, 2, 2))
    want = sk.patch_embed3d(videos, weight, bias, (1, 2, 2), backend="reference")
    torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)
    assert got.grids == packed.grids and got.patch_size == (1, 2, 2) and torch.equal(got.positions, packed.positions)
    dout = torch.randn(want.tokens.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(got.tokens, videos + [weight, bias], dout)
    expected = torch.autograd.grad(want.tokens, videos + [weight, bias], dout)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"patch_size: expected \(1, 2, 2\), the patch the videos were packed with"):
        sk.patch_embed3d(packed, weight.reshape(16, 12), bias, (1, 1, 4))
    with pytest.raises(ValueError, match=r"weight: expected \[E, 3, 1, 2, 2\] or \[E, 12\], got \(16, 13\)"):
        sk.patch_embed3d(packed, torch.zeros(16, 13, device=DEVICE), None, (1, 2, 2))
    with pytest.raises(ValueError, match=r"backend: a Packed record's tokens are projected by one matrix product"):
        sk.patch_embed3d(packed, weight, bias, (1, 2, 2), backend="triton")
    assert not packed.embedded and got.embedded and want.embedded


def test_embedded_record_refused():
    """An embedded record whose width happens to equal C * volume (E = 12 here) is not taken
    for patch tokens and projected a second time, whichever way it was embedded."""
    videos = [torch.randn(3, *s).to(DEVICE) for s in SIZES[:2]]
    square = torch.randn(12, 12, device=DEVICE)
    for embedded in (sk.patch_embed3d(videos, square, None, (1, 2, 2)),
                     sk.patch_embed3d(sk.pack_patchify(videos, (1, 2, 2)), square, None, (1, 2, 2))):
        with pytest.raises(ValueError, match=r"videos: expected a Packed record of patch tokens \(pack_patchify's\), "
                                             r"got one whose tokens are already embedded"):
            sk.patch_embed3d(embedded, square, None, (1, 2, 2))
