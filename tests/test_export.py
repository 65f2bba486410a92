"""torch.export and AOTInductor: how a library deploys a model built on these ops. Every public op
exports with its custom op whole in the graph (its fake gives the shapes), and the exported
program, decomposed to core ATen, gives eager's outputs bit for bit; the token count can be a
dynamic dimension, and on CPU the offset checks stay in the graph as asserts. The tiny DiT and
the autoencoder's decode export too, and AOTInductor compiles the DiT into a package that runs
without Python's model code (inductor generates the glue around the ops, so fp32 rounding)."""
import pytest
import torch
from torch.export import Dim

import sora_kernels as sk
from conftest import DEVICE, public_op_cases

NAMES = list(public_op_cases())


class Call(torch.nn.Module):
    """f as a module (torch.export takes modules), with the module whose weights f uses as a
    submodule, so they export as parameters and not as constants."""

    def __init__(self, f, owner: torch.nn.Module | None = None):
        super().__init__()
        self.f, self.owner = f, owner

    def forward(self, *args):
        return self.f(*args)


def _outputs(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _sora_ops(program) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "sora_kernels" in str(n.target)}


@pytest.fixture(params=[False, True], ids=["default", "native"])
def backends(request):
    """default: the backends the tests select (on CPU the Triton interpreter first); native:
    those a CPU user gets (the C++ kernels, else the reference)."""
    if request.param:
        if DEVICE.type != "cpu":
            pytest.skip("the native case is the CPU user's backends; on a GPU it repeats the default one")
        request.getfixturevalue("native_kernels")


@pytest.mark.parametrize("name", NAMES)
def test_export_matches_eager(name, backends):
    f, leaves = public_op_cases()[name]
    args = tuple(x.detach() for x in leaves)
    program = torch.export.export(Call(f), args).run_decompositions()
    assert _sora_ops(program), f"{name}: no sora_kernels op in the exported graph (traced through?)"
    expected, got = _outputs(f(*args)), _outputs(program.module()(*args))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), name


def test_export_dynamic_token_count(backends):
    """One exported program for every packed batch size: attention with 3D rope and the fused
    residual + adaLN over symbolic token and segment counts, run on batches of other counts
    and lengths (one segment, an empty one)."""
    g = torch.Generator().manual_seed(1)

    def block(q, k, v, x, gate, shift, scale, cu, pos):
        o = sk.varlen_attention(q, k, v, cu, cu, 64, 64, rope=pos)     # max_seqlen: a bound, not a shape
        h, y = sk.gated_residual_adaln(x, o.flatten(1), gate, shift, scale, cu)
        return h, y

    def batch(lengths):
        n = sum(lengths)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        t = [torch.randn(n, 2, 16, generator=g) for _ in range(3)]
        x = torch.randn(n, 32, generator=g)
        per_seg = [torch.randn(len(lengths), 32, generator=g) for _ in range(3)]
        pos = torch.randint(0, 8, (n, 3), generator=g, dtype=torch.int32)
        return tuple(a.to(DEVICE) for a in (*t, x, *per_seg, cu, pos))

    tokens, segments = Dim("tokens", min=2, max=1 << 20), Dim("segments", min=1, max=1 << 14)
    per_token, per_segment = {0: tokens}, {0: segments}
    shapes = (per_token,) * 4 + (per_segment,) * 3 + ({0: segments + 1}, per_token)
    program = torch.export.export(Call(block), batch([5, 12]), dynamic_shapes=(shapes,))   # forward(*args)
    for lengths in ([5, 12], [1, 30, 7], [64], [3, 0, 9]):
        args = batch(lengths)
        for a, b in zip(program.module()(*args), block(*args)):
            assert torch.equal(a, b), lengths
    # offsets that do not end at the token count: the attention op reads them as it runs (the
    # eager message); adaln_norm alone has the checks as asserts in the graph (CPU only: on a
    # GPU a failed graph assert is a device-side assert, packed.py)
    args = list(batch([5, 12]))
    args[7] = torch.tensor([0, 5, 16], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"cu_seqlens_q: expected the last entry to equal the token count 17, "
                                         r"got 16"):
        program.module()(*args)
    if DEVICE.type == "cpu":
        picked = (3, 5, 6, 7)                   # x, shift, scale, cu
        norm = torch.export.export(Call(sk.adaln_norm), tuple(batch([5, 12])[i] for i in picked),
                                   dynamic_shapes=((per_token, per_segment, per_segment, {0: segments + 1}),))
        with pytest.raises(RuntimeError, match="cu_seqlens: expected the last entry to equal the token count"):
            norm.module()(*(args[i] for i in picked))


