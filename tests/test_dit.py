"""The DiT over packed spacetime patches (sora_model/dit.py): the packed model equals the same
model run one video at a time, no video's tokens reach another's output, adaLN-Zero starts at
zero, fused and reference backends train alike, named sizes, clear errors."""
import pytest
import torch

from conftest import DEVICE, assert_trains_like_reference, train_losses
from sora_model.dit import SIZES, DiT, TextBatch, dit_config, forward_flops, parameter_count

pytestmark = pytest.mark.usefixtures("native_kernels")

# a clip, an image, a wide clip: different grids in one batch
SIZES_TWH = [(3, 4, 6), (1, 6, 4), (2, 2, 8)]


def model(seed=0, **overrides):
    """The tiny DiT with its zero-initialised layers randomised (so every path shows in the output)."""
    torch.manual_seed(seed)
    dit = DiT(dit_config("tiny", **overrides))
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "modulation" in name or "final" in name or "cross_proj" in name:
                p.normal_(0.0, 0.1)
    return dit.to(DEVICE)


def batch(seed=0, sizes=SIZES_TWH, text_lengths=(5, 1, 3), text_dim=64):
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(16, *s, generator=g).to(DEVICE) for s in sizes]
    t = torch.rand(len(sizes), generator=g).to(DEVICE)
    tokens = torch.randn(sum(text_lengths), text_dim, generator=g).to(DEVICE)
    cu = torch.tensor([0, *text_lengths]).cumsum(0).to(torch.int32).to(DEVICE)
    pooled = torch.randn(len(sizes), text_dim, generator=g).to(DEVICE)
    return latents, t, TextBatch(tokens, cu, max(text_lengths), pooled)


def one(text: TextBatch, i: int) -> TextBatch:
    a, b = int(text.cu_seqlens[i]), int(text.cu_seqlens[i + 1])
    return TextBatch(text.tokens[a:b], torch.tensor([0, b - a], dtype=torch.int32, device=DEVICE), b - a,
                     text.pooled[i:i + 1])


def test_packed_equals_one_at_a_time():
    dit = model()
    latents, t, text = batch()
    with torch.no_grad():
        packed = dit(latents, t, text)
        for i, z in enumerate(latents):
            alone = dit([z], t[i:i + 1], one(text, i))[0]
            assert packed[i].shape == z.shape
            torch.testing.assert_close(packed[i], alone, rtol=1e-5, atol=1e-5)


def test_no_cross_sample_leakage():
    """Changing video 1's latent, timestep and caption changes video 1's output and no other."""
    dit = model(seed=1)
    latents, t, text = batch(seed=1)
    with torch.no_grad():
        before = dit(latents, t, text)
        latents[1] = torch.randn_like(latents[1])
        t = t.clone()
        t[1] = 0.9
        text.tokens[5:6] = torch.randn(1, 64, device=DEVICE)   # caption 1 is tokens[5:6]
        after = dit(latents, t, text)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert (before[1] - after[1]).abs().max() > 1e-3


def test_torch_compile_fullgraph():
    """The whole forward and backward under torch.compile(fullgraph=True): the Packed record is
    built inside the graph (patch_embed3d) and every block reads its segment_ids. aot_eager
    runs the same kernels, so outputs and gradients are equal bit for bit."""
    dit = model(seed=3)
    latents, t, text = batch(seed=3)
    params = list(dit.parameters())

    def run(f):
        out = f(latents, t, text)
        return [o.detach() for o in out] + list(torch.autograd.grad(sum((o * o).sum() for o in out), params))
    expected = run(dit)
    torch._dynamo.reset()
    got = run(torch.compile(dit, fullgraph=True, backend="aot_eager"))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_block_two_graphs_for_every_batch():
    """A DiT block under torch.compile over packed batches of other token, video and caption
    counts, forward and backward: the first batch's graph, then one with those counts dynamic
    (torch.compile's automatic dynamic shapes) that serves every later batch, with eager's
    outputs and gradients. A size formatted into an error message, a slice of cu_seqlens and
    math.isfinite on a traced float each used to make a count a constant or break the graph:
    a recompilation per batch size."""
    import sora_kernels as sk
    dit = model(seed=5)
    block = dit.blocks[0]
    params = list(block.parameters())
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=count_graphs)
    batches = [(SIZES_TWH, (5, 1, 3)), ([(2, 4, 4), (1, 2, 2)], (4, 2)),
               ([(1, 2, 2), (3, 6, 6), (1, 4, 2), (2, 2, 2)], (1, 2, 3, 4)), ([(4, 2, 6), (1, 8, 8)], (7, 1))]
    # on a GPU the adaLN backward's float atomics add in no fixed order: fp32 rounding there
    tol = dict(rtol=0, atol=0) if DEVICE.type == "cpu" else dict(rtol=1e-5, atol=1e-6)
    for seed, (sizes, text_lengths) in enumerate(batches):
        latents, t, text = batch(seed, sizes, text_lengths)
        with torch.no_grad():
            packed = sk.patch_embed3d(latents, dit.patch_embed, dit.patch_bias, dit.cfg.patch_size)
            c = dit.t_embed(t) + dit.text_pool(text.pooled)
        x = packed.tokens.clone().requires_grad_()
        got, expected = (f(x, c, packed, text) for f in (compiled, block))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for a, b in zip(*(torch.autograd.grad(out.square().sum(), [x] + params) for out in (got, expected))):
            torch.testing.assert_close(a, b, **tol)
    assert len(graphs) == 2, f"{len(graphs)} graphs for {len(batches)} batches"


