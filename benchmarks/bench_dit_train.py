"""Benchmarks of a DiT training step on a mixed-size batch: packed against padded and bucketed
runs of the same model on the same data (sora_model/dit.py).

Providers (one AdamW step each: forward, flow-matching loss, backward, update):
  packed    every latent at its own size in one packed sequence (ours);
  padded    every latent zero-padded to the batch's largest (t, h, w), then one batch of equal
            lengths: the tokens a padding loader computes (attention over padding costs what a
            masked attention does); the loss counts real elements only;
  bucketed  one forward and backward per group of equal sizes (what a bucketing loader
            feeds), gradients summed into one update.
Rows: median ms per step; extra: real_tokens, computed_tokens, tokens_per_s (real tokens).
Workload: latents of 9 sizes from an image to a 4-frame 12x16 clip; a DiT of width 256, depth 4
on CPU, the "B" size (768 x 12) in bf16 autocast on GPU.
"""
import pytest
import torch

from sora_model.diffusion import flow_error
from sora_model.dit import DiT, TextBatch, dit_config

PROVIDERS = ["packed", "padded", "bucketed"]
SIZES = [(4, 12, 16), (1, 8, 8), (3, 6, 10), (2, 12, 6), (4, 6, 16), (1, 10, 10), (2, 8, 8), (1, 8, 8), (3, 6, 10)]


def _setup(device):
    cfg = dit_config("B", text_dim=64) if device.type == "cuda" else dit_config("tiny", hidden=256, depth=4, heads=4)
    repeat = 8 if device.type == "cuda" else 1
    torch.manual_seed(0)
    dit = DiT(cfg).to(device).train()
    g = torch.Generator().manual_seed(0)
    sizes = SIZES * repeat
    latents = [torch.randn(16, *s, generator=g).to(device) for s in sizes]
    noise = [torch.randn(z.shape, generator=g).to(device) for z in latents]
    t = torch.rand(len(sizes), generator=g)
    text = TextBatch(torch.randn(3 * len(sizes), 64, generator=g).to(device),
                     torch.arange(0, 3 * len(sizes) + 1, 3, dtype=torch.int32).to(device), 3,
                     torch.randn(len(sizes), 64, generator=g).to(device))
    return dit, latents, noise, t, text


def _sub_text(text, idx, device):
    rows = torch.cat([torch.arange(int(text.cu_seqlens[i]), int(text.cu_seqlens[i + 1])) for i in idx]).to(device)
    lengths = [int(text.cu_seqlens[i + 1] - text.cu_seqlens[i]) for i in idx]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).to(device)
    return TextBatch(text.tokens[rows], cu, max(lengths), text.pooled[idx])


def _step(provider, dit, opt, latents, noise, t, text, autocast):
    total = sum(z.numel() for z in latents)
    opt.zero_grad(set_to_none=True)
    with autocast:
        if provider == "packed":
            (flow_error(dit, latents, text, t, noise) / total).backward()
        elif provider == "padded":
            T, H, W = (max(z.shape[d] for z in latents) for d in (1, 2, 3))
            pad = [torch.nn.functional.pad(z, (0, W - z.shape[3], 0, H - z.shape[2], 0, T - z.shape[1])) for z in latents]
            pad_noise = [torch.nn.functional.pad(e, (0, W - e.shape[3], 0, H - e.shape[2], 0, T - e.shape[1]))
                         for e in noise]
            td = t.to(latents[0].device)
            pred = dit([(1 - td[i]) * z + td[i] * e for i, (z, e) in enumerate(zip(pad, pad_noise))], td, text)
            err = sum(((p[:, :z.shape[1], :z.shape[2], :z.shape[3]].float() - (e - z)) ** 2).sum()
                      for p, z, e in zip(pred, latents, noise))
            (err / total).backward()
        else:
            groups: dict = {}
            for i, z in enumerate(latents):
                groups.setdefault(tuple(z.shape), []).append(i)
            for idx in groups.values():
                sub = _sub_text(text, idx, latents[0].device)
                err = flow_error(dit, [latents[i] for i in idx], sub, t[idx], [noise[i] for i in idx])
                (err / total).backward()
    opt.step()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_dit_train(suite, benchmark, provider):
    dit, latents, noise, t, text = _setup(suite.device)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if suite.device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    p = dit.cfg.patch_size
    real = sum((z.shape[1] // p[0]) * (z.shape[2] // p[1]) * (z.shape[3] // p[2]) for z in latents)
    if provider == "padded":
        T, H, W = (max(z.shape[d] for z in latents) for d in (1, 2, 3))
        computed = len(latents) * (T // p[0]) * (H // p[1]) * (W // p[2])
    else:
        computed = real
    row = suite.run("dit_train", "step", provider, f"{len(latents)}-videos-{real}-tokens",
                    lambda: _step(provider, dit, opt, latents, noise, t, text, autocast), 0, torch.float32, benchmark,
                    rounds=3 if suite.device.type == "cpu" and not suite.quick else None,
                    real_tokens=real, computed_tokens=computed, config=f"{dit.cfg.hidden}x{dit.cfg.depth}")
    row.extra["tokens_per_s"] = round(real / (row.median_ms * 1e-3), 1)
    suite.write()
