"""Exact spatial tiling of the video decoder and the memory planner (sora_model/vae_tiling.py):
tiled equals untiled, the plan a budget picks keeps the measured peak under the budget, clear
errors."""
import itertools
import re

import pytest
import torch

from conftest import DEVICE
from sora_kernels.testing.memory import peak_bytes
from sora_model import vae as vae_module
from sora_model import vae_tiling
from sora_model.vae import GroupNormSiLU, VideoAutoencoder, inference_layout, vae_config

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


def test_every_pixel_is_written(monkeypatch):
    """With torch.use_deterministic_algorithms(True), torch.empty fills new tensors with NaN: the
    full, chunked, tiled and streamed decodes (which write into buffers they allocate empty)
    give the same bits as without it, so none leaves a pixel or a carried frame unwritten."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    vae = tiny(seed=2)
    z = torch.randn(1, 16, 3, 5, 7, device=DEVICE)

    def decodes():
        with torch.no_grad():
            return [vae.decode(z), vae.decode(z, 2), vae.decode(z, 2, tile=(2, 3)),
                    torch.cat(list(vae.decode_stream(z, tile=(3, 2))), dim=2)]
    expected = decodes()
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = decodes()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)

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
    untiled = _estimate(vae, z, 1)
    tiled = _estimate(vae, z, 1, (6, 6), (True,) * 4, keep_inputs=False)
    assert tiled < untiled
    budget_gb = (tiled + untiled) / 2 / 2 ** 30
    plan = vae.plan_decode(z, max_memory_gb=budget_gb)
    assert plan.tile is not None and plan.chunk_frames is not None and any(plan.tiled)
    assert plan.estimate_bytes <= budget_gb * 2 ** 30
    with torch.no_grad():
        full = vae.decode(z)
        out = vae.decode(z, max_memory_gb=budget_gb)
        assert (out - full).abs().max().item() <= 1e-4
        measured = peak_bytes(lambda: vae.decode(z, max_memory_gb=budget_gb), DEVICE, _resident(vae, z))
        chunked = peak_bytes(lambda: vae.decode(z, 1), DEVICE, _resident(vae, z))
    assert 0 < measured <= budget_gb * 2 ** 30, (measured, budget_gb)
    assert measured < chunked, (measured, chunked)
    big = vae.plan_decode(z, max_memory_gb=64)
    assert big.chunk_frames is None and big.tile is None


def small(seed=0):
    """The small config (the GPU one): 64 to 256 channels, 112 MB of decoder weights."""
    torch.manual_seed(seed)
    return VideoAutoencoder(vae_config("small")).to(DEVICE).eval()


def _channels_last(z):
    """Whether a decode of z without autograd (what a budget bounds) convolves channels-last."""
    return inference_layout(z.dtype, z.device) == torch.channels_last_3d


def _estimate(vae, z, chunk, tile=None, tiled=(False,) * 4, keep_inputs=True):
    segs = vae_tiling.segments_of(vae.decoder)
    return vae_tiling.estimate_bytes(segs, tuple(z.shape), chunk, tile, tiled, z.element_size(), True, keep_inputs,
                                     _channels_last(z))


def _resident(vae, z):
    """What a decode reads that exists before it: the decoder's weights and the latent. The
    budget counts them; peak_bytes counts them on CPU by itself and adds them on CUDA."""
    return [*vae.decoder.parameters(), *vae.decoder.buffers(), z]


def _decode_within(vae, z, budget, exact=False):
    """The plan `budget` bytes pick: its estimate, and the measured peak of decode(z,
    max_memory_gb=) (the decoder's weights and the latent included, on either device),
    within the budget; exact: the output equals the full decode."""
    gb = budget / 2 ** 30
    plan = vae.plan_decode(z, max_memory_gb=gb)
    assert plan.estimate_bytes <= budget
    with torch.no_grad():
        if exact:
            assert (vae.decode(z, max_memory_gb=gb) - vae.decode(z)).abs().max().item() <= 1e-4
        measured = peak_bytes(lambda: vae.decode(z, max_memory_gb=gb), DEVICE, _resident(vae, z))
    assert 0 < measured <= budget, (plan, measured, budget)
    return plan


@pytest.mark.parametrize("channels_last", [True, False])
def test_budget_small_batch_2_chunks(channels_last, monkeypatch):
    """small, batch 2: a budget just above the chunk-by-chunk decode's estimate picks it and
    the measured peak stays under. (The estimate calibrated on tiny left out the decoder's
    weights, which peak_bytes counts: 78 MB estimated, 170 MB measured here.) Both CPU
    layouts of the convolutions (vae.CPU_CHANNELS_LAST; on a GPU both are contiguous)."""
    monkeypatch.setattr(vae_module, "CPU_CHANNELS_LAST", channels_last)
    vae = small()
    z = torch.randn(2, 16, 4, 4, 6, device=DEVICE)
    plan = _decode_within(vae, z, 1.001 * _estimate(vae, z, 1))
    assert plan.chunk_frames == 1 and plan.tile is None


def test_budget_small_batch_2_tiles():
    """small, batch 2: a budget just above a tiled plan's estimate, below every untiled one's,
    picks tiles and the measured peak stays under."""
    vae = small()
    z = torch.randn(2, 16, 3, 8, 8, device=DEVICE)
    tiled = _estimate(vae, z, 1, (4, 4), (False, False, False, True))
    assert tiled < min(_estimate(vae, z, chunk) for chunk in (1, 2, 3))
    plan = _decode_within(vae, z, 1.001 * tiled)
    assert plan.tile is not None and any(plan.tiled) and plan.keep_inputs


def test_budget_error_reports_the_smallest_estimate():
    """The estimate a too-small budget's error reports is the smallest over every plan the
    planner tries (each chunk, tile and tiling of the segments): 1 MB above it a plan fits, 1 MB
    below it none does. (The greedy search reported its last estimate, 0.108 GB for this
    latent, while a budget of 0.08 GB found a plan.)"""
    vae = tiny()
    z = torch.zeros(1, 16, 5, 16, 24, device=DEVICE)
    with pytest.raises(ValueError, match="below the smallest estimated peak") as error:
        vae.plan_decode(z, max_memory_gb=0.001)
    smallest = float(re.search(r"peak, ([0-9.]+) GB", str(error.value)).group(1))
    plan = vae.plan_decode(z, max_memory_gb=smallest + 0.001)
    assert plan.estimate_bytes <= (smallest + 0.001) * 2 ** 30
    with pytest.raises(ValueError):
        vae.plan_decode(z, max_memory_gb=smallest - 0.001)
    segs = vae_tiling.segments_of(vae.decoder)
    best = min(vae_tiling.estimate_bytes(segs, tuple(z.shape), 1, (8, 6), tiled, 4, True, keep, _channels_last(z))
               for tiled in itertools.product((False, True), repeat=4) for keep in (False, True))
    assert smallest <= best / 2 ** 30 + 0.0005


def test_budget_tiles_each_axis():
    """Tile sizes are the product of each axis' sizes: a latent one pixel high gets (1, tw)
    tiles (zipping the axes' sizes paired h = 1 with the full width only, so no tiled plan was
    tried and this budget raised ValueError), a wide one full-height tiles."""
    vae = tiny(seed=5)
    z = torch.randn(1, 16, 3, 1, 96, device=DEVICE)
    untiled = min(_estimate(vae, z, chunk) for chunk in (1, 2, 3))
    tiled = _estimate(vae, z, 1, (1, 24), (False, False, False, True), keep_inputs=False)
    assert tiled < untiled
    plan = _decode_within(vae, z, (tiled + untiled) / 2, exact=True)
    assert plan.tile[0] == 1 and any(plan.tiled)
    z = torch.randn(1, 16, 2, 8, 24, device=DEVICE)
    tiled = _estimate(vae, z, 2, (8, 12), (False, False, False, True), keep_inputs=False)
    assert tiled < _estimate(vae, z, 2)
    assert vae.plan_decode(z, max_memory_gb=1.001 * tiled / 2 ** 30).tile[0] == 8


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
    (dict(max_memory_gb=True), "max_memory_gb: expected a positive number, got True"),
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
