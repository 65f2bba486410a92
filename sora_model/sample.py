"""Samples videos and images of any sizes from a trained run, all in one packed batch, and
writes them through the autoencoder's streaming decode.

    sora-sample --run run/ --vae vae.safetensors --prompt "a small red ball falls" \
        --size 13x64x96 --size 1x64x64 --size 9x96x48 --steps 30 --guidance 4 --out samples/

--size is FRAMES x HEIGHT x WIDTH in pixels: frames 1 + t*k, height and width multiples of s*p,
with t and s the VAE's temporal and spatial compression and p the DiT's patch (size_problem):
1 + 4k and multiples of 16 for the tiny, small and base VAEs with a patch-2 DiT (tiny, S, B,
...), multiples of 8 with the patch-1 mini. Each gives one output, an image when FRAMES is 1.
One --prompt for all, or one per --size.
Each output is written as MP4 and GIF (an image as a 1-frame one), its prompt beside it in a
.txt, chunk by chunk as the streaming decode yields frames (the whole video is never held).
--max-memory-gb bounds the decode's estimated peak (chunk and tile sizes chosen for it; an
error before sampling when no plan fits). The EMA weights are used unless --no-ema. A
progress bar counts the sampling steps unless --no-progress. --shift-base-tokens sets the
sampling schedule's timestep shift (256 by default), apart from the one the run trained with.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from typing import Iterator

import torch

from sora_model.checks import is_int
from sora_model.diffusion import FlowConfig, sample
from sora_model.dit import DiT
from sora_model.train import VAE_FIELDS, Denoiser, TrainConfig, make_denoiser, text_problem, vae_fields
from sora_model.vae import VAEConfig, to_uint8_frames


def parse_size(text: str) -> tuple[int, int, int]:
    """FRAMESxHEIGHTxWIDTH, positive; which sizes the VAE and the DiT take is size_problem's
    (they are known once the run and the VAE are loaded)."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--size: expected FRAMESxHEIGHTxWIDTH, got {text!r}")
    T, H, W = map(int, m.groups())
    if not T or not H or not W:
        raise argparse.ArgumentTypeError(f"--size {text}: expected positive frames, height and width")
    return T, H, W


def size_problem(size: tuple[int, int, int], vae: VAEConfig, patch_size) -> str | None:
    """Why a pixel size (T, H, W) cannot be sampled with this VAE and DiT patch, or None. The
    latent is [C, 1 + (T - 1) / t, H / s, W / s] (t, s: the VAE's temporal and spatial
    compression), and the DiT's patch (pt, ph, pw) must divide it: frames 1 + t*k with 1 + k a
    multiple of pt, H a multiple of s*ph, W of s*pw."""
    T, H, W = size
    tc, sc = vae.temporal_compression, vae.spatial_compression
    pt, ph, pw = patch_size
    if T < 1 or (T - 1) % tc:
        return f"frames must be 1 + {tc}k (the VAE's temporal compression is {tc}), got {T}"
    if (1 + (T - 1) // tc) % pt:
        return (f"frames must be 1 + {tc}k with 1 + k a multiple of {pt} (the DiT's patch takes {pt} latent frames), "
                f"got {T}: {1 + (T - 1) // tc} latent frames")
    for name, n, p in (("height", H, ph), ("width", W, pw)):
        if n < 1 or n % (sc * p):
            return (f"{name} must be a positive multiple of {sc * p} (the VAE's spatial compression {sc} x the DiT's "
                    f"patch {p}), got {n}")
    return None


def check_sizes(sizes, vae: VAEConfig, patch_size, names: list[str]) -> None:
    """ValueError naming the first size (by its name in `names`) that size_problem refuses."""
    for name, size in zip(names, sizes):
        why = size_problem(size, vae, patch_size)
        if why:
            raise ValueError(f"{name}: {why}")


def run_config(run: str) -> TrainConfig:
    """The TrainConfig a training run's checkpoint was written with."""
    from safetensors import safe_open
    path = os.path.join(run, "checkpoint.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"run: no checkpoint.safetensors in {run!r}")
    with safe_open(path, framework="pt") as f:
        return TrainConfig(**json.loads(f.metadata()["config"]))


def load_run(run: str, ema: bool = True, device: str | torch.device = "cpu") -> Denoiser:
    """The denoiser of a training run's checkpoint (its EMA DiT weights when ema). Reads the
    model's and the EMA's tensors only, not AdamW's moments (twice the model)."""
    from safetensors import safe_open
    path = os.path.join(run, "checkpoint.safetensors")
    cfg = run_config(run)
    why = text_problem(cfg.text)          # "hf:<folder>": the encoder is rebuilt from the folder's weights
    if why:
        raise ValueError(f"run: the text encoder {run!r} was trained with cannot be rebuilt here: {why}")
    model = make_denoiser(cfg)
    wanted = ("model.", "ema.") if ema else ("model.",)
    with safe_open(path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)}
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    if ema:
        model.dit.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
    return model.to(device).eval()


@torch.no_grad()
def sample_latents(model: Denoiser, vae, prompts: list[str], sizes: list[tuple[int, int, int]], *, steps: int = 30,
                   guidance: float = 4.0, method: str = "heun", seed: int = 0, progress: bool = False,
                   shift_base_tokens: int = FlowConfig.base_tokens) -> list[torch.Tensor]:
    """Latents [C, t, h, w] for each (prompt, pixel size), sampled as one packed batch (with a
    progress bar over the sampling steps when progress). Each video walks the schedule shifted
    by s = sqrt(its tokens / shift_base_tokens), whatever its run trained with (TrainConfig's
    field of that name)."""
    if not is_int(shift_base_tokens) or shift_base_tokens < 1:
        raise ValueError(f"shift_base_tokens: expected a positive int (latent tokens), got {shift_base_tokens!r}")
    dit: DiT = model.dit
    device = dit.patch_embed.device
    check_sizes(sizes, vae.cfg, dit.cfg.patch_size, [f"sizes[{i}]" for i in range(len(sizes))])
    shapes = [latent_shape(size, vae.cfg, dit.cfg.in_channels) for size in sizes]
    text = model.text(prompts)
    # bf16 autocast on a GPU, as in training: the attention kernels run bf16 and fp16 (in
    # float32 a GPU falls back to the reference attention)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        return sample(dit, shapes, text, dit.cfg.patch_size, null=model.text.null(len(prompts)), guidance=guidance,
                      steps=steps, method=method, cfg=FlowConfig(base_tokens=shift_base_tokens),
                      generator=torch.Generator().manual_seed(seed), device=device, progress=progress)


