"""End to end on the physics world: trains the tiny VAE, then the mini DiT on its latents,
samples videos of several sizes from captions, and measures them.

    python -m sora_model.e2e --out e2e/      # 800 VAE, 2500 DiT steps (pool 150): 4-7 min on 2 CPU cores

Steps:
  1. the VAE (sora_model.train_vae) on 9-frame 32x32 physics clips (three latent frames: trained
     on 5-frame clips, it decoded a clip's third latent frame as noise), at lr 2e-3 after a
     linear warm-up over its first 10% of steps (at a constant 1e-3, the seed-1 run's VAE lost
     the balls: benchmarks/results/e2e/README.md, "Seeds");
  2. its latent statistics (mean, std over 32 clips) into the config's shift_factor and
     scaling_factor, so the DiT sees latents of unit scale;
  3. the DiT (sora_model.train, the "mini" size: one token per latent pixel) on token-budget
     batches of clips of every size and duration, its captions through the pretrained MiniLM
     encoder (frozen; --text byte: the byte-level encoder, trained with the DiT, which the
     DiT learned to ignore: 0.8% between its error with right and with wrong captions at 1500
     steps, against 10% with MiniLM at 2500; benchmarks/results/e2e/README.md); the batches of
     the first 150 steps are encoded once and cycled through (--latent-pool: rendering and
     encoding a batch cost more than the mini DiT's step on a CPU, so the pool doubles the
     steps in the same time); its training timesteps' shift base is 64 tokens (the sampling's
     stays 256);
  4. samples of four sizes (three aspect ratios and an image) from captions of the world,
     written as GIFs; and an evaluation set: 72 world captions sampled at 9 x 32 x 48 by the
     trained pipeline and by the untrained one.

Metrics (metrics.json):
  - dit_loss_first / dit_loss_last: mean flow-matching loss of the first and last 10% of steps;
  - colour_distance_samples / _untrained / _noise / _data: the L1 distance between colour
    histograms (4 x 4 x 4 bins over RGB) of the samples' frames and of held-out world clips,
    against the same distance for the untrained pipeline's samples, for uniform noise frames
    and for a second set of world clips (the floor);
  - colour_distance_recon: the same distance for the VAE's reconstructions of the held-out
    clips (a reference: about what a DiT whose latents matched the world's would give), and
    colour_distance_samples_to_recon / _untrained_to_recon: the samples' and
    the untrained pipeline's distance to those reconstructions (the DiT's part, apart from the
    VAE's); colour_distance_eval_to_recon / _eval_untrained_to_recon: the same over the
    evaluation set's 72 samples of each pipeline;
  - ball_pixels_samples / _untrained / _data: the fraction of pixels near one of the five ball
    colours, in the samples, in the same pipeline's samples before training (the DiT at its
    adaLN-Zero start predicts nothing, so they are the starting noise decoded) and in held-out clips;
    ball_pixels_eval / _eval_untrained: the same over the evaluation set's 72 samples of each
    pipeline (over the 4 samples alone the untrained pipeline's fraction swings with the VAE's
    decoding of a few noise draws);
  - ball_motion_samples / _untrained / _data: how far down the frame the ball-coloured pixels'
    centroid moves over a clip (ball_motion: every world ball falls), over the evaluation set,
    the untrained pipeline's and the 72 world clips whose captions it used; ball_motion_recon:
    the VAE's reconstructions of those clips (what this VAE's blur leaves of their fall: a
    DiT whose latents matched the world's would score about this);
  - caption_errors: the flow-matching error on 48 held-out clips with their own captions,
    with each clip given another's, and with the null caption (a model that ignores its
    captions scores the three alike).

The VAE trains with MSE, not L1: on these frames L1 collapses to the background
(sora_model/train_vae.py, RECON_LOSSES).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from dataclasses import replace

import torch

from sora_model.physics_world import COLOURS, WorldConfig, physics_clips


EVAL_CLIPS = 72     # world captions in the evaluation set


def colour_histogram(frames: torch.Tensor, bins: int = 4) -> torch.Tensor:
    """Normalised histogram of RGB colours of uint8 frames [..., 3]: [bins ** 3]."""
    q = (frames.reshape(-1, 3).long() * bins) // 256
    index = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    h = torch.bincount(index, minlength=bins ** 3).float()
    return h / h.sum()


def ball_mask(frames: torch.Tensor, tolerance: float = 0.15) -> torch.Tensor:
    """The pixels of uint8 frames [..., 3] within `tolerance` (per channel) of a ball colour: [...]."""
    x = frames.float() / 255
    near = torch.zeros(x.shape[:-1], dtype=torch.bool)
    for rgb in COLOURS.values():
        near |= ((x - torch.tensor(rgb)).abs() < tolerance).all(-1)
    return near


def ball_pixels(frames: torch.Tensor, tolerance: float = 0.15) -> float:
    """Fraction of pixels of uint8 frames [..., 3] within `tolerance` (per channel) of a ball colour."""
    return ball_mask(frames, tolerance).float().mean().item()


def ball_motion(videos: list[torch.Tensor], min_pixels: int = 4) -> float:
    """Mean over uint8 videos [T, H, W, 3] of how far down the frame (in frame heights) the
    centroid of the ball-coloured pixels moves, from the first frame with at least min_pixels
    of them to the last (0 for a video with fewer than two such frames)."""
    total = 0.0
    for frames in videos:
        mask = ball_mask(frames).float()                                     # [T, H, W]
        rows = mask.sum(2)                                                   # [T, H]
        counts = rows.sum(1)
        seen = (counts >= min_pixels).nonzero().flatten()
        if len(seen) >= 2:
            y = (rows * torch.arange(mask.shape[1]).float()).sum(1) / counts.clamp(min=1) / mask.shape[1]
            total += (y[seen[-1]] - y[seen[0]]).item()
    return total / len(videos)


def first_last_tenths(losses: list[float]) -> tuple[float, float]:
    """Mean loss of the first and of the last 10% of a run's steps (at least one each)."""
    n = max(1, len(losses) // 10)
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def _pixels(videos) -> torch.Tensor:
    """The pixels of uint8 videos [..., 3], all in one [N, 3]."""
    return torch.cat([v.reshape(-1, 3) for v in videos])      # videos: any iterable


def _frames(video: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)


def normalise_latents(vae, clips) -> None:
    """Sets the VAE's shift_factor and scaling_factor from the latents of `clips` (mean, 1 / std)."""
    with torch.no_grad():
        z = torch.cat([vae.encoder(v[None]).chunk(2, dim=1)[0].flatten() for v in clips])
    vae.cfg = replace(vae.cfg, shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))