def _random_dit():
    """The tiny DiT with every weight drawn (adaLN-Zero's initial zeros would make its output
    the zero it is compared with)."""
    from sora_model.dit import DiT, dit_config
    torch.manual_seed(0)
    dit = DiT(dit_config("tiny")).to(DEVICE).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.05)
    return dit


def test_export_dit_and_aoti(tmp_path, native_kernels):
    """The tiny DiT on a packed batch of a clip and an image: exported, then compiled by
    AOTInductor into a .pt2 package and loaded back. An exported DiT is specialised to its
    latents' shapes (the packing is planned from them)."""
    from sora_model.dit import TextBatch
    dit = _random_dit()
    cfg = dit.cfg

    def forward(clip, image, t, tokens, cu, pooled):
        return dit([clip, image], t, TextBatch(tokens, cu, 6, pooled))
    g = torch.Generator().manual_seed(2)
    args = tuple(a.to(DEVICE) for a in (
        torch.randn(cfg.in_channels, 3, 8, 12, generator=g), torch.randn(cfg.in_channels, 1, 6, 4, generator=g),
        torch.rand(2, generator=g), torch.randn(11, cfg.text_dim, generator=g),
        torch.tensor([0, 5, 11], dtype=torch.int32), torch.randn(2, cfg.text_dim, generator=g)))
    with torch.no_grad():
        expected = forward(*args)
        program = torch.export.export(Call(forward, dit), args)
        got = program.module()(*args)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "dit.pt2"))
        compiled = torch._inductor.aoti_load_package(package)(*args)
    assert [c.shape for c in compiled] == [e.shape for e in expected] == [(cfg.in_channels, 3, 8, 12),
                                                                        (cfg.in_channels, 1, 6, 4)]
    assert min(e.abs().max().item() for e in expected) > 0.1     # not the adaLN-Zero output
    for a, b in zip(compiled, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_export_dit_block(native_kernels):
    """One DiT block, whose forward takes the Packed record and the TextBatch (both registered
    as pytree dataclasses, so torch.export takes them): exported, equal to eager bit for bit."""
    from sora_model.dit import TextBatch
    dit = _random_dit()
    block = dit.blocks[0]
    g = torch.Generator().manual_seed(3)
    latents = [torch.randn(dit.cfg.in_channels, *s, generator=g).to(DEVICE) for s in [(3, 8, 12), (1, 6, 4)]]
    text = TextBatch(torch.randn(11, dit.cfg.text_dim, generator=g).to(DEVICE),
                     torch.tensor([0, 5, 11], dtype=torch.int32, device=DEVICE), 6,
                     torch.randn(2, dit.cfg.text_dim, generator=g).to(DEVICE))
    with torch.no_grad():
        packed = sk.patch_embed3d(latents, dit.patch_embed, dit.patch_bias, dit.cfg.patch_size)
        c = dit.t_embed(torch.rand(2, generator=g).to(DEVICE)) + dit.text_pool(text.pooled)
        args = (packed.tokens, c, packed, text)
        program = torch.export.export(block, args)
        assert torch.equal(program.module()(*args), block(*args))


def test_export_vae_decode(native_kernels):
    """The autoencoder's decode (sampling's last step) exported: on CPU eager calls oneDNN
    directly and the exported graph F.conv3d, so fp32 rounding (test_vae's compiled decode)."""
    from sora_model.vae import VideoAutoencoder, vae_config
    torch.manual_seed(6)
    vae = VideoAutoencoder(vae_config("tiny")).to(DEVICE).eval()
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with torch.no_grad():
        expected = vae.decode(z)
        got = torch.export.export(Call(vae.decode, vae), (z,)).module()(z)
    assert got.shape == expected.shape == (1, 3, 9, 16, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
