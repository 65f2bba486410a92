"""Trains the DiT with flow matching on packed batches of mixed-size clips.

    sora-train --vae vae.safetensors --data physics --dit tiny --budget 256 --steps 2000 --out run/
    torchrun --nproc-per-node 8 -m sora_model.train ...                 # DDP over 8 ranks
    torchrun --nproc-per-node 8 -m sora_model.train ... --fsdp          # FSDP2 over 8 ranks

Each step: a batch of clips of at most --budget latent tokens (first-fit decreasing over the
physics world or a JSONL manifest, no padding) -> the frozen VAE's latents -> captions through
the text conditioner (caption dropout) -> the flow-matching loss -> AdamW with gradient
clipping -> EMA of the DiT. bf16 autocast on GPU (fp32 weights, gradients and AdamW state). A
step's batch, timesteps and noise are drawn from (seed, step) and each clip's index in the
global batch, so a run gives the same losses on any number of ranks and after a resume.
--latent-pool P makes step k train on step (k mod P)'s clips, drawn and encoded once (with
new timesteps, noise and caption dropout): for a small model whose data costs more to make
than its step (on a CPU, rendering and encoding physics clips is about 0.14 s of a mini DiT's
0.26 s step).

With several ranks (torchrun), rank r takes clips r, r + world, ... of the global batch; the
loss is the squared error summed over all ranks' elements divided by their total count, so
gradients equal a single process's on the whole batch. The ranks run DDP (every rank holds
the whole model, EMA and AdamW state) or, with --fsdp, FSDP2: `fully_shard` on each DiT block,
then on the whole denoiser (embedders, final layer, text conditioner), so every rank holds 1/world
of each parameter, gradient and AdamW moment and gathers one block's weights at a time. The EMA
is sharded like the parameters and updated shard by shard. Mixed precision stays bf16 autocast, as
under DDP: blocks are gathered and gradients reduce-scattered in fp32 (FSDP2's
MixedPrecisionPolicy would halve that traffic, but would also run the residual stream in bf16,
which the DiT keeps in the weights' dtype, so the losses would no longer match DDP's).

Checkpoints (<out>/checkpoint.safetensors): DiT, text conditioner, EMA, AdamW state and the
step, in one safetensors file of full (unsharded) tensors, written by rank 0 to a temporary
name and renamed (a killed run leaves the previous checkpoint whole). The keys are the same
with one process, DDP and FSDP2, so a checkpoint of any of them resumes under any other and
sora-sample reads it. --resume continues from it. <out>/log.jsonl gets one line per step: loss,
gradient norm, tokens, clips, tokens/s; a run first drops its lines of the steps after the one
it starts from (0, or the checkpoint's on --resume), rewritten atomically, so steps that a run
killed between checkpoints logged and its resume redoes are logged once.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from sora_model.checks import is_int, is_real
from sora_model.data import captioned_clips, fit_to_tokens, fitted_shape, latent_tokens, token_batches
from sora_model.diffusion import FlowConfig, flow_error, sample_timesteps, token_counts
from sora_model.dit import DiT, SIZES, TextBatch, dit_config
from sora_model.physics_world import WorldConfig, physics_clips
from sora_model.text import ByteTextEncoder, CaptionConditioner, HFTextEncoder, MiniLMEncoder


@dataclass
class TrainConfig:
    dit: str = "tiny"
    text: str = "byte"                 # "byte" (trained with the DiT), "minilm" or "hf:<folder>" (frozen): text_encoder
    data: str = "physics"              # "physics" or a JSONL manifest of {"path", "caption"}
    budget: int = 256                  # latent tokens per global batch
    max_tokens: int = 256              # per clip, <= budget (clips over it are downscaled, aspect ratio kept)
    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.0          # AdamW's, on every parameter
    ema: float = 0.999                 # EMA decay per step, in [0, 1)
    clip_grad: float = 1.0             # max gradient norm, > 0 (inf: no clipping)
    caption_dropout: float = 0.1
    seed: int = 0
    save_every: int = 500
    fsdp: bool = False                 # several ranks: FSDP2 instead of DDP (no effect in one process)
    latent_pool: int = 0               # > 0: step k trains on step (k mod latent_pool)'s clips, encoded once
    grad_checkpointing: bool = False   # recompute each DiT block in the backward: less activation memory, same results
    # the training timesteps' shift base (diffusion.FlowConfig.base_tokens): a video of this
    # many latent tokens is not shifted, bigger ones toward noise, smaller ones away from it.
    # Sampling has its own (sample.sample_latents' shift_base_tokens, sora-sample's flag).
    shift_base_tokens: int = 256
    # the VAE's compression and latent channels (its cfg's properties of these names; 4, 8 and
    # 16: the tiny, small and base VAE's): clips are fitted and counted in latent tokens with
    # them, and the DiT takes latent_channels in. train() checks them against its VAE,
    # sora-train sets them from --vae, sora-sample checks its --vae against them.
    temporal_compression: int = 4
    spatial_compression: int = 8
    latent_channels: int = 16


# TrainConfig's numeric fields: what each must be, and a test of it (sora-train's flags of the
# same names are checked with them; a clip_grad below 0 flipped the gradients, an ema over 1
# extrapolated, a save_every of 0 divided by zero)
FIELD_RULES = {
    "budget": ("a positive int (latent tokens per global batch)", lambda v: is_int(v) and v >= 1),
    "max_tokens": ("a positive int (latent tokens per clip)", lambda v: is_int(v) and v >= 1),
    "steps": ("a positive int", lambda v: is_int(v) and v >= 1),
    "lr": ("a finite number > 0", lambda v: is_real(v) and 0 < v < math.inf),
    "weight_decay": ("a finite number >= 0", lambda v: is_real(v) and 0 <= v < math.inf),
    "ema": ("a decay in [0, 1)", lambda v: is_real(v) and 0 <= v < 1),
    "clip_grad": ("a max gradient norm > 0 (inf: no clipping)", lambda v: is_real(v) and v > 0),
    "caption_dropout": ("a probability in [0, 1)", lambda v: is_real(v) and 0 <= v < 1),
    "save_every": ("a positive int (steps)", lambda v: is_int(v) and v >= 1),
    "latent_pool": ("0 or a positive int (steps)", lambda v: is_int(v) and v >= 0),
    "shift_base_tokens": ("a positive int (latent tokens)", lambda v: is_int(v) and v >= 1),
}


def field_problem(name: str, value) -> str | None:
    """Why `value` is no TrainConfig.<name> (FIELD_RULES), or None."""
    expected, ok = FIELD_RULES[name]
    return None if ok(value) else f"expected {expected}, got {value!r}"


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the first field of cfg out of its range (FIELD_RULES), or a max_tokens
    over the budget (such a clip fits no batch)."""
    for name in FIELD_RULES:
        why = field_problem(name, getattr(cfg, name))
        if why:
            raise ValueError(f"cfg.{name}: {why}")
    if cfg.max_tokens > cfg.budget:
        raise ValueError(f"cfg.max_tokens: a clip of {cfg.max_tokens} tokens would not fit a batch of "
                         f"cfg.budget {cfg.budget}")


