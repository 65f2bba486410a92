"""Benchmarks of a DiT training step on a mixed-size batch: packed against padded and bucketed
runs of the same model on the same data (sora_model/dit.py).

Providers (one AdamW step each: forward, flow-matching loss, backward, update; the fused AdamW,
as sora-train runs it):
  packed       every latent at its own size in one packed sequence (ours);
  packed_ckpt  the same with gradient checkpointing (each block recomputed in the backward),
               on the 32k-token workload only: what fits an 80 GB GPU there;
  padded       every latent zero-padded to the batch's largest (t, h, w), then one batch of
               equal lengths: the tokens a padding loader computes (attention over padding
               costs what a masked attention does); the loss counts real elements only;
  bucketed     one forward and backward per group of equal sizes (what a bucketing loader
               feeds), gradients summed into one update.
Rows: median ms per step, TFLOP/s of the model's FLOPs on the real tokens (3x
sora_model.dit.forward_flops: the same count for every provider) and, on GPUs with a known
bf16 peak, MFU; extra: real_tokens, computed_tokens, tokens_per_s (real tokens), peak_mb (peak
memory above the model and its AdamW state: activations and gradients).
Workloads:
  mixed-small  latents of 9 sizes from an image to a 4-frame 12x16 clip: a DiT of width 256,
               depth 4 on CPU (9 latents), the "B" size (768 x 12) in bf16 autocast on GPU
               (72 latents, 4024 tokens);
  mixed-32k    GPU only: the "1B" size on five latents of 31,984 tokens (a 13 x 60 x 80 latent,
               720p-like, two shorter clips and two images), issue 6's MFU target.
"""
import pytest
import torch

from benchmarks import harness
from sora_kernels.testing.memory import peak_bytes
from sora_model.diffusion import flow_error
from sora_model.dit import DiT, TextBatch, dit_config, forward_flops

PROVIDERS = ["packed", "packed_ckpt", "padded", "bucketed"]
SIZES = [(4, 12, 16), (1, 8, 8), (3, 6, 10), (2, 12, 6), (4, 6, 16), (1, 10, 10), (2, 8, 8), (1, 8, 8), (3, 6, 10)]
SIZES_32K = [(13, 60, 80), (9, 48, 64), (5, 64, 48), (1, 128, 128), (1, 64, 96)]
TEXT_TOKENS = 3


def _config(workload, device, grad_checkpointing=False):
    if workload == "mixed-32k":
        return dit_config("1B", text_dim=64, grad_checkpointing=grad_checkpointing)
    if device.type == "cuda":
        return dit_config("B", text_dim=64)
    return dit_config("tiny", hidden=256, depth=4, heads=4)


def _setup(device, workload="mixed-small", grad_checkpointing=False):
    cfg = _config(workload, device, grad_checkpointing)
    sizes = SIZES_32K if workload == "mixed-32k" else SIZES * (8 if device.type == "cuda" else 1)
    torch.manual_seed(0)
    dit = DiT(cfg).to(device).train()
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(16, *s, generator=g).to(device) for s in sizes]
    noise = [torch.randn(z.shape, generator=g).to(device) for z in latents]
    t = torch.rand(len(sizes), generator=g)
    return dit, latents, noise, t, random_text(len(sizes), TEXT_TOKENS, 64, g, device)


def random_text(n: int, tokens: int, dim: int, g: torch.Generator, device) -> TextBatch:
    """n captions of `tokens` random embeddings each."""
    return TextBatch(torch.randn(n * tokens, dim, generator=g).to(device),
                     torch.arange(0, n * tokens + 1, tokens, dtype=torch.int32).to(device), tokens,
                     torch.randn(n, dim, generator=g).to(device))


def sub_text(text, idx, device):
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
            pad = [torch.nn.functional.pad(z, (0, W - z.shape[3], 0, H - z.shape[2], 0, T - z.shape[1]))
                   for z in latents]
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
                sub = sub_text(text, idx, latents[0].device)
                err = flow_error(dit, [latents[i] for i in idx], sub, t[idx], [noise[i] for i in idx])
                (err / total).backward()
    opt.step()


@pytest.mark.parametrize("workload", ["mixed-small", "mixed-32k"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_dit_train(suite, benchmark, provider, workload):
    if workload == "mixed-32k" and suite.device.type != "cuda":
        pytest.skip("mixed-32k is a GPU workload (the 1B size)")
    if provider == "packed_ckpt" and workload != "mixed-32k":
        pytest.skip("packed_ckpt runs on mixed-32k only")
    if provider == "padded" and workload == "mixed-32k":
        pytest.skip("padded: every latent padded to (13, 128, 128) is 266k tokens for 32k real ones (8.3x)")
    try:
        dit, latents, noise, t, text = _setup(suite.device, workload, grad_checkpointing=provider == "packed_ckpt")
        opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=True)  # as sora-train (without --fsdp)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if suite.device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        name = "packed" if provider == "packed_ckpt" else provider
        step = lambda: _step(name, dit, opt, latents, noise, t, text, autocast)  # noqa: E731
        step()  # the AdamW state exists from here on: peak_mb is what a step adds
        peak = peak_bytes(step, suite.device)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} ran out of GPU memory at {workload}: {str(e).splitlines()[0]}")
    p = dit.cfg.patch_size
    tokens = [(z.shape[1] // p[0]) * (z.shape[2] // p[1]) * (z.shape[3] // p[2]) for z in latents]
    real = sum(tokens)
    if provider == "padded":
        T, H, W = (max(z.shape[d] for z in latents) for d in (1, 2, 3))
        computed = len(latents) * (T // p[0]) * (H // p[1]) * (W // p[2])
    else:
        computed = real
    flops = 3 * forward_flops(dit.cfg, tokens, [TEXT_TOKENS] * len(tokens))
    row = suite.run("dit_train", "step", provider, f"{workload}-{len(latents)}-videos-{real}-tokens", step, 0,
                    torch.float32, benchmark, flops=flops,
                    rounds=3 if suite.device.type == "cpu" and not suite.quick else None,
                    real_tokens=real, computed_tokens=computed, config=f"{dit.cfg.hidden}x{dit.cfg.depth}",
                    peak_mb=round(peak / 2**20, 1))
    row.extra["tokens_per_s"] = round(real / (row.median_ms * 1e-3), 1)
    peak_tflops = harness.peak_bf16_tflops(suite.device)
    row.extra["mfu"] = None if peak_tflops is None else round(row.tflops / peak_tflops, 4)
    suite.write()
