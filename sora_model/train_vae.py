"""Trains the video autoencoder: reconstruction (L1, or MSE with --recon mse) + KL (+ an
optional adversarial term), checkpoints in safetensors.

    python -m sora_model.train_vae --config tiny --data synthetic --frames 9 --size 64 --steps 200 \
        --out vae.safetensors
    python -m sora_model.train_vae --data path/to/videos ...      # any container FFmpeg reads
    python -m sora_model.train_vae ... --adv-weight 0.1 --adv-start 5000   # with a 3D PatchGAN

--warmup N raises the autoencoder's learning rate linearly to --lr over the first N steps (a
function of the step, so a resumed run continues it). On the physics world it lets a higher
rate train without settling on the background (benchmarks/results/e2e/README.md, "VAE learning
rate").

The adversarial term (sora_model/discriminator.py) is off by default (--adv-weight 0). From
step --adv-start the decoder also minimises adv_weight * -D(reconstruction), and the
discriminator takes one hinge-loss step per training step.

Checkpoints (--out, one safetensors file) hold the autoencoder's weights under their own names
(encoder.*, decoder.*: what load_checkpoint, sora-train and sora-sample read) and the training
state beside them: AdamW's (optim.*), the discriminator's weights and AdamW state (disc.*,
disc_optim.*) and the random generators' states (rng.*). They are written to a temporary name,
synced and renamed (a killed run leaves the previous checkpoint whole). --resume continues from
the checkpoint's step: the next steps' losses are those of an uninterrupted run (a folder's clips
up to the checkpoint's step are passed over without decoding them: their files are probed and
their crops drawn, to continue their order). AdamW is the fused one; its implementation flags are
kept out of checkpoints (sora_model.train.IMPLEMENTATION_FLAGS).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict
from typing import Iterator

import torch

from sora_model.data import folder_videos, synthetic_video
from sora_model.physics_world import WorldConfig, render_clip
from sora_model.discriminator import PatchDiscriminator3D, discriminator_hinge_loss, generator_hinge_loss
from sora_model.train import optimizer_tensors, param_groups_json, save_atomically, saved_param_groups
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


# -----------------------------------------------------------------------------
# Checkpoints
# -----------------------------------------------------------------------------

# the names of the training state, beside the autoencoder's own (encoder.*, decoder.*)
TRAINING_STATE = ("optim.", "disc.", "disc_optim.", "rng.")


def _optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """AdamW's state as tensors named <prefix>.<parameter index>.<name>, and its param_groups as JSON
    (without the flags that choose its implementation: sora_model.train.IMPLEMENTATION_FLAGS)."""
    state = opt.state_dict()
    return optimizer_tensors(prefix, state), param_groups_json(state)


def _optimizer_state(tensors: dict[str, torch.Tensor], prefix: str, param_groups: str,
                     opt: torch.optim.Optimizer) -> dict:
    """The state dict that _optimizer_tensors wrote, with opt's own implementation flags."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            pid, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": saved_param_groups(opt, param_groups)}


