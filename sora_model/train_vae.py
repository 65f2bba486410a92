"""Trains the video autoencoder: reconstruction L1 + KL, checkpoints in safetensors.

    python -m sora_model.train_vae --config tiny --data synthetic --frames 9 --size 64 --steps 200 \
        --out vae.safetensors
    python -m sora_model.train_vae --data path/to/videos ...      # any container FFmpeg reads

(The optional adversarial term of issue 5 is not written yet.)
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from sora_model.data import folder_videos, synthetic_videos
from sora_model.vae import SIZES, VAEConfig, VideoAutoencoder, vae_config


def save_checkpoint(path: str, vae: VideoAutoencoder, step: int) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    save_file(state, path, metadata={"config": json.dumps(asdict(vae.cfg)), "step": str(step)})


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> VideoAutoencoder:
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    fields = json.loads(meta["config"])
    cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    vae = VideoAutoencoder(cfg)
    vae.load_state_dict(load_file(path, device="cpu"))
    return vae.to(device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", choices=sorted(SIZES))
    p.add_argument("--data", default="synthetic", help='"synthetic" or a folder of video files')
    p.add_argument("--frames", type=int, default=9, help="frames per clip: 1 + 4k")
    p.add_argument("--size", type=int, default=64, help="crop size (square), divisible by 8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--out", default="vae.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs every 10%% instead)")
    args = p.parse_args(argv)
    if args.frames < 1 or (args.frames - 1) % 4:
        p.error(f"--frames: expected 1 + 4k, got {args.frames}")
    if args.size % 8:
        p.error(f"--size: expected a multiple of 8, got {args.size}")
    return args


def train(args) -> list[float]:
    """Runs the training; returns the loss of every step."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    vae = VideoAutoencoder(vae_config(args.config)).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    data = (synthetic_videos(args.frames, args.size, args.size, args.seed) if args.data == "synthetic"
            else folder_videos(args.data, args.frames, args.size, args.size, args.seed))
    losses = []
    steps = range(1, args.steps + 1)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(steps, desc="train_vae", unit="step", file=sys.stderr)
        steps = bar
    for step in steps:
        video = torch.stack([next(data) for _ in range(args.batch)]).to(device)
        recon, posterior = vae(video)
        l1 = (recon - video).abs().mean()
        kl = posterior.kl()
        loss = l1 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.1f}")
        elif step % max(1, args.steps // 10) == 0:
            print(f"step {step}/{args.steps} l1 {l1.item():.4f} kl {kl.item():.1f}", file=sys.stderr)
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(args.out, vae, step)
    return losses


if __name__ == "__main__":
    train(parse_args())