class Denoiser(nn.Module):
    """What is trained: the DiT and the text conditioner (its byte encoder, null caption)."""

    def __init__(self, dit: DiT, text: CaptionConditioner):
        super().__init__()
        self.dit, self.text = dit, text

    def forward(self, latents, t, captions, drop, batch_drop=None):
        """drop: bool [n], which captions become the null one; batch_drop: the flags of the whole
        global batch when these clips are one rank's part of it."""
        text = self.text(captions, drop=drop)
        if batch_drop is not None:
            text = self.join_other_ranks(text, drop, batch_drop)
        return self.dit(latents, t, text)

    def join_other_ranks(self, text: TextBatch, drop: torch.Tensor, batch_drop: torch.Tensor) -> TextBatch:
        """FSDP2 reduce-scatters the gradients of the parameters that have one, and every rank
        must send the same ones. The null caption is used only on ranks that drop a caption, and
        the encoder only on ranks that keep one: a trainable one that other ranks use and this
        rank does not joins its graph with weight zero, so its gradient is the other ranks' sum,
        as in one process. (One no rank uses keeps no gradient, also as in one process.)"""
        unused = []
        if bool(batch_drop.any()) and not bool(drop.any()):
            unused += [self.text.null_token, self.text.null_pooled]
        if not bool(batch_drop.all()) and bool(drop.all()):
            unused += list(self.text.encoder.parameters())
        unused = [p for p in unused if p.requires_grad]
        if not unused:
            return text
        zero = 0.0 * sum(p.sum() for p in unused)
        return replace(text, pooled=text.pooled + zero)