def _config(meta: dict[str, str]) -> VAEConfig:
    fields = json.loads(meta["config"])
    return VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def save_checkpoint(path: str, vae: VideoAutoencoder, step: int, *, opt: torch.optim.Optimizer | None = None,
                    disc: PatchDiscriminator3D | None = None, opt_d: torch.optim.Optimizer | None = None,
                    rng: dict[str, torch.Tensor] | None = None) -> None:
    """The autoencoder's weights, its config and the step, and the training state --resume needs
    when given: AdamW's (opt), the discriminator's weights and AdamW (disc, opt_d), random
    generators' states (rng, by name). Written to path + '.tmp', synced and renamed over path
    (train.save_atomically)."""
    state = dict(vae.state_dict())
    meta = {"config": json.dumps(asdict(vae.cfg)), "step": str(step)}
    if opt is not None:
        tensors, meta["param_groups"] = _optimizer_tensors("optim", opt)
        state.update(tensors)
    if disc is not None:
        state.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
    if opt_d is not None:
        tensors, meta["disc_param_groups"] = _optimizer_tensors("disc_optim", opt_d)
        state.update(tensors)
    state.update({f"rng.{name}": v for name, v in (rng or {}).items()})
    save_atomically({k: v.detach().contiguous().cpu() for k, v in state.items()}, path, meta)


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> VideoAutoencoder:
    """The autoencoder of a save_checkpoint file (its training state, if any, is not read)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        vae = VideoAutoencoder(_config(f.metadata()))
        vae.load_state_dict({k: f.get_tensor(k) for k in f.keys() if not k.startswith(TRAINING_STATE)})
    return vae.to(device)


def load_training_state(path: str, vae: VideoAutoencoder, opt: torch.optim.Optimizer,
                        disc: PatchDiscriminator3D | None = None,
                        opt_d: torch.optim.Optimizer | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    """Loads a checkpoint's autoencoder and training state into vae and opt (and disc and opt_d
    when given); returns its step and its random generators' states."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        if "param_groups" not in meta:
            raise ValueError(f"resume: {path!r} holds the autoencoder only, without its optimizer state (written "
                             "before --resume existed, or by save_checkpoint without opt); it cannot be resumed")
        if disc is not None and "disc_param_groups" not in meta:
            raise ValueError(f"resume: {path!r} holds no discriminator state (trained with --adv-weight 0); "
                             "expected one for --adv-weight > 0")
        if _config(meta) != vae.cfg:
            raise ValueError(f"resume: {path!r} holds an autoencoder of another config: expected {vae.cfg}, "
                             f"got {_config(meta)}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    vae.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(TRAINING_STATE)})
    opt.load_state_dict(_optimizer_state(tensors, "optim", meta["param_groups"], opt))
    if disc is not None:
        disc.load_state_dict({k[len("disc."):]: v for k, v in tensors.items() if k.startswith("disc.")})
        opt_d.load_state_dict(_optimizer_state(tensors, "disc_optim", meta["disc_param_groups"], opt_d))
    return int(meta["step"]), {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def clips(args, skip: int = 0) -> tuple[Iterator[torch.Tensor], torch.Generator | None]:
    """The training clips, one at a time, and the generator they are drawn from (None for a
    folder: folder_videos keeps its order inside), which a checkpoint saves to continue them.
    skip: for a folder, the clips a resumed run has used (passed over without decoding them)."""
    if args.data == "synthetic":
        g = torch.Generator().manual_seed(args.seed)
        return (synthetic_video(args.frames, args.size, args.size, g) for _ in itertools.count()), g
    if args.data == "physics":
        g = torch.Generator().manual_seed(args.seed)
        world = WorldConfig(frames=(args.frames,), sizes=((args.size, args.size),))
        return (render_clip(world, g)[0] for _ in itertools.count()), g
    return folder_videos(args.data, args.frames, args.size, args.size, args.seed, skip), None


def rng_states(device: torch.device, data_generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """What a resume restores to draw the same posterior noise and clips as an uninterrupted run."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if data_generator is not None:
        states["data"] = data_generator.get_state()
    return states


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
    p.add_argument("--warmup", type=int, default=0,
                   help="steps over which the autoencoder's learning rate rises linearly to --lr (0: --lr from "
                        "the first step)")
    p.add_argument("--recon", default="l1", choices=["l1", "mse"],
                   help="reconstruction loss: l1 (the default) or mse (for scenes of small objects on a "
                        "plain background, where l1 first settles on the background: see RECON_LOSSES)")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--adv-weight", type=float, default=0.0, help="weight of the adversarial term (0: off)")
    p.add_argument("--adv-start", type=int, default=0, help="first step with the adversarial term")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--out", default="vae.safetensors")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out's checkpoint: its step, weights, AdamW and discriminator state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs every 10%% instead)")
    args = p.parse_args(argv)
    if args.frames < 1 or (args.frames - 1) % 4:
        p.error(f"--frames: expected 1 + 4k, got {args.frames}")
    if args.size < 8 or args.size % 8:
        p.error(f"--size: expected a positive multiple of 8, got {args.size}")
    for name in ("batch", "steps", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr: expected > 0, got {args.lr}")
    for name in ("kl_weight", "adv_weight", "adv_start", "warmup"):
        if not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")
    return args


def warmup_lr(lr: float, warmup: int, step: int) -> float:
    """The learning rate of 1-based `step`: lr * step / warmup over the first `warmup` steps, then lr
    (a function of the step alone, so a resumed run continues the same schedule)."""
    return lr * min(1.0, step / warmup) if warmup > 0 else lr


def train(args, discriminator: PatchDiscriminator3D | None = None) -> list[float]:
    """Runs the training (from --out's checkpoint with --resume); returns the loss of every step
    run (the autoencoder's: reconstruction + KL, + the weighted generator term once it is on). With
    --adv-weight > 0 a discriminator is made unless one is given (its weights are updated in place)."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    vae = VideoAutoencoder(vae_config(args.config)).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    adversarial = args.adv_weight > 0
    disc = opt_d = None
    if adversarial:
        disc = (discriminator or PatchDiscriminator3D()).to(device).train()
        opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=0.0, fused=True)
    start, rng = 0, {}
    if args.resume:
        if not os.path.exists(args.out):
            raise ValueError(f"resume: no checkpoint at {args.out!r}")
        start, rng = load_training_state(args.out, vae, opt, disc, opt_d)
        for group in [*opt.param_groups, *(opt_d.param_groups if opt_d else [])]:
            group["lr"] = args.lr        # this run's --lr, not the checkpoint's: it may change on resume
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    data, data_generator = clips(args, skip=start * args.batch)    # a folder passes over the clips used
    if data_generator is not None and start:
        if "data" in rng:
            data_generator.set_state(rng["data"])
        else:                                   # a checkpoint without the generator's state: draw them again
            for _ in range(start * args.batch):
                next(data)
    losses = []
    steps = range(start + 1, args.steps + 1)
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
        for group in opt.param_groups:
            group["lr"] = warmup_lr(args.lr, args.warmup, step)
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
            save_checkpoint(args.out, vae, step, opt=opt, disc=disc, opt_d=opt_d,
                            rng=rng_states(device, data_generator))
    return losses


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
