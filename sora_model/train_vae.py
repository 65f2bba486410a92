"""Trains the video autoencoder: reconstruction (L1, or MSE with --recon mse) + KL (+ an
optional adversarial term), checkpoints in safetensors.

    python -m sora_model.train_vae --config tiny --data synthetic --frames 9 --size 64 --steps 200 \
        --out vae.safetensors
    python -m sora_model.train_vae --data path/to/videos ...      # any container FFmpeg reads
    python -m sora_model.train_vae ... --adv-weight 0.1 --adv-start 5000   # with a 3D PatchGAN

The adversarial term (sora_model/discriminator.py) is off by default (--adv-weight 0). From
step --adv-start the decoder also minimises adv_weight * -D(reconstruction), and the
discriminator takes one hinge-loss step per training step. Checkpoints hold the autoencoder
only.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from sora_model.data import folder_videos, synthetic_videos
from sora_model.physics_world import WorldConfig, physics_clips
from sora_model.discriminator import PatchDiscriminator3D, discriminator_hinge_loss, generator_hinge_loss
from sora_model.vae import SIZES, VAEConfig, VideoAutoencoder, vae_config


# Reconstruction losses. L1 is the usual choice (sharper than MSE). On the physics world
# (balls covering ~3% of a dark, plain frame) it collapses: within 25 steps the decoder outputs
# the background whatever the latent (reconstructions vary across clips by 0.002 against the
# data's 0.10), because the per-pixel median of frames with rare small objects is the
# background and L1's gradient does not grow with the error. MSE escapes (0.077 by step 100)
# and the balls' shapes and positions are reconstructed in 300 steps (docs/NOTES-vae.md).
RECON_LOSSES = {
    "l1": lambda recon, video: (recon - video).abs().mean(),
    "mse": lambda recon, video: (recon - video).pow(2).mean(),
}


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
    p.add_argument("--data", default="synthetic",
                   help='"synthetic" (moving squares), "physics" (the physics world) or a folder of video files')
    p.add_argument("--frames", type=int, default=9, help="frames per clip: 1 + 4k")
    p.add_argument("--size", type=int, default=64, help="crop size (square), divisible by 8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--recon", default="l1", choices=["l1", "mse"],
                   help="reconstruction loss: l1 (the default) or mse (for scenes of small objects on a "
                        "plain background, where l1 first settles on the background: see RECON_LOSSES)")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--adv-weight", type=float, default=0.0, help="weight of the adversarial term (0: off)")
    p.add_argument("--adv-start", type=int, default=0, help="first step with the adversarial term")
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
    if args.adv_weight < 0:
        p.error(f"--adv-weight: expected >= 0, got {args.adv_weight}")
    return args


def train(args, discriminator: PatchDiscriminator3D | None = None) -> list[float]:
    """Runs the training; returns the loss of every step (the autoencoder's: reconstruction +
    KL, + the weighted generator term once it is on). With --adv-weight > 0 a discriminator is made
    unless one is given (its weights are updated in place)."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    vae = VideoAutoencoder(vae_config(args.config)).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    adversarial = args.adv_weight > 0
    if adversarial:
        disc = (discriminator or PatchDiscriminator3D()).to(device).train()
        opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=0.0)
    if args.data == "synthetic":
        data = synthetic_videos(args.frames, args.size, args.size, args.seed)
    elif args.data == "physics":
        world = WorldConfig(frames=(args.frames,), sizes=((args.size, args.size),))
        data = (video for video, _ in physics_clips(world, args.seed))
    else:
        data = folder_videos(args.data, args.frames, args.size, args.size, args.seed)
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
        rec = RECON_LOSSES[args.recon](recon, video)
        kl = posterior.kl()
        loss = rec + args.kl_weight * kl
        adv_on = adversarial and step >= args.adv_start
        if adv_on:
            for p in disc.parameters():       # the generator term's gradient goes to the VAE only
                p.requires_grad_(False)
            g_loss = generator_hinge_loss(disc(recon))
            loss = loss + args.adv_weight * g_loss
            for p in disc.parameters():
                p.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = {args.recon: f"{rec.item():.4f}", "kl": f"{kl.item():.1f}"}
        if adv_on:
            d_loss = discriminator_hinge_loss(disc(video), disc(recon.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            stats.update(g=f"{g_loss.item():.3f}", d=f"{d_loss.item():.3f}")
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(**stats)
        elif step % max(1, args.steps // 10) == 0:
            print(f"step {step}/{args.steps} " + " ".join(f"{k} {v}" for k, v in stats.items()), file=sys.stderr)
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(args.out, vae, step)
    return losses


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
