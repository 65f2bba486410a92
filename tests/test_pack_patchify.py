"""pack_patchify / unpack_unpatchify: every backend bitwise equal to the reference, on
awkward mixes of sizes, forward and backward, under torch.compile, and with clear errors."""
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sora_kernels as sk
from conftest import DEVICE, KERNEL_BACKENDS, assert_bitwise_equal, require_backend
from sora_kernels.ops.pack_patchify import PACK_BACKENDS, UNPACK_BACKENDS
from sora_kernels.reference import patchify as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_videos(sizes, channels, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, *s, generator=g).to(device=device, dtype=dtype) for s in sizes]


def check_roundtrip(backend, videos, patch):
    sizes = [tuple(v.shape[1:]) for v in videos]
    require_backend(PACK_BACKENDS, backend, (videos, patch))
    packed = sk.pack_patchify(videos, patch, backend=backend)
    assert_bitwise_equal(packed.tokens, ref.pack_patchify(videos, patch), f"{backend} pack tokens")
    assert_bitwise_equal(packed.positions, ref.packed_positions(packed.grids, videos[0].device),
                         f"{backend} pack positions")
    back = sk.unpack_unpatchify(packed.tokens, packed, patch, backend=backend)
    assert len(back) == len(videos)
    for i, (b, v) in enumerate(zip(back, videos)):
        assert_bitwise_equal(b, v, f"{backend} unpack video {i} of size {sizes[i]}")
    return packed


# A 13x90x160 clip is too slow for the interpreter; the mix keeps every feature of it.
MIX = [(5, 18, 32), (3, 8, 8), (3, 8, 8), (1, 16, 24), (1, 24, 16), (1, 2, 2), (2, 6, 10)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_matches_reference(backend, dtype):
    check_roundtrip(backend, make_videos(MIX, 16, dtype), (1, 2, 2))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("patch", [(1, 1, 1), (2, 2, 2), (1, 3, 5), (3, 1, 2), (2, 4, 4)])
def test_patch_sizes(backend, patch):
    pt, ph, pw = patch
    sizes = [(pt * 2, ph * 3, pw * 5), (pt, ph, pw), (pt * 3, ph * 1, pw * 7)]
    check_roundtrip(backend, make_videos(sizes, 3), patch)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_many_small_videos_next_to_a_large_one(backend):
    sizes = [(1, 2, 2)] * 40 + [(4, 40, 72)] + [(1, 4, 2)] * 9
    check_roundtrip(backend, make_videos(sizes, 4, torch.bfloat16), (1, 2, 2))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_wide_rows_span_several_tiles(backend):
    # Rows wider than one tile, which the CUDA (96 tokens of 128 B) and Triton (64) kernels
    # cut, with partial last tiles, and odd widths.
    check_roundtrip(backend, make_videos([(1, 2, 2 * 300), (2, 4, 2 * 129)], 16, torch.float16), (1, 2, 2))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_misaligned_storage(backend):
    # A video whose data starts 2 bytes into its storage: the CUDA kernel drops to narrow units.
    g = torch.Generator().manual_seed(3)
    shape = (16, 2, 4, 2 * 100)
    flat = torch.randn(16 * 2 * 4 * 200 + 1, generator=g).to(device=DEVICE, dtype=torch.float16)
    check_roundtrip(backend, [flat[1:].view(shape), make_videos([(1, 2, 6)], 16, torch.float16)[0]], (1, 2, 2))


video_sizes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patch=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)),
       grids=st.lists(video_sizes, min_size=1, max_size=6),
       channels=st.integers(1, 5),
       dtype=st.sampled_from(DTYPES))
def test_random_batches(backend, patch, grids, channels, dtype):
    sizes = [tuple(g * p for g, p in zip(grid, patch)) for grid in grids]
    videos = make_videos(sizes, channels, dtype)
    packed = check_roundtrip(backend, videos, patch)
    lengths = [t * h * w for t, h, w in grids]
    assert packed.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert packed.max_seqlen == max(lengths)
    assert packed.grid_sizes.tolist() == [list(g) for g in grids]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(large=st.tuples(st.integers(1, 4), st.integers(4, 12), st.integers(4, 20)),
       small=st.lists(st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2)), min_size=5, max_size=40),
       at=st.floats(0, 1), dtype=st.sampled_from(DTYPES))
def test_random_many_small_videos_around_a_large_one(backend, large, small, at, dtype):
    """Sora's mix: one long clip among many 1-4 token clips and images, anywhere in the list."""
    grids = list(small)
    grids.insert(int(at * len(small)), large)
    check_roundtrip(backend, make_videos([(t, 2 * h, 2 * w) for t, h, w in grids], 4, dtype), (1, 2, 2))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_metadata_is_int32_and_positions_are_grid_indices(backend):
    videos = make_videos([(2, 4, 6), (1, 2, 4)], 3)
    require_backend(PACK_BACKENDS, backend, (videos, (1, 2, 2)))
    packed = sk.pack_patchify(videos, (1, 2, 2), backend=backend)
    for name in ("cu_seqlens", "positions", "grid_sizes"):
        assert getattr(packed, name).dtype == torch.int32, name
    expected = [[t, h, w] for t in range(2) for h in range(2) for w in range(3)] + \
               [[0, 0, w] for w in range(2)]
    assert packed.positions.tolist() == expected
    assert packed.grids == ((2, 2, 3), (1, 1, 2))