def latent_shape(size: tuple[int, int, int], vae: VAEConfig, channels: int) -> tuple[int, int, int, int]:
    """[C, t, h, w] of the latent of a (frames, height, width) pixel size."""
    T, H, W = size
    tc, sc = vae.temporal_compression, vae.spatial_compression
    return channels, 1 + (T - 1) // tc, H // sc, W // sc


def decode_frames(vae, z: torch.Tensor, max_memory_gb: float | None = None) -> Iterator[torch.Tensor]:
    """uint8 frames [t, H, W, 3] of latent z [C, t, h, w], chunk by chunk (decode_stream: 2
    latent frames a chunk; with max_memory_gb, the chunk and tile sizes whose estimated peak
    fits it), on the CPU. Each chunk is decoded without autograd (with it, every chunk's graph
    would live on through the carried frames), and the caller's grad mode is left alone
    between chunks."""
    with torch.no_grad():
        stream = vae.decode_stream(z[None], chunk_frames=None if max_memory_gb is not None else 2,
                                   max_memory_gb=max_memory_gb)
    while True:
        with torch.no_grad():
            chunk = next(stream, None)
            if chunk is None:
                return
            frames = to_uint8_frames(chunk[0]).cpu()
            del chunk
        yield frames


def check_decode_budget(vae, shapes: list[tuple[int, int, int, int]], max_memory_gb: float | None,
                        names: list[str]) -> None:
    """decode_stream's plan for each latent shape within max_memory_gb, found before sampling
    (its ValueError names the budget, the smallest estimate and the size, by `names`)."""
    if max_memory_gb is None:
        return
    dtype = next(vae.parameters()).dtype
    for shape, name in zip(shapes, names):
        try:
            vae.plan_decode(torch.empty(1, *shape, dtype=dtype, device="meta"), None, None, max_memory_gb,
                            keep_output=False)
        except ValueError as e:
            raise ValueError(f"{e} ({name})") from e