def text_problem(text: str) -> str | None:
    """Why a TrainConfig.text value names no encoder this machine can build, or None."""
    if text in ("byte", "minilm"):
        return None
    if not text.startswith("hf:"):
        return f'expected "byte", "minilm" or "hf:<local folder>", got {text!r}'
    path = text[3:]
    if not os.path.isdir(path):
        return f"{text!r}: expected a local folder with a Hugging Face model, and {path!r} is not a folder"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"{text!r}: expected a local folder with a Hugging Face model, and {path!r} has no config.json"
    return None


def text_encoder(text: str) -> nn.Module:
    """The encoder a TrainConfig.text value names: "byte" (ByteTextEncoder, trained with the
    DiT), "minilm" (MiniLMEncoder, frozen) or "hf:<folder>" (HFTextEncoder: the Hugging Face
    encoder saved in that local folder, frozen; its weights stay there, and the run's config
    records the folder)."""
    why = text_problem(text)
    if why:
        raise ValueError(f"text: {why}")
    if text == "byte":
        return ByteTextEncoder(dim=64)
    if text == "minilm":
        return MiniLMEncoder()
    return HFTextEncoder(text[3:])


# TrainConfig's fields that must equal the VAE's cfg's of the same names
VAE_FIELDS = ("temporal_compression", "spatial_compression", "latent_channels")


def vae_fields(vae_cfg) -> dict[str, int]:
    """The VAE's compression and latent channels, as TrainConfig holds them."""
    return {name: getattr(vae_cfg, name) for name in VAE_FIELDS}


def make_denoiser(cfg: TrainConfig) -> Denoiser:
    encoder = text_encoder(cfg.text)
    dit = DiT(dit_config(cfg.dit, text_dim=encoder.dim, in_channels=cfg.latent_channels,
                         grad_checkpointing=cfg.grad_checkpointing))
    return Denoiser(dit, CaptionConditioner(encoder, cfg.caption_dropout))