def test_record_to_device_and_dtype():
    """Packed.to moves every tensor (the segment ids too, once computed) and casts the tokens
    only; Packed.pin_memory pins them (what DataLoader(pin_memory=True) calls). Packed in a
    DataLoader's collate function on the CPU, a batch arrives as a record."""
    packed = sk.pack_patchify(make_videos([(2, 4, 6), (1, 2, 4)], 3, device="cpu"), (1, 2, 2))
    ids = packed.segment_ids
    moved = packed.to("meta", torch.float16)
    tensors = ("tokens", "cu_seqlens", "positions", "grid_sizes", "segment_ids")
    assert all(getattr(moved, name).device.type == "meta" for name in tensors)
    assert moved.tokens.dtype == torch.float16 and moved.segment_ids.dtype == torch.int32
    assert (moved.grids, moved.max_seqlen, moved.patch_size) == (packed.grids, packed.max_seqlen, packed.patch_size)
    same = packed.to(dtype=torch.float64)
    assert torch.equal(same.tokens, packed.tokens.double()) and "_segment_ids" in same.__dict__
    assert torch.equal(same.segment_ids, ids) and torch.equal(same.cu_seqlens, packed.cu_seqlens)
    loader = torch.utils.data.DataLoader([make_videos([(1, 2, 2), (2, 4, 4)], 3, device="cpu", seed=i)
                                          for i in range(3)], batch_size=None,
                                         collate_fn=lambda videos: sk.pack_patchify(videos, (1, 2, 2)),
                                         pin_memory=torch.cuda.is_available())
    batches = list(loader)
    assert len(batches) == 3 and all(isinstance(b, sk.Packed) for b in batches)
    assert all(b.tokens.is_pinned() for b in batches) == torch.cuda.is_available()
    if torch.cuda.is_available():
        on_gpu = batches[0].to(DEVICE, non_blocking=True)
        assert on_gpu.tokens.is_cuda and on_gpu.positions.is_cuda


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_backward_matches_reference(backend):
    patch = (1, 2, 2)
    base = make_videos([(2, 4, 6), (1, 2, 8), (3, 2, 2)], 3, torch.float32)
    require_backend(PACK_BACKENDS, backend, (base, patch))
    videos = [v.clone().requires_grad_() for v in base]
    ref_videos = [v.clone().requires_grad_() for v in base]
    w = torch.randn_like(ref.pack_patchify(base, patch))
    packed = sk.pack_patchify(videos, patch, backend=backend)
    (packed.tokens * w).sum().backward()
    (ref.pack_patchify(ref_videos, patch) * w).sum().backward()
    for v, r in zip(videos, ref_videos):
        assert_bitwise_equal(v.grad, r.grad, f"{backend} pack backward")

    tokens = ref.pack_patchify(base, patch).requires_grad_()
    outs = sk.unpack_unpatchify(tokens, packed, patch, backend=backend)
    # Only outs[0] and outs[2] feed the loss: outs[1] contributes a zero gradient.
    (outs[0] * base[0]).sum().add_((outs[2] * 3).sum()).backward()
    expected = ref.pack_patchify([base[0], torch.zeros_like(base[1]), torch.full_like(base[2], 3.0)], patch)
    assert_bitwise_equal(tokens.grad, expected, f"{backend} unpack backward")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_torch_compile_fullgraph(backend):
    patch = (1, 2, 2)
    base = make_videos([(2, 4, 6), (1, 2, 8)], 3)
    require_backend(PACK_BACKENDS, backend, (base, patch))
    videos = [v.clone().requires_grad_() for v in base]

    def step(videos):
        packed = sk.pack_patchify(videos, patch, backend=backend)
        out = sk.unpack_unpatchify(packed.tokens * 2, packed, patch, backend=backend)
        return sum(o.sum() for o in out), packed.positions

    loss, positions = torch.compile(step, fullgraph=True, backend="aot_eager")(videos)
    loss.backward()
    assert torch.equal(positions, sk.pack_patchify(base, patch).positions)
    for v in videos:
        assert torch.equal(v.grad, torch.full_like(v, 2.0))


def test_torch_compile_inductor():
    videos = make_videos([(2, 4, 6), (1, 2, 8)], 3)
    step = torch.compile(lambda vs: sk.pack_patchify(vs, (1, 2, 2)).tokens * 3, fullgraph=True)
    assert torch.equal(step(videos), ref.pack_patchify(videos, (1, 2, 2)) * 3)