@torch.no_grad()
def generate(model: Denoiser, vae, prompts: list[str], sizes: list[tuple[int, int, int]], *, steps: int = 30,
             guidance: float = 4.0, method: str = "heun", seed: int = 0, progress: bool = False,
             max_memory_gb: float | None = None, shift_base_tokens: int = FlowConfig.base_tokens
             ) -> list[torch.Tensor]:
    """uint8 frames [T, H, W, 3] for each (prompt, pixel size): sample_latents, then
    decode_frames (max_memory_gb bounds the decode)."""
    names = [f"sizes[{i}]" for i in range(len(sizes))]
    check_sizes(sizes, vae.cfg, model.dit.cfg.patch_size, names)
    check_decode_budget(vae, [latent_shape(size, vae.cfg, model.dit.cfg.in_channels) for size in sizes], max_memory_gb,
                        names)
    latents = sample_latents(model, vae, prompts, sizes, steps=steps, guidance=guidance, method=method, seed=seed,
                             progress=progress, shift_base_tokens=shift_base_tokens)
    return [torch.cat(list(decode_frames(vae, z, max_memory_gb))) for z in latents]


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
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="bound the decode's estimated peak (GB): chunk and tile sizes chosen to fit")
    p.add_argument("--shift-base-tokens", type=int, default=FlowConfig.base_tokens, metavar="N",
                   help="the sampling schedule's shift base: videos of more latent tokens than N spend more of "
                        "the steps at high noise, s = sqrt(tokens / N); need not be the run's training one")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: expected a positive int, got {args.steps}")
    if not math.isfinite(args.guidance):
        p.error(f"--guidance: expected a finite number, got {args.guidance}")
    if args.shift_base_tokens < 1:
        p.error(f"--shift-base-tokens: expected a positive int (latent tokens), got {args.shift_base_tokens}")
    if args.max_memory_gb is not None and not 0 < args.max_memory_gb < float("inf"):
        p.error(f"--max-memory-gb: expected a positive number of GB, got {args.max_memory_gb}")
    if not 0 < args.fps < float("inf"):
        p.error(f"--fps: expected a positive finite number, got {args.fps}")
    if len(args.prompt) not in (1, len(args.size)):
        p.error(f"--prompt: expected one, or one per --size ({len(args.size)}), got {len(args.prompt)}")
    return args


def main(argv=None) -> list[str]:
    """Writes <out>/sample_<i>.mp4 and .gif for each size, as the decode streams; returns the paths."""
    args = parse_args(argv)
    from sora_model.train_vae import load_checkpoint
    from sora_model.video_io import _av, VideoWriter
    _av()  # without PyAV, say so before sampling rather than after
    cfg = run_config(args.run)
    vae = load_checkpoint(args.vae, args.device).eval()
    trained, given = tuple(getattr(cfg, name) for name in VAE_FIELDS), tuple(vae_fields(vae.cfg).values())
    if given != trained:
        raise ValueError(f"--vae: expected a VAE of the run's (temporal compression, spatial compression, latent "
                         f"channels) = {trained}, got {given}")
    model = load_run(args.run, ema=not args.no_ema, device=args.device)
    names = [f"--size {T}x{H}x{W}" for T, H, W in args.size]
    check_sizes(args.size, vae.cfg, model.dit.cfg.patch_size, names)
    try:
        check_decode_budget(vae, [latent_shape(s, vae.cfg, model.dit.cfg.in_channels) for s in args.size],
                            args.max_memory_gb, names)
    except ValueError as e:
        raise ValueError(str(e).replace("max_memory_gb:", "--max-memory-gb:", 1)) from e
    prompts = args.prompt * len(args.size) if len(args.prompt) == 1 else args.prompt
    latents = sample_latents(model, vae, prompts, args.size, steps=args.steps, guidance=args.guidance,
                             method=args.method, seed=args.seed, progress=not args.no_progress,
                             shift_base_tokens=args.shift_base_tokens)
    os.makedirs(args.out, exist_ok=True)
    paths = []
    for i, (z, prompt) in enumerate(zip(latents, prompts)):
        files = [os.path.join(args.out, f"sample_{i}.{ext}") for ext in ("mp4", "gif")]
        parts = [os.path.join(args.out, f"sample_{i}.partial.{ext}") for ext in ("mp4", "gif")]
        try:     # written under .partial names, renamed once whole: a failed decode leaves no sample
            with contextlib.ExitStack() as writers:
                opened = [writers.enter_context(VideoWriter(part, fps=args.fps)) for part in parts]
                for frames in decode_frames(vae, z, args.max_memory_gb):
                    for writer in opened:
                        writer.write(frames)
        except BaseException:
            for part in parts:
                if os.path.exists(part):
                    os.remove(part)
            raise
        for part, path in zip(parts, files):
            os.replace(part, path)
        paths += files
        with open(os.path.join(args.out, f"sample_{i}.txt"), "w") as f:
            f.write(prompt + "\n")
    return paths


if __name__ == "__main__":
    main()
