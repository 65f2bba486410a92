"""Exact spatial tiling of the video decoder and the memory planner (sora_model/vae_tiling.py):
tiled equals untiled, the plan a budget picks keeps the measured peak under the budget, clear
errors."""
import pytest
import torch

from conftest import DEVICE
from sora_kernels.testing.memory import peak_bytes
from sora_model import vae_tiling
from sora_model.vae import GroupNormSiLU, VideoAutoencoder, vae_config

pytestmark = pytest.mark.usefixtures("native_kernels")


def tiny(seed=0):
    """The tiny config with GroupNorm affines and convolutions far from their initial values,
    so that wrong statistics or a short halo show in the output."""
    torch.manual_seed(seed)
    vae = VideoAutoencoder(vae_config("tiny"))
    for m in vae.modules():
        if isinstance(m, GroupNormSiLU):
            m.weight.data.normal_(1.0, 0.3)
            m.bias.data.normal_(0.0, 0.3)
        elif isinstance(m, torch.nn.Conv3d):
            m.weight.data.normal_(0.0, 0.1)
    return vae.to(DEVICE).eval()


@pytest.mark.parametrize("tile, chunk", [((2, 3), 2), ((3, 7), None), ((1, 4), 3)])
def test_tiled_equals_untiled(tile, chunk):
    """Tiles cutting the frame unevenly (edge tiles smaller, a 1-pixel-high row of tiles,
    tiles as wide as the frame), with temporal chunks; every segment tiled."""
    vae = tiny(seed=1)
    z = torch.randn(1, 16, 3, 5, 7, device=DEVICE)
    with torch.no_grad():
        full = vae.decode(z)
        tiled = vae.decode(z, chunk, tile=tile)
        streamed = torch.cat(list(vae.decode_stream(z, chunk, tile=tile)), dim=2)
    assert tiled.shape == full.shape == (1, 3, 9, 40, 56)
    assert (tiled - full).abs().max().item() <= 1e-4
    assert torch.equal(streamed, tiled)


def _per_tile_statistics(vae, z, tile):
    """The tiled decode with the same tiles and halos but each tile's GroupNorms taking the
    statistics of the tile (with its halo): what tiling without the statistics passes gives."""
    from sora_model.vae import DecodeState, run_layers
    x = vae._denormalize(z)
    for seg in vae_tiling.segments_of(vae.decoder):
        H, W = x.shape[3] * seg.scale, x.shape[4] * seg.scale
        out = None
        for t in vae_tiling.make_tiles(seg, z.shape[3], z.shape[4], tile):
            y = run_layers(seg.layers, x[..., t.rows, t.cols], DecodeState(), True)
            oy, ox, th, tw = t.region
            out = y.new_empty(*y.shape[:3], H, W) if out is None else out
            out[..., t.at[0]:t.at[0] + th, t.at[1]:t.at[1] + tw] = y[..., oy:oy + th, ox:ox + tw]
        x = out
    return x


def test_statistics_are_whole_frame():
    """The tiled decode of a latent whose halves differ (a bright and a dark half) equals the
    untiled one; the same tiles and halos with per-tile statistics do not."""
    vae = tiny(seed=2)
    z = torch.randn(1, 16, 2, 4, 6, device=DEVICE)
    z[..., :3] += 3.0
    with torch.no_grad():
        full = vae.decode(z)
        tiled = vae.decode(z, tile=(4, 3))
        per_tile = _per_tile_statistics(vae, z, (4, 3))
    assert per_tile.shape == full.shape
    assert (tiled - full).abs().max().item() <= 1e-4
    assert (per_tile - full).abs().max().item() > 1e-2


def test_budget_picks_a_plan_that_fits():
    """A budget between the tiled and the untiled estimates picks tiles; the measured peak of
    that decode stays under the budget and under the untiled chunk-by-chunk decode's; the
    output equals the full decode. A large budget decodes all at once."""
    vae = tiny(seed=3)
    z = torch.randn(1, 16, 3, 12, 12, device=DEVICE)
    segs = vae_tiling.segments_of(vae.decoder)
    untiled = vae_tiling.estimate_bytes(segs, tuple(z.shape), 1, None, (False,) * 4, 4, True)
    tiled = vae_tiling.estimate_bytes(segs, tuple(z.shape), 1, (6, 6), (True,) * 4, 4, True, keep_inputs=False)
    assert tiled < untiled
    budget_gb = (tiled + untiled) / 2 / 2 ** 30
    plan = vae.plan_decode(z, max_memory_gb=budget_gb)
    assert plan.tile is not None and plan.chunk_frames is not None and any(plan.tiled)
    assert plan.estimate_bytes <= budget_gb * 2 ** 30
    with torch.no_grad():
        full = vae.decode(z)
        out = vae.decode(z, max_memory_gb=budget_gb)
        assert (out - full).abs().max().item() <= 1e-4
        measured = peak_bytes(lambda: vae.decode(z, max_memory_gb=budget_gb), DEVICE)
        chunked = peak_bytes(lambda: vae.decode(z, 1), DEVICE)
    assert 0 < measured <= budget_gb * 2 ** 30, (measured, budget_gb)
    assert measured < chunked, (measured, chunked)
    big = vae.plan_decode(z, max_memory_gb=64)
    assert big.chunk_frames is None and big.tile is None


def test_budget_too_small_says_what_it_needs():
    vae = tiny()
    z = torch.zeros(1, 16, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"max_memory_gb: 1e-06 GB is below the smallest estimated peak, "
                                         r"[0-9.]+ GB \(chunk_frames=1, tile="):
        vae.decode(z, max_memory_gb=1e-6)


ERRORS = [
    (dict(tile=(0, 2)), r"tile: expected two positive ints \(th, tw\) in latent pixels, got \(0, 2\)"),
    (dict(tile=4), "tile: expected two positive ints"),
    (dict(max_memory_gb=-1), "max_memory_gb: expected a positive number, got -1"),
    (dict(chunk_frames=0), "chunk_frames: expected a positive int, got 0"),
]


@pytest.mark.parametrize("kwargs, message", ERRORS, ids=[e[1][:24] for e in ERRORS])
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny().decode(torch.zeros(1, 16, 2, 4, 4, device=DEVICE), **kwargs)


def test_kept_inputs_equal_recomputed():
    """run_tiled keeping each tile's layer inputs between statistics passes (the default when it
    fits) and recomputing them (the planner's choice when the kept inputs do not fit) both equal
    the full decode over two chunks: each causal convolution updates its carried frames once
    per chunk either way."""
    from dataclasses import replace
    vae = tiny(seed=4)
    z = torch.randn(1, 16, 2, 8, 8, device=DEVICE)
    plan = vae.plan_decode(z, chunk_frames=1, tile=(4, 4))
    assert plan.keep_inputs and all(plan.tiled)
    zd = vae._denormalize_checked(z)
    with torch.no_grad():
        full = vae.decode(z)
        for p in (plan, replace(plan, keep_inputs=False)):
            out = torch.cat(list(vae._stream(zd, p)), dim=2)
            assert (out - full).abs().max().item() <= 1e-4