# -----------------------------------------------------------------------------
# Bad input
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("videos, patch, message", [
    ([], (1, 2, 2), r"videos: expected at least one video, got an empty list"),
    ([torch.zeros(3, 4, 4)], (1, 2, 2), r"videos\[0\]: expected a 4-dim tensor \[C, T, H, W\], got \(3, 4, 4\)"),
    ([torch.zeros(3, 1, 4, 4), torch.zeros(4, 1, 4, 4)], (1, 2, 2), r"videos\[1\]: expected C=3 .* got C=4"),
    ([torch.zeros(3, 1, 4, 4), torch.zeros(3, 1, 4, 4, dtype=torch.float16)], (1, 2, 2),
     r"videos\[1\]: expected dtype torch.float32 like videos\[0\], got torch.float16"),
    ([torch.zeros(3, 1, 5, 4)], (1, 2, 2), r"videos\[0\]: H=5 is not divisible by patch_size\[1\]=2"),
    ([torch.zeros(3, 1, 4, 4)], (1, 0, 2), r"patch_size\[1\]: expected a positive int, got 0"),
    ([torch.zeros(3, 1, 4, 4)], (1, 2), r"patch_size: expected an int or 3 ints"),
    ([torch.zeros(3, 1, 4, 4)], True, r"patch_size: expected an int or 3 ints \(pt, ph, pw\), got True"),
    ([torch.zeros(3, 1, 4, 4)], (1, True, 2), r"patch_size: expected an int or 3 ints"),
    ([torch.zeros(3, 0, 4, 4)], (1, 2, 2), r"videos\[0\]: expected T > 0, got T=0"),
    ([torch.zeros(0, 1, 4, 4)], (1, 2, 2), r"videos\[0\]: expected C >= 1 channels, got C=0"),
])
def test_bad_input_names_the_argument(videos, patch, message):
    with pytest.raises(ValueError, match=message):
        sk.pack_patchify(videos, patch)


def test_mixed_devices_are_rejected():
    """Checked before any backend runs: a meta tensor stands for another device on any machine."""
    with pytest.raises(ValueError, match=r"videos\[1\]: expected device cpu like videos\[0\], got meta"):
        sk.pack_patchify([torch.zeros(3, 1, 4, 4), torch.zeros(3, 1, 4, 4, device="meta")], (1, 2, 2))


def test_unpack_checks_token_count_and_width():
    videos = make_videos([(1, 4, 4), (1, 2, 2)], 3)
    packed = sk.pack_patchify(videos, (1, 2, 2))
    with pytest.raises(ValueError, match=r"tokens: expected N=5 tokens to match packed.cu_seqlens\[-1\], got N=4"):
        sk.unpack_unpatchify(packed.tokens[:4], packed, (1, 2, 2))
    with pytest.raises(ValueError, match=r"tokens: expected D a positive multiple of pt\*ph\*pw=4, got D=10"):
        sk.unpack_unpatchify(torch.zeros(5, 10), packed, (1, 2, 2))
    with pytest.raises(ValueError, match=r"tokens: expected a 2-dim tensor \[N, D\], got \(5, 12, 1\)"):
        sk.unpack_unpatchify(torch.zeros(5, 12, 1), packed, (1, 2, 2))


def test_unpack_checks_the_record_and_its_patch():
    """Unpacking with another patch of the same volume would return videos of other sizes;
    the record knows the patch it was cut with (patch_embed3d's too)."""
    videos = make_videos([(1, 4, 4), (2, 2, 2)], 3)
    packed = sk.pack_patchify(videos, (1, 2, 2))
    assert packed.patch_size == (1, 2, 2)
    with pytest.raises(ValueError, match=r"patch_size: expected \(1, 2, 2\), the patch the videos were packed with, "
                                         r"got \(1, 1, 4\)"):
        sk.unpack_unpatchify(packed.tokens, packed, (1, 1, 4))
    with pytest.raises(ValueError, match=r"packed: expected a Packed record .* got NoneType"):
        sk.unpack_unpatchify(packed.tokens, None, (1, 2, 2))
    embedded = sk.patch_embed3d(videos, torch.zeros(8, 3, 1, 2, 2, device=DEVICE), None, (1, 2, 2), backend="reference")
    assert embedded.patch_size == (1, 2, 2)
    with pytest.raises(ValueError, match=r"patch_size: expected \(1, 2, 2\)"):
        sk.unpack_unpatchify(packed.tokens, embedded, 2)
    # a record made by hand, without its patch, is taken at its word
    unknown = dataclasses.replace(packed, patch_size=None)
    assert [v.shape for v in sk.unpack_unpatchify(packed.tokens, unknown, (1, 1, 4))] == [(3, 1, 2, 8), (3, 2, 1, 4)]


def test_compiled_op_checks_its_arguments():
    """Direct callers of torch.ops.sora_kernels get errors that name the argument too."""
    require_backend(PACK_BACKENDS, "cpu", ([torch.zeros(1, 1, 1, 1)], (1, 1, 1)))
    with pytest.raises(RuntimeError, match=r"videos\[0\]: W=3 is not divisible by patch_size\[2\]=2"):
        torch.ops.sora_kernels.pack_patchify([torch.zeros(2, 1, 2, 3)], [1, 2, 2])
    with pytest.raises(RuntimeError, match=r"tokens: expected 8 tokens for the given sizes, got 7"):
        torch.ops.sora_kernels.unpack_unpatchify(torch.zeros(7, 8), [1, 2, 2], [2, 4, 4])