def caption_errors(model, vae, clips, seed: int = 0) -> dict:
    """How much the trained denoiser uses its captions: the mean flow-matching error on `clips`
    ((video, caption) pairs) with their own captions, with the captions shifted by one
    among them, and with the null caption; the same timesteps (0.3, 0.5, 0.7, 0.9) and noise
    for all three."""
    from sora_model.diffusion import flow_error
    from sora_model.train import encode
    latents, captions = encode(vae, [v for v, _ in clips], "cpu"), [c for _, c in clips]
    g = torch.Generator().manual_seed(seed)
    errors = {"own": 0.0, "shifted": 0.0, "null": 0.0}
    with torch.no_grad():
        for t in (0.3, 0.5, 0.7, 0.9):
            noise = [torch.randn(z.shape, generator=g) for z in latents]
            for name, caps, drop in (("own", captions, False), ("shifted", captions[1:] + captions[:1], False),
                                     ("null", captions, True)):
                text = model.text(caps, drop=torch.full((len(caps),), drop))
                errors[name] += flow_error(lambda x, tt, _: model.dit(x, tt, text), latents, None,
                                           torch.full((len(latents),), t), noise).item()
    count = 4 * sum(z.numel() for z in latents)
    return {name: e / count for name, e in errors.items()}


def run(out: str, vae_steps: int = 800, dit_steps: int = 2500, seed: int = 0, progress: bool = True,
        latent_pool: int = 150, text: str = "minilm") -> dict:
    from sora_model import train as dit_train
    from sora_model import train_vae
    from sora_model.sample import generate
    from sora_model.video_io import write_video
    os.makedirs(out, exist_ok=True)
    vae_path = os.path.join(out, "vae.safetensors")
    args = train_vae.parse_args(["--config", "tiny", "--data", "physics", "--frames", "9", "--size", "32",
                                 "--batch", "4", "--steps", str(vae_steps), "--lr", "2e-3",
                                 "--warmup", str(vae_steps // 10), "--recon", "mse", "--out", vae_path,
                                 "--device", "cpu", "--seed", str(seed), "--save-every", str(vae_steps)]
                                + ([] if progress else ["--no-progress"]))
    vae_losses = train_vae.train(args)
    vae = train_vae.load_checkpoint(vae_path).eval()
    held_out = [v for v, _ in itertools.islice(physics_clips(WorldConfig(), seed=seed + 101), 32)]
    normalise_latents(vae, held_out)
    train_vae.save_checkpoint(vae_path, vae, vae_steps)

    # max_tokens = budget: every world clip whole (the largest, 13 x 48 x 48 frames, is 144 tokens)
    # shift_base_tokens 64: the world's clips (16-144 tokens) train nearer the unshifted
    # schedule than at the default 256, where every clip trained shifted away from noise; the
    # sampling keeps its default base (256: at 64 and 16 the metrics moved within their noise)
    cfg = dit_train.TrainConfig(dit="mini", steps=dit_steps, lr=1e-3, budget=256, max_tokens=256, seed=seed,
                                save_every=dit_steps, ema=0.99, latent_pool=latent_pool, text=text,
                                shift_base_tokens=64)
    run_dir = os.path.join(out, "run")
    dit_losses = dit_train.train(cfg, vae, run_dir, progress=progress)

    from sora_model.sample import load_run
    model = load_run(run_dir)
    captions = [c for _, c in itertools.islice(physics_clips(WorldConfig(), seed=seed + 202), 4)]
    sizes = [(9, 32, 48), (9, 48, 32), (9, 32, 64), (1, 48, 48)]
    videos = generate(model, vae, captions, sizes, steps=20, guidance=3.0, seed=seed)
    # The same pipeline before training: adaLN-Zero's DiT predicts v = 0, so its samples are
    # the sampler's starting noise through the VAE (which alone already gives world-like colours).
    torch.manual_seed(seed)
    blank = dit_train.make_denoiser(cfg).eval()
    untrained = generate(blank, vae, captions, sizes, steps=20, guidance=3.0, seed=seed)
    # the evaluation set: 72 world clips of 9 frames or more, their captions sampled at one size
    # (24 gave ball motion 0.11, 0.17 and 0.15 over three sets of captions for one trained
    # pipeline: benchmarks/results/e2e/README.md)
    world = list(itertools.islice(((v, c) for v, c in physics_clips(WorldConfig(), seed=seed + 505)
                                   if v.shape[1] >= 9), EVAL_CLIPS))
    eval_sizes = [(9, 32, 48)] * len(world)
    evaluated = generate(model, vae, [c for _, c in world], eval_sizes, steps=20, guidance=3.0, seed=seed + 1)
    evaluated_untrained = generate(blank, vae, [c for _, c in world], eval_sizes, steps=20, guidance=3.0,
                                   seed=seed + 1)
    for i, (frames, caption) in enumerate(zip(videos, captions)):
        write_video(os.path.join(out, f"sample_{i}.gif"), frames, fps=WorldConfig().fps)
        with open(os.path.join(out, f"sample_{i}.txt"), "w") as f:
            f.write(caption + "\n")

    data = _pixels(_frames(v) for v in held_out)
    with torch.no_grad():   # what a DiT that matched the world's latents would give: their decoding
        recon = _pixels(_frames(vae.decode(vae.encode(v[None]).mode())[0]) for v in held_out)
        world_recon = [_frames(vae.decode(vae.encode(v[None, :, :9]).mode())[0]) for v, _ in world]
    other = _pixels(_frames(v) for v, _ in itertools.islice(physics_clips(WorldConfig(), seed=seed + 303), 32))
    samples, before = _pixels(videos), _pixels(untrained)
    noise = torch.randint(0, 256, samples.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    h_data, h_recon = colour_histogram(data), colour_histogram(recon)
    h_samples, h_before = colour_histogram(samples), colour_histogram(before)
    h_eval, h_eval_before = colour_histogram(_pixels(evaluated)), colour_histogram(_pixels(evaluated_untrained))
    vae_first, vae_last = first_last_tenths(vae_losses)
    dit_first, dit_last = first_last_tenths(dit_losses)
    metrics = {
        "vae_steps": vae_steps, "dit_steps": dit_steps, "latent_pool": latent_pool, "text": text,
        "vae_loss_first": vae_first, "vae_loss_last": vae_last,
        "dit_loss_first": dit_first, "dit_loss_last": dit_last,
        "colour_distance_samples": (h_samples - h_data).abs().sum().item(),
        "colour_distance_untrained": (h_before - h_data).abs().sum().item(),
        "colour_distance_noise": (colour_histogram(noise) - h_data).abs().sum().item(),
        "colour_distance_data": (colour_histogram(other) - h_data).abs().sum().item(),
        "colour_distance_recon": (h_recon - h_data).abs().sum().item(),
        "colour_distance_samples_to_recon": (h_samples - h_recon).abs().sum().item(),
        "colour_distance_untrained_to_recon": (h_before - h_recon).abs().sum().item(),
        "colour_distance_eval_to_recon": (h_eval - h_recon).abs().sum().item(),
        "colour_distance_eval_untrained_to_recon": (h_eval_before - h_recon).abs().sum().item(),
        "ball_pixels_samples": ball_pixels(samples), "ball_pixels_untrained": ball_pixels(before),
        "ball_pixels_data": ball_pixels(data),
        "ball_pixels_eval": ball_pixels(_pixels(evaluated)),
        "ball_pixels_eval_untrained": ball_pixels(_pixels(evaluated_untrained)),
        "ball_motion_samples": ball_motion(evaluated), "ball_motion_untrained": ball_motion(evaluated_untrained),
        "ball_motion_data": ball_motion([_frames(v)[:9] for v, _ in world]),
        "ball_motion_recon": ball_motion(world_recon),
        "caption_errors": caption_errors(model, vae, list(itertools.islice(physics_clips(WorldConfig(),
                                                                                       seed=seed + 404), 48)), seed),
        "captions": captions, "sizes": sizes,
    }
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="e2e")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--dit-steps", type=int, default=2500)
    p.add_argument("--latent-pool", type=int, default=150, help="DiT steps whose clips are encoded once and reused")
    p.add_argument("--text", default="minilm", choices=["minilm", "byte"],
                   help="the DiT's text encoder: pretrained MiniLM (frozen; make installs its weights) or the "
                        "byte-level one trained with the DiT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(run(a.out, a.vae_steps, a.dit_steps, a.seed, not a.no_progress, a.latent_pool, a.text),
                     indent=1))


if __name__ == "__main__":
    main()
