"""Trains the DiT with flow matching on packed batches of mixed-size clips.

    sora-train --vae vae.safetensors --data physics --dit tiny --budget 256 --steps 2000 --out run/
    torchrun --nproc-per-node 8 -m sora_model.train ...                 # DDP over 8 ranks

Each step: a batch of clips of at most --budget latent tokens (first-fit decreasing over the
physics world or a JSONL manifest, no padding) -> the frozen VAE's latents -> captions through
the text conditioner (caption dropout) -> the flow-matching loss -> AdamW with gradient
clipping -> EMA of the DiT. bf16 autocast on GPU. Several ranks: DDP (FSDP2 is not written
yet). A step's batch, timesteps and noise are drawn from (seed, step) and each clip's index in
the global batch, so a run gives the same losses on any number of ranks and after a resume.

With several ranks (torchrun), rank r takes clips r, r + world, ... of the global batch; the
loss is the squared error summed over all ranks' elements divided by their total count, so
gradients equal a single process's on the whole batch.

Checkpoints (<out>/checkpoint.safetensors): DiT, text conditioner, EMA, AdamW state and the
step, in one safetensors file written to a temporary name and renamed (a killed run leaves the
previous checkpoint whole). --resume continues from it. <out>/log.jsonl gets one line per
step: loss, gradient norm, tokens, clips, tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from sora_model.data import captioned_videos, latent_tokens, token_batches
from sora_model.diffusion import FlowConfig, flow_error, sample_timesteps, token_counts
from sora_model.dit import DiT, SIZES, dit_config
from sora_model.physics_world import WorldConfig, physics_clips
from sora_model.text import ByteTextEncoder, CaptionConditioner, MiniLMEncoder


@dataclass
class TrainConfig:
    dit: str = "tiny"
    text: str = "byte"                 # "byte" (trained with the DiT) or "minilm" (frozen)
    data: str = "physics"              # "physics" or a JSONL manifest of {"path", "caption"}
    budget: int = 256                  # latent tokens per global batch
    max_tokens: int = 256              # per clip (manifest clips are downscaled to it)
    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.0
    ema: float = 0.999
    clip_grad: float = 1.0
    caption_dropout: float = 0.1
    seed: int = 0
    save_every: int = 500


class Denoiser(nn.Module):
    """What is trained: the DiT and the text conditioner (its byte encoder, null caption)."""

    def __init__(self, dit: DiT, text: CaptionConditioner):
        super().__init__()
        self.dit, self.text = dit, text

    def forward(self, latents, t, captions, drop):
        return self.dit(latents, t, self.text(captions, drop=drop))


def make_denoiser(cfg: TrainConfig) -> Denoiser:
    encoder = MiniLMEncoder() if cfg.text == "minilm" else ByteTextEncoder(dim=64)
    dit = DiT(dit_config(cfg.dit, text_dim=encoder.dim))
    return Denoiser(dit, CaptionConditioner(encoder, cfg.caption_dropout))


def step_batch(cfg: TrainConfig, step: int, patch_size) -> list[tuple[torch.Tensor, str]]:
    """The global batch of a step: the fullest token batch of a window of clips drawn from a
    generator seeded by (seed, step) (the same on every rank and after a resume)."""
    seed = cfg.seed * 1_000_003 + step
    if cfg.data == "physics":
        clips = physics_clips(WorldConfig(), seed=seed)
    else:
        clips = captioned_videos(cfg.data, cfg.max_tokens, patch_size, seed=seed)
    return next(token_batches(clips, cfg.budget, patch_size, window=16))


def step_noise(cfg: TrainConfig, step: int, latents, flow: FlowConfig, patch_size, drop_prob: float):
    """Timesteps, noise and caption-dropout flags of each clip of the global batch, from
    (seed, step, clip index)."""
    t, noise, drop = [], [], []
    for i, z in enumerate(latents):
        g = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 1009 + i) % (2 ** 63))
        t.append(sample_timesteps(token_counts([z.shape], patch_size), flow, g)[0])
        noise.append(torch.randn(z.shape, generator=g))
        drop.append(bool(torch.rand((), generator=g) < drop_prob))
    return torch.stack(t), noise, torch.tensor(drop)


@torch.no_grad()
def encode(vae, videos, device) -> list[torch.Tensor]:
    """Latents [C, t, h, w] of each video (the posterior mean), one at a time (sizes differ)."""
    return [vae.encode(v[None].to(device)).mode()[0] for v in videos]


# -----------------------------------------------------------------------------
# Checkpoints
# -----------------------------------------------------------------------------

def save_checkpoint(path: str, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, step: int,
                    cfg: TrainConfig) -> None:
    """One safetensors file, written whole to path + '.tmp' and then renamed over path."""
    from safetensors.torch import save_file
    state = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for pid, s in opt_state["state"].items():
        for k, v in s.items():
            state[f"optim.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous().cpu()
    meta = {"step": str(step), "config": json.dumps(asdict(cfg)),
            "param_groups": json.dumps(opt_state["param_groups"])}
    tmp = path + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path: str, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    state = load_file(path)
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
    opt_state: dict = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for k, v in state.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(opt_state)
    return int(meta["step"])


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def train(cfg: TrainConfig, vae, out: str, *, device: str | torch.device = "cpu", resume: bool = False,
          progress: bool = True, steps: int | None = None) -> list[float]:
    """Trains from step 0 (or from out's checkpoint with resume) to cfg.steps (or `steps` more);
    returns the loss of each step run (the global batch's)."""
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(cfg.seed)
    model = make_denoiser(cfg).to(device)
    ema = DiT(model.dit.cfg).to(device)
    ema.load_state_dict(model.dit.state_dict())
    ema.requires_grad_(False)
    vae = vae.to(device).eval()
    patch = model.dit.cfg.patch_size
    flow = FlowConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    start = load_checkpoint(ckpt, model, ema, opt) if resume and os.path.exists(ckpt) else 0
    if resume and start == 0 and not os.path.exists(ckpt):
        raise ValueError(f"resume: no checkpoint at {ckpt!r}")
    net: nn.Module = model
    if distributed:  # DDP (FSDP2 is not written: the EMA and rank-0 checkpoints would need gathered weights)
        # find_unused_parameters: the null caption is unused in steps that drop no caption
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)
    end = cfg.steps if steps is None else start + steps
    losses = []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=end - start, desc="train", unit="step", file=sys.stderr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for step in range(start, end):
        t0 = time.perf_counter()
        batch = step_batch(cfg, step, patch)
        latents = encode(vae, [v for v, _ in batch], device)
        t, noise, drop = step_noise(cfg, step, latents, flow, patch, cfg.caption_dropout)
        if len(batch) < world:
            raise ValueError(f"budget: step {step}'s batch has {len(batch)} clips for {world} ranks; raise --budget")
        mine = list(range(rank, len(batch), world))
        total = sum(z.numel() for z in latents)
        with autocast:
            err = flow_error(lambda x, tt, _: net([*x], tt, [batch[i][1] for i in mine], drop[mine]),
                             [latents[i] for i in mine], None, t[mine], [noise[i] for i in mine])
        # DDP averages gradients over ranks: scale so that they equal the global batch's
        (err * world / total).backward()
        grad_norm = nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.dit.parameters()):
                e.lerp_(p.detach().to(e.dtype), 1.0 - cfg.ema)
            loss = err.detach().clone()
            if distributed:
                dist.all_reduce(loss)
        losses.append(loss.item() / total)
        tokens = sum(latent_tokens(v.shape, patch) for v, _ in batch)
        tok_s = tokens / (time.perf_counter() - t0)
        if rank == 0:
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": losses[-1], "grad_norm": float(grad_norm),
                                    "tokens": tokens, "clips": len(batch), "tokens_per_s": tok_s}) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", grad=f"{float(grad_norm):.2f}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == end):
            save_checkpoint(ckpt, model, ema, opt, step + 1, cfg)
    if bar is not None:
        bar.close()
    return losses


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", required=True, help="a train_vae checkpoint (safetensors)")
    p.add_argument("--out", required=True, help="run folder (checkpoint.safetensors)")
    p.add_argument("--dit", default="tiny", choices=sorted(SIZES))
    p.add_argument("--text", default="byte", choices=["byte", "minilm"])
    p.add_argument("--data", default="physics", help='"physics" or a JSONL manifest of {"path", "caption"}')
    p.add_argument("--budget", type=int, default=256, help="latent tokens per global batch")
    p.add_argument("--max-tokens", type=int, default=256, help="latent tokens per clip (bigger are downscaled)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.budget < 1 or args.max_tokens < 1:
        p.error("--budget and --max-tokens: expected positive token counts")
    if args.max_tokens > args.budget:
        p.error(f"--max-tokens: a clip of {args.max_tokens} tokens would not fit a batch of --budget {args.budget}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from sora_model.train_vae import load_checkpoint as load_vae
    cfg = TrainConfig(dit=args.dit, text=args.text, data=args.data, budget=args.budget, max_tokens=args.max_tokens,
                      steps=args.steps, lr=args.lr, ema=args.ema, clip_grad=args.clip_grad,
                      caption_dropout=args.caption_dropout, seed=args.seed, save_every=args.save_every)
    device = args.device
    if "RANK" in os.environ and not dist.is_initialized():          # launched by torchrun
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    try:
        train(cfg, load_vae(args.vae), args.out, device=device, resume=args.resume, progress=not args.no_progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