def shard(model: Denoiser, ema: DiT, device: torch.device) -> None:
    """FSDP2 over all ranks: each DiT block is a unit (its weights gathered for its forward and
    again for its backward, its gradients reduce-scattered as soon as they are computed), the
    rest of the denoiser is the root unit. The EMA is sharded as one unit: it never runs, and
    FSDP2 splits each parameter along dim 0 whatever the unit, so its shards line up with the
    model's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.dit.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fully_shard(ema, mesh=mesh)


def physics_world(cfg: TrainConfig) -> WorldConfig:
    """The physics world of cfg.data "physics": durations 1 + k * the VAE's temporal compression,
    k = 0..3 (1, 5, 9, 13 at 4x)."""
    return WorldConfig(frames=tuple(1 + k * cfg.temporal_compression for k in range(4)))


def check_data(cfg: TrainConfig, patch_size) -> None:
    """ValueError, before any step, when some clip of cfg.data fits no size within
    cfg.max_tokens (or is smaller than one token): for the physics world, each of its durations
    and sizes; for a manifest, every entry (read_manifest's checks, each file probed)."""
    factors = {"temporal": cfg.temporal_compression, "spatial": cfg.spatial_compression}   # the VAE's compression
    if cfg.data != "physics":
        next(captioned_clips(cfg.data, cfg.max_tokens, patch_size, **factors))
        return
    world = physics_world(cfg)
    for T in world.frames:
        for H, W in world.sizes:
            try:
                fitted_shape((3, T, H, W), cfg.max_tokens, patch_size, **factors)
            except ValueError as e:
                raise ValueError(f"data 'physics': {e}") from e


def step_batch(cfg: TrainConfig, step: int, patch_size) -> list[tuple[torch.Tensor, str]]:
    """The global batch of a step: the fullest token batch of a window of clips drawn from a
    generator seeded by (seed, step) (the same on every rank and after a resume), each fitted to
    cfg.max_tokens (fit_to_tokens: downscaled, aspect ratio kept), counted in tokens of the
    VAE's compression (cfg's) and the DiT's patch_size."""
    seed = cfg.seed * 1_000_003 + step
    factors = {"temporal": cfg.temporal_compression, "spatial": cfg.spatial_compression}   # the VAE's compression
    if cfg.data == "physics":
        clips = ((fit_to_tokens(video, cfg.max_tokens, patch_size, **factors), caption)
                 for video, caption in physics_clips(physics_world(cfg), seed=seed))
        return next(token_batches(clips, cfg.budget, patch_size, window=16, **factors))
    # manifest clips are packed by their metadata's shapes; only the batch's are decoded
    clips = captioned_clips(cfg.data, cfg.max_tokens, patch_size, seed=seed, **factors)
    batch = next(token_batches(clips, cfg.budget, patch_size, window=16, **factors))
    return [(clip.load(), caption) for clip, caption in batch]


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


def data_step(cfg: TrainConfig, step: int, vae, patch_size, device, pool: dict) -> tuple[list[str], list, int]:
    """(captions, latents, latent tokens) of a step's global batch. With cfg.latent_pool = P,
    step k takes step (k mod P)'s clips: drawn, decoded and encoded at its first use, then
    kept in `pool` (the first P steps are the same as without a pool; later steps draw new
    timesteps, noise and caption dropout for them). For data that costs more to make than the
    model's step: rendered or decoded clips and a small model."""
    key = step % cfg.latent_pool if cfg.latent_pool > 0 else None
    if key in pool:
        return pool[key]
    batch = step_batch(cfg, step if key is None else key, patch_size)
    entry = ([caption for _, caption in batch], encode(vae, [v for v, _ in batch], device),
             sum(latent_tokens(v.shape, patch_size, cfg.temporal_compression, cfg.spatial_compression)
                 for v, _ in batch))
    if key is not None:
        pool[key] = entry
    return entry


@torch.no_grad()
def encode(vae, videos, device) -> list[torch.Tensor]:
    """Latents [C, t, h, w] of each video (the posterior mean), one at a time (sizes differ)."""
    return [vae.encode(v[None].to(device)).mode()[0] for v in videos]


# -----------------------------------------------------------------------------
# Checkpoints
# -----------------------------------------------------------------------------

def save_atomically(state: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors' save_file to path + '.tmp', synced to disk (fsync), then renamed over path, and
    the folder synced: a run killed at any point leaves the previous file whole, after a crash the
    new name never points at data that was not written yet, and the rename itself is on disk
    when this returns. (sora_model.train_vae's checkpoints use it too.)"""
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    save_file(state, tmp, metadata=metadata)
    _replace_synced(tmp, path)


def _replace_synced(tmp: str, path: str) -> None:
    """tmp synced to disk, renamed over path, and the folder synced (the rename is its entry)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def trim_log(path: str, step: int) -> None:
    """Drops the lines of a log.jsonl for steps after `step` (a run killed between checkpoints
    logged steps that its resume redoes and logs again), and a last line cut short by a kill
    (no newline); rewritten like a checkpoint (a temporary file, synced, renamed), so a kill
    leaves the old log or the new one. Nothing to do when no line goes."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()

    def later(line: str) -> bool:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] > step
    keep = [line for line in lines if line.endswith("\n") and not later(line)]
    if len(keep) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    _replace_synced(tmp, path)


# AdamW's flags that choose how a step is computed, not what it computes. A run uses its own:
# the fused kernel in one process and under DDP, the per-tensor loop under FSDP2 (sharded
# DTensor parameters). They are kept out of checkpoints, so that a checkpoint of any mode
# resumes under any other with that mode's implementation.
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def param_groups_json(opt_state: dict) -> str:
    """An optimizer state_dict's param_groups as JSON, without IMPLEMENTATION_FLAGS."""
    return json.dumps([{k: v for k, v in group.items() if k not in IMPLEMENTATION_FLAGS}
                       for group in opt_state["param_groups"]])


def saved_param_groups(opt: torch.optim.Optimizer, saved: str) -> list[dict]:
    """param_groups_json's groups, with opt's own IMPLEMENTATION_FLAGS (for load_state_dict)."""
    return [{**group, **{k: own[k] for k in IMPLEMENTATION_FLAGS if k in own}}
            for group, own in zip(json.loads(saved), opt.param_groups)]


def optimizer_tensors(prefix: str, opt_state: dict) -> dict[str, torch.Tensor]:
    """An optimizer state_dict's per-parameter state as tensors named <prefix>.<parameter
    index>.<name> (scalars, as AdamW's step, as 0-dim tensors); sora_model.train_vae's too."""
    return {f"{prefix}.{pid}.{name}": v if torch.is_tensor(v) else torch.tensor(v)
            for pid, s in opt_state["state"].items() for name, v in s.items()}


def save_checkpoint(path: str, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, step: int,
                    cfg: TrainConfig) -> None:
    """One safetensors file of full tensors (model.*, ema.*, and optim.<parameter index>.<name>
    for AdamW's state), written by rank 0 whole to path + '.tmp', synced and then renamed over
    path (save_atomically).
    Under FSDP2 every rank must call it: each sharded tensor is gathered whole, one at a time,
    and only rank 0 keeps a (CPU) copy."""
    write = not dist.is_initialized() or dist.get_rank() == 0
    opt_state = opt.state_dict()
    named = [(f"model.{k}", v) for k, v in model.state_dict().items()]
    named += [(f"ema.{k}", v) for k, v in ema.state_dict().items()]
    named += list(optimizer_tensors("optim", opt_state).items())
    state = {}
    for name, v in named:
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if write:
            state[name] = v.detach().contiguous().cpu()
    if not write:
        return
    meta = {"step": str(step), "config": json.dumps(asdict(cfg)),
            "param_groups": param_groups_json(opt_state)}
    save_atomically(state, path, meta)


def _like(v: torch.Tensor, ref) -> torch.Tensor:
    """A full tensor from a checkpoint as `ref` holds it: ref's shard of it when ref is an FSDP2
    DTensor (rank 0's copy is scattered: every rank must call this, in the same order)."""
    if isinstance(ref, DTensor):
        return distribute_tensor(v.to(ref.device), ref.device_mesh, ref.placements)
    return v


# The config fields that shape the model and its data's tokens: a resume must keep them (the
# steps, the batch budget, the learning rate and the rest may change).
MODEL_FIELDS = ("dit", "text", "temporal_compression", "spatial_compression", "latent_channels")
# The fields that set what the model is trained to do: a resume must keep them too (a resume
# that left out --shift-base-tokens would go on at the default's timesteps).
OBJECTIVE_FIELDS = ("shift_base_tokens",)


def check_resumable(path: str, cfg: TrainConfig) -> None:
    """ValueError naming each model field whose value in the checkpoint's config differs from
    cfg's (a resume of another model would fail later as a mismatch of tensor shapes), or else
    each objective field that differs."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        saved = json.loads(f.metadata()["config"])
    default = asdict(TrainConfig())      # checkpoints from before a field existed had its default
    for fields, what in ((MODEL_FIELDS, "holds another model"),
                         (OBJECTIVE_FIELDS, "was trained with another objective")):
        differ = [f"{name} {saved.get(name, default[name])!r} there, {getattr(cfg, name)!r} here" for name in fields
                  if saved.get(name, default[name]) != getattr(cfg, name)]
        if differ:
            raise ValueError(f"resume: {path!r} {what}: " + "; ".join(differ))


def load_checkpoint(path: str, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Loads a save_checkpoint file, from any number of ranks, DDP or FSDP2, into model, ema and
    opt; returns its step. Tensors are read one at a time, and under FSDP2 each rank keeps its
    shard of each (AdamW's moments are sharded like their parameter)."""
    from safetensors import safe_open
    refs = {"model": model.state_dict(), "ema": ema.state_dict()}
    params = [p for group in opt.param_groups for p in group["params"]]
    states: dict = {"model": {}, "ema": {}}
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        opt_state: dict = {"state": {}, "param_groups": saved_param_groups(opt, meta["param_groups"])}
        for key in f.keys():
            part, name = key.split(".", 1)
            v = f.get_tensor(key)
            if part == "optim":
                pid, name = name.split(".", 1)
                p = params[int(pid)] if int(pid) < len(params) else None
                if p is not None and v.shape == p.shape:     # a moment, not the step count
                    v = _like(v, p)
                opt_state["state"].setdefault(int(pid), {})[name] = v
            else:
                states[part][name] = _like(v, refs[part].get(name))
    model.load_state_dict(states["model"])
    ema.load_state_dict(states["ema"])
    opt.load_state_dict(opt_state)
    return int(meta["step"])


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def train(cfg: TrainConfig, vae, out: str, *, device: str | torch.device = "cpu", resume: bool = False,
          progress: bool = True, steps: int | None = None) -> list[float]:
    """Trains from step 0 (or from out's checkpoint with resume) to cfg.steps (or `steps` more);
    returns the loss of each step run (the global batch's). With torch.distributed initialised,
    the ranks share each global batch under DDP, or FSDP2 with cfg.fsdp."""
    check_config(cfg)
    device = torch.device(device)
    got, want = tuple(getattr(cfg, name) for name in VAE_FIELDS), tuple(vae_fields(vae.cfg).values())
    if got != want:
        raise ValueError(f"cfg.temporal_compression, cfg.spatial_compression, cfg.latent_channels: expected the "
                         f"VAE's {want}, got {got}")
    check_data(cfg, dit_config(cfg.dit).patch_size)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(cfg.seed)
    model = make_denoiser(cfg).to(device)
    ema = DiT(model.dit.cfg).to(device)
    ema.load_state_dict(model.dit.state_dict())
    ema.requires_grad_(False)
    fsdp = distributed and cfg.fsdp
    if fsdp:
        shard(model, ema, device)
    vae = vae.to(device).eval()
    patch = model.dit.cfg.patch_size
    flow = FlowConfig(base_tokens=cfg.shift_base_tokens)
    params = [p for p in model.parameters() if p.requires_grad]     # FSDP2's sharded ones
    # fused: one kernel over every parameter (4.3 ms a step here for 5.8M parameters on the CPU,
    # against 11.8 for the per-tensor loop); FSDP2's DTensor shards keep the loop.
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=not fsdp)
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    if resume and not os.path.exists(ckpt):
        raise ValueError(f"resume: no checkpoint at {ckpt!r}")
    if resume:
        check_resumable(ckpt, cfg)
    start = load_checkpoint(ckpt, model, ema, opt) if resume else 0
    log = os.path.join(out, "log.jsonl")
    if rank == 0:       # the log holds the steps up to the start: a redone step is logged once
        trim_log(log, start)
    for group in opt.param_groups:  # this run's lr and weight decay, not the checkpoint's: they may change on resume
        group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
    net: nn.Module = model
    if distributed and not fsdp:
        # find_unused_parameters: the null caption is unused in steps that drop no caption
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)
    end = cfg.steps if steps is None else start + steps
    losses = []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=end - start, desc="train", unit="step", file=sys.stderr)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    pool: dict[int, tuple[list[str], list[torch.Tensor], int]] = {}   # cfg.latent_pool: batches encoded once
    for step in range(start, end):
        t0 = time.perf_counter()
        captions, latents, tokens = data_step(cfg, step, vae, patch, device, pool)
        t, noise, drop = step_noise(cfg, step, latents, flow, patch, cfg.caption_dropout)
        if len(latents) < world:
            raise ValueError(f"budget: step {step}'s batch has {len(latents)} clips for {world} ranks; raise --budget")
        mine = list(range(rank, len(latents), world))
        total = sum(z.numel() for z in latents)
        with autocast:
            err = flow_error(lambda x, tt, _: net([*x], tt, [captions[i] for i in mine], drop[mine], drop),
                             [latents[i] for i in mine], None, t[mine], [noise[i] for i in mine])
        # DDP's all-reduce and FSDP2's reduce-scatter average gradients over ranks: scale so
        # that they equal the global batch's
        (err * world / total).backward()
        # under FSDP2 the norm of the whole gradient (the shards' norms all-reduced), a DTensor
        grad_norm = nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.dit.parameters()):   # under FSDP2 shard by shard
                e.lerp_(p.detach().to(e.dtype), 1.0 - cfg.ema)
            loss = err.detach().clone()
            if distributed:
                dist.all_reduce(loss)
        losses.append(loss.item() / total)
        tok_s = tokens / (time.perf_counter() - t0)
        if rank == 0:
            with open(log, "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": losses[-1], "grad_norm": float(grad_norm),
                                    "tokens": tokens, "clips": len(latents), "tokens_per_s": tok_s}) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", grad=f"{float(grad_norm):.2f}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:    # every rank: FSDP2 gathers
            save_checkpoint(ckpt, model, ema, opt, step + 1, cfg)
    if bar is not None:
        bar.close()
    return losses


