"""Samples videos and images of any sizes from a trained run, all in one packed batch, and
writes them through the autoencoder's streaming decode.

    sora-sample --run run/ --vae vae.safetensors --prompt "a small red ball falls" \
        --size 13x64x96 --size 1x64x64 --size 9x96x48 --steps 30 --guidance 4 --out samples/

--size is FRAMES x HEIGHT x WIDTH in pixels (frames 1 + 4k; height and width multiples of 16):
each gives one output, an image when FRAMES is 1. One --prompt for all, or one per --size.
Each output is written as MP4 and GIF (an image as a 1-frame one), its prompt beside it in a
.txt. The EMA weights are used unless --no-ema. A progress bar counts the sampling steps
unless --no-progress.
"""
from __future__ import annotations

import argparse
import json
import os
import re

import torch

from sora_model.diffusion import sample
from sora_model.dit import DiT
from sora_model.train import Denoiser, TrainConfig, make_denoiser
from sora_model.vae import to_uint8_frames


def parse_size(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--size: expected FRAMESxHEIGHTxWIDTH, got {text!r}")
    T, H, W = map(int, m.groups())
    if T < 1 or (T - 1) % 4:
        raise argparse.ArgumentTypeError(f"--size {text}: frames must be 1 + 4k, got {T}")
    if H % 16 or W % 16 or not H or not W:
        raise argparse.ArgumentTypeError(f"--size {text}: height and width must be positive multiples of 16")
    return T, H, W


def load_run(run: str, ema: bool = True, device: str | torch.device = "cpu") -> Denoiser:
    """The denoiser of a training run's checkpoint (its EMA DiT weights when ema)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = os.path.join(run, "checkpoint.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"run: no checkpoint.safetensors in {run!r}")
    with safe_open(path, framework="pt") as f:
        cfg = TrainConfig(**json.loads(f.metadata()["config"]))
    model = make_denoiser(cfg)
    state = load_file(path)
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    if ema:
        model.dit.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
    return model.to(device).eval()


@torch.no_grad()
def generate(model: Denoiser, vae, prompts: list[str], sizes: list[tuple[int, int, int]], *, steps: int = 30,
             guidance: float = 4.0, method: str = "heun", seed: int = 0, progress: bool = False) -> list[torch.Tensor]:
    """uint8 frames [T, H, W, 3] for each (prompt, pixel size), sampled as one packed batch
    (with a progress bar over the sampling steps when progress)."""
    dit: DiT = model.dit
    device = dit.patch_embed.device
    tc, sc = vae.cfg.temporal_compression, vae.cfg.spatial_compression
    shapes = [(dit.cfg.in_channels, 1 + (T - 1) // tc, H // sc, W // sc) for T, H, W in sizes]
    text = model.text(prompts)
    # bf16 autocast on a GPU, as in training: the attention kernels run bf16 and fp16 (in
    # float32 a GPU falls back to the reference attention)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        latents = sample(dit, shapes, text, dit.cfg.patch_size, null=model.text.null(len(prompts)),
                         guidance=guidance, steps=steps, method=method, generator=torch.Generator().manual_seed(seed),
                         device=device, progress=progress)
    videos = []
    for z in latents:
        chunks = [to_uint8_frames(c) for c in vae.decode_stream(z[None], chunk_frames=2)]
        videos.append(torch.cat(chunks, dim=0).cpu())
    return videos


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a sora-train output folder")
    p.add_argument("--vae", required=True, help="the train_vae checkpoint the run was trained with")
    p.add_argument("--prompt", action="append", required=True, help="one for all sizes, or one per --size")
    p.add_argument("--size", action="append", type=parse_size, required=True, help="FRAMESxHEIGHTxWIDTH")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--method", default="heun", choices=["euler", "heun"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--out", default="samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if len(args.prompt) not in (1, len(args.size)):
        p.error(f"--prompt: expected one, or one per --size ({len(args.size)}), got {len(args.prompt)}")
    return args


def main(argv=None) -> list[str]:
    """Writes <out>/sample_<i>.mp4 and .gif for each size; returns the paths."""
    args = parse_args(argv)
    from sora_model.train_vae import load_checkpoint
    from sora_model.video_io import _av, write_video
    _av()  # without PyAV, say so before sampling rather than after
    model = load_run(args.run, ema=not args.no_ema, device=args.device)
    vae = load_checkpoint(args.vae, args.device).eval()
    prompts = args.prompt * len(args.size) if len(args.prompt) == 1 else args.prompt
    videos = generate(model, vae, prompts, args.size, steps=args.steps, guidance=args.guidance, method=args.method,
                      seed=args.seed, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    paths = []
    for i, (frames, prompt) in enumerate(zip(videos, prompts)):
        for ext in ("mp4", "gif"):
            path = os.path.join(args.out, f"sample_{i}.{ext}")
            write_video(path, frames, fps=args.fps)
            paths.append(path)
        with open(os.path.join(args.out, f"sample_{i}.txt"), "w") as f:
            f.write(prompt + "\n")
    return paths


if __name__ == "__main__":
    main()