def test_adaln_zero_output_is_zero():
    torch.manual_seed(0)
    dit = DiT(dit_config("tiny")).to(DEVICE)
    latents, t, text = batch()
    with torch.no_grad():
        out = dit(latents, t, text)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)


def _train(steps=20):
    dit = model(seed=2)
    latents, t, text = batch(seed=2)
    targets = [torch.randn_like(z) for z in latents]
    return train_losses(dit, lambda: sum(torch.nn.functional.mse_loss(o, y)
                                         for o, y in zip(dit(latents, t, text), targets)), steps)


def test_fused_and_reference_train_alike(monkeypatch):
    assert_trains_like_reference(_train, monkeypatch)


def test_bf16_autocast():
    """Under bf16 autocast (what sora-train uses on GPU) the linear layers run bf16 while the
    residual stream keeps the weights' fp32: forward and backward run, and the output is near
    fp32's."""
    dit = model(seed=4)
    latents, t, text = batch(seed=4)
    with torch.no_grad():
        full = dit(latents, t, text)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = dit(latents, t, text)
        sum(o.float().square().sum() for o in out).backward()
    for a, b in zip(out, full):
        assert a.shape == b.shape and (a.detach().float() - b).abs().max() <= 0.05 * b.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dit.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_checkpointing_same_gradients(dtype):
    """Checkpointing recomputes each block's forward: the same gradients. float64 runs the
    reference ops on every device; float32 runs the kernels, whose gradients repeat run to run
    on CPU only (on CUDA, adaln_norm's backward sums per video with float32 atomic adds)."""
    if dtype == torch.float32 and DEVICE.type == "cuda":
        pytest.skip("float32 on CUDA: adaln_norm's backward adds per-video sums atomically, in run-dependent "
                    "order, so two runs differ at float32 rounding with or without checkpointing")
    latents, t, text = batch(seed=3)
    latents, t = [z.to(dtype) for z in latents], t.to(dtype)
    text = TextBatch(text.tokens.to(dtype), text.cu_seqlens, text.max_seqlen, text.pooled.to(dtype))
    grads = []
    for ckpt in (False, True):
        dit = model(seed=3, grad_checkpointing=ckpt).to(dtype).train()
        out = dit(latents, t, text)
        sum(o.square().sum() for o in out).backward()
        grads.append([p.grad.clone() for p in dit.parameters()])
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}[dtype]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)


def test_named_sizes():
    assert set(SIZES) >= {"tiny", "S", "B", "L", "XL", "1B"}
    assert 0.95e9 < parameter_count(SIZES["1B"]) < 1.2e9
    assert parameter_count(SIZES["tiny"]) < 1e6


def test_errors():
    dit = model()
    latents, t, text = batch()
    with pytest.raises(ValueError, match=r"latents\[1\]: the patch \(1, 2, 2\) does not divide its grid "
                                         r"\(T, H, W\) = \(1, 5, 4\)"):
        dit([latents[0], torch.zeros(16, 1, 5, 4, device=DEVICE), latents[2]], t, text)
    with pytest.raises(ValueError, match=r"latents\[0\]: expected \[16, T, H, W\], got \(8, 3, 4, 6\)"):
        dit([torch.zeros(8, 3, 4, 6, device=DEVICE), *latents[1:]], t, text)
    with pytest.raises(ValueError, match=r"t: expected one timestep per video, shape \(3,\), got \(2,\)"):
        dit(latents, t[:2], text)
    with pytest.raises(ValueError, match=r"text: expected pooled \[3, 64\] and cu_seqlens \[4\]"):
        dit(latents, t, TextBatch(text.tokens, text.cu_seqlens[:3], text.max_seqlen, text.pooled[:2]))
    with pytest.raises(ValueError, match="heads: expected a divisor of hidden=64, got 5"):
        DiT(dit_config("tiny", heads=5))
    with pytest.raises(ValueError, match=r"heads: 3D RoPE rotates pairs of features, so hidden / heads must be even; "
                                         r"got hidden=60, heads=4 \(head dim 15\)"):
        DiT(dit_config("tiny", hidden=60, heads=4))


@pytest.mark.parametrize("overrides", [{}, dict(patch_size=(1, 1, 1), hidden=96, heads=3, mlp_ratio=2.0)])
def test_forward_flops_counts_every_matrix_product(overrides, monkeypatch):
    """forward_flops (the numerator of MFU) equals PyTorch's FLOP counter on the reference
    backends, where every matrix product is an aten op it counts and both attentions are
    custom ops it counts by their registered formula (varlen_attention.attention_flops)."""
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setenv("SORA_KERNELS_BACKEND", "reference")
    dit = model(seed=1, **overrides)
    latents, t, text = batch(seed=1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dit(latents, t, text)
    p = dit.cfg.patch_size
    tokens = [(T // p[0]) * (H // p[1]) * (W // p[2]) for T, H, W in SIZES_TWH]
    assert forward_flops(dit.cfg, tokens, [5, 1, 3]) == counter.get_total_flops()
    with pytest.raises(ValueError, match=r"text_tokens: expected one count per video \(3\), got 2"):
        forward_flops(dit.cfg, tokens, [5, 1])