def parse_args(argv=None):
    d = TrainConfig()                  # the defaults
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", required=True, help="a train_vae checkpoint (safetensors)")
    p.add_argument("--out", required=True, help="run folder (checkpoint.safetensors)")
    p.add_argument("--dit", default=d.dit, choices=sorted(SIZES))
    p.add_argument("--text", default=d.text,
                   help='"byte" (trained with the DiT), "minilm" (frozen all-MiniLM-L6-v2) or "hf:<folder>" (a '
                        "frozen Hugging Face encoder saved in a local folder, e.g. a T5's; needs transformers)")
    p.add_argument("--data", default=d.data, help='"physics" or a JSONL manifest of {"path", "caption"}')
    p.add_argument("--budget", type=int, default=d.budget, help="latent tokens per global batch")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="latent tokens per clip, at most --budget (bigger clips, physics or manifest, are "
                        "downscaled with their aspect ratio kept)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW's weight decay (on every parameter); a resume takes this run's, like --lr")
    p.add_argument("--ema", type=float, default=d.ema, help="EMA decay per step, in [0, 1)")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm, > 0 (inf: no clipping)")
    p.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fsdp", action="store_true",
                   help="with torchrun: FSDP2 (parameters, gradients, AdamW state and EMA sharded over the ranks) "
                        "instead of DDP")
    p.add_argument("--latent-pool", type=int, default=d.latent_pool, metavar="P",
                   help="step k trains on the clips of step k mod P, encoded once (0: new clips every step); "
                        "for data that costs more to make than the model's step")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each DiT block in the backward: less activation memory for more compute, the "
                        "same losses (may change on resume)")
    p.add_argument("--shift-base-tokens", type=int, default=d.shift_base_tokens, metavar="N",
                   help="the training timesteps' shift base: videos of more latent tokens than N train at more "
                        "noise, of fewer at less, s = sqrt(tokens / N) (sora-sample has its own; a resume must keep "
                        "the run's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in FIELD_RULES:
        why = field_problem(name, getattr(args, name))
        if why:
            p.error(f"--{name.replace('_', '-')}: {why}")
    if args.max_tokens > args.budget:
        p.error(f"--max-tokens: a clip of {args.max_tokens} tokens would not fit a batch of --budget {args.budget}")
    why = text_problem(args.text)
    if why:
        p.error(f"--text: {why}")
    if args.text.startswith("hf:"):
        if importlib.util.find_spec("transformers") is None:
            p.error(f"--text {args.text}: needs the transformers library (pip install transformers, or the "
                    "package's text extra)")
        args.text = "hf:" + os.path.abspath(args.text[3:])     # the run's config: sora-sample runs from anywhere
    return args


def train_config(args, vae_cfg) -> TrainConfig:
    """The TrainConfig of parse_args's flags, with the VAE's compression and channels."""
    return TrainConfig(dit=args.dit, text=args.text, data=args.data, budget=args.budget, max_tokens=args.max_tokens,
                       steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, ema=args.ema,
                       clip_grad=args.clip_grad, caption_dropout=args.caption_dropout, seed=args.seed,
                       save_every=args.save_every, fsdp=args.fsdp, latent_pool=args.latent_pool,
                       grad_checkpointing=args.grad_checkpointing, shift_base_tokens=args.shift_base_tokens,
                       **vae_fields(vae_cfg))


def main(argv=None) -> None:
    args = parse_args(argv)
    from sora_model.train_vae import load_checkpoint as load_vae
    vae = load_vae(args.vae)
    cfg = train_config(args, vae.cfg)
    device = args.device
    if "RANK" in os.environ and not dist.is_initialized():          # launched by torchrun
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    try:
        train(cfg, vae, args.out, device=device, resume=args.resume, progress=not args.no_progress)
        if dist.is_initialized():
            # every rank past its last collective before any tears its connections down: a
            # rank that destroyed the group while another was still in it aborted the other
            # once on gloo ("terminate called without an active exception", CI under load)
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
