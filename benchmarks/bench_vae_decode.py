"""Benchmarks of the video autoencoder's decode (sora_model/vae.py): frames per second and peak
tensor memory, full decode against the streaming (chunked causal) decode.

Providers:
  eager_full  the whole latent at once, GroupNorm + SiLU in plain PyTorch (the reference
              backend, forced through SORA_KERNELS_BACKEND): what an open video VAE does;
              contiguous tensors (vae.CPU_CHANNELS_LAST off), its faster layout on CPU: the
              reference GroupNorm's reshapes copy channels-last ones (5 frames: 0.67 s
              contiguous, 0.82 s channels-last);
  full        the whole latent at once with our kernels (group_norm_silu);
  streaming   decode_stream(chunk_frames=2) with our kernels, each chunk of frames turned
              into uint8 as it comes (memory bounded by the chunk);
  streaming_1 decode_stream(chunk_frames=1): the untiled decode at the tiled one's chunk, so that
              the two compare like for like (where tiled runs);
  tiled       decode_stream(chunk_frames=1, tile=half the frame each way): the exact
              spatial tiling (4 tiles, whole-frame GroupNorm statistics from statistics
              passes), what a memory budget picks when a frame does not fit. Run on the
              17-frame CPU workload and on the GPU one (its passes are slow on 2 cores).
Every provider ends with uint8 frames. The model is the "tiny" config with random weights
on CPU (speed does not depend on the weights), "small" on GPU. Rows: median ms per decode;
extra holds frames_per_s and peak_mb (peak tensor memory, sora_kernels.testing.memory).
GB/s is of the uint8 frames written, for the table only.
"""
import contextlib
import os
from unittest import mock

import pytest
import torch

from sora_kernels import backends as B
from sora_kernels.testing.memory import peak_bytes
from sora_model import vae as vae_module
from sora_model.vae import VideoAutoencoder, to_uint8_frames, vae_config

PROVIDERS = ["eager_full", "full", "streaming", "streaming_1", "tiled"]


def workloads(device: torch.device) -> dict:
    """name -> (video frames, height, width, config name)."""
    if device.type == "cuda":
        return {"129x720x1280": (129, 720, 1280, "small")}
    return {f"{t}x256x256": (t, 256, 256, "tiny") for t in (5, 17, 65)}


@contextlib.contextmanager
def forced_backend(name: str | None):
    old = os.environ.get(B.BACKEND_ENV)
    if name is not None:
        os.environ[B.BACKEND_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(B.BACKEND_ENV, None)
        else:
            os.environ[B.BACKEND_ENV] = old


def _decode(vae, z, provider):
    eager = provider == "eager_full"

    def run():
        with (torch.no_grad(), forced_backend("reference" if eager else None),
              mock.patch.object(vae_module, "CPU_CHANNELS_LAST", not eager)):
            if provider in ("streaming", "streaming_1", "tiled"):
                plan = {"streaming": dict(chunk_frames=2), "streaming_1": dict(chunk_frames=1),
                        "tiled": dict(chunk_frames=1, tile=(-(-z.shape[3] // 2), -(-z.shape[4] // 2)))}[provider]
                for chunk in vae.decode_stream(z, **plan):
                    for video in chunk:
                        to_uint8_frames(video)
            else:
                for video in vae.decode(z):
                    to_uint8_frames(video)
    return run


@pytest.mark.parametrize("workload", ["5x256x256", "17x256x256", "65x256x256", "129x720x1280"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_vae_decode(suite, benchmark, provider, workload):
    sizes = workloads(suite.device)
    if workload not in sizes:
        pytest.skip(f"{workload} is a {'CPU' if suite.device.type == 'cuda' else 'GPU'} workload")
    if provider in ("tiled", "streaming_1") and workload in ("5x256x256", "65x256x256"):
        pytest.skip(f"{provider} runs on one CPU workload (17 frames): the tiled decode's statistics passes take "
                    f"minutes on 2 cores, and streaming_1 is its like-for-like")
    T, H, W, config = sizes[workload]
    torch.manual_seed(0)
    vae = VideoAutoencoder(vae_config(config)).to(suite.device).eval()
    cfg = vae.cfg
    z = torch.randn(1, cfg.latent_channels, 1 + (T - 1) // cfg.temporal_compression, H // cfg.spatial_compression,
                    W // cfg.spatial_compression, device=suite.device)
    run = _decode(vae, z, provider)
    try:
        peak = peak_bytes(run, suite.device)
    except torch.cuda.OutOfMemoryError as e:  # what the streaming decode exists to avoid: a row, not a crash
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} ran out of GPU memory at {workload}: {str(e).splitlines()[0]}")
    rounds = 1 if suite.quick else (2 if T > 20 else 3)
    row = suite.run("vae_decode", "decode", provider, workload, run, T * H * W * 3, torch.float32, benchmark,
                    rounds=rounds, peak_mb=round(peak / 2**20, 1), config=config)
    row.extra["frames_per_s"] = round(T / (row.median_ms * 1e-3), 2)
    suite.write()
